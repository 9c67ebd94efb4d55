"""``jaxninja bench``: how fast the training step and the ops run, against peers.

Two benchmarks, each measured in one process so that the rows of a table are comparable,
each printing a markdown table and writing its part of ``bench.json``:

``jaxninja bench`` (:func:`run_bench`), one training step:

* for each setting ``HxB`` (hidden units x batch; default ``200x32``, the lecture's, and
  ``1024x256``) and each backend (``custom_vjp``, ``manual``, ``autodiff``): the steady
  state microseconds per step of :func:`jaxninja.train.make_train_chunk` (compile time
  excluded, reported apart), as the median of ``repeats`` timed chunks with the backends
  interleaved round-robin (so a burst of load hits all rows alike), its spread
  ``(max - min) / median`` and the process CPU time per step (robust to other load);
* the machine roof: float32 GFLOP/s of a 2048x2048 ``jnp`` matmul, and each step's FLOP
  count, so each row shows its fraction of peak;
* PyTorch eager baselines when torch is installed (:mod:`jaxninja.bench_torch`): the
  lecture's loop with the Python double loop for ``dC``, the same with ``index_add_``,
  and ``loss.backward()``;
* sweep rows (first setting): model-steps/s when ``M`` = 1, 8, 32 models train in one
  vmapped program (:mod:`jaxninja.sweep`).

``jaxninja bench ops`` (:func:`run_ops_bench`), one op at a time: for each op, size and
dtype, the median time and the compiled temporary memory
(``compiled.memory_analysis().temp_size_in_bytes``) of the jitted gradient of the mean
loss, for our op, its peer (``optax.softmax_cross_entropy_with_integer_labels``;
``flax.linen.BatchNorm``, an optional extra) and autodiff of our plain-``jnp`` reference;
and :func:`jaxninja.ops.linear_cross_entropy` against the unfused
``cross_entropy(x @ w, labels)``.

The two results share one ``bench.json`` (the training rows at the top level, the ops
under ``"ops"``), checked to be writable before any work starts and written atomically.
No number here is asserted anywhere: timings on a shared machine are noisy; compare rows
of one run, never runs of different days.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxninja import data, fileio, ops, sweep, train
from jaxninja.train import BACKENDS, ConfigError, TrainConfig

Log = Callable[[str], None]
DEFAULT_SETTINGS = ((200, 32), (1024, 256))
DEFAULT_MEMBERS = (1, 8, 32)
TOOL = "jaxninja bench"  # what a results file says it is: the only --out a bench replaces


# ----------------------------------------------------------------------- results file


def save_results(out: str | os.PathLike[str], results: dict[str, Any]) -> None:
    """Write ``results`` (JSON) to ``out`` atomically: the old file or the whole new one
    (a write that fails all the same, e.g. on a full disk, is one ``cannot write`` line
    of :func:`jaxninja.fileio.write_atomic`; the tables were printed before)."""
    text = json.dumps({"tool": TOOL, **results}, indent=2, default=float)
    fileio.write_atomic(out, lambda f: f.write(text), "w")


# ------------------------------------------------------------------------ measurement


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, spread ``(max - min) / median`` and count of ``values``."""
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / med if med else float("nan"),
        "n": len(values),
    }


def machine_peak(n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """float32 GFLOP/s of an ``n x n`` jnp matmul (median of ``repeats``)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
    s = summary(rates)
    return {
        "matmul": f"{n}x{n} float32",
        "gflops": s["median"],
        "gflops_max": s["max"],
        "spread": s["spread"],
    }


def machine_info() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "device": str(jax.devices()[0].device_kind),
        "loadavg_start": loadavg(),
    }


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def timed(units: int, fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """Run ``fn(*args)`` to completion: its result, then wall and CPU us per unit."""
    c, t = time.process_time(), time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - t) / units * 1e6, (time.process_time() - c) / units * 1e6


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or not np.isfinite(v) else format(v, spec)


# ------------------------------------------------------------------ training benchmark


def parse_settings(text: str) -> list[tuple[int, int]]:
    """``"200x32,1024x256"`` -> ``[(200, 32), (1024, 256)]`` (hidden units x batch)."""
    out = []
    for part in text.split(","):
        try:
            h, b = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ConfigError(f"bad setting {part!r}: expected HxB, e.g. 200x32") from None
        if h < 1 or b < 2:
            raise ConfigError(f"bad setting {part!r}: need H >= 1 and batch >= 2")
        out.append((h, b))
    if not out:
        raise ConfigError("no settings given")
    return out


def step_flops(cfg: TrainConfig, vocab_size: int) -> float:
    """FLOPs of the six matmuls of one step (forward + two per layer backward)."""
    fan_in = cfg.n_embd * cfg.block_size
    return 3 * 2 * cfg.batch_size * (fan_in * cfg.n_hidden + cfg.n_hidden * vocab_size)


@dataclass
class Workload:
    """What every training row of one run shares: the training split and its vocabulary."""

    X: np.ndarray
    Y: np.ndarray
    vocab_size: int
    Xj: jax.Array = field(init=False)
    Yj: jax.Array = field(init=False)

    def __post_init__(self) -> None:
        self.Xj, self.Yj = jnp.asarray(self.X), jnp.asarray(self.Y)


def _row(cfg: TrainConfig, vocab_size: int, kind: str, name: str, **extra: Any) -> dict:
    return {
        "setting": f"{cfg.n_hidden}x{cfg.batch_size}",
        "n_hidden": cfg.n_hidden,
        "batch_size": cfg.batch_size,
        "kind": kind,
        "row": name,
        "compile_s": None,
        "flops_per_step": step_flops(cfg, vocab_size),
        **extra,
    }


def _finish(row: dict[str, Any], wall: list[float], cpu: list[float]) -> dict[str, Any]:
    row["us_per_step"], row["cpu_us_per_step"] = summary(wall), summary(cpu)
    return row


def time_backends(
    cfg: TrainConfig, backends: Sequence[str], steps: int, repeats: int, w: Workload, log: Log
) -> list[dict[str, Any]]:
    """One row per backend: us per step of a compiled ``steps``-step chunk, the backends
    timed round-robin, ``repeats`` times each."""
    rows, fns = [], []
    for backend in backends:
        bcfg = TrainConfig(**{**cfg.to_dict(), "backend": backend}).validate()
        state = train.init_state(bcfg, w.vocab_size)
        t = time.perf_counter()
        compiled = train.make_train_chunk(bcfg, steps).lower(state, w.Xj, w.Yj).compile()
        compile_s = time.perf_counter() - t
        state, _ = jax.block_until_ready(compiled(state, w.Xj, w.Yj))  # warm-up run
        fns.append([compiled, state])
        rows.append(
            _row(cfg, w.vocab_size, "jax", backend, compile_s=compile_s, steps_per_repeat=steps)
        )
    wall: list[list[float]] = [[] for _ in rows]
    cpu: list[list[float]] = [[] for _ in rows]
    for _ in range(repeats):  # round-robin, so bursts of outside load hit every row
        for i, fs in enumerate(fns):
            (fs[1], _), wt, ct = timed(steps, fs[0], fs[1], w.Xj, w.Yj)
            wall[i].append(wt)
            cpu[i].append(ct)
    for row, row_wall, row_cpu in zip(rows, wall, cpu, strict=True):
        _finish(row, row_wall, row_cpu)
        log(
            f"  {row['setting']:>9s} {row['row']:12s} {row['us_per_step']['median']:9.1f} "
            f"us/step (compile {row['compile_s']:.2f} s)"
        )
    return rows


def torch_baselines() -> Any | None:
    """:mod:`jaxninja.bench_torch`, or ``None`` when torch is not installed."""
    from jaxninja import bench_torch

    return None if bench_torch.torch is None else bench_torch


def time_torch(
    mod: Any, cfg: TrainConfig, steps: int, repeats: int, w: Workload, log: Log
) -> list[dict[str, Any]]:
    """One row per PyTorch baseline (the lecture's loop runs 1/4 of the steps at large
    batches: its Python double loop is that slow)."""
    rows = []
    for name in mod.BASELINES:
        n = max(1, steps // 4) if name == "lecture_loop" and cfg.batch_size > 64 else steps
        kw = {"n_hidden": cfg.n_hidden, "batch_size": cfg.batch_size, "steps": n}
        runs = [mod.run_baseline(name, w.X, w.Y, w.vocab_size, **kw) for _ in range(repeats)]
        extra = {"steps_per_repeat": n, "final_loss": runs[-1]["final_loss"]}
        row = _row(cfg, w.vocab_size, "torch", f"torch {name}", **extra)
        _finish(row, [r["us_per_step"] for r in runs], [r["cpu_us_per_step"] for r in runs])
        log(f"  {row['setting']:>9s} {row['row']:22s} {row['us_per_step']['median']:9.1f} us/step")
        rows.append(row)
    return rows


def time_sweeps(
    cfg: TrainConfig, members: Sequence[int], steps: int, repeats: int, w: Workload, log: Log
) -> list[dict[str, Any]]:
    """One row per ``M``: M models trained in one vmapped program (us per model-step)."""
    rows = []
    for m in members:
        seeds = list(range(cfg.seed, cfg.seed + m))
        states = sweep.init_states(cfg, seeds, w.vocab_size)
        m_seeds, m_lrs = jnp.asarray(seeds, jnp.int32), jnp.full((m,), cfg.lr, jnp.float32)
        args = (m_seeds, m_lrs, w.Xj, w.Yj)
        t = time.perf_counter()
        fn = sweep.make_sweep_chunk(cfg, steps).lower(states, *args).compile()
        compile_s = time.perf_counter() - t
        states, _ = jax.block_until_ready(fn(states, *args))
        wall, cpu = [], []
        for _ in range(repeats):
            (states, _), wt, ct = timed(steps * m, fn, states, *args)
            wall.append(wt)
            cpu.append(ct)
        row = _finish(
            _row(
                cfg,
                w.vocab_size,
                "sweep",
                f"sweep M={m}",
                members=m,
                compile_s=compile_s,
                steps_per_repeat=steps,
            ),
            wall,
            cpu,
        )
        row["model_steps_per_s"] = 1e6 / row["us_per_step"]["median"]
        log(f"  sweep M={m:<3d} {row['model_steps_per_s']:10.0f} model-steps/s")
        rows.append(row)
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    """The rows of a result as a markdown table (``ratio``: row us/step over the
    custom_vjp us/step of the same setting; < 1 is faster than custom_vjp)."""
    m, peak = result["machine"], result["machine"]["peak"]["gflops"]
    base = {
        r["setting"]: r["us_per_step"]["median"] for r in result["rows"] if r["row"] == "custom_vjp"
    }
    torch_version = result["versions"].get("torch")
    lines = [
        f"Machine: {m['cpu_count']} CPUs, float32 matmul peak {peak:.0f} GFLOP/s "
        f"({m['peak']['matmul']}); load average {m['loadavg_start']} at start, "
        f"{m['loadavg_end']} at end. jax {result['versions']['jax']}"
        + (f", torch {torch_version}" if torch_version else "")
        + ".",
        "",
        "| setting | row | us/step (median) | spread | CPU us/step | compile s "
        "| MFLOP/step | % of peak | ratio to custom_vjp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        us, flops = r["us_per_step"]["median"], r["flops_per_step"]
        frac = flops / (us * 1e-6) / (peak * 1e9) * 100 if us else None
        name = r["row"] + (
            f" ({r['model_steps_per_s']:.0f} model-steps/s)" if "members" in r else ""
        )
        lines.append(
            f"| {r['setting']} | {name} | {_fmt(us, '.1f')} | "
            f"{_fmt(r['us_per_step']['spread'] * 100, '.0f')}% | "
            f"{_fmt(r['cpu_us_per_step']['median'], '.1f')} | {_fmt(r['compile_s'], '.2f')} | "
            f"{_fmt(flops / 1e6, '.2f')} | {_fmt(frac, '.1f')} | "
            f"{_fmt(us / base[r['setting']] if r['setting'] in base else None, '.2f')} |"
        )
    return "\n".join(lines)


def _check_bench_options(backends: Sequence[str], repeats: int, members: Sequence[int]) -> None:
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    for b in backends:
        if b not in BACKENDS:
            raise ConfigError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if any(m < 1 for m in members):
        raise ConfigError(f"sweep sizes must be >= 1, got {list(members)}")


def run_bench(
    settings: Sequence[tuple[int, int]] = DEFAULT_SETTINGS,
    *,
    backends: Sequence[str] = tuple(BACKENDS),
    repeats: int = 5,
    steps: int | None = None,
    torch_steps: int | None = None,
    members: Sequence[int] = DEFAULT_MEMBERS,
    sweep_steps: int | None = None,
    use_torch: bool = True,
    quick: bool = False,
    data_path: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = "bench.json",
    log: Log = print,
) -> dict[str, Any]:
    """Run the training benchmark and return (and write to ``out``) its result dict.

    ``steps`` (JAX steps per timed chunk) defaults to about 0.2 s of work per chunk:
    5,000 for the default setting, scaled down with ``H * B`` for larger ones; ``quick``
    divides the defaults by 10 and uses 2 repeats (a smoke test, not a measurement).
    ``out`` is checked (:func:`jaxninja.fileio.check_results_file`) before any work; the
    ``"ops"`` part it holds is kept.
    """
    _check_bench_options(backends, repeats, members)
    previous = fileio.check_results_file(out, TOOL) if out else {}
    repeats, scale = (min(repeats, 2), 10) if quick else (repeats, 1)
    splits = data.load_splits(data_path, block_size=3)
    X, Y = splits.data["train"]
    w = Workload(X, Y, splits.vocab.size)
    machine = machine_info()
    log(f"machine: {machine['cpu_count']} CPUs, load average {machine['loadavg_start']}")
    machine["peak"] = machine_peak(repeats=3 if quick else 5)
    log(f"  float32 {machine['peak']['matmul']} matmul: {machine['peak']['gflops']:.0f} GFLOP/s")
    torch_mod = torch_baselines() if use_torch else None
    if use_torch and torch_mod is None:
        log("  (torch not installed: no PyTorch rows; pip install 'jaxninja[bench]')")
    rows: list[dict[str, Any]] = []
    for H, B in settings:
        cfg = TrainConfig(n_hidden=H, batch_size=B).validate()
        work = max(1.0, H * B / (200 * 32))
        n = steps or max(20, int(5000 / work**0.8) // scale)
        log(f"setting H={H}, batch {B}: {n} steps x {repeats} repeats per backend")
        rows += time_backends(cfg, backends, n, repeats, w, log)
        if torch_mod is not None:
            tn = torch_steps or max(10, int(1000 / work**0.8) // scale)
            rows += time_torch(torch_mod, cfg, tn, repeats, w, log)
    if members:
        cfg = TrainConfig(n_hidden=settings[0][0], batch_size=settings[0][1]).validate()
        sn = sweep_steps or max(20, 2000 // scale)
        log(f"sweep (H={cfg.n_hidden}, batch {cfg.batch_size}): {sn} steps x {repeats} repeats")
        rows += time_sweeps(cfg, members, sn, repeats, w, log)
    machine["loadavg_end"] = loadavg()
    result: dict[str, Any] = {
        "machine": machine,
        "versions": {
            "python": sys.version.split()[0],
            "jax": jax.__version__,
            "torch": torch_mod.version() if torch_mod else None,
        },
        "options": {
            "settings": [f"{h}x{b}" for h, b in settings],
            "repeats": repeats,
            "quick": quick,
            "backends": list(backends),
            "members": list(members),
            "vocab_size": w.vocab_size,
        },
        "rows": rows,
    }
    result["summary"] = summary_ratios(rows)
    result["table"] = markdown_table(result)
    log("\n" + result["table"] + "\n")
    for k, v in result["summary"].items():
        log(f"{k}: {v:.2f}")
    if out:
        save_results(out, {**result, **({"ops": previous["ops"]} if "ops" in previous else {})})
        log(f"\nwrote {out}")
    return result


def summary_ratios(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Headline ratios of each setting: our backends against autodiff and PyTorch."""
    us = {(r["setting"], r["row"]): r["us_per_step"]["median"] for r in rows}
    out: dict[str, float] = {}
    for setting in {r["setting"] for r in rows}:
        base, auto = us.get((setting, "custom_vjp")), us.get((setting, "autodiff"))
        if base is None:
            continue
        if auto:
            out[f"{setting} custom_vjp/autodiff"] = base / auto
            if (setting, "manual") in us:
                out[f"{setting} manual/autodiff"] = us[(setting, "manual")] / auto
        for name, label in (
            ("torch autograd", "loss.backward()"),
            ("torch lecture_loop", "lecture loop"),
            ("torch vectorised_dc", "vectorised dC"),
        ):
            if (setting, name) in us:
                out[f"{setting} speedup of custom_vjp over {label}"] = us[(setting, name)] / base
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------- ops benchmark

Loss = Callable[..., jax.Array]


@dataclass(frozen=True)
class OpCase:
    """One row of an op's table: one size and dtype, and the implementations compared
    on it. ``impls[0]`` is ours; ratios are ours over ``impls[1]`` (time) and over the
    smallest of the others (memory). ``missing`` names implementations that cannot run
    here and why (e.g. flax not installed)."""

    op: str
    size: dict[str, int]
    dtype: str
    make_args: Callable[[], tuple[Any, ...]]
    argnums: tuple[int, ...]
    impls: dict[str, Loss]
    missing: dict[str, str] = field(default_factory=dict)


def _normal(key: int, shape: tuple[int, ...], dtype: Any, scale: float = 1.0) -> jax.Array:
    return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(dtype)


def _labels(key: int, n: int, v: int) -> jax.Array:
    return jax.random.randint(jax.random.key(key), (n,), 0, v, jnp.int32)


def _mean(losses: jax.Array) -> jax.Array:
    return jnp.mean(losses.astype(jnp.float32))


def cross_entropy_case(n: int, v: int, dtype: str) -> OpCase:
    """Grad w.r.t. the logits ``(n, v)`` of the mean cross-entropy."""
    return OpCase(
        "cross_entropy",
        {"N": n, "V": v},
        dtype,
        lambda: (_normal(0, (n, v), dtype), _labels(1, n, v)),
        (0,),
        {
            "jaxninja": lambda x, y: _mean(ops.cross_entropy(x, y)),
            "optax": lambda x, y: _mean(optax.softmax_cross_entropy_with_integer_labels(x, y)),
            "reference": lambda x, y: _mean(ops.cross_entropy_reference(x, y)),
        },
    )


def _flax_batch_norm() -> Loss | str:
    """``flax.linen.BatchNorm`` (training mode, biased variance as flax) as a loss of
    ``(x, gain, bias, cotangent)``, or why it cannot run."""
    if importlib.util.find_spec("flax") is None:
        return "flax not installed (pip install flax)"
    from flax import linen as nn

    module = nn.BatchNorm(use_running_average=False, epsilon=1e-5)

    def loss(x: jax.Array, gain: jax.Array, bias: jax.Array, cot: jax.Array) -> jax.Array:
        h = x.shape[-1]
        stats = {"mean": jnp.zeros(h), "var": jnp.ones(h)}
        variables = {"params": {"scale": gain, "bias": bias}, "batch_stats": stats}
        y, _ = module.apply(variables, x, mutable=["batch_stats"])
        return _mean(y * cot)

    return loss


def batch_norm_case(n: int, h: int, dtype: str) -> OpCase:
    """Grad w.r.t. ``x (n, h)``, gain and bias of ``mean(batch_norm(x) * c)`` for a fixed
    random ``c`` (so the backward pass has a non-trivial cotangent), biased variance."""
    impls: dict[str, Loss] = {
        "jaxninja": lambda x, g, b, c: _mean(ops.batch_norm(x, g, b, unbiased=False) * c)
    }
    peer, missing = _flax_batch_norm(), {}
    if isinstance(peer, str):
        missing["flax"] = peer
    else:
        impls["flax"] = peer
    impls["reference"] = lambda x, g, b, c: _mean(
        ops.batch_norm_reference(x, g, b, unbiased=False) * c
    )

    def args() -> tuple[jax.Array, ...]:
        x, c = _normal(0, (n, h), dtype, 2.0), _normal(3, (n, h), dtype)
        return x, 1 + _normal(1, (h,), dtype, 0.1), _normal(2, (h,), dtype, 0.1), c

    return OpCase("batch_norm", {"N": n, "H": h}, dtype, args, (0, 1, 2), impls, missing)


def linear_cross_entropy_case(n: int, d: int, v: int, dtype: str) -> OpCase:
    """Grad w.r.t. ``x (n, d)`` and ``w (d, v)`` of the mean of the fused op against the
    unfused ``cross_entropy(x @ w, labels)`` (which holds the ``(n, v)`` logits)."""
    impls: dict[str, Loss] = {
        "linear_cross_entropy": lambda x, w, y: _mean(ops.linear_cross_entropy(x, w, y)),
        "unfused": lambda x, w, y: _mean(ops.cross_entropy(x @ w, y)),
    }

    def args() -> tuple[jax.Array, ...]:
        return _normal(0, (n, d), dtype), _normal(1, (d, v), dtype, d**-0.5), _labels(2, n, v)

    return OpCase("linear_cross_entropy", {"N": n, "D": d, "V": v}, dtype, args, (0, 1), impls)


def ops_cases(quick: bool = False) -> list[OpCase]:
    """The sizes users meet (N in the thousands, V from 27 to 65536, float32 and
    bfloat16), chosen so that the default run takes about 3 minutes on 2 CPU cores;
    ``quick``: tiny sizes, a smoke test."""
    if quick:
        return [
            cross_entropy_case(64, 27, "float32"),
            cross_entropy_case(64, 300, "bfloat16"),
            batch_norm_case(64, 32, "float32"),
            linear_cross_entropy_case(64, 16, 300, "float32"),
        ]
    ce = [(4096, 27), (4096, 1024), (4096, 32768), (2048, 65536)]
    return (
        [cross_entropy_case(n, v, dt) for n, v in ce for dt in ("float32", "bfloat16")]
        + [
            batch_norm_case(n, h, dt)
            for n, h in ((32, 200), (8192, 1024))
            for dt in ("float32", "bfloat16")
        ]
        + [
            linear_cross_entropy_case(4096, d, v, "float32")
            for d, v in ((256, 32768), (512, 65536))
        ]
    )


def _compile(loss: Loss, argnums: tuple[int, ...], args: tuple[Any, ...]) -> tuple[Any, dict]:
    """The compiled ``grad(loss)`` and its compile time and temporary memory."""
    t = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=argnums)).lower(*args).compile()
    stats = {"compile_s": time.perf_counter() - t, "temp_bytes": None}
    memory = compiled.memory_analysis()
    if memory is not None:
        stats["temp_bytes"] = int(memory.temp_size_in_bytes)
    return compiled, stats


def _calls_per_round(fn: Callable[..., Any], args: tuple[Any, ...], target_s: float) -> int:
    """Warm ``fn`` up (first-touch of its buffers) and pick how many back-to-back calls
    make one timed round of about ``target_s`` seconds (one call for the slow ones)."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if time.perf_counter() - t > target_s:
        return 1
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return max(1, min(1000, int(target_s / max(time.perf_counter() - t, 1e-7))))


def time_interleaved(
    fns: Sequence[Callable[..., Any]],
    args: tuple[Any, ...],
    repeats: int,
    budget_s: float = 20.0,
    target_s: float = 0.05,
) -> list[dict[str, float]]:
    """Milliseconds per call of each of ``fns``: ``repeats`` rounds, each timing every
    function once in turn, starting from a different one each round (so a burst of outside
    load, or the one before, hits all alike); after 3 rounds,
    stop once ``budget_s`` is spent (the slowest sizes). A summary per function."""
    calls = [_calls_per_round(fn, args, target_s) for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for r in range(repeats):
        # each round starts with another function: none always follows the same one
        # (what ran before, e.g. a 96 MiB temporary freed, costs the next call page faults)
        for j in range(len(fns)):
            i = (r + j) % len(fns)
            fn, k = fns[i], calls[i]
            t = time.perf_counter()
            for _ in range(k):
                out = fn(*args)
            jax.block_until_ready(out)
            times[i].append((time.perf_counter() - t) / k * 1e3)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return [summary(ts) for ts in times]


def measure_case(case: OpCase, repeats: int) -> dict[str, Any]:
    """Time and memory of every implementation of ``case``, measured side by side."""
    args = case.make_args()
    compiled = {name: _compile(loss, case.argnums, args) for name, loss in case.impls.items()}
    timings = time_interleaved([c for c, _ in compiled.values()], args, repeats)
    impls = {
        name: {**stats, "ms": ms}
        for (name, (_, stats)), ms in zip(compiled.items(), timings, strict=True)
    }
    row = {
        "op": case.op,
        "size": case.size,
        "dtype": case.dtype,
        "impls": impls,
        "missing": case.missing,
    }
    row["ratios"] = case_ratios(row)
    return row


def case_ratios(row: dict[str, Any]) -> dict[str, float]:
    """Ours (the first implementation) over the peer (the second) in time, and over the
    smallest of all the others in temporary memory."""
    names = list(row["impls"])
    if len(names) < 2:
        return {}
    ours, rest = row["impls"][names[0]], [row["impls"][n] for n in names[1:]]
    out = {f"time {names[0]}/{names[1]}": ours["ms"]["median"] / rest[0]["ms"]["median"]}
    mems = [r["temp_bytes"] for r in rest]
    if ours["temp_bytes"] is not None and None not in mems:
        label = names[1] if len(names) == 2 else f"min({', '.join(names[1:])})"
        low = min(mems)  # None: ours needs some where the best other needs none
        out[f"temp {names[0]}/{label}"] = ours["temp_bytes"] / low if low else None
        if not (low or ours["temp_bytes"]):
            out[f"temp {names[0]}/{label}"] = 1.0
    return out


OP_LOSSES = {
    "cross_entropy": "grad w.r.t. the logits of `mean(cross_entropy(logits, labels))`",
    "batch_norm": "grad w.r.t. x, gain and bias of `mean(batch_norm(x, gain, bias, "
    "unbiased=False) * c)`, c a fixed random cotangent",
    "linear_cross_entropy": "grad w.r.t. x and w of `mean(linear_cross_entropy(x, w, labels))` "
    "against the unfused `mean(cross_entropy(x @ w, labels))`",
}


def _ms(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _size(size: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in size.items())


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    mib = n / 2**20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.1f}" if mib >= 1 else f"{mib:.2f}"


def ops_table(rows: Sequence[dict[str, Any]], op: str) -> str:
    """One op's rows as a markdown table: ms (median) and temp MiB per implementation,
    then the ratios (ours over the peer; < 1 is better for ours)."""
    rows = [r for r in rows if r["op"] == op]
    impls = list(dict.fromkeys(n for r in rows for n in r["impls"]))
    ratios = list(dict.fromkeys(k for r in rows for k in r["ratios"]))
    size = list(rows[0]["size"])
    head = [*size, "dtype", *(f"{n} ms" for n in impls), *(f"{n} temp MiB" for n in impls), *ratios]
    lines = [
        f"`{op}`: {OP_LOSSES[op]}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---:|" * len(size) + "---|" + "---:|" * (len(head) - len(size) - 1),
    ]
    for r in rows:
        cells = [str(r["size"][k]) for k in size] + [r["dtype"]]
        cells += [_ms(r["impls"][n]["ms"]["median"]) if n in r["impls"] else "-" for n in impls]
        cells += [_mib(r["impls"][n]["temp_bytes"]) if n in r["impls"] else "-" for n in impls]
        cells += [_fmt(r["ratios"].get(k), ".2f") for k in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    notes = {f"{k}: {v}" for r in rows for k, v in r["missing"].items()}
    return "\n".join(lines + ([""] if notes else []) + [f"({n})" for n in sorted(notes)])


def ops_markdown(result: dict[str, Any]) -> str:
    """The header line (machine, versions, method) and one table per op."""
    m, v = result["machine"], result["versions"]
    head = (
        f"Machine: {m['cpu_count']} CPUs ({m['device']}), load average {m['loadavg_start']} "
        f"at start, {m['loadavg_end']} at end; jax {v['jax']}, optax {v['optax']}, "
        f"flax {v['flax'] or 'not installed'}. Time: median ms per call of the jitted "
        f"gradient ({result['options']['repeats']} interleaved rounds at most); temp: "
        f"`compiled.memory_analysis().temp_size_in_bytes`."
    )
    ops_seen = list(dict.fromkeys(r["op"] for r in result["rows"]))
    return "\n\n".join([head, *(ops_table(result["rows"], op) for op in ops_seen)])


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    return str(getattr(importlib.import_module(module), "__version__", "?"))


def run_ops_bench(
    *,
    quick: bool = False,
    repeats: int = 5,
    out: str | os.PathLike[str] | None = "bench.json",
    log: Log = print,
) -> dict[str, Any]:
    """``jaxninja bench ops``: measure every case of :func:`ops_cases`, print the
    markdown tables and write the result under ``"ops"`` in ``out`` (checked before any
    work; the training rows already there are kept). ``quick``: tiny sizes, 2 rounds."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    previous = fileio.check_results_file(out, TOOL) if out else {}
    repeats = min(repeats, 2) if quick else repeats
    machine = machine_info()
    log(f"machine: {machine['cpu_count']} CPUs, load average {machine['loadavg_start']}")
    rows = []
    for case in ops_cases(quick):
        row = measure_case(case, repeats)
        log(
            f"  {case.op} {_size(case.size)} {case.dtype}: "
            + ", ".join(
                f"{n} {_ms(s['ms']['median'])} ms {_mib(s['temp_bytes'])} MiB"
                for n, s in row["impls"].items()
            )
        )
        rows.append(row)
    machine["loadavg_end"] = loadavg()
    result: dict[str, Any] = {
        "machine": machine,
        "versions": {
            "python": sys.version.split()[0],
            "jax": jax.__version__,
            "optax": _version("optax"),
            "flax": _version("flax"),
        },
        "options": {"quick": quick, "repeats": repeats},
        "rows": rows,
    }
    result["table"] = ops_markdown(result)
    log("\n" + result["table"])
    if out:
        kept = {k: v for k, v in previous.items() if k not in ("tool", "ops")}
        save_results(out, {**kept, "ops": result})
        log(f"\nwrote {out}")
    return result
