"""A training run on disk: data -> chunks of fused steps -> checkpoints -> metrics -> samples.

This is what ``jaxninja train`` / ``eval`` / ``sample`` call. A run directory holds
``checkpoint.npz`` (see :mod:`jaxninja.checkpoint`), ``losses.npy`` (the loss of every
step, NaN where not yet run), ``metrics.json`` and, with matplotlib, ``loss.png``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja import checkpoint, data, fileio, parallel, sample, train
from jaxninja.train import TrainConfig

Log = Callable[[str], None]


def print_flush(line: str) -> None:
    """Progress lines reach a pipe (``| tee``) as they are printed."""
    print(line, flush=True)


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class Interrupted(RunError):
    """Ctrl-C during training: a checkpoint was saved first."""


@contextmanager
def _deferred_sigint() -> Iterator[list[bool]]:
    """Turn Ctrl-C into a flag checked between chunks, so a chunk is never cut in half."""
    flag = [False]

    def handler(signum, frame):
        flag[0] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave Ctrl-C alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _prepare_out_dir(cfg: TrainConfig, out: Path, resume: bool, overwrite: bool, vocab):
    ckpt_file = out / checkpoint.FILENAME
    if resume:
        if not ckpt_file.exists():
            raise RunError(f"{out}: nothing to resume (no {checkpoint.FILENAME})")
        ckpt = checkpoint.load(out)
        theirs = {**ckpt.config.to_dict(), "steps": None}
        ours = {**cfg.to_dict(), "steps": None}
        diff = [f"{k}={theirs[k]!r} (asked {ours[k]!r})" for k in ours if theirs[k] != ours[k]]
        if diff:
            raise RunError(f"{out} holds a run with a different config: {', '.join(diff)}")
        if ckpt.vocab != vocab:
            raise RunError(f"{out} holds a run trained on a different vocabulary")
        if int(ckpt.state.step) > cfg.steps:
            raise RunError(f"{out} is already at step {int(ckpt.state.step)} > --steps {cfg.steps}")
        return ckpt.state
    if ckpt_file.exists() and not overwrite:
        raise RunError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to "
            f"replace it, or --out to choose another directory"
        )
    return None


def train_run(
    cfg: TrainConfig,
    out: str | os.PathLike[str],
    data_path: str | os.PathLike[str] | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Log = print_flush,
    num_samples: int = 10,
    devices: int | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` on the lecture's split of ``data_path`` into run directory ``out``.

    Prints the lecture's progress lines (``  10000/ 200000: 2.1775``), checkpoints after
    every chunk, and at the end calibrates batch norm on the training set, evaluates the
    three splits, writes ``metrics.json`` (and ``loss.png``) and returns the metrics.
    ``devices`` (default: all) splits every batch over that many devices
    (:mod:`jaxninja.parallel`); it is not part of ``cfg``: a run may resume on another
    device count.
    """
    t_start = time.perf_counter()
    cfg.validate()
    mesh = parallel.data_mesh(cfg, devices)  # None: one device
    out = Path(out)
    data_file = data.resolve_data_path(data_path)
    vocab, splits = data.load_splits(data_file, block_size=cfg.block_size)
    Xtr, Ytr = (jnp.asarray(a) for a in splits["train"])
    if Xtr.shape[0] == 0:
        raise RunError(f"{data_file}: the training split is empty (the file needs more words)")
    state = _prepare_out_dir(cfg, out, resume, overwrite, vocab)
    if state is None:
        state = train.init_state(cfg, vocab.size)
    out.mkdir(parents=True, exist_ok=True)
    losses_file = out / "losses.npy"
    losses = np.full(cfg.steps, np.nan, np.float32)
    if resume and losses_file.exists():
        old = np.load(losses_file, allow_pickle=False)
        losses[: min(len(old), cfg.steps)] = old[: cfg.steps]

    start = int(state.step)
    saved = start if resume else None  # step of the newest checkpoint of this run
    compiled: dict[int, Any] = {}
    compile_seconds = run_seconds = 0.0
    with _deferred_sigint() as interrupted:
        step = start
        while step < cfg.steps:
            n = min(cfg.chunk_steps, cfg.steps - step)
            if n not in compiled:  # ahead-of-time, so compile time is measured apart
                t = time.perf_counter()
                if mesh is None:
                    fn = train.make_train_chunk(cfg, n)
                else:
                    fn = parallel.make_sharded_train_chunk(cfg, n, mesh)
                compiled[n] = fn.lower(state, Xtr, Ytr).compile()
                compile_seconds += time.perf_counter() - t
            t = time.perf_counter()
            state, chunk_losses = compiled[n](state, Xtr, Ytr)
            chunk_losses = np.asarray(chunk_losses)
            run_seconds += time.perf_counter() - t
            bad = ~np.isfinite(chunk_losses)
            if bad.any() or not _all_finite(state):
                what = (
                    f"loss became non-finite at step {step + int(bad.argmax())}"
                    if bad.any()
                    else f"parameters became non-finite in steps {step}..{step + n - 1}"
                )
                kept = (
                    f"the last good checkpoint (step {saved}) is kept in {out}"
                    if saved is not None
                    else "no checkpoint of this run was written"
                )
                raise RunError(f"{what}; stopped, {kept}")
            losses[step : step + n] = chunk_losses
            for i in range(n):
                if (step + i) % cfg.chunk_steps == 0:
                    log(f"{step + i:7d}/{cfg.steps:7d}: {chunk_losses[i]:.4f}")
            step += n
            checkpoint.save(out, cfg, vocab, state)
            saved = step
            fileio.write_atomic(losses_file, lambda f: np.save(f, losses))
            if interrupted[0] and step < cfg.steps:
                raise Interrupted(
                    f"interrupted at step {step}; checkpoint saved in {out}. "
                    f"Continue with the same command plus --resume"
                )

    params = state.params
    bn_stats = train.calibrate_bn(params, Xtr)
    checkpoint.save(out, cfg, vocab, state, bn_stats)
    split_losses = split_losses_of(params, bn_stats, splits)
    steps_run = cfg.steps - start
    metrics: dict[str, Any] = {
        **{f"{k}_loss": v for k, v in split_losses.items()},
        "steps": cfg.steps,
        "steps_this_run": steps_run,
        "backend": cfg.backend,
        "seconds": round(time.perf_counter() - t_start, 3),
        "compile_seconds": round(compile_seconds, 3),
        "steps_per_second": round(steps_run / run_seconds, 1) if run_seconds else None,
        "device": str(jax.devices()[0].device_kind),
        "devices": 1 if mesh is None else mesh.size,
        "config": cfg.to_dict(),
    }
    if cfg.running_stats:
        running = split_losses_of(params, state.bn_running, splits)
        metrics.update({f"{k}_loss_running_stats": v for k, v in running.items()})
    fileio.write_atomic(out / "metrics.json", lambda f: json.dump(metrics, f, indent=2), "w")
    for split, value in split_losses.items():
        log(f"{split:5s} {value:.4f}")
    if plot_losses(losses, out / "loss.png"):
        log(f"loss curve: {out / 'loss.png'}")
    key = jax.random.key(cfg.seed + 10)
    if num_samples:  # --samples 0 prints none
        for name in sample.sample_names(params, bn_stats, vocab, key, num_samples):
            log(name)
    return metrics


def _all_finite(tree) -> bool:
    """Whether every floating-point leaf of ``tree`` is finite (what a checkpoint needs)."""
    leaves = (np.asarray(x) for x in jax.tree.leaves(tree))
    return all(np.isfinite(a).all() for a in leaves if a.dtype.kind == "f")


def split_losses_of(params, bn_stats, splits) -> dict[str, float]:
    """Eval-mode mean loss of each split that has examples."""
    return {
        name: round(float(train.evaluate(params, bn_stats, jnp.asarray(X), jnp.asarray(Y))), 4)
        for name, (X, Y) in splits.items()
        if len(Y)
    }


def plot_losses(losses: np.ndarray, path: Path, window: int = 1000) -> bool:
    """Save log10(loss) averaged over ``window`` steps, as in the lectures; ``False``
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = losses[np.isfinite(losses)]
    window = max(1, min(window, len(done) // 10 or 1))
    n = len(done) // window * window
    curve = np.log10(done[:n]).reshape(-1, window).mean(1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(len(curve)) * window, curve)
    ax.set_xlabel("step")
    ax.set_ylabel(f"log10 loss (mean of {window} steps)")
    fig.tight_layout()
    fileio.write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
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


def eval_run(out: str | os.PathLike[str], data_path=None) -> dict[str, float]:
    """The split losses of a saved run, recomputed from its checkpoint."""
    ckpt = load_run(out)
    vocab, splits = data.load_splits(data_path, block_size=ckpt.config.block_size)
    if vocab != ckpt.vocab:
        raise RunError(f"{out}: the data's vocabulary differs from the run's")
    return split_losses_of(ckpt.state.params, ckpt.bn_stats, splits)
