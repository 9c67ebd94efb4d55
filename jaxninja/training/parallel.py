"""Data-parallel training over a 1-D device mesh, on one process or a job of many (README
"Data-parallel training", "Many machines"): any layout trains the same model up to rounding."""

from __future__ import annotations

import itertools
import os
import re
import select
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax import Array
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxninja.errors import JaxninjaError
from jaxninja.lecture import model
from jaxninja.training import train
from jaxninja.training.train import AXIS, ConfigError, TrainConfig

HEARTBEAT_TIMEOUT = 30  # seconds without a heartbeat: a process counts as dead (JAX: 100)
CONNECT_TIMEOUT = 300  # seconds to wait for every process to join (they may start apart)
LAUNCHERS = {  # a launcher's process count -> another variable JAX's detection needs
    "SLURM_STEP_NUM_TASKS": "SLURM_STEP_NODELIST",  # srun: a job step's task count
    "OMPI_COMM_WORLD_SIZE": "OMPI_MCA_orte_hnp_uri",  # Open MPI's mpirun
}
RESTART = "the job stops; the run's last checkpoint is intact: restart every process with --resume"
_LOG_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")  # a C++ log line
_FATAL = "Terminating process because the JAX distributed service detected fatal errors"


def data_mesh(cfg: TrainConfig, devices: int | None = None) -> Mesh | None:
    """The 1-D mesh of ``devices`` devices for ``cfg`` (default: all; one for ``manual``, which
    has no cross-device rule; a job of several processes trains on all), ``None`` for one.
    :class:`~jaxninja.training.train.ConfigError` for a count ``cfg`` cannot use."""
    available, processes = jax.device_count(), jax.process_count()
    data_parallel = train.BACKENDS[cfg.backend].data_parallel
    if processes > 1 and devices not in (None, available):
        raise ConfigError(
            f"--devices {devices}: a job of {processes} processes trains on all "
            f"{available} of their devices; leave --devices out"
        )
    if devices is None and not data_parallel and processes == 1:
        return None
    n = available if devices is None else devices
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"devices must be a positive integer, got {devices!r}")
    if n > available:
        raise ConfigError(
            f"--devices {n} asks for more devices than the {available} there are (on CPU: set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting)"
        )
    if n > 1 and not data_parallel:
        fix = "--backend custom_vjp or autodiff" + (" or --devices 1" if processes == 1 else "")
        raise ConfigError(f"backend {cfg.backend!r} runs on one device only, not {n}; use {fix}")
    if cfg.batch_size % n:
        default = " (--devices defaults to all of them)" if devices is None else ""
        raise ConfigError(
            f"batch_size {cfg.batch_size} does not divide evenly over {n} devices{default}; use "
            f"a --batch-size that is a multiple of {n} or a --devices that divides {cfg.batch_size}"
        )
    return Mesh(np.array(jax.devices()[:n]), (AXIS,)) if n > 1 else None


def sharded_loss_and_grads(
    mesh: Mesh, backend: str = "custom_vjp"
) -> Callable[[model.Params, Array, Array], tuple[Array, model.Params]]:
    """A jitted ``(params, X, Y) -> (loss, grads)`` on the global batch ``X, Y`` split
    over ``mesh``'s rows; the same numbers as ``jax.value_and_grad(model.loss)``."""
    grad = train.BACKENDS[backend].grad

    def loss_and_grads(p: model.Params, X: Array, Y: Array) -> tuple[Array, model.Params]:
        (loss, _), grads = grad(p, X, Y, axis_name=AXIS)
        return loss, grads

    specs = (P(), P(AXIS), P(AXIS))
    return jax.jit(jax.shard_map(loss_and_grads, mesh=mesh, in_specs=specs, out_specs=P()))


def launched_job(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a launcher (``srun``, ``mpirun``, ``JAX_COORDINATOR_ADDRESS``) started this
    process as one of several, a job JAX joins with no arguments.

    >>> launched_job({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "x;tcp://h:1"})
    True
    """
    counts = [environ.get(count, "") for count, needs in LAUNCHERS.items() if environ.get(needs)]
    many = any(count.isdigit() and int(count) > 1 for count in counts)
    return many or bool(environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT,
    environ: Mapping[str, str] = os.environ,
) -> int:
    """Join a multi-process job before anything touches a device; return the process count.

    All three of ``coordinator`` (process 0's ``HOST:PORT``), ``num_processes`` and
    ``process_id``, or none: then join a launcher's job (:func:`launched_job`) or run alone.
    CPU collectives use gloo; stderr goes through :func:`filter_stderr`.

    >>> initialize(environ={})  # no flags, no launcher: one process
    1
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes}
    missing = [flag for flag, v in (given | {"--process-id": process_id}).items() if v is None]
    if len(missing) == 3 and not launched_job(environ):
        return 1
    if 0 < len(missing) < 3:
        raise JaxninjaError(
            f"--coordinator, --num-processes and --process-id go together; missing "
            f"{', '.join(missing)}"
        )
    host, _, port = (coordinator or "").rpartition(":")  # "[::1]:PORT" for IPv6
    if coordinator is not None and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise JaxninjaError(
            f"--coordinator must be HOST:PORT with a port in 1..65535, got {coordinator!r}"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:  # type: ignore[operator]
        raise JaxninjaError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _guard_stderr(coordinator or environ.get("JAX_COORDINATOR_ADDRESS") or "process 0")
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=CONNECT_TIMEOUT,
            heartbeat_timeout_seconds=heartbeat_timeout,  # shutdown: JAX's 300 s
        )
    except Exception as e:  # JAX raises several types; the message is what matters
        where = coordinator or "the launcher's coordinator"
        raise JaxninjaError(f"cannot join the job at {where}: {_first_line(e)}") from None
    return jax.process_count()


def leave_job(exit_code: int) -> int:
    """End this process of a job now, skipping JAX's exit barrier (which would wait for
    processes that wait for this one); alone, return ``exit_code``.

    >>> leave_job(2)  # one process: nothing to leave
    2
    """
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    return exit_code


def is_main() -> bool:
    """Whether this is process 0, the one that prints and writes the run directory."""
    return jax.process_index() == 0


def from_main(tree: Any, mesh: Mesh | None) -> Any:
    """Process 0's pytree ``tree``, :func:`replicate`-d (a collective: every process calls it)."""
    return replicate(multihost_utils.broadcast_one_to_all(tree), mesh)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Pytree ``tree``, the same on every process, as arrays replicated on every device
    of ``mesh`` (``None``: on this process's default device)."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda a: jax.make_array_from_process_local_data(replicated, np.asarray(a)), tree
    )


def local(tree: Any) -> Any:
    """Replicated (global) arrays as arrays on this process's default device."""
    return jax.tree.map(lambda a: jax.numpy.asarray(np.asarray(a)), tree)


def _everyone(x: np.ndarray) -> np.ndarray:
    """``x`` of every process, stacked in process order (a collective)."""
    return x[None] if jax.process_count() == 1 else multihost_utils.process_allgather(x)


def largest(value: int) -> int:
    """The largest ``value`` over all processes (a collective), e.g. a signal's number.

    >>> largest(15)  # one process
    15
    """
    return int(_everyone(np.array(value, np.int32)).max())


def check_same(text: str, what: str) -> None:
    """Raise :class:`JaxninjaError` on every process unless all hold the same
    ``text`` (at most 64 ASCII characters, e.g. the data file's sha256)."""
    everyone = _everyone(np.frombuffer(text.encode("ascii").ljust(64)[:64], np.uint8))
    differ = [i for i, row in enumerate(everyone) if not np.array_equal(row, everyone[0])]
    if differ:
        raise JaxninjaError(
            f"process(es) {', '.join(map(str, differ))} have a different {what} than "
            f"process 0; every process needs the same one"
        )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def lost_process(error: BaseException) -> str | None:
    """The one line for a JAX runtime error in a job (a collective lost its peer), or ``None``.

    >>> lost_process(RuntimeError("x")) is None  # one process: not ours to explain
    True
    """
    if not isinstance(error, jax.errors.JaxRuntimeError) or not jax.distributed.is_initialized():
        return None
    return f"a collective with another process failed ({_first_line(error)}); {RESTART}"


def _guard_stderr(coordinator: str) -> None:
    """Route fd 2 through :func:`filter_stderr` in a forked child, which outlives ``abort()``."""
    sys.stderr.flush()
    read, write = os.pipe()
    if os.fork() == 0:  # before JAX's runtime starts; the child only runs the standard library
        try:
            os.close(write)
            os.setsid()  # the job's signals are for the parent
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
            lines = _pipe_lines(read)
            if filter_stderr(lines, sys.stderr.write, coordinator):
                for _ in lines:  # the stack trace: drained, not shown
                    pass
        finally:
            sys.stderr.flush()
            os._exit(0)
    os.close(read)
    os.dup2(write, 2)
    os.close(write)


def _pipe_lines(fd: int) -> Iterator[str | None]:
    """The lines read from pipe ``fd``, with ``None`` after each half second of quiet."""
    while True:  # a chunk is whole lines: every writer writes line by line
        if not select.select([fd], [], [], 0.5)[0]:
            yield None
        elif chunk := os.read(fd, 65536):
            yield from chunk.decode(errors="replace").splitlines(keepends=True)
        else:
            return  # EOF: the process whose stderr this is has ended


def filter_stderr(
    lines: Iterable[str | None], write: Callable[[str], Any], coordinator: str = "process 0"
) -> bool:
    """Copy ``lines`` to ``write``, but the fatal log with which JAX ends a job's process from
    C++ (then ``abort()``, uncatchable) becomes one ``error:`` line; return whether it came.
    A C++ log line (``E1127 00:06:08.5 109 a.cc:12] ...``) and what follows are held until a
    ``None`` (a pause) or the end.

    >>> out = []
    >>> filter_stderr(["W1127 00:00:00.1 7 a.cc:1] hi", None, "ok"], out.append), out
    (False, ['W1127 00:00:00.1 7 a.cc:1] hi', 'ok'])
    """
    held: list[str] = []
    for line in itertools.chain(lines, [None]):
        if line is None:  # a pause: the block is complete
            if any(_FATAL in h for h in held):
                write(f"error: {_fatal_message(''.join(held), coordinator)}\n")
                return True
            for h in held:
                write(h)
            held = []
        elif held or _LOG_LINE.match(line):
            held.append(line)
        else:
            write(line)
    return False


def _fatal_message(block: str, coordinator: str) -> str:
    """The one line for JAX's fatal log ``block``: what happened, in a few words."""
    if "RegisterTask" in block:  # never joined: nothing was trained, nothing to resume
        return (
            f"cannot join the job: the coordinator at {coordinator} did not answer within "
            f"{CONNECT_TIMEOUT} s (process 0 must be running and reachable at that address)"
        )
    dead = re.search(r"stopped sending heartbeats\):\s*\n([\d, ]+)", block)
    if dead:
        return f"process {dead.group(1).strip()} stopped sending heartbeats; {RESTART}"
    if "Socket closed" in block or "failed to connect" in block.lower():
        return f"the connection to process 0 (the coordinator) was lost; {RESTART}"
    return f"another process of the job died or became unreachable; {RESTART}"
