"""A training run on disk: data -> chunks of fused steps -> checkpoints -> metrics -> samples.

A run directory holds ``checkpoint.npz``, ``losses.npy`` (every step's loss, NaN where not yet
run), ``metrics.json``, ``metrics.jsonl`` (with ``eval_every``), ``loss.png`` and the lock of
``jaxninja.training.rundir``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxninja.lecture import data, sample
from jaxninja.limits import check_int
from jaxninja.training import checkpoint, fileio, parallel, rundir, train
from jaxninja.training import metrics as metrics_lib
from jaxninja.training.rundir import Interrupted, RunError
from jaxninja.training.train import TrainConfig, TrainState

print_flush = partial(print, flush=True)  # progress lines reach a pipe (``| tee``) as printed


@dataclasses.dataclass
class Run:
    """One run in progress: what its training loop and its end need (typed, not passed as
    nine loose arguments)."""

    cfg: TrainConfig
    out: Path
    splits: data.Splits
    mesh: Mesh | None
    stop: dict[str, int]  # rundir.deferred_stop's: the signal to stop at, 0 for none
    log: Callable[[str], None]
    losses: np.ndarray  # every step's training-batch loss, NaN where not yet run
    environment: dict[str, Any]  # metrics.environment(), taken at the start
    t_start: float  # time.perf_counter() at the start
    num_samples: int = 10
    compiled: dict[int, Any] | None = None  # chunks shared with other runs (a sweep's members)


class Timing(NamedTuple):
    """How long the training loop took, for ``metrics.json``."""

    compile_seconds: float
    run_seconds: float
    start: int  # the step this process started from (a resume: the checkpoint's)


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
    compiled: dict[int, Any] | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on the lecture's split of ``data_path`` into run directory ``out``.

    Ctrl-C/SIGTERM stop after the current chunk, with a checkpoint. In a multi-process job
    every process calls this; process 0 alone touches ``out`` and logs.

    Args:
        cfg: the run's config (validated here).
        out: the run directory.
        data_path: the word list (default: the bundled names.txt).
        resume: continue the run in ``out`` (its config must equal ``cfg`` but ``steps``).
        overwrite: replace what is in ``out``.
        other_data: resume although ``data_path`` is not the run's training file.
        log: where progress lines go.
        num_samples: names logged at the end, ``0..jaxninja.lecture.sample.MAX_SAMPLES``
            (checked before training, not after it).
        devices: split each batch over this many devices (default: all; not part of
            ``cfg``, a resume may change it).
        compiled: compiled chunks shared with runs of the same
            ``jaxninja.training.train.program_config`` (seed and lr become arguments;
            the numbers equal a run's own chunk up to float32 rounding).

    Returns:
        The metrics (also written to ``metrics.json``); ``{}`` on processes other than 0.

    Raises:
        JaxninjaError: a bad config, data file or run directory; a run that diverged.
    """
    t_start = time.perf_counter()
    cfg.validate()
    check_int("num_samples", num_samples, 0, sample.MAX_SAMPLES)
    environment = metrics_lib.environment()
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
            metrics_lib.write(out, metrics_lib.read(out, upto=int(state.step)))
        run = Run(
            cfg, out, splits, mesh, stop, log, losses, environment, t_start, num_samples, compiled
        )
        state = parallel.from_main(state, mesh)  # alone: as is
        state, timing = _train_loop(run, state)
        if not main:
            return {}
        stop["then"] = rundir.FINISHING
        return finish(run, parallel.local(state), timing)


def _train_loop(run: Run, state: TrainState) -> tuple[TrainState, Timing]:
    """Chunks until ``cfg.steps``: finiteness check, progress lines, evaluations,
    checkpoints; the final state and the timings."""
    cfg = run.cfg
    Xtr, Ytr = parallel.replicate(
        run.splits.data["train"], run.mesh
    )  # the same everywhere: checked
    start = int(state.step)
    saved = start or None  # step of the newest checkpoint of this run
    compile_s = 0.0
    run_s = 0.0
    make = partial(train.make_train_chunk, cfg, mesh=run.mesh)
    args: tuple[Any, ...] = (Xtr, Ytr)
    if run.compiled is not None:  # one program for every seed and lr: they are arguments
        make = partial(train.make_train_chunk, train.program_config(cfg), mesh=run.mesh)
        args = (Xtr, Ytr, jnp.asarray(cfg.seed, jnp.int32), jnp.asarray(cfg.lr, jnp.float32))
    steps = dict(start=start, steps=cfg.steps, chunk_steps=cfg.chunk_steps)
    loop = train.run_chunks(
        make, state, *args, eval_every=cfg.eval_every, compiled=run.compiled, **steps
    )
    for chunk in loop:
        first = chunk.step - len(chunk.losses)
        state = chunk.state
        compile_s += chunk.compile_seconds
        run_s += chunk.run_seconds
        _check_finite(chunk, first, run.out, saved)
        run.losses[first : chunk.step] = chunk.losses
        for i in range(first, chunk.step):
            if i % cfg.chunk_steps == 0:
                run.log(f"{i:7d}/{cfg.steps:7d}: {run.losses[i]:.4f}")
        if cfg.eval_every and chunk.step % cfg.eval_every == 0 and parallel.is_main():
            evaluate_now(run, parallel.local(state))
        if chunk.step % cfg.chunk_steps and chunk.step < cfg.steps:
            continue  # an evaluation's chunk: checkpoints stay every chunk_steps
        if parallel.is_main():
            # the history first: whichever write fails (a full disk), it is never behind
            # the checkpoint, and a resume rewrites the steps it is ahead with equal values
            fileio.write_atomic(run.out / "losses.npy", lambda f: np.save(f, run.losses))
            checkpoint.save(run.out, cfg, run.splits.vocab, state, data_sha256=run.splits.sha256)
        saved = chunk.step
        _stop_if_asked(run, chunk.step)
    return state, Timing(compile_s, run_s, start)


def evaluate_now(run: Run, state: TrainState) -> None:
    """Append this step's evaluation to ``metrics.jsonl`` and log its validation loss."""
    step = int(state.step)
    Xtr, Ytr = (jnp.asarray(a) for a in run.splits.data["train"])
    val = tuple(jnp.asarray(a) for a in run.splits.data["val"])
    record = metrics_lib.evaluation(run.cfg, state, Xtr, Ytr, val)  # type: ignore[arg-type]
    window = run.losses[max(0, step - run.cfg.eval_every) : step]
    record = {"step": step, "train_loss": round(float(np.mean(window)), 4), **record}
    metrics_lib.append(run.out, record)
    if "val_loss" in record:
        run.log(f"{step:7d}/{run.cfg.steps:7d}: val {record['val_loss']:.4f}")


def _stop_if_asked(run: Run, step: int) -> None:
    """Raise ``Interrupted`` after a checkpoint if a signal asked to stop."""
    signum = parallel.largest(run.stop["signum"])  # a job's processes stop after the same chunk
    if signum and step < run.cfg.steps:
        raise Interrupted(
            f"{signal.Signals(signum).name}: stopped at step {step}; checkpoint "
            f"saved in {run.out}. Continue with the same command plus --resume",
            signum,
        )


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


def finish(run: Run, state: TrainState, timing: Timing) -> dict[str, Any]:
    """Calibrate, checkpoint, evaluate, write metrics, plot, sample: the end of a run.

    Args:
        run: the run (its ``losses`` complete).
        state: the trained state (on this process's device).
        timing: the training loop's timings.

    Returns:
        The metrics, also written to ``run.out/metrics.json``.
    """
    cfg = run.cfg
    splits = run.splits
    params = state.params
    bn_stats = train.calibrate_bn(params, jnp.asarray(splits.data["train"][0]))
    split_losses = split_losses_of(params, bn_stats, splits.data)
    metrics: dict[str, Any] = {f"{k}_loss": v for k, v in split_losses.items()}
    metrics.update(steps=cfg.steps, backend=cfg.backend, **run.environment)
    metrics.update(config=cfg.to_dict(), data_sha256=splits.sha256)
    metrics.update(_timing_metrics(run, timing))
    if cfg.running_stats:
        running = split_losses_of(params, state.bn_running, splits.data)
        metrics.update({f"{k}_loss_running_stats": v for k, v in running.items()})
    rundir.check_finite_end(run.out, cfg.steps, bn_stats, metrics)  # before anything is written
    checkpoint.save(run.out, cfg, splits.vocab, state, bn_stats, data_sha256=splits.sha256)
    dump = partial(json.dump, metrics, indent=2, allow_nan=False)  # NaN is not JSON
    fileio.write_atomic(run.out / "metrics.json", dump, "w")
    for split, value in split_losses.items():
        run.log(f"{split:5s} {value:.4f}")
    evaluations = metrics_lib.read(run.out)
    if plot_losses(run.losses, run.out / "loss.png", evaluations):
        run.log(f"loss curve: {run.out / 'loss.png'}")
    key = jax.random.fold_in(jax.random.key(cfg.seed), 2)  # not the init or data key
    if run.num_samples:  # --samples 0 prints none
        for name in sample.sample_names(params, bn_stats, splits.vocab, key, run.num_samples):
            run.log(name)
    return metrics


def _timing_metrics(run: Run, timing: Timing) -> dict[str, Any]:
    steps = run.cfg.steps - timing.start
    mesh = run.mesh
    return {
        "compile_seconds": round(timing.compile_seconds, 3),
        "steps_per_second": round(steps / timing.run_seconds, 1) if timing.run_seconds else None,
        "steps_this_run": steps,
        "seconds": round(time.perf_counter() - run.t_start, 3),
        "devices": 1 if mesh is None else mesh.size,
        "processes": jax.process_count(),
    }


def split_losses_of(params, bn_stats, splits: dict) -> dict[str, float]:
    """Eval-mode mean loss of each split that has examples."""
    return {
        name: round(float(train.evaluate(params, bn_stats, jnp.asarray(X), jnp.asarray(Y))), 4)
        for name, (X, Y) in splits.items()
        if len(Y)
    }


def plot_losses(
    losses: np.ndarray, path: Path, evaluations: list[dict[str, Any]] | None = None
) -> bool:
    """Save log10(loss) averaged over windows of up to 1000 steps, as in the lectures, and
    the validation loss of ``evaluations`` (``metrics.jsonl``'s records) if any; ``False``
    when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or state
    except ImportError:
        return False
    done = losses[np.isfinite(losses)]
    window = max(1, min(1000, len(done) // 10))
    curve = np.log10(done[: len(done) // window * window]).reshape(-1, window).mean(1)
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    ax.plot(np.arange(len(curve)) * window, curve, label="train (batch loss)")
    points = metrics_lib.curves(evaluations or [])
    if np.isfinite(points["val_loss"]).any():
        ax.plot(points["step"], np.log10(points["val_loss"]), "o-", label="val")
        ax.legend()
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
