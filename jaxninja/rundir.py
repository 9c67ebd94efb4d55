"""What makes a run directory safe: exclusive, locked, stopped cleanly, sized in advance.

* **Exclusive.** The tool writes only its own file names (:data:`FILES`). A directory that
  holds one of them without a jaxninja checkpoint is someone else's: it is refused unless
  ``--overwrite`` says so. A checkpoint there needs ``--resume`` or ``--overwrite``.
* **Locked.** A run holds an ``flock`` on :data:`LOCK` in its directory for its whole
  life, so a second process (same ``--out``, same or another machine on a shared
  filesystem that supports it) gets a one-line error instead of mixing two runs' files.
  The kernel drops the lock when the process dies, however it dies.
* **Stopped cleanly.** SIGINT (Ctrl-C) and SIGTERM (``kill``, Slurm, ``timeout``,
  ``docker stop``) end the run after the current chunk, with a checkpoint; a second
  signal stops at once (the last checkpoint is intact: every file is written atomically).
* **Sized in advance.** :func:`check_memory` refuses a config that cannot fit in memory
  before anything large is allocated.
"""

from __future__ import annotations

import fcntl
import math
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jaxninja.errors import JaxninjaError
from jaxninja.train import TrainConfig

FILES = ("checkpoint.npz", "losses.npy", "metrics.json", "loss.png")
LOCK = ".jaxninja.lock"


class RunError(JaxninjaError):
    """A run that cannot start or continue; the message says why and what to do."""


class Interrupted(RunError):
    """Stopped by a signal after a checkpoint; ``exit_code`` is ``128 + signum``."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signum)


def _check_owned(out: Path, resume: bool, overwrite: bool) -> None:
    has_checkpoint = (out / FILES[0]).exists()
    if resume:
        if not has_checkpoint:
            raise RunError(f"{out}: nothing to resume (no {FILES[0]})")
        return
    if has_checkpoint and not overwrite:
        raise RunError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to "
            f"replace it, or --out to choose another directory"
        )
    foreign = [name for name in FILES[1:] if (out / name).exists() or (out / name).is_symlink()]
    if foreign and not has_checkpoint and not overwrite:
        raise RunError(
            f"{out} holds {', '.join(foreign)} but no jaxninja run; pass --overwrite to "
            f"replace them, or --out to choose another directory"
        )


def _clear(out: Path) -> None:
    """``--overwrite``: no file of the old run may outlive it next to the new one."""
    for name in FILES:
        (out / name).unlink(missing_ok=True)


@contextmanager
def claim(out: Path, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """Create (if needed), check and lock run directory ``out`` for this process."""
    try:
        if resume or out.exists() or out.is_symlink():
            _check_owned(out, resume, overwrite)  # before creating anything in it
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
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
            _clear(out)
        yield
    finally:
        os.close(fd)


@dataclass
class Stop:
    """Set by the first SIGINT/SIGTERM: ``requested`` names it, ``signum`` is its number."""

    requested: str | None = None
    signum: int = 0


@contextmanager
def deferred_stop() -> Iterator[Stop]:
    """Turn the first SIGINT/SIGTERM into a flag checked between chunks (a chunk is never
    cut in half); a second one ends the process at once with ``128 + signum`` (files
    being written are removed first; the last checkpoint stays)."""
    stop = Stop()

    def handler(signum, frame):
        if stop.requested:
            stop.signum = signum
            raise KeyboardInterrupt  # unwinds: a file being written is cleaned up
        stop.requested, stop.signum = signal.Signals(signum).name, signum
        print(
            f"{stop.requested}: saving after the current chunk (send it again to stop now)",
            file=sys.stderr,
            flush=True,
        )

    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:  # not the main thread: leave the signals alone
        yield stop
        return
    try:
        yield stop
    except KeyboardInterrupt:
        # XLA may still be running the chunk in its threads, and a normal interpreter
        # exit under it can crash (SIGSEGV, measured): leave at once, the checkpoint
        # on disk is the last complete one and the kernel releases the lock.
        name = signal.Signals(stop.signum or signal.SIGINT).name
        print(f"{name} again: stopped now; the last checkpoint is kept", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + (stop.signum or signal.SIGINT))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def memory_needed(cfg: TrainConfig, n_examples: int, vocab_size: int = 27) -> int:
    """Bytes a run needs at its peak, roughly (float32/int32, 4 bytes each): the state
    (params, gradients, optimizer), a chunk's gathered batches, a step's activations
    and the evaluation of the whole training set at once."""
    fan_in = cfg.block_size * cfg.n_embd
    params = vocab_size * cfg.n_embd + (fan_in + vocab_size + 4) * cfg.n_hidden + vocab_size
    batches = min(cfg.chunk_steps, cfg.steps) * cfg.batch_size * (cfg.block_size + 2)
    step = cfg.batch_size * (fan_in + 8 * cfg.n_hidden + 4 * vocab_size)
    evaluation = n_examples * (cfg.block_size + fan_in + 3 * cfg.n_hidden + 3 * vocab_size)
    return 4 * (4 * params + batches + step + evaluation + cfg.steps)


def check_memory(cfg: TrainConfig, n_examples: int, vocab_size: int = 27) -> None:
    """Raise :class:`RunError` when :func:`memory_needed` exceeds this machine's memory."""
    need, have = memory_needed(cfg, n_examples, vocab_size), _physical_memory()
    if need > 0.8 * have:
        gib = 1 << 30
        raise RunError(
            f"this config needs about {math.ceil(need / gib):,} GiB of memory and the "
            f"machine has {have / gib:.0f} GiB; lower --n-hidden, --block-size, "
            f"--n-embd, --batch-size, --chunk-steps or --steps"
        )
