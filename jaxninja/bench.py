"""``jaxninja bench``: the speed of the training step (``run_bench``: backends, PyTorch
baselines, sweeps) and of the ops' gradients (``run_ops_bench``: time and compiled
temporary memory against optax/flax). A table's rows are timed in interleaved rounds of one
process: compare rows of one run, never runs of different days. Both write ``bench.json``,
checked before any work. Method and figures: the README's "Speed" section.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxninja import ops
from jaxninja.lecture import data
from jaxninja.limits import check_int
from jaxninja.training import fileio, sweep, train
from jaxninja.training.train import BACKENDS, ConfigError, TrainConfig

Log = Callable[[str], None]


class Timer(NamedTuple):
    run: Callable[[], Any]  # the call to time
    units: float  # the units of work one call does (figures are per unit)


class Entry(NamedTuple):
    row: dict[str, Any]  # a row of a table
    timer: Timer  # the timer of its figures


class Workload(NamedTuple):
    X: jax.Array  # the training split's contexts
    Y: jax.Array  # and targets
    vocab_size: int


DEFAULT_SETTINGS = ((200, 32), (1024, 256))
DEFAULT_MEMBERS = (1, 8, 32)
# bounds on time: more is a typo
MAX_REPEATS = 1000
MAX_STEPS = 100_000
MAX_MEMBERS = 1024
TOOL = "jaxninja bench"  # what a results file says it is: the only --out a bench replaces
TORCH = {  # the PyTorch baselines -> their names in the summary
    "lecture_loop": "lecture loop",
    "vectorised_dc": "vectorised dC",
    "autograd": "loss.backward()",
}


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, spread ``(max - min) / median`` and count of ``values``.

    Examples:
      >>> summary([1.0, 2.0, 4.0])
      {'median': 2.0, 'min': 1.0, 'max': 4.0, 'spread': 1.5, 'n': 3}
    """
    med = statistics.median(values)
    lo = min(values)
    hi = max(values)
    spread = (hi - lo) / med if med else float("nan")
    return {"median": med, "min": lo, "max": hi, "spread": spread, "n": len(values)}


def rounds(
    timers: Sequence[Timer], repeats: int, budget_s: float = float("inf")
) -> list[tuple[dict[str, float], ...]]:
    """Per timer ``(run, units)``: the ``summary`` of the wall and of the CPU seconds per
    unit of one call of ``run`` over ``repeats`` rounds (round ``r`` starts at timer ``r``:
    no order favours one; after 3 rounds, stop past ``budget_s``)."""
    values: list[list[tuple[float, float]]] = [[] for _ in timers]
    start = time.perf_counter()
    for r in range(repeats):
        for i in [(r + j) % len(timers) for j in range(len(timers))]:
            timer = timers[i]
            cpu_start = time.process_time()
            wall_start = time.perf_counter()
            timer.run()
            wall = (time.perf_counter() - wall_start) / timer.units
            cpu = (time.process_time() - cpu_start) / timer.units
            values[i].append((wall, cpu))
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return [tuple(summary(column) for column in zip(*v, strict=True)) for v in values]


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """``jitted`` lowered and compiled for ``args``, and the seconds that took."""
    t = time.perf_counter()
    return jitted.lower(*args).compile(), time.perf_counter() - t


def call_timer(fn: Callable[..., Any], args: tuple[Any, ...], target_s: float = 0.05) -> Timer:
    """Warm ``fn`` up (first touch of its buffers): a timer in ms per call, over as many
    back-to-back calls as make about ``target_s`` seconds (one for the slow ones)."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    k = 1
    if time.perf_counter() - t <= target_s:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        k = max(1, min(1000, int(target_s / max(time.perf_counter() - t, 1e-7))))

    def run() -> None:
        for _ in range(k):  # only the last output is kept alive, as in a loop of the user's
            out = fn(*args)
        jax.block_until_ready(out)

    return Timer(run, k * 1e-3)


def loadavg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def start_run(repeats: int, out: str | os.PathLike[str] | None, log: Log) -> tuple[dict, dict]:
    """Check ``repeats`` (``1..MAX_REPEATS``) and ``out`` before any work: the results
    ``out`` holds, the machine."""
    check_int("repeats", repeats, 1, MAX_REPEATS)
    previous = fileio.check_results_file(out, TOOL) if out else {}
    machine: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "device": str(jax.devices()[0].device_kind),
    }
    machine["loadavg_start"] = loadavg()
    log(f"machine: {machine['cpu_count']} CPUs, load average {machine['loadavg_start']}")
    return previous, machine


def end_run(m: dict, options: dict, rows: list, modules: Sequence[str], method: str) -> dict:
    """The result of a run: machine (its load average now), versions, options, rows, and
    its ``table`` so far: a line on the machine, the versions and ``method``."""
    m["loadavg_end"] = loadavg()
    versions: dict[str, Any] = {"python": sys.version.split()[0], "jax": jax.__version__}
    versions |= {k: getattr(sys.modules.get(k), "__version__", None) for k in modules}
    table = (
        f"Machine: {m['cpu_count']} CPUs ({m['device']}), load average {m['loadavg_start']} "
        f"at start, {m['loadavg_end']} at end; "
        + ", ".join(f"{k} {v}" for k, v in list(versions.items())[1:] if v is not None)
    )
    result = {"machine": m, "versions": versions, "options": options, "rows": rows}
    return result | {"table": f"{table}. {method}"}


def save_results(out: str | os.PathLike[str] | None, results: dict, log: Log) -> None:
    """Write ``results`` (JSON) to ``out`` atomically, if given (after the tables)."""
    if out:
        fileio.write_results_file(out, TOOL, results)
        log(f"\nwrote {out}")


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None or not np.isfinite(v) else format(v, spec)


def md_table(head: Sequence[str], align: str, rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table; ``align``: ``l`` or ``r`` for each column."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [list(head), *rows]]
    return [lines[0], "|" + "".join("---|" if a == "l" else "---:|" for a in align), *lines[1:]]


def parse_settings(text: str) -> list[tuple[int, int]]:
    """``"200x32,1024x256"`` -> ``[(200, 32), (1024, 256)]`` (hidden units x batch).

    Examples:
      >>> parse_settings("200x32, 1024X256")
      [(200, 32), (1024, 256)]
    """
    out = []
    for part in text.split(","):
        hb = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part.lower())
        if not hb or int(hb[1]) < 1 or int(hb[2]) < 2:
            raise ConfigError(f"bad setting {part!r}: expected HxB, H >= 1, B >= 2, e.g. 200x32")
        out.append((int(hb[1]), int(hb[2])))
    return out


def _row(cfg: TrainConfig, w: Workload, kind: str, name: str, **extra: Any) -> dict[str, Any]:
    h = cfg.n_hidden
    b = cfg.batch_size
    fan_in = cfg.n_embd * cfg.block_size
    flops = 3 * 2 * b * (fan_in * h + h * w.vocab_size)  # 2 matmuls forward, 4 backward
    row = {"setting": f"{h}x{b}", "n_hidden": h, "batch_size": b, "kind": kind, "row": name}
    return {**row, "compile_s": None, "flops_per_step": flops, **extra}


def chunk_entry(cfg: TrainConfig, w: Workload, steps: int, m: int = 0) -> Entry:
    """A compiled, warmed-up chunk of ``steps`` training steps (of ``m`` models in one
    vmapped program of ``jaxninja.training.sweep`` if ``m``): its row, a timer in us per step."""
    rest: tuple[jax.Array, ...] = (w.X, w.Y)
    if m:
        seeds = list(range(cfg.seed, cfg.seed + m))
        jitted = sweep.make_sweep_chunk(cfg, steps)
        state = sweep.init_states(cfg, seeds, w.vocab_size)
        rest = (jnp.asarray(seeds, jnp.int32), jnp.full((m,), cfg.lr, jnp.float32), *rest)
    else:
        jitted = train.make_train_chunk(cfg, steps)
        state = train.init_state(cfg, w.vocab_size)
    fn, compile_s = compile_timed(jitted, state, *rest)
    state = jax.block_until_ready(fn(state, *rest))[0]

    def run() -> None:
        nonlocal state
        state = jax.block_until_ready(fn(state, *rest))[0]

    extra = {"compile_s": compile_s, "steps_per_repeat": steps} | ({"members": m} if m else {})
    row = _row(cfg, w, "sweep" if m else "jax", f"sweep M={m}" if m else cfg.backend, **extra)
    return Entry(row, Timer(run, steps * max(m, 1) * 1e-6))


def _torch_step(params: list, Xb: Any, Yb: Any, name: str) -> Any:
    """One SGD step (lr 0.1) of the lecture's Exercise 4: its manual backward pass (``dC`` by
    the lecture's double loop or ``index_add_``), or ``loss.backward()`` (``autograd``)."""
    import torch

    C, W1, b1, W2, b2, bngain, bnbias = params
    with torch.set_grad_enabled(name == "autograd"):  # the lecture's forward pass
        emb = C[Xb]
        embcat = emb.view(emb.shape[0], -1)
        hprebn = embcat @ W1 + b1
        bnvar_inv = (hprebn.var(0, keepdim=True, unbiased=True) + 1e-5) ** -0.5
        bnraw = (hprebn - hprebn.mean(0, keepdim=True)) * bnvar_inv
        h = torch.tanh(bngain * bnraw + bnbias)
        logits = h @ W2 + b2
        loss = torch.nn.functional.cross_entropy(logits, Yb)
    if name == "autograd":
        for p in params:
            p.grad = None
        loss.backward()
        grads = [p.grad for p in params]
    else:  # the lecture's solution
        n = Xb.shape[0]
        dlogits = torch.softmax(logits, 1)
        dlogits[range(n), Yb] -= 1
        dlogits /= n
        dhpreact = (1.0 - h**2) * (dlogits @ W2.T)
        dsum = dhpreact.sum(0)
        dsum_raw = (dhpreact * bnraw).sum(0)
        dhprebn = bngain * bnvar_inv / n * (n * dhpreact - dsum - n / (n - 1) * bnraw * dsum_raw)
        demb = (dhprebn @ W1.T).view(emb.shape)
        dC = torch.zeros_like(C)
        if name == "lecture_loop":
            for k in range(Xb.shape[0]):
                for j in range(Xb.shape[1]):
                    dC[Xb[k, j]] += demb[k, j]
        else:
            dC.index_add_(0, Xb.view(-1), demb.view(-1, C.shape[1]))
        grads = [dC, embcat.T @ dhprebn, dhprebn.sum(0), h.T @ dlogits, dlogits.sum(0)]
        grads += [dsum_raw.view(1, -1), dsum.view(1, -1)]
    with torch.no_grad():
        for p, grad in zip(params, grads, strict=True):
            p.data += -0.1 * grad
    return loss


def torch_entry(cfg: TrainConfig, name: str, steps: int, w: Workload) -> Entry:
    """PyTorch baseline ``name`` in eager mode: the lecture's init (seed 42), same data,
    batch size and SGD, minibatches drawn with ``torch.randint``. One intra-op thread: on 2
    cores shared with JAX, OpenMP's spinning made 2 threads 10-25x slower than 1."""
    import torch

    torch.set_num_threads(1)
    X = torch.as_tensor(np.asarray(w.X, np.int64))
    Y = torch.as_tensor(np.asarray(w.Y, np.int64))
    e = cfg.n_embd
    h = cfg.n_hidden
    v = w.vocab_size
    fan_in = cfg.n_embd * cfg.block_size
    g = torch.Generator().manual_seed(42)
    shapes = [(v, e), (fan_in, h), (h,), (h, v), (v,), (1, h), (1, h)]
    C, W1, b1, W2, b2, gain, bias = (torch.randn(s, generator=g) for s in shapes)
    params = [C, W1 * (5 / 3) / fan_in**0.5, b1 * 0.1, W2 * 0.1, b2 * 0.1, gain * 0.1 + 1.0]
    params = [p.requires_grad_(name == "autograd") for p in [*params, bias * 0.1]]
    # the lecture's Python double loop is that slow at large batches
    n = max(1, steps // 4) if name == "lecture_loop" and cfg.batch_size > 64 else steps
    row = _row(cfg, w, "torch", f"torch {name}", steps_per_repeat=n)
    batches = g.manual_seed(43)

    def run(k: int = n) -> None:
        for _ in range(k):
            ix = torch.randint(0, X.shape[0], (cfg.batch_size,), generator=batches)
            loss = _torch_step(params, X[ix], Y[ix], name)
        row["final_loss"] = float(loss.detach())

    run(max(1, n // 10))  # warm-up
    return Entry(row, Timer(run, n * 1e-6))


def time_entries(entries: Sequence[Entry], repeats: int, log: Log) -> list[dict[str, Any]]:
    """The entries' rows, with their timings from interleaved rounds."""
    rows = [row for row, _ in entries]
    for row, (wall, cpu) in zip(rows, rounds([t for _, t in entries], repeats), strict=True):
        row["us_per_step"], row["cpu_us_per_step"] = wall, cpu
        if "members" in row:
            row["model_steps_per_s"] = 1e6 / wall["median"]
        log(f"  {row['setting']:>9s} {row['row']:22s} {wall['median']:9.1f} us/step")
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], peak_gflops: float) -> list[str]:
    """The rows as a markdown table; ratio: over custom_vjp of the same setting."""
    base = {r["setting"]: r["us_per_step"]["median"] for r in rows if r["row"] == "custom_vjp"}
    table = []
    for r in rows:
        us = r["us_per_step"]["median"]
        flops = r["flops_per_step"]
        setting = r["setting"]
        steps_per_s = f" ({r['model_steps_per_s']:.0f} model-steps/s)" if "members" in r else ""
        table.append(
            [setting, r["row"] + steps_per_s, _fmt(us, ".1f")]
            + [_fmt(r["us_per_step"]["spread"] * 100, ".0f") + "%"]
            + [_fmt(r["cpu_us_per_step"]["median"], ".1f"), _fmt(r["compile_s"], ".2f")]
            + [_fmt(flops / 1e6, ".2f"), _fmt(flops / us / peak_gflops / 10, ".1f")]
            + [_fmt(us / base[setting] if setting in base else None, ".2f")]
        )
    head = "setting|row|us/step (median)|spread|CPU us/step|compile s|MFLOP/step|% of peak"
    return md_table([*head.split("|"), "ratio to custom_vjp"], "ll" + "r" * 7, table)


def summary_ratios(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Headline ratios of each setting: our backends against autodiff and PyTorch."""
    us = {(r["setting"], r["row"]): r["us_per_step"]["median"] for r in rows}
    pairs = [(f"{n}/autodiff", n, "autodiff") for n in ("custom_vjp", "manual")]
    pairs += [
        (f"speedup of custom_vjp over {v}", f"torch {k}", "custom_vjp") for k, v in TORCH.items()
    ]
    ratios = {
        f"{s} {label}": us[(s, a)] / us[(s, b)]
        for s, _ in us
        for label, a, b in pairs
        if us.get((s, a)) and us.get((s, b))
    }
    return dict(sorted(ratios.items()))


def machine_peak(n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """float32 GFLOP/s of an ``n x n`` jnp matmul (from the median and min time)."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    ((ms, _),) = rounds([call_timer(jax.jit(jnp.matmul), (a, a), 0.0)], repeats)
    gflops = {k: 2 * n**3 / ms[v] / 1e6 for k, v in (("gflops", "median"), ("gflops_max", "min"))}
    return {"matmul": f"{n}x{n} float32", **gflops, "spread": ms["spread"]}


def run_bench(
    settings: Sequence[tuple[int, int]] = DEFAULT_SETTINGS,
    *,
    backends: Sequence[str] = tuple(BACKENDS),
    repeats: int = 5,
    steps: int | None = None,
    torch_steps: int | None = None,
    members: Sequence[int] = DEFAULT_MEMBERS,
    use_torch: bool = True,
    quick: bool = False,
    data_path: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = "bench.json",
    log: Log = print,
) -> dict[str, Any]:
    """Run the training benchmark and return (and write to ``out``, keeping its ``"ops"``)
    its result. ``steps`` (JAX steps per timed chunk) defaults to about 0.2 s of work per
    chunk: 5,000 for the default setting, fewer as ``H * B`` grows; ``quick`` divides the
    defaults by 10 and uses 2 repeats (a smoke test, not a measurement). The backends and
    PyTorch baselines of a setting are timed in the same rounds. ``steps`` and
    ``torch_steps`` are at most ``MAX_STEPS``, ``members`` (sweep sizes) ``1..MAX_MEMBERS``."""
    if not settings or not set(backends) <= set(BACKENDS):
        raise ConfigError(
            f"need settings and backends from {', '.join(BACKENDS)}; "
            f"got {list(settings)}, {list(backends)}"
        )
    for name, n in (("steps", steps), ("torch_steps", torch_steps)):
        if n is not None:
            check_int(name, n, 1, MAX_STEPS)
    for m in members:
        check_int("members", m, 1, MAX_MEMBERS)
    previous, machine = start_run(repeats, out, log)
    scale = 10 if quick else 1  # quick: a tenth of the steps, at most 2 repeats
    repeats = min(repeats, 2) if quick else repeats
    splits = data.load_splits(data_path, block_size=3)
    X, Y = (jnp.asarray(a) for a in splits.data["train"])
    w = Workload(X, Y, splits.vocab.size)
    machine["peak"] = peak = machine_peak(repeats=3 if quick else 5)
    log(f"  {peak['matmul']} matmul: {peak['gflops']:.0f} GFLOP/s")
    has_torch = use_torch and importlib.util.find_spec("torch") is not None
    if use_torch and not has_torch:
        log("  (torch not installed: no PyTorch rows; pip install 'jaxninja[bench]')")
    rows: list[dict[str, Any]] = []
    for H, B in settings:
        work = max(1.0, H * B / (200 * 32))
        n = steps or max(20, int(5000 / work**0.8) // scale)
        log(f"setting H={H}, batch {B}: {n} steps x {repeats} repeats per backend")
        cfgs = [TrainConfig(n_hidden=H, batch_size=B, backend=b).validate() for b in backends]
        entries = [chunk_entry(cfg, w, n) for cfg in cfgs]
        tn = torch_steps or max(10, int(1000 / work**0.8) // scale)
        entries += [torch_entry(cfgs[0], name, tn, w) for name in TORCH] if has_torch else []
        rows += time_entries(entries, repeats, log)
    if members:
        cfg = TrainConfig(n_hidden=settings[0][0], batch_size=settings[0][1]).validate()
        sn = max(20, 2000 // scale)
        log(f"sweep (H={cfg.n_hidden}, batch {cfg.batch_size}): {sn} steps x {repeats} repeats")
        rows += time_entries([chunk_entry(cfg, w, sn, m) for m in members], repeats, log)
    options = {"settings": [f"{h}x{b}" for h, b in settings], "repeats": repeats, "quick": quick}
    options |= {"backends": list(backends), "members": list(members), "vocab_size": w.vocab_size}
    method = f"float32 matmul peak {peak['gflops']:.0f} GFLOP/s ({peak['matmul']})."
    result = end_run(machine, options, rows, ["torch"], method)
    result["summary"] = summary_ratios(rows)
    result["table"] = "\n".join([result["table"], "", *markdown_table(rows, peak["gflops"])])
    log("\n" + result["table"] + "\n")
    log("\n".join(f"{k}: {v:.2f}" for k, v in result["summary"].items()))
    save_results(out, {**result, **({"ops": previous["ops"]} if "ops" in previous else {})}, log)
    return result


# ----------------------------------------------------------------------- ops benchmark


def _flax_batch_norm(x: jax.Array, gain: jax.Array, bias: jax.Array, unbiased: bool) -> jax.Array:
    from flax import linen as nn  # its BatchNorm in training mode: biased variance only

    stats = {"mean": jnp.zeros(x.shape[-1]), "var": jnp.ones(x.shape[-1])}
    variables = {"params": {"scale": gain, "bias": bias}, "batch_stats": stats}
    module = nn.BatchNorm(use_running_average=False, epsilon=1e-5)
    return module.apply(variables, x, mutable=["batch_stats"])[0]


def _times_c(norm: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    def loss(x: jax.Array, gain: jax.Array, bias: jax.Array, c: jax.Array) -> jax.Array:
        return norm(x, gain, bias, unbiased=False) * c

    return loss


class OpCase(NamedTuple):
    about: str  # the loss whose gradient is timed
    argnums: tuple[int, ...]  # the arguments it is taken with respect to
    losses: dict[str, Callable[..., jax.Array]]  # the implementations, ours first (mean taken)


def _vocab_parallel(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
    """linear_cross_entropy with w's vocabulary split over every device of this process."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("v",))
    spec = jax.sharding.PartitionSpec

    def local(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
        return ops.linear_cross_entropy(x, w, labels, vocab_axis_name="v")

    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(spec(), spec(None, "v"), spec()), out_specs=spec()
    )
    return sharded(x, w, labels)


# Every option of the cross-entropy ops on at once (1/8 of the labels are -100).
EVERY_OPTION: dict[str, Any] = dict(
    ignore_index=-100, softcap=30.0, label_smoothing=0.1, z_loss=1e-4, reduction="mean"
)

OPS: dict[str, OpCase] = {
    "cross_entropy": OpCase(
        "grad w.r.t. the logits of `mean(cross_entropy(logits, labels))`",
        (0,),
        {
            "jaxninja": ops.cross_entropy,
            "optax": optax.softmax_cross_entropy_with_integer_labels,
            "reference": ops.cross_entropy_reference,
        },
    ),
    "batch_norm": OpCase(
        "grad w.r.t. x, gain and bias of `mean(batch_norm(x, gain, bias, unbiased=False) * c)`"
        ", c a fixed random cotangent",
        (0, 1, 2),
        {
            "jaxninja": _times_c(ops.batch_norm),
            "flax": _times_c(_flax_batch_norm),
            "reference": _times_c(ops.batch_norm_reference),
        },
    ),
    "linear_cross_entropy": OpCase(
        "grad w.r.t. x and w of `mean(linear_cross_entropy(x, w, labels))` against the "
        "unfused `mean(cross_entropy(x @ w, labels))` and optax's",
        (0, 1),
        {
            "linear_cross_entropy": ops.linear_cross_entropy,
            "unfused": lambda x, w, y: ops.cross_entropy(x @ w, y),
            "optax": lambda x, w, y: optax.softmax_cross_entropy_with_integer_labels(x @ w, y),
        },
    ),
    "linear_cross_entropy vocab-parallel": OpCase(
        "grad w.r.t. x and w of `mean(linear_cross_entropy(x, w, labels, "
        'vocab_axis_name="v"))` inside `shard_map` with w split over the vocabulary on '
        "all of this process's devices (on 1 device: the collectives' cost without their "
        "communication) against the unfused `mean(cross_entropy(x @ w, labels))`",
        (0, 1),
        {
            "linear_cross_entropy": _vocab_parallel,
            "unfused": lambda x, w, y: ops.cross_entropy(x @ w, y),
        },
    ),
    "linear_cross_entropy options": OpCase(
        "grad w.r.t. x, w (V, D) and bias of `linear_cross_entropy(x, w, labels, bias=bias, "
        'w_layout="vd", **EVERY_OPTION)` against the unfused `cross_entropy(x @ w.T + bias, '
        "labels, **EVERY_OPTION)`",
        (0, 1, 2),
        {
            "linear_cross_entropy": lambda x, w, b, y: ops.linear_cross_entropy(
                x, w, y, bias=b, w_layout="vd", **EVERY_OPTION
            ),
            "unfused": lambda x, w, b, y: ops.cross_entropy(x @ w.T + b, y, **EVERY_OPTION),
        },
    ),
}


def _op_args(op: str, size: dict[str, int], dtype: str) -> tuple[jax.Array, ...]:
    """Random arguments of ``op``'s losses (fixed keys): float ``dtype`` inputs, labels."""
    n = size.get("N", 1)
    v = size.get("V", 1)
    h = size.get("H", 1)
    d = size.get("D", 1)

    def normal(key: int, shape: tuple[int, ...], scale: float = 1.0) -> jax.Array:
        return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(dtype)

    def labels(key: int) -> jax.Array:
        return jax.random.randint(jax.random.key(key), (n,), 0, v, jnp.int32)

    if op == "cross_entropy":
        return normal(0, (n, v)), labels(1)
    if op == "batch_norm":  # x, gain, bias and the cotangent c
        x = normal(0, (n, h), 2.0)
        gain = 1 + normal(1, (h,), 0.1)
        bias = normal(2, (h,), 0.1)
        c = normal(3, (n, h))
        return x, gain, bias, c
    if op != "linear_cross_entropy options":
        return normal(0, (n, d)), normal(1, (d, v), d**-0.5), labels(2)
    ignored = jnp.arange(n) % 8 == 0  # the option rows: w is (V, D), a bias, padding labels
    y = jnp.where(ignored, -100, labels(2))
    return normal(0, (n, d)), normal(1, (v, d), d**-0.5), normal(3, (v,), 0.1), y


def ops_cases(quick: bool = False) -> list[tuple[str, str, dict[str, int]]]:
    """``(op, dtype, size)``: the sizes users meet (about 3 minutes on 2 CPU cores);
    ``quick``: tiny ones, a smoke test."""
    dts = ("float32", "bfloat16")
    ce = [(64, 300)] if quick else [(4096, 27), (4096, 1024), (4096, 32768), (2048, 65536)]
    bn = [(64, 32)] if quick else [(32, 200), (8192, 1024)]
    lce = [(64, 16, 300)] if quick else [(4096, 256, 32768), (4096, 512, 65536)]
    cases = [("cross_entropy", dt, {"N": n, "V": v}) for n, v in ce for dt in dts]
    cases += [("batch_norm", dt, {"N": n, "H": h}) for n, h in bn for dt in dts]
    cases += [("linear_cross_entropy", "float32", dict(N=n, D=d, V=v)) for n, d, v in lce]
    n, d, v = (64, 16, 300) if quick else (4096, 256, 65536)
    more = ("linear_cross_entropy options", "linear_cross_entropy vocab-parallel")
    return cases + [(op, "float32", dict(N=n, D=d, V=v)) for op in more]


def measure_case(
    op: str, dtype: str, size: dict[str, int], repeats: int, budget_s: float = 20.0
) -> dict[str, Any]:
    """Time and compiled temporary memory of the jitted gradient of each implementation of
    ``op`` (``OPS``; flax's is left out with a note when flax is not installed), and the
    ratios: ours (the first) over the peer (the second) in time, and over the smallest of the
    others in temporary memory (``None``: ours needs some where that one needs none)."""
    argnums = OPS[op].argnums
    losses = OPS[op].losses
    missing = {}
    if "flax" in losses and importlib.util.find_spec("flax") is None:
        missing = {"flax": "flax not installed (pip install flax)"}
    args = _op_args(op, size, dtype)
    names = [k for k in losses if k not in missing]

    def grad(loss: Callable[..., jax.Array]) -> Any:  # of the mean loss, in float32
        return jax.jit(jax.grad(lambda *a: jnp.mean(loss(*a).astype(jnp.float32)), argnums))

    compiled = [compile_timed(grad(losses[k]), *args) for k in names]
    timings = rounds([call_timer(fn, args) for fn, _ in compiled], repeats, budget_s)
    temps: list[Any] = [
        getattr(fn.memory_analysis(), "temp_size_in_bytes", None) for fn, _ in compiled
    ]
    impls = {
        k: {"compile_s": s, "temp_bytes": temp, "ms": ms}
        for k, (_, s), temp, (ms, _) in zip(names, compiled, temps, timings, strict=True)
    }
    ratios: dict[str, float | None] = {}
    if len(names) > 1:
        ratios[f"time {names[0]}/{names[1]}"] = timings[0][0]["median"] / timings[1][0]["median"]
    if len(names) > 1 and None not in temps:
        label = names[1] if len(names) == 2 else f"min({', '.join(names[1:])})"
        mine = temps[0]
        least = min(temps[1:])
        ratios[f"temp {names[0]}/{label}"] = mine / least if least else (None if mine else 1.0)
    row = {"op": op, "size": size, "dtype": dtype, "impls": impls}
    return {**row, "missing": missing, "ratios": ratios}


def _ms(v: float) -> str:
    return _fmt(v, ".0f" if v >= 100 else ".3g")


def _mib(n: int | None) -> str:
    mib = (n or 0) / 2**20
    return "-" if n is None else _fmt(mib, ".0f" if mib >= 100 else ".1f" if mib >= 1 else ".2f")


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
    lines = [f"`{op}`: {OPS[op].about}", "", *md_table(head + ratios, align, table)]
    return "\n".join(lines + ([""] if notes else []) + notes)


def run_ops_bench(
    *,
    quick: bool = False,
    repeats: int = 5,
    out: str | os.PathLike[str] | None = "bench.json",
    log: Log = print,
) -> dict[str, Any]:
    """``jaxninja bench --ops``: measure ``ops_cases``, print the tables, write them
    under ``"ops"`` in ``out`` (keeping the training rows). ``quick``: tiny, 2 rounds."""
    previous, machine = start_run(repeats, out, log)
    repeats = min(repeats, 2) if quick else repeats
    rows = []
    for op, dtype, size in ops_cases(quick):
        rows.append(measure_case(op, dtype, size, repeats))
        log(f"  {op} " + ops_table(rows[-1:], op).splitlines()[4])
    method = (
        f"Time: median ms per call of the jitted gradient ({repeats} interleaved rounds at "
        "most); temp: `compiled.memory_analysis().temp_size_in_bytes`."
    )
    result = end_run(machine, {"quick": quick, "repeats": repeats}, rows, ["optax", "flax"], method)
    result["table"] = "\n\n".join([result["table"], *(ops_table(rows, op) for op in OPS)])
    log("\n" + result["table"])
    kept = {k: v for k, v in previous.items() if k not in ("tool", "ops")}
    save_results(out, {**kept, "ops": result}, log)
    return result
