"""``jaxninja bench``: how fast the training step and the ops run, against peers.

:func:`run_bench`: the training step per setting ``HxB`` (hidden x batch) and backend, the
PyTorch baselines of :mod:`jaxninja.bench_torch` and vmapped sweeps; :func:`run_ops_bench`
(``bench --ops``): time and compiled temporary memory of each op's jitted gradient against
its peers. Rows of a table are timed in interleaved rounds of one process (compare rows of
one run, never runs of different days); both write one ``bench.json``, checked before any
work. The README's "Speed" section has the method and the figures.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxninja import data, fileio, ops, sweep, train
from jaxninja.train import BACKENDS, ConfigError, TrainConfig

Log = Callable[[str], None]
Timer = Callable[[], tuple[float, ...]]  # one timed run: its figures (e.g. wall, CPU)
Entry = tuple[dict[str, Any], Timer]  # a row of a table and the timer of its figures
DEFAULT_SETTINGS = ((200, 32), (1024, 256))
DEFAULT_MEMBERS = (1, 8, 32)
TOOL = "jaxninja bench"  # what a results file says it is: the only --out a bench replaces


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, spread ``(max - min) / median`` and count of ``values``.

    >>> summary([1.0, 2.0, 4.0])
    {'median': 2.0, 'min': 1.0, 'max': 4.0, 'spread': 1.5, 'n': 3}
    """
    med, lo, hi = statistics.median(values), min(values), max(values)
    spread = (hi - lo) / med if med else float("nan")
    return {"median": med, "min": lo, "max": hi, "spread": spread, "n": len(values)}


def rounds(timers: Sequence[Timer], repeats: int, budget_s: float = math.inf) -> list[list[dict]]:
    """Per timer, a :func:`summary` of each figure it returns over ``repeats`` rounds (round
    ``r`` starts at timer ``r``: no order favours one; after 3, stop past ``budget_s``)."""
    values: list[list[tuple[float, ...]]] = [[] for _ in timers]
    start = time.perf_counter()
    for r in range(repeats):
        for j in range(len(timers)):
            values[(r + j) % len(timers)].append(timers[(r + j) % len(timers)]())
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return [[summary(column) for column in zip(*v, strict=True)] for v in values]


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """``jitted`` lowered and compiled for ``args``, and the seconds that took."""
    t = time.perf_counter()
    return jitted.lower(*args).compile(), time.perf_counter() - t


def call_timer(fn: Callable[..., Any], args: tuple[Any, ...], target_s: float = 0.05) -> Timer:
    """Warm ``fn`` up (first touch of its buffers): a timer of ms per call, over as many
    back-to-back calls as make about ``target_s`` seconds (one for the slow ones)."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    k = 1
    if time.perf_counter() - t <= target_s:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        k = max(1, min(1000, int(target_s / max(time.perf_counter() - t, 1e-7))))

    def run() -> tuple[float]:
        t = time.perf_counter()
        for _ in range(k):  # only the last output is kept alive, as in a loop of the user's
            out = fn(*args)
        jax.block_until_ready(out)
        return ((time.perf_counter() - t) / k * 1e3,)

    return run


def machine_peak(n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """float32 GFLOP/s of an ``n x n`` jnp matmul (from the median and min time)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    ((ms,),) = rounds([call_timer(jax.jit(jnp.matmul), (a, a), 0.0)], repeats)
    gflops = {k: 2 * n**3 / ms[v] / 1e6 for k, v in (("gflops", "median"), ("gflops_max", "min"))}
    return {"matmul": f"{n}x{n} float32", **gflops, "spread": ms["spread"]}


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def start_run(repeats: int, out: str | os.PathLike[str] | None, log: Log) -> tuple[dict, dict]:
    """Check ``repeats`` and ``out`` before any work: the results ``out`` holds, the machine."""
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    previous = fileio.check_results_file(out, TOOL) if out else {}
    machine: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform()}
    machine |= {"processor": platform.processor(), "device": str(jax.devices()[0].device_kind)}
    machine["loadavg_start"] = loadavg()
    log(f"machine: {machine['cpu_count']} CPUs, load average {machine['loadavg_start']}")
    return previous, machine


def end_run(machine: dict, options: dict, rows: list, **versions: str | None) -> dict[str, Any]:
    """The result of a run: machine (its load average now), versions, options, rows."""
    machine["loadavg_end"] = loadavg()
    versions = {"python": sys.version.split()[0], "jax": jax.__version__, **versions}
    return {"machine": machine, "versions": versions, "options": options, "rows": rows}


def save_results(out: str | os.PathLike[str] | None, results: dict, log: Log = print) -> None:
    """Write ``results`` (JSON) to ``out`` atomically, if given (after the tables)."""
    if out:
        text = json.dumps({"tool": TOOL, **results}, indent=2, default=float)
        fileio.write_atomic(out, lambda f: f.write(text), "w")
        log(f"\nwrote {out}")


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    return str(getattr(importlib.import_module(module), "__version__", "?"))


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or not np.isfinite(v) else format(v, spec)


def md_table(head: Sequence[str], align: str, rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table; ``align``: ``l`` or ``r`` for each column."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [head, *rows]]
    return [lines[0], "|" + "".join("---|" if a == "l" else "---:|" for a in align), *lines[1:]]


def parse_settings(text: str) -> list[tuple[int, int]]:
    """``"200x32,1024x256"`` -> ``[(200, 32), (1024, 256)]`` (hidden units x batch).

    >>> parse_settings("200x32, 1024X256")
    [(200, 32), (1024, 256)]
    """
    out = []
    for part in text.split(","):
        try:
            h, b = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ConfigError(f"bad setting {part!r}: expected HxB, e.g. 200x32") from None
        if h < 1 or b < 2:
            raise ConfigError(f"bad setting {part!r}: need H >= 1 and batch >= 2")
        out.append((h, b))
    return out


def step_flops(cfg: TrainConfig, vocab_size: int) -> float:
    """FLOPs of the six matmuls of one step (forward + two per layer backward)."""
    fan_in = cfg.n_embd * cfg.block_size
    return 3 * 2 * cfg.batch_size * (fan_in * cfg.n_hidden + cfg.n_hidden * vocab_size)


class Workload(NamedTuple):
    """The training split and its vocabulary size."""

    X: jax.Array
    Y: jax.Array
    vocab_size: int


def _row(cfg: TrainConfig, w: Workload, kind: str, name: str, **extra: Any) -> dict[str, Any]:
    setting = {"setting": f"{cfg.n_hidden}x{cfg.batch_size}", "n_hidden": cfg.n_hidden}
    flops = step_flops(cfg, w.vocab_size)
    row = {"batch_size": cfg.batch_size, "kind": kind, "row": name, "compile_s": None}
    return {**setting, **row, "flops_per_step": flops, **extra}


def chunk_entry(
    cfg: TrainConfig, w: Workload, name: str, steps: int, jitted: Any, *args: Any, m: int = 0
) -> Entry:
    """The row of a compiled, warmed-up chunk ``jitted(state, *rest)`` of ``steps`` steps of
    ``m`` models (0: one), and its timer: wall and CPU us per (model-)step."""
    fn, compile_s = compile_timed(jitted, *args)
    state, rest = jax.block_until_ready(fn(*args))[0], args[1:]
    units = steps * max(m, 1)

    def run() -> tuple[float, float]:
        nonlocal state
        c, t = time.process_time(), time.perf_counter()
        state = jax.block_until_ready(fn(state, *rest))[0]
        return (time.perf_counter() - t) / units * 1e6, (time.process_time() - c) / units * 1e6

    extra = {"compile_s": compile_s, "steps_per_repeat": steps} | ({"members": m} if m else {})
    return _row(cfg, w, "sweep" if m else "jax", name, **extra), run


def backend_entries(
    cfg: TrainConfig, backends: Sequence[str], steps: int, w: Workload
) -> list[Entry]:
    """One entry per backend: a ``steps``-step chunk of :func:`train.make_train_chunk`."""
    out = []
    for backend in backends:
        b = TrainConfig(**{**cfg.to_dict(), "backend": backend}).validate()
        chunk, state = train.make_train_chunk(b, steps), train.init_state(b, w.vocab_size)
        out.append(chunk_entry(b, w, backend, steps, chunk, state, w.X, w.Y))
    return out


def sweep_entries(cfg: TrainConfig, members: Sequence[int], steps: int, w: Workload) -> list[Entry]:
    """One entry per ``M``: M models trained in one vmapped program (per model-step)."""
    out = []
    for m in members:
        seeds = list(range(cfg.seed, cfg.seed + m))
        states, chunk = sweep.init_states(cfg, seeds, w.vocab_size), sweep.make_sweep_chunk
        rest = (jnp.asarray(seeds, jnp.int32), jnp.full((m,), cfg.lr, jnp.float32), w.X, w.Y)
        out.append(
            chunk_entry(cfg, w, f"sweep M={m}", steps, chunk(cfg, steps), states, *rest, m=m)
        )
    return out


def torch_entries(mod: Any, cfg: TrainConfig, steps: int, w: Workload) -> list[Entry]:
    """One entry per PyTorch baseline."""

    def entry(name: str) -> Entry:
        # the lecture's Python double loop is that slow at large batches
        n = max(1, steps // 4) if name == "lecture_loop" and cfg.batch_size > 64 else steps
        row = _row(cfg, w, "torch", f"torch {name}", steps_per_repeat=n)

        def run() -> tuple[float, float]:
            r = mod.run_baseline(name, w.X, w.Y, w.vocab_size, cfg.n_hidden, cfg.batch_size, n)
            row["final_loss"] = r["final_loss"]
            return r["us_per_step"], r["cpu_us_per_step"]

        return row, run

    return [entry(name) for name in mod.BASELINES]


def time_entries(entries: Sequence[Entry], repeats: int, log: Log) -> list[dict[str, Any]]:
    """The entries' rows, with their timings from interleaved rounds."""
    rows = [row for row, _ in entries]
    for row, (wall, cpu) in zip(rows, rounds([t for _, t in entries], repeats), strict=True):
        row["us_per_step"], row["cpu_us_per_step"] = wall, cpu
        if "members" in row:
            row["model_steps_per_s"] = 1e6 / wall["median"]
        log(f"  {row['setting']:>9s} {row['row']:22s} {wall['median']:9.1f} us/step")
    return rows


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as a markdown table; ratio: over custom_vjp of the same setting."""
    m, v, peak = result["machine"], result["versions"], result["machine"]["peak"]["gflops"]
    rows = result["rows"]
    base = {r["setting"]: r["us_per_step"]["median"] for r in rows if r["row"] == "custom_vjp"}
    table = []
    for r in rows:
        us, flops, setting = r["us_per_step"]["median"], r["flops_per_step"], r["setting"]
        steps_per_s = f" ({r['model_steps_per_s']:.0f} model-steps/s)" if "members" in r else ""
        frac = flops / (us * 1e-6) / (peak * 1e9) * 100 if us else None
        table.append(
            [setting, r["row"] + steps_per_s, _fmt(us, ".1f")]
            + [_fmt(r["us_per_step"]["spread"] * 100, ".0f") + "%"]
            + [_fmt(r["cpu_us_per_step"]["median"], ".1f"), _fmt(r["compile_s"], ".2f")]
            + [_fmt(flops / 1e6, ".2f"), _fmt(frac, ".1f")]
            + [_fmt(us / base[setting] if setting in base else None, ".2f")]
        )
    head = "setting|row|us/step (median)|spread|CPU us/step|compile s|MFLOP/step|% of peak"
    torch = f", torch {v['torch']}" if v.get("torch") else ""
    title = (
        f"Machine: {m['cpu_count']} CPUs, float32 matmul peak {peak:.0f} GFLOP/s "
        f"({m['peak']['matmul']}); load average {m['loadavg_start']} at start, "
        f"{m['loadavg_end']} at end. jax {v['jax']}{torch}."
    )
    cols = [*head.split("|"), "ratio to custom_vjp"]
    return "\n".join([title, "", *md_table(cols, "ll" + "r" * 7, table)])


TORCH_LABELS = {"autograd": "loss.backward()", "lecture_loop": "lecture loop"}
TORCH_LABELS["vectorised_dc"] = "vectorised dC"


def summary_ratios(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Headline ratios of each setting: our backends against autodiff and PyTorch."""
    us = {(r["setting"], r["row"]): r["us_per_step"]["median"] for r in rows}
    out: dict[str, float] = {}
    for setting in {r["setting"] for r in rows}:
        base, auto = us.get((setting, "custom_vjp")), us.get((setting, "autodiff"))
        if base is None:
            continue
        for name in ("custom_vjp", "manual"):
            if auto and (setting, name) in us:
                out[f"{setting} {name}/autodiff"] = us[(setting, name)] / auto
        for name, label in TORCH_LABELS.items():
            if t := us.get((setting, f"torch {name}")):
                out[f"{setting} speedup of custom_vjp over {label}"] = t / base
    return dict(sorted(out.items()))


def _check_options(settings: Sequence, backends: Sequence[str], members: Sequence[int]) -> None:
    if not settings:
        raise ConfigError("no settings given")
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
    """Run the training benchmark and return (and write to ``out``, keeping its ``"ops"``)
    its result. ``steps`` (JAX steps per timed chunk) defaults to about 0.2 s of work per
    chunk: 5,000 for the default setting, fewer as ``H * B`` grows; ``quick`` divides the
    defaults by 10 and uses 2 repeats (a smoke test, not a measurement)."""
    _check_options(settings, backends, members)
    previous, machine = start_run(repeats, out, log)
    repeats, scale = (min(repeats, 2), 10) if quick else (repeats, 1)
    splits = data.load_splits(data_path, block_size=3)
    X, Y = (jnp.asarray(a) for a in splits.data["train"])
    w = Workload(X, Y, splits.vocab.size)
    machine["peak"] = peak = machine_peak(repeats=3 if quick else 5)
    log(f"  float32 {peak['matmul']} matmul: {peak['gflops']:.0f} GFLOP/s")
    from jaxninja import bench_torch  # imports torch when installed: only here

    torch_mod = bench_torch if use_torch and bench_torch.torch is not None else None
    if use_torch and torch_mod is None:
        log("  (torch not installed: no PyTorch rows; pip install 'jaxninja[bench]')")
    rows: list[dict[str, Any]] = []
    for H, B in settings:
        cfg = TrainConfig(n_hidden=H, batch_size=B).validate()
        work = max(1.0, H * B / (200 * 32))
        n = steps or max(20, int(5000 / work**0.8) // scale)
        log(f"setting H={H}, batch {B}: {n} steps x {repeats} repeats per backend")
        rows += time_entries(backend_entries(cfg, backends, n, w), repeats, log)
        if torch_mod is not None:
            tn = torch_steps or max(10, int(1000 / work**0.8) // scale)
            rows += time_entries(torch_entries(torch_mod, cfg, tn, w), repeats, log)
    if members:
        cfg = TrainConfig(n_hidden=settings[0][0], batch_size=settings[0][1]).validate()
        sn = sweep_steps or max(20, 2000 // scale)
        log(f"sweep (H={cfg.n_hidden}, batch {cfg.batch_size}): {sn} steps x {repeats} repeats")
        rows += time_entries(sweep_entries(cfg, members, sn, w), repeats, log)
    options = {"settings": [f"{h}x{b}" for h, b in settings], "repeats": repeats, "quick": quick}
    options |= {"backends": list(backends), "members": list(members), "vocab_size": w.vocab_size}
    result = end_run(machine, options, rows, torch=_version("torch") if torch_mod else None)
    result["summary"] = summary_ratios(rows)
    result["table"] = markdown_table(result)
    log("\n" + result["table"] + "\n")
    log("\n".join(f"{k}: {v:.2f}" for k, v in result["summary"].items()))
    save_results(out, {**result, **({"ops": previous["ops"]} if "ops" in previous else {})}, log)
    return result


# ----------------------------------------------------------------------- ops benchmark

Loss = Callable[..., jax.Array]


class OpCase(NamedTuple):
    """One row of an op's table: a size, a dtype, the losses compared (ours first) and
    ``missing``: those that cannot run here, and why."""

    op: str
    size: dict[str, int]
    dtype: str
    make_args: Callable[[], tuple[Any, ...]]
    argnums: tuple[int, ...]
    impls: dict[str, Loss]
    missing: dict[str, str] = {}  # never mutated


def _normal(key: int, shape: tuple[int, ...], dtype: Any, scale: float = 1.0) -> jax.Array:
    return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(dtype)


def _labels(key: int, n: int, v: int) -> jax.Array:
    return jax.random.randint(jax.random.key(key), (n,), 0, v, jnp.int32)


def _mean(losses: jax.Array) -> jax.Array:
    return jnp.mean(losses.astype(jnp.float32))


def cross_entropy_case(n: int, v: int, dtype: str) -> OpCase:
    """Grad w.r.t. the logits ``(n, v)`` of the mean cross-entropy."""
    impls: dict[str, Loss] = {
        "jaxninja": lambda x, y: _mean(ops.cross_entropy(x, y)),
        "optax": lambda x, y: _mean(optax.softmax_cross_entropy_with_integer_labels(x, y)),
        "reference": lambda x, y: _mean(ops.cross_entropy_reference(x, y)),
    }

    def make() -> tuple[jax.Array, ...]:
        return _normal(0, (n, v), dtype), _labels(1, n, v)

    return OpCase("cross_entropy", {"N": n, "V": v}, dtype, make, (0,), impls)


def _flax_batch_norm() -> Loss | str:
    """``flax.linen.BatchNorm`` (training mode) as a loss of ``(x, g, b, c)``, or why not."""
    if importlib.util.find_spec("flax") is None:
        return "flax not installed (pip install flax)"
    from flax import linen as nn

    module = nn.BatchNorm(use_running_average=False, epsilon=1e-5)

    def loss(x: jax.Array, gain: jax.Array, bias: jax.Array, cot: jax.Array) -> jax.Array:
        stats = {"mean": jnp.zeros(x.shape[-1]), "var": jnp.ones(x.shape[-1])}
        variables = {"params": {"scale": gain, "bias": bias}, "batch_stats": stats}
        return _mean(module.apply(variables, x, mutable=["batch_stats"])[0] * cot)

    return loss


def batch_norm_case(n: int, h: int, dtype: str) -> OpCase:
    """Grad w.r.t. ``x (n, h)``, gain and bias of ``mean(batch_norm(x) * c)`` for a fixed
    random ``c`` (a non-trivial cotangent), biased variance."""
    peer = _flax_batch_norm()
    impls: dict[str, Loss] = {
        "jaxninja": lambda x, g, b, c: _mean(ops.batch_norm(x, g, b, unbiased=False) * c),
        **({} if isinstance(peer, str) else {"flax": peer}),
        "reference": lambda x, g, b, c: _mean(
            ops.batch_norm_reference(x, g, b, unbiased=False) * c
        ),
    }

    def make() -> tuple[jax.Array, ...]:
        x, c = _normal(0, (n, h), dtype, 2.0), _normal(3, (n, h), dtype)
        return x, 1 + _normal(1, (h,), dtype, 0.1), _normal(2, (h,), dtype, 0.1), c

    missing = {"flax": peer} if isinstance(peer, str) else {}
    return OpCase("batch_norm", {"N": n, "H": h}, dtype, make, (0, 1, 2), impls, missing)


def linear_cross_entropy_case(n: int, d: int, v: int, dtype: str) -> OpCase:
    """Grad w.r.t. ``x (n, d)`` and ``w (d, v)`` of the mean of the fused op against the
    unfused ``cross_entropy(x @ w, labels)`` (which holds the ``(n, v)`` logits)."""
    impls: dict[str, Loss] = {
        "linear_cross_entropy": lambda x, w, y: _mean(ops.linear_cross_entropy(x, w, y)),
        "unfused": lambda x, w, y: _mean(ops.cross_entropy(x @ w, y)),
    }

    def make() -> tuple[jax.Array, ...]:
        return _normal(0, (n, d), dtype), _normal(1, (d, v), dtype, d**-0.5), _labels(2, n, v)

    return OpCase("linear_cross_entropy", {"N": n, "D": d, "V": v}, dtype, make, (0, 1), impls)


def ops_cases(quick: bool = False) -> list[OpCase]:
    """The sizes users meet (about 3 minutes on 2 CPU cores); ``quick``: a smoke test."""
    ce: list = [(64, 27, "float32"), (64, 300, "bfloat16")]
    bn, lce = [(64, 32, "float32")], [(64, 16, 300, "float32")]
    if not quick:
        dts = ("float32", "bfloat16")
        ce = [(n, v, dt) for n, v in ((4096, 27), (4096, 1024), (4096, 32768)) for dt in dts]
        ce += [(2048, 65536, dt) for dt in dts]
        bn = [(n, h, dt) for n, h in ((32, 200), (8192, 1024)) for dt in dts]
        lce = [(4096, 256, 32768, "float32"), (4096, 512, 65536, "float32")]
    cases = [cross_entropy_case(*a) for a in ce] + [batch_norm_case(*a) for a in bn]
    return cases + [linear_cross_entropy_case(*a) for a in lce]


def measure_case(case: OpCase, repeats: int, budget_s: float = 20.0) -> dict[str, Any]:
    """Time and compiled temporary memory of each implementation's jitted gradient."""
    args, grads = case.make_args(), {}
    for name, loss in case.impls.items():
        grads[name] = compile_timed(jax.jit(jax.grad(loss, argnums=case.argnums)), *args)
    timings = rounds([call_timer(fn, args) for fn, _ in grads.values()], repeats, budget_s)
    impls = {}
    for (name, (fn, s)), (ms,) in zip(grads.items(), timings, strict=True):
        temp = getattr(fn.memory_analysis(), "temp_size_in_bytes", None)
        impls[name] = {"compile_s": s, "temp_bytes": temp, "ms": ms}
    row = {"op": case.op, "size": case.size, "dtype": case.dtype, "impls": impls}
    return {**row, "missing": case.missing, "ratios": case_ratios(impls)}


def case_ratios(impls: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """Ours (the first) over the peer (the second) in time, and over the smallest of the
    others in temporary memory (``None``: ours needs some where that one needs none)."""
    (ours, *names), stats = list(impls), list(impls.values())
    if not names:
        return {}
    out: dict[str, float | None] = {}
    out[f"time {ours}/{names[0]}"] = stats[0]["ms"]["median"] / stats[1]["ms"]["median"]
    mine, mems = stats[0]["temp_bytes"], [s["temp_bytes"] for s in stats[1:]]
    if mine is not None and None not in mems:
        label = names[0] if len(names) == 1 else f"min({', '.join(names)})"
        out[f"temp {ours}/{label}"] = mine / min(mems) if min(mems) else (None if mine else 1.0)
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


def _mib(n: int | None) -> str:
    mib = (n or 0) / 2**20
    spec = ".0f" if mib >= 100 else ".1f" if mib >= 1 else ".2f"
    return "-" if n is None else format(mib, spec)


def ops_table(rows: Sequence[dict[str, Any]], op: str) -> str:
    """One op's rows as a markdown table: ms and temp MiB per implementation, ratios."""
    rows = [r for r in rows if r["op"] == op]
    impls = list(dict.fromkeys(n for r in rows for n in r["impls"]))
    ratios = list(dict.fromkeys(k for r in rows for k in r["ratios"]))
    size = list(rows[0]["size"])
    head = [*size, "dtype", *(f"{n} ms" for n in impls), *(f"{n} temp MiB" for n in impls)]
    table = []
    for r in rows:
        got = r["impls"]
        cells = [str(r["size"][k]) for k in size] + [r["dtype"]]
        cells += [_ms(got[n]["ms"]["median"]) if n in got else "-" for n in impls]
        cells += [_mib(got[n]["temp_bytes"]) if n in got else "-" for n in impls]
        table.append(cells + [_fmt(r["ratios"].get(k), ".2f") for k in ratios])
    align = "r" * len(size) + "l" + "r" * (len(head) + len(ratios) - len(size) - 1)
    notes = sorted({f"({k}: {v})" for r in rows for k, v in r["missing"].items()})
    lines = [f"`{op}`: {OP_LOSSES[op]}", "", *md_table(head + ratios, align, table)]
    return "\n".join(lines + ([""] if notes else []) + notes)


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
    ops_seen = dict.fromkeys(r["op"] for r in result["rows"])
    return "\n\n".join([head, *(ops_table(result["rows"], op) for op in ops_seen)])


def run_ops_bench(
    *,
    quick: bool = False,
    repeats: int = 5,
    out: str | os.PathLike[str] | None = "bench.json",
    log: Log = print,
) -> dict[str, Any]:
    """``jaxninja bench --ops``: measure :func:`ops_cases`, print the tables, write them
    under ``"ops"`` in ``out`` (keeping the training rows). ``quick``: tiny, 2 rounds."""
    previous, machine = start_run(repeats, out, log)
    repeats = min(repeats, 2) if quick else repeats
    rows = []
    for case in ops_cases(quick):
        rows.append(measure_case(case, repeats))
        log(f"  {case.op} " + ops_table(rows[-1:], case.op).splitlines()[4])
    options = {"quick": quick, "repeats": repeats}
    result = end_run(machine, options, rows, optax=_version("optax"), flax=_version("flax"))
    result["table"] = ops_markdown(result)
    log("\n" + result["table"])
    kept = {k: v for k, v in previous.items() if k not in ("tool", "ops")}
    save_results(out, {**kept, "ops": result}, log)
    return result
