"""``jaxninja bench``: how fast one training step runs, against the machine and PyTorch.

Everything is measured in one process, so the rows of a table are comparable:

* for each setting ``HxB`` (hidden units x batch; default ``200x32``, the lecture's, and
  ``1024x256``) and each backend (``custom_vjp``, ``manual``, ``autodiff``): the steady
  state microseconds per step of :func:`jaxninja.train.make_train_chunk` (compile time
  excluded, reported apart), as the median of ``repeats`` timed chunks with the backends
  interleaved round-robin (so a burst of load hits all rows alike), its spread
  ``(max - min) / median`` and the process CPU time per step (robust to other load);
* the machine roof: float32 GFLOP/s of a 2048x2048 ``jnp`` matmul, and each step's FLOP
  count (XLA's cost analysis of the compiled step), so each row shows its fraction of peak;
* PyTorch eager baselines when torch is importable (``experiments/bench_torch.py``): the
  lecture's loop with the Python double loop for ``dC``, the same with ``index_add_``,
  and ``loss.backward()``;
* sweep rows (first setting): model-steps/s when ``M`` = 1, 8, 32 models train in one
  vmapped program (:mod:`jaxninja.sweep`).

It prints a markdown table (ratios are ``us/step of the row / us/step of custom_vjp`` of
the same setting) and writes ``bench.json``. No number here is asserted anywhere: timings
on a shared machine are noisy; compare rows of one run, never runs of different days.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja import data, sweep, train
from jaxninja.train import BACKENDS, ConfigError, TrainConfig

Log = Callable[[str], None]
DEFAULT_SETTINGS = ((200, 32), (1024, 256))
DEFAULT_MEMBERS = (1, 8, 32)
TORCH_FILE = Path(__file__).resolve().parent.parent / "experiments" / "bench_torch.py"


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


def _summary(values: Sequence[float]) -> dict[str, float]:
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
    s = _summary(rates)
    return {"matmul": f"{n}x{n} float32", "gflops": s["median"], "gflops_max": s["max"],
            "spread": s["spread"]}  # fmt: skip


def step_flops(
    n_hidden: int, batch: int, n_embd: int = 10, block: int = 3, vocab: int = 27
) -> float:
    """FLOPs of the six matmuls of one step (forward + two per layer backward)."""
    return 3 * 2 * batch * (n_embd * block * n_hidden + n_hidden * vocab)


def _xla_flops(compiled: Any, n_steps: int) -> float | None:
    """XLA's cost-analysis FLOPs of a compiled chunk, per step (loop bodies counted once
    per trip where XLA knows the trip count); ``None`` when unavailable."""
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        flops = float(cost.get("flops", 0.0))
    except Exception:  # noqa: BLE001 - optional diagnostics
        return None
    return flops / n_steps if flops > 0 else None


def _timed(units: int, fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """Run ``fn(*args)`` to completion: its result, then wall and CPU us per unit."""
    c, t = time.process_time(), time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, (time.perf_counter() - t) / units * 1e6, (time.process_time() - c) / units * 1e6


def _time_jax_rows(
    setting: tuple[int, int], backends: Sequence[str], steps: int, repeats: int,
    Xtr: jax.Array, Ytr: jax.Array, vocab_size: int, log: Log,
) -> list[dict[str, Any]]:  # fmt: skip
    H, B = setting
    rows: list[dict[str, Any]] = []
    fns: list[list[Any]] = []
    for backend in backends:
        cfg = TrainConfig(n_hidden=H, batch_size=B, backend=backend).validate()
        state = train.init_state(cfg, vocab_size)
        t = time.perf_counter()
        compiled = train.make_train_chunk(cfg, steps).lower(state, Xtr, Ytr).compile()
        compile_s = time.perf_counter() - t
        state, losses = compiled(state, Xtr, Ytr)  # warm-up run (first-touch, caches)
        losses.block_until_ready()
        fns.append([compiled, state])
        rows.append({"setting": f"{H}x{B}", "n_hidden": H, "batch_size": B, "kind": "jax",
                     "row": backend, "compile_s": compile_s, "steps_per_repeat": steps,
                     "xla_flops_per_step": _xla_flops(compiled, steps),
                     "wall": [], "cpu": []})  # fmt: skip
    for _ in range(repeats):  # round-robin, so bursts of outside load hit every row
        for row, fs in zip(rows, fns, strict=True):
            (fs[1], _), wall, cpu = _timed(steps, fs[0], fs[1], Xtr, Ytr)
            row["wall"].append(wall)
            row["cpu"].append(cpu)
    for row in rows:
        row["us_per_step"] = _summary(row.pop("wall"))
        row["cpu_us_per_step"] = _summary(row.pop("cpu"))
        us, cpu = row["us_per_step"]["median"], row["cpu_us_per_step"]["median"]
        log(f"  {row['setting']:>9s} {row['row']:12s} {us:9.1f} us/step"
            f"  (cpu {cpu:.1f}, compile {row['compile_s']:.2f} s)")  # fmt: skip
    return rows


def load_torch_baselines() -> Any | None:
    """``experiments/bench_torch.py`` as a module, or ``None`` (no torch, or the file is
    not there, e.g. in an installed, non-editable copy)."""
    if importlib.util.find_spec("torch") is None or not TORCH_FILE.exists():
        return None
    spec = importlib.util.spec_from_file_location("jaxninja_bench_torch", TORCH_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _time_torch_rows(
    mod: Any, setting: tuple[int, int], steps: int, repeats: int,
    Xtr: np.ndarray, Ytr: np.ndarray, log: Log,
) -> list[dict[str, Any]]:  # fmt: skip
    H, B = setting
    rows = []
    for name in mod.BASELINES:
        n = max(1, steps // 4) if name == "lecture_loop" and B > 64 else steps
        runs = [getattr(mod, name)(Xtr, Ytr, n_hidden=H, batch_size=B, steps=n)
                for _ in range(repeats)]  # fmt: skip
        row = {"setting": f"{H}x{B}", "n_hidden": H, "batch_size": B, "kind": "torch",
               "row": f"torch {name}", "compile_s": None, "steps_per_repeat": n,
               "xla_flops_per_step": None,
               "us_per_step": _summary([r["us_per_step"] for r in runs]),
               "cpu_us_per_step": _summary([r["cpu_us_per_step"] for r in runs]),
               "final_loss": runs[-1]["final_loss"]}  # fmt: skip
        log(f"  {row['setting']:>9s} {row['row']:22s} {row['us_per_step']['median']:9.1f} us/step")
        rows.append(row)
    return rows


def _time_sweep_rows(
    setting: tuple[int, int], members: Sequence[int], steps: int, repeats: int,
    Xtr: jax.Array, Ytr: jax.Array, vocab_size: int, log: Log,
) -> list[dict[str, Any]]:  # fmt: skip
    cfg = TrainConfig(n_hidden=setting[0], batch_size=setting[1]).validate()
    rows = []
    for m in members:
        seeds = list(range(cfg.seed, cfg.seed + m))
        states = sweep.init_states(cfg, seeds, vocab_size)
        m_seeds = jnp.asarray(seeds, jnp.int32)
        m_lrs = jnp.full((m,), cfg.lr, jnp.float32)
        t = time.perf_counter()
        fn = sweep.make_sweep_chunk(cfg, steps).lower(states, m_seeds, m_lrs, Xtr, Ytr).compile()
        compile_s = time.perf_counter() - t
        states, losses = fn(states, m_seeds, m_lrs, Xtr, Ytr)
        losses.block_until_ready()
        wall, cpu = [], []
        for _ in range(repeats):
            (states, _), w, c = _timed(steps * m, fn, states, m_seeds, m_lrs, Xtr, Ytr)
            wall.append(w)
            cpu.append(c)
        row: dict[str, Any]
        row = {"setting": f"{cfg.n_hidden}x{cfg.batch_size}", "n_hidden": cfg.n_hidden,
               "batch_size": cfg.batch_size, "kind": "sweep", "row": f"sweep M={m}",
               "members": m, "compile_s": compile_s, "steps_per_repeat": steps,
               "xla_flops_per_step": None,
               "us_per_step": _summary(wall), "cpu_us_per_step": _summary(cpu)}  # fmt: skip
        row["model_steps_per_s"] = 1e6 / row["us_per_step"]["median"]
        log(f"  sweep M={m:<3d} {row['model_steps_per_s']:10.0f} model-steps/s "
            f"({row['us_per_step']['median']:.1f} us per model-step)")  # fmt: skip
        rows.append(row)
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or not np.isfinite(v) else format(v, spec)


def markdown_table(result: dict[str, Any]) -> str:
    """The rows of a result as a markdown table (``ratio``: row us/step over the
    custom_vjp us/step of the same setting; < 1 is faster than custom_vjp)."""
    peak = result["machine"]["peak"]["gflops"]
    base = {r["setting"]: r["us_per_step"]["median"] for r in result["rows"]
            if r["row"] == "custom_vjp"}  # fmt: skip
    lines = [
        f"Machine: {result['machine']['cpu_count']} CPUs, float32 matmul peak "
        f"{peak:.0f} GFLOP/s ({result['machine']['peak']['matmul']}); load average "
        f"{result['machine']['loadavg_start']} at start, {result['machine']['loadavg_end']} "
        f"at end. jax {result['versions']['jax']}"
        + (f", torch {result['versions']['torch']}" if result["versions"].get("torch") else "")
        + ".",
        "",
        "| setting | row | us/step (median) | spread | CPU us/step | compile s "
        "| MFLOP/step | % of peak | ratio to custom_vjp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        us = r["us_per_step"]["median"]
        flops = r.get("flops_per_step")
        frac = flops / (us * 1e-6) / (peak * 1e9) * 100 if flops and us else None
        ratio = us / base[r["setting"]] if r["setting"] in base else None
        name = r["row"]
        if r["kind"] == "sweep":
            name += f" ({r['model_steps_per_s']:.0f} model-steps/s)"
        lines.append(
            f"| {r['setting']} | {name} | {_fmt(us, '.1f')} | "
            f"{_fmt(r['us_per_step']['spread'] * 100, '.0f')}% | "
            f"{_fmt(r['cpu_us_per_step']['median'], '.1f')} | {_fmt(r.get('compile_s'), '.2f')} | "
            f"{_fmt(flops / 1e6 if flops else None, '.2f')} | {_fmt(frac, '.1f')} | "
            f"{_fmt(ratio, '.2f')} |"
        )
    return "\n".join(lines)


def run_bench(
    settings: Sequence[tuple[int, int]] = DEFAULT_SETTINGS,
    *,
    backends: Sequence[str] = BACKENDS,
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
    """Run the benchmark and return (and write to ``out``) its result dict.

    ``steps`` (JAX steps per timed chunk) defaults to about 0.2 s of work per chunk:
    5,000 for the default setting, scaled down with ``H * B`` for larger ones; ``quick``
    divides the defaults by 10 and uses 2 repeats (a smoke test, not a measurement).
    """
    if repeats < 1:
        raise ConfigError(f"repeats must be >= 1, got {repeats}")
    for b in backends:
        if b not in BACKENDS:
            raise ConfigError(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if quick:
        repeats = min(repeats, 2)
    scale = 10 if quick else 1
    load0 = _loadavg()
    _, splits = data.load_splits(data_path, block_size=3)
    Xnp, Ynp = splits["train"]
    Xtr, Ytr = jnp.asarray(Xnp), jnp.asarray(Ynp)
    vocab_size = 27
    log(f"machine: {os.cpu_count()} CPUs, load average {load0}; measuring the matmul roof ...")
    peak = machine_peak(repeats=3 if quick else 5)
    log(f"  float32 {peak['matmul']} matmul: {peak['gflops']:.0f} GFLOP/s (median)")
    torch_mod = load_torch_baselines() if use_torch else None
    if use_torch and torch_mod is None:
        log("  (torch not importable or experiments/bench_torch.py missing: no PyTorch rows)")
    rows: list[dict[str, Any]] = []
    for H, B in settings:
        work = max(1.0, H * B / (200 * 32))
        n = steps or max(20, int(5000 / work**0.8) // scale)
        log(f"setting H={H}, batch {B}: {n} steps x {repeats} repeats per backend")
        jax_rows = _time_jax_rows((H, B), backends, n, repeats, Xtr, Ytr, vocab_size, log)
        for r in jax_rows:
            r["flops_per_step"] = step_flops(H, B)
        rows += jax_rows
        if torch_mod is not None:
            tn = torch_steps or max(10, int(1000 / work**0.8) // scale)
            torch_rows = _time_torch_rows(torch_mod, (H, B), tn, repeats, Xnp, Ynp, log)
            for r in torch_rows:
                r["flops_per_step"] = step_flops(H, B)
            rows += torch_rows
    if members:
        sn = sweep_steps or max(20, 2000 // scale)
        H, B = settings[0]
        log(f"sweep (H={H}, batch {B}): {sn} steps x {repeats} repeats per M")
        for r in _time_sweep_rows((H, B), members, sn, repeats, Xtr, Ytr, vocab_size, log):
            r["flops_per_step"] = step_flops(r["n_hidden"], r["batch_size"])
            rows.append(r)
    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor(), "device": str(jax.devices()[0].device_kind),
            "peak": peak, "loadavg_start": load0, "loadavg_end": _loadavg(),
        },
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__,
                     "torch": torch_mod.info()["torch"] if torch_mod else None},
        "options": {"settings": [f"{h}x{b}" for h, b in settings], "repeats": repeats,
                    "quick": quick, "backends": list(backends), "members": list(members)},
        "rows": rows,
    }  # fmt: skip
    result["summary"] = _summary_ratios(result)
    result["table"] = markdown_table(result)
    log("")
    log(result["table"])
    if result["summary"]:
        log("")
        for k, v in result["summary"].items():
            log(f"{k}: {v:.2f}")
    if out:
        Path(out).write_text(json.dumps(result, indent=2, default=float))
        log(f"\nwrote {out}")
    return result


def _summary_ratios(result: dict[str, Any]) -> dict[str, float]:
    """Headline ratios of the default setting (those the Speed issue asks about)."""
    us = {(r["setting"], r["row"]): r["us_per_step"]["median"] for r in result["rows"]}
    out: dict[str, float] = {}
    for setting in {r["setting"] for r in result["rows"]}:
        base = us.get((setting, "custom_vjp"))
        auto = us.get((setting, "autodiff"))
        if base is None:
            continue
        if auto:
            out[f"{setting} custom_vjp/autodiff"] = base / auto
            if (setting, "manual") in us:
                out[f"{setting} manual/autodiff"] = us[(setting, "manual")] / auto
        for name, label in (("torch autograd", "loss.backward()"),
                            ("torch lecture_loop", "lecture loop"),
                            ("torch vectorised_dc", "vectorised dC")):  # fmt: skip
            if (setting, name) in us:
                out[f"{setting} speedup of custom_vjp over {label}"] = us[(setting, name)] / base
    return dict(sorted(out.items()))


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None
