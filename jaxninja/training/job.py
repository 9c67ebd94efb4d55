"""A training run on disk: data -> chunks of fused steps -> checkpoints -> metrics -> samples.

A run directory holds ``checkpoint.npz``, ``losses.npy`` (every step's loss, NaN where not yet
run), ``metrics.json``, ``loss.png`` and the lock of :mod:`jaxninja.training.rundir`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja.lecture import data, sample
from jaxninja.training import checkpoint, fileio, parallel, rundir, train
from jaxninja.training.rundir import Interrupted, RunError
from jaxninja.training.train import TrainConfig

print_flush = partial(print, flush=True)  # progress lines reach a pipe (``| tee``) as printed


def train_run(
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    data_path: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    other_data: bool = False,
    log: Callable[[str], None] = print_flush,
    num_samples: int = 10,
    devices: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on the lecture's split of ``data_path`` into run directory ``out``;
    return the metrics (also written to ``metrics.json``). ``devices`` (default: all; not part
    of ``cfg``, a resume may change it) splits each batch. Ctrl-C/SIGTERM stop after the
    current chunk, with a checkpoint. In a multi-process job every process calls this;
    process 0 alone touches ``out`` and logs, the others return ``{}``.
    """
    t_start = time.perf_counter()
    cfg.validate()
    flags = dict(resume=resume, overwrite=overwrite, other_data=other_data, devices=devices)
    parallel.check_same_options(parallel.job_options(cfg, **flags))
    mesh = parallel.data_mesh(cfg, devices)
    main = parallel.is_main()
    log = log if main else (lambda line: None)
    splits = data.load_splits(data_path, block_size=cfg.block_size)
    parallel.check_same_options({"data file (sha256)": splits.sha256})
    rundir.check_memory(cfg, len(splits.data["train"][1]), splits.vocab.size)
    out = Path(out)
    claim = rundir.claim(out, resume=resume, overwrite=overwrite) if main else nullcontext()
    with claim, rundir.deferred_stop() as stop:
        state = train.init_state(cfg, splits.vocab.size)
        losses = np.full(cfg.steps, np.nan, np.float32)
        if resume and main:
            state, losses = rundir.resume(cfg, out, splits, other_data, log)
        state = parallel.from_main(state, mesh)  # alone: as is
        state, timing = _train_loop(cfg, out, splits, state, losses, mesh, stop, log, t_start)
        if not main:
            return {}
        stop["then"] = rundir.FINISHING
        return _finish(cfg, out, splits, parallel.local(state), losses, timing, log, num_samples)


def _train_loop(cfg, out, splits, state, losses, mesh, stop, log, t_start: float):
    """Chunks until ``cfg.steps``: finiteness check, progress lines, checkpoint; the timings."""
    Xtr, Ytr = parallel.replicate(splits.data["train"], mesh)  # the same everywhere: checked
    start = int(state.step)
    saved = start or None  # step of the newest checkpoint of this run
    compile_s = run_s = 0.0
    make = partial(train.make_train_chunk, cfg, mesh=mesh)
    steps = dict(start=start, steps=cfg.steps, chunk_steps=cfg.chunk_steps)
    for chunk in train.run_chunks(make, state, Xtr, Ytr, **steps):
        first, state = chunk.step - len(chunk.losses), chunk.state
        compile_s, run_s = compile_s + chunk.compile_seconds, run_s + chunk.run_seconds
        _check_finite(chunk, first, out, saved)
        losses[first : chunk.step] = chunk.losses
        for i in range(first, chunk.step):
            if i % cfg.chunk_steps == 0:
                log(f"{i:7d}/{cfg.steps:7d}: {losses[i]:.4f}")
        if parallel.is_main():
            # the history first: whichever write fails (a full disk), it is never behind
            # the checkpoint, and a resume rewrites the steps it is ahead with equal values
            fileio.write_atomic(out / "losses.npy", lambda f: np.save(f, losses))
            checkpoint.save(out, cfg, splits.vocab, state, data_sha256=splits.sha256)
        saved = chunk.step
        signum = parallel.largest(stop["signum"])  # a job's processes stop after the same chunk
        if signum and chunk.step < cfg.steps:
            raise Interrupted(
                f"{signal.Signals(signum).name}: stopped at step {chunk.step}; checkpoint "
                f"saved in {out}. Continue with the same command plus --resume",
                signum,
            )
    return state, {
        "compile_seconds": round(compile_s, 3),
        "steps_per_second": round((cfg.steps - start) / run_s, 1) if run_s else None,
        "steps_this_run": cfg.steps - start,
        "seconds": round(time.perf_counter() - t_start, 3),
        "devices": 1 if mesh is None else mesh.size,
        "processes": jax.process_count(),
    }


def _check_finite(chunk: train.Chunk, first: int, out: Path, saved: int | None) -> None:
    bad = ~np.isfinite(chunk.losses)
    leaves = (np.asarray(x) for x in jax.tree.leaves(chunk.state))
    if not bad.any() and all(np.isfinite(a).all() for a in leaves if a.dtype.kind == "f"):
        return
    what = f"parameters became non-finite in steps {first}..{chunk.step - 1}"
    if bad.any():
        what = f"loss became non-finite at step {first + int(bad.argmax())}"
    kept = f"the last good checkpoint (step {saved}) is kept in {out}"
    kept = "no checkpoint of this run was written" if saved is None else kept
    raise RunError(f"{what}; stopped, {kept}")


def _finish(cfg, out, splits, state, losses, timing, log, num_samples: int) -> dict[str, Any]:
    """Calibrate, checkpoint, evaluate, write metrics, plot, sample: the end of a run."""
    params = state.params
    bn_stats = train.calibrate_bn(params, jnp.asarray(splits.data["train"][0]))
    split_losses = split_losses_of(params, bn_stats, splits.data)
    metrics: dict[str, Any] = {f"{k}_loss": v for k, v in split_losses.items()}
    metrics.update(steps=cfg.steps, backend=cfg.backend, device=jax.devices()[0].device_kind)
    metrics.update(config=cfg.to_dict(), data_sha256=splits.sha256, **timing)
    if cfg.running_stats:
        running = split_losses_of(params, state.bn_running, splits.data)
        metrics.update({f"{k}_loss_running_stats": v for k, v in running.items()})
    rundir.check_finite_end(out, cfg.steps, bn_stats, metrics)  # before anything is written
    checkpoint.save(out, cfg, splits.vocab, state, bn_stats, data_sha256=splits.sha256)
    dump = partial(json.dump, metrics, indent=2, allow_nan=False)  # NaN is not JSON
    fileio.write_atomic(out / "metrics.json", dump, "w")
    for split, value in split_losses.items():
        log(f"{split:5s} {value:.4f}")
    if plot_losses(losses, out / "loss.png"):
        log(f"loss curve: {out / 'loss.png'}")
    key = jax.random.fold_in(jax.random.key(cfg.seed), 2)  # not the init or data key
    if num_samples:  # --samples 0 prints none
        for name in sample.sample_names(params, bn_stats, splits.vocab, key, num_samples):
            log(name)
    return metrics


def split_losses_of(params, bn_stats, splits: dict) -> dict[str, float]:
    """Eval-mode mean loss of each split that has examples."""
    return {
        name: round(float(train.evaluate(params, bn_stats, jnp.asarray(X), jnp.asarray(Y))), 4)
        for name, (X, Y) in splits.items()
        if len(Y)
    }


def plot_losses(losses: np.ndarray, path: Path) -> bool:
    """Save log10(loss) averaged over windows of up to 1000 steps, as in the lectures;
    ``False`` when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or state
    except ImportError:
        return False
    done = losses[np.isfinite(losses)]
    window = max(1, min(1000, len(done) // 10))
    curve = np.log10(done[: len(done) // window * window]).reshape(-1, window).mean(1)
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    ax.plot(np.arange(len(curve)) * window, curve)
    ax.set(xlabel="step", ylabel=f"log10 loss (mean of {window} steps)")
    fileio.write_atomic(path, lambda f: fig.savefig(f, format="png"))
    return True


def load_run(out: str | os.PathLike[str]) -> checkpoint.Checkpoint:
    """A finished run's checkpoint (with calibrated batch-norm statistics)."""
    ckpt = checkpoint.load(out)
    if ckpt.bn_stats is None:
        raise RunError(
            f"{out}: training has not finished (step {int(ckpt.state.step)} of "
            f"{ckpt.config.steps}); finish it with --resume first"
        )
    return ckpt


def eval_run(out: str | os.PathLike[str], data_path=None, other_data: bool = False):
    """The split losses of a saved run, recomputed from its checkpoint."""
    ckpt = load_run(out)
    splits = data.load_splits(data_path, block_size=ckpt.config.block_size)
    rundir.check_same_run(Path(out), ckpt, splits, other_data)
    return split_losses_of(ckpt.state.params, ckpt.bn_stats, splits.data)
