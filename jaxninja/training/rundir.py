"""What makes a run directory safe: exclusive, locked, resumable, stopped cleanly, sized.

The tool writes only ``FILES``; a directory holding one without a checkpoint is someone
else's. An ``flock`` on ``LOCK`` keeps a second process out (however the first one dies).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import signal
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from jaxninja.errors import JaxninjaError
from jaxninja.lecture import data
from jaxninja.training import checkpoint
from jaxninja.training.train import TrainConfig, TrainState

FILES = (checkpoint.FILENAME, "losses.npy", "metrics.json", "loss.png", "metrics.jsonl")
LOCK = ".jaxninja.lock"


class RunError(JaxninjaError):
    """A run that cannot start or continue; the message says why and what to do."""


class Interrupted(RunError):
    """Stopped by a signal after a checkpoint; ``exit_code`` is ``128 + signum``."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def _check_owned(out: Path, resume: bool, overwrite: bool) -> None:
    for name in (*FILES, LOCK):  # the tool writes files: anything else is the user's
        if not _file_or_link(out / name):
            raise RunError(
                f"{out / name} is not a regular file (jaxninja never removes it); move it "
                f"away or choose another --out"
            )
    has_checkpoint = (out / FILES[0]).exists()
    if resume and not has_checkpoint:
        raise RunError(f"{out}: nothing to resume (no {FILES[0]})")
    foreign = [name for name in FILES[1:] if (out / name).exists() or (out / name).is_symlink()]
    if resume or overwrite or not (foreign or has_checkpoint):
        return
    if has_checkpoint:
        raise RunError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to "
            f"replace it, or --out to choose another directory"
        )
    raise RunError(
        f"{out} holds {', '.join(foreign)} but no jaxninja run; pass --overwrite to "
        f"replace them, or --out to choose another directory"
    )


def _file_or_link(path: Path) -> bool:
    """Whether ``path`` is missing, a regular file or a symbolic link (which a write
    replaces and an unlink removes, its target untouched), not a directory, FIFO, ..."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return True
    return stat.S_ISREG(mode) or stat.S_ISLNK(mode)


@contextmanager
def claim(out: Path, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """Create (if needed), check and lock run directory ``out`` for this process."""
    try:
        if resume or out.exists() or out.is_symlink():
            _check_owned(out, resume, overwrite)  # before creating anything in it
        out.mkdir(parents=True, exist_ok=True)
        fd = _open_lock(out / LOCK)
    except OSError as e:
        raise RunError(f"cannot use {out} as a run directory: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"{out} is in use by another jaxninja process; wait for it to finish "
                f"or choose another --out"
            ) from None
        _check_owned(out, resume, overwrite)  # again, now that nobody else can change it
        if overwrite:  # only now: never delete the files of a run that holds the lock
            for name in FILES:
                (out / name).unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # drops the lock


def _open_lock(path: Path) -> int:
    """The lock file's descriptor, never through a symbolic link (what the process writes
    to a stray descriptor must never reach a file of the user's) nor on a FIFO or device."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RunError(
                f"{path} is a symbolic link; remove it or choose another --out"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunError(f"{path} is not a regular file; move it away or choose another --out")
    return fd


SAVING = "saving after the current chunk"
FINISHING = "training is done; finishing the run first (statistics, metrics, samples)"


@contextmanager
def deferred_stop() -> Iterator[dict[str, Any]]:
    """Turn the first SIGINT/SIGTERM into ``stop["signum"]``, checked between chunks (a chunk
    is never cut in half) and announced with ``stop["then"]`` (``SAVING``; the end of a
    run sets ``FINISHING``); a second one ends the process at once with ``128 + signum``
    (files being written are removed first; the last checkpoint stays)."""
    stop: dict[str, Any] = {"signum": 0, "then": SAVING}

    def handler(signum, frame):
        first, stop["signum"] = not stop["signum"], signum
        if not first:
            raise KeyboardInterrupt  # unwinds: a file being written is cleaned up
        msg = f"{stop['then']} (send it again to stop now)"
        with contextlib.suppress(OSError):  # a closed or full stderr: the stop still counts
            print(f"{signal.Signals(signum).name}: {msg}", file=sys.stderr, flush=True)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    try:
        yield stop
    except KeyboardInterrupt:
        # XLA may still run the chunk in its threads and a normal exit under it can crash
        # (SIGSEGV, measured): leave at once; the kernel releases the lock.
        signum = stop["signum"] or signal.SIGINT
        msg = "again: stopped now; the last checkpoint is kept"
        with contextlib.suppress(OSError):
            sys.stdout.flush()
            print(f"{signal.Signals(signum).name} {msg}", file=sys.stderr, flush=True)
        os._exit(128 + signum)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def check_finite_end(out: Path, step: int, bn_stats: dict, metrics: dict[str, Any]) -> None:
    """Raise ``RunError`` when a finished run's calibrated statistics or any of its
    metrics (split losses) are non-finite, which a checkpoint or ``metrics.json`` must never
    hold: the parameters stayed finite but diverged (a learning rate too large)."""
    bad = [f"batch-norm {k}" for k, v in bn_stats.items() if not np.isfinite(v).all()]
    if not bad and bn_stats and not (np.asarray(bn_stats["var"]) > 0).all():  # {}: no BN
        bad.append("batch-norm var (not > 0)")
    bad += [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RunError(
            f"the run diverged (non-finite after training: {', '.join(bad)}); stopped, the "
            f"checkpoint of step {step} (without statistics) is kept in {out}; try a lower --lr"
        )


def check_memory(cfg: TrainConfig, n_examples: int, vocab_size: int = 27) -> None:
    """Raise ``RunError`` when a run's peak memory, roughly (4 bytes per value: state
    with grads and optimizer, a chunk's batches, a step's activations, the evaluation of
    the whole training set), exceeds 80% of this machine's."""
    fan_in = cfg.block_size * cfg.n_embd
    params = vocab_size * cfg.n_embd + (fan_in + vocab_size + 4) * cfg.n_hidden + vocab_size
    batches = min(cfg.chunk_steps, cfg.steps) * cfg.batch_size * (cfg.block_size + 2)
    step = cfg.batch_size * (fan_in + 8 * cfg.n_hidden + 4 * vocab_size)
    evaluation = n_examples * (cfg.block_size + fan_in + 3 * cfg.n_hidden + 3 * vocab_size)
    gib = 4 * (4 * params + batches + step + evaluation + cfg.steps) / (1 << 30)
    have = (data.physical_memory() or 0) / (1 << 30)  # unknown (0): do not refuse
    if have and gib > 0.8 * have:
        raise RunError(
            f"this config needs about {math.ceil(gib):,} GiB of memory and the machine has "
            f"{have:.0f} GiB; lower --n-hidden, --block-size, --n-embd, --batch-size, "
            f"--chunk-steps or --steps"
        )


def check_same_run(
    out: Path, ckpt: checkpoint.Checkpoint, splits, other_data: bool, cfg: TrainConfig | None = None
) -> None:
    """Raise ``RunError`` unless ``ckpt`` was trained with ``cfg`` (but ``steps``; if
    given), on ``splits``' vocabulary and (unless ``other_data``) on the same data file."""
    if cfg is not None:
        theirs, ours = {**ckpt.config.to_dict(), "steps": 0}, {**cfg.to_dict(), "steps": 0}
        diff = [f"{k}={theirs[k]!r} (asked {ours[k]!r})" for k in ours if theirs[k] != ours[k]]
        if diff:
            raise RunError(f"{out} holds a run with a different config: {', '.join(diff)}")
    if ckpt.vocab != splits.vocab:
        raise RunError(f"{out} holds a run trained on a different vocabulary")
    if not other_data and ckpt.data_sha256 != splits.sha256:
        raise RunError(
            f"{out} was trained on another data file (sha256 {ckpt.data_sha256!s:.12}..., "
            f"this one {splits.sha256[:12]}...); pass --other-data to use it anyway"
        )


def resume(
    cfg: TrainConfig, out: Path, splits: data.Splits, other_data: bool, log
) -> tuple[TrainState, np.ndarray]:
    """The checkpoint's state, once ``check_same_run`` passes, and the loss history
    (NaN where missing: a damaged file costs the history, never the run)."""
    ckpt = checkpoint.load(out)
    check_same_run(out, ckpt, splits, other_data, cfg)
    if int(ckpt.state.step) > cfg.steps:
        raise RunError(f"{out} is already at step {int(ckpt.state.step)} > --steps {cfg.steps}")
    losses = np.full(cfg.steps, np.nan, np.float32)
    try:  # memory-mapped: a header that claims terabytes allocates nothing
        old = np.load(out / "losses.npy", mmap_mode="r", allow_pickle=False).reshape(-1)
        losses[: len(old[: cfg.steps])] = np.asarray(old[: cfg.steps], np.float32)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, EOFError, TypeError) as e:
        log(f"warning: {out / 'losses.npy'} is unreadable ({e}); the loss history restarts here")
    return ckpt.state, losses
