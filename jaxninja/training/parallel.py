"""Data-parallel training over a 1-D device mesh, on one process or a job of many (README
"Data-parallel training", "Many machines"): any layout trains the same model up to rounding."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any, NamedTuple

import jax
import numpy as np
from jax import Array
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxninja.errors import JaxninjaError
from jaxninja.lecture import model
from jaxninja.limits import check_int
from jaxninja.training import fileio, train
from jaxninja.training.train import AXIS, ConfigError, TrainConfig

HEARTBEAT_TIMEOUT = 30  # seconds without a heartbeat: a process counts as dead (JAX: 100)
CONNECT_TIMEOUT = 300  # seconds to wait for every process to join (they may start apart)
LAUNCHERS = {  # a launcher's process count -> another variable JAX's detection needs
    "SLURM_STEP_NUM_TASKS": "SLURM_STEP_NODELIST",  # srun: a job step's task count
    "OMPI_COMM_WORLD_SIZE": "OMPI_MCA_orte_hnp_uri",  # Open MPI's mpirun
}
MAX_OPTIONS_BYTES = 4096  # a job's options as JSON (about 400 bytes)
RESTART = "the job stops; the run's last checkpoint is intact: restart every process with --resume"
PAUSE = 2.0  # seconds of quiet after which C++ output held by the stderr guard is shown
JOINED, CLEAN_END, QUIET_END = b"j", b"e", b"q"  # what a process tells its stderr guard
_notices: list[int] = []  # the write end of the pipe to this process's stderr guard


def data_mesh(cfg: TrainConfig, devices: int | None = None) -> Mesh | None:
    """The 1-D mesh of ``devices`` devices for ``cfg`` (default: all; one for ``manual``, which
    has no cross-device rule; a job of several processes trains on all), ``None`` for one.
    ``jaxninja.errors.ConfigError`` for ``devices`` not in ``1..INT32_MAX`` or a count
    ``cfg`` cannot use."""
    if devices is not None:
        check_int("devices", devices)
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

    Examples:
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
    ``process_id``, or none: then join a launcher's job (``launched_job``) or run alone.
    CPU collectives use gloo; C++'s stderr goes through ``filter_stderr``.

    Raises:
        ConfigError: a number out of range: ``num_processes`` or ``heartbeat_timeout`` < 1,
            ``process_id`` outside ``0..num_processes - 1`` (named by their flags).
        JaxninjaError: some of the three but not all, a bad ``coordinator``, or a job that
            cannot be joined.

    Examples:
      >>> initialize(environ={})  # no flags, no launcher: one process
      1
    """
    check_int("--heartbeat-timeout", heartbeat_timeout)
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
    if num_processes is not None:
        check_int("--num-processes", num_processes)
        check_int("--process-id", process_id, 0, num_processes - 1)
    if coordinator is not None and process_id == 0:
        _check_port_free(coordinator, int(port))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = coordinator or environ.get("JAX_COORDINATOR_ADDRESS") or "process 0"
    _guard_stderr(where, heartbeat_timeout)
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=CONNECT_TIMEOUT,
            heartbeat_timeout_seconds=heartbeat_timeout,  # shutdown: JAX's 300 s
        )
    except Exception as e:  # JAX raises several types; the message is what matters
        _release_claims()  # no job: the port is free again for this process and others
        raise JaxninjaError(f"cannot join the job at {where}: {_first_line(e)}") from None
    tell_guard(JOINED)
    return jax.process_count()


def leave_job(exit_code: int) -> int:
    """End this process of a job now, skipping JAX's exit barrier (which would wait for
    processes that wait for this one); alone, return ``exit_code``.

    Examples:
      >>> leave_job(2)  # one process: nothing to leave
      2
    """
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        tell_guard(QUIET_END)  # this process said why it ends: C++'s echo of it is noise
        os._exit(exit_code)
    return exit_code


def is_main() -> bool:
    """Whether this is process 0, the one that prints and writes the run directory."""
    return jax.process_index() == 0


def from_main(tree: Any, mesh: Mesh | None) -> Any:
    """Process 0's pytree ``tree``, ``replicate``-d (a collective: every process calls it)."""
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

    Examples:
      >>> largest(15)  # one process
      15
    """
    return int(_everyone(np.array(value, np.int32)).max())


def job_options(cfg: TrainConfig, **flags: Any) -> dict[str, Any]:
    """``cfg``'s fields and ``flags`` by their command-line names: the options that define
    a job, which ``check_same_options`` compares.

    Examples:
      >>> job_options(TrainConfig(), resume=False)["--n-hidden"]
      200
    """
    return {f"--{k.replace('_', '-')}": v for k, v in {**cfg.to_dict(), **flags}.items()}


def check_same_options(options: Mapping[str, Any]) -> None:
    """Raise ``JaxninjaError`` on every process unless all of them were given the same
    ``options`` (every option that defines the job: config, data file hash, resume...), in
    one line naming the first option that differs and both values. A collective: call it
    before the first step, on every process. Alone, nothing to compare:

    Examples:
      >>> check_same_options({"--seed": 1})
    """
    if jax.process_count() == 1:
        return
    text = json.dumps(dict(options), sort_keys=True, default=str).encode()
    if len(text) > MAX_OPTIONS_BYTES:
        raise ValueError(f"options take {len(text)} bytes, over {MAX_OPTIONS_BYTES}")
    mine = np.frombuffer(text.ljust(MAX_OPTIONS_BYTES), np.uint8)
    everyone = [json.loads(bytes(row).rstrip()) for row in _everyone(mine)]
    for i, theirs in enumerate(everyone[1:], start=1):
        for name, value in everyone[0].items():
            if theirs.get(name) != value:
                raise JaxninjaError(
                    f"process {i} has {name} {theirs.get(name)!r:.80} but process 0 has "
                    f"{value!r:.80}; every process of a job needs the same options"
                )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def lost_process(error: BaseException) -> str | None:
    """The one line for a JAX runtime error in a job (a collective lost its peer), or ``None``.

    Examples:
      >>> lost_process(RuntimeError("x")) is None  # one process: not ours to explain
      True
    """
    if not isinstance(error, jax.errors.JaxRuntimeError) or not jax.distributed.is_initialized():
        return None
    return f"a collective with another process failed ({_first_line(error)}); {RESTART}"


def tell_guard(notice: bytes) -> None:
    """Tell this process's stderr guard (if any) ``notice``: ``JOINED``, or how the
    process ends: ``CLEAN_END`` (show what C++ wrote) or ``QUIET_END`` (an
    ``error:`` line said why: drop it)."""
    for fd in _notices:
        with contextlib.suppress(OSError):
            os.write(fd, notice)


def _guard_stderr(coordinator: str, heartbeat_timeout: int) -> None:
    """Route fd 2, where JAX's C++ runtime logs (and then ``abort()``s a process of a
    failed job, uncatchably), through ``filter_stderr`` in a forked child that
    outlives the process; Python's own lines go to a copy of the real stderr."""
    sys.stderr.flush()
    read, write = os.pipe()
    notices_read, notices_write = os.pipe()
    started = time.monotonic()
    if os.fork() == 0:  # before JAX's runtime starts; the child only runs the standard library
        try:
            os.close(write)
            os.close(notices_write)
            os.setsid()  # the job's signals are for the parent
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
            ended = Ended(coordinator, heartbeat_timeout, started)
            filter_stderr(_pipe_lines(read), _stderr_write, partial(_read_all, notices_read), ended)
        finally:
            os._exit(0)
    os.close(read)
    os.close(notices_read)
    python_stderr = os.dup(2)
    os.dup2(write, 2)
    os.close(write)
    _notices.append(notices_write)
    atexit.register(tell_guard, CLEAN_END)  # an exit JAX's abort() skips
    if isinstance(sys.stderr, fileio.SafeStream):  # the CLI's
        sys.stderr.retarget(python_stderr)
    else:
        sys.stderr = fileio.SafeStream(None, python_stderr)


def _stderr_write(text: str) -> None:
    os.write(2, text.encode(errors="backslashreplace"))


def _read_all(fd: int) -> bytes:
    """What is left in pipe ``fd``, once its writer has ended."""
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _pipe_lines(fd: int) -> Iterator[str | None]:
    """The lines read from pipe ``fd``, with ``None`` after each ``PAUSE`` of quiet."""
    while True:
        if not select.select([fd], [], [], PAUSE)[0]:
            yield None
        elif chunk := os.read(fd, 65536):
            yield from chunk.decode(errors="replace").splitlines(keepends=True)
        else:
            return  # EOF: the process whose stderr this is has ended


class Ended(NamedTuple):
    """What a stderr guard knows of its process's job, for ``message``."""

    coordinator: str
    heartbeat_timeout: int
    started: float  # time.monotonic() when the process began to join

    def message(self, joined: bool, now: float) -> str:
        """The one line for a process that JAX's runtime ended (``abort()``): from what
        the process told (``joined``) and when, never from the words JAX logged."""
        if joined:
            return (
                f"JAX's distributed runtime ended this process: another process of the job "
                f"died, hung (no heartbeat for {self.heartbeat_timeout} s) or became "
                f"unreachable; {RESTART}"
            )
        waited = now - self.started
        if waited >= CONNECT_TIMEOUT - 1:
            return (
                f"cannot join the job: the coordinator at {self.coordinator} did not answer "
                f"within {CONNECT_TIMEOUT} s (process 0 must be running and reachable there)"
            )
        return (
            f"cannot join the job at {self.coordinator}: its coordinator ended this "
            f"process's registration after {waited:.0f} s (does another process have the "
            f"same --process-id? Each needs its own, 0..N-1) or the job had ended"
        )


def filter_stderr(
    lines: Iterable[str | None],
    write: Callable[[str], Any],
    notices: Callable[[], bytes],
    ended: Ended,
    clock: Callable[[], float] = time.monotonic,
) -> str | None:
    r"""Copy C++ ``lines`` to ``write`` once a pause (``None``) follows them; at their end,
    what is still held depends on the process's ``notices``, never on its words (JAX's log
    format may change): a clean end shows it, an ``error:`` line's end drops it, and an
    end without notice (``abort()``) turns it into one ``error:`` line (returned).

    Examples:
      >>> out = []
      >>> ended = Ended("h:1", 30, started=0.0)
      >>> filter_stderr(["W a warning\n", None, "F fatal\n", "stack\n"], out.append,
      ...               lambda: JOINED, ended, clock=lambda: 5.0).endswith("--resume")
      True
      >>> out[0], out[1].startswith("error: JAX's distributed runtime ended this process")
      ('W a warning\n', True)
    """
    held: list[str] = []
    for line in lines:
        if line is not None:
            held.append(line)
            continue
        for h in held:  # a pause: the process goes on, so what it wrote is not its end
            write(h)
        held = []
    told = notices()
    if CLEAN_END in told:
        for h in held:
            write(h)
    if CLEAN_END in told or QUIET_END in told or not held:
        return None
    message = ended.message(JOINED in told, clock())
    write(f"error: {message}\n")
    return message


_CLAIMS: list[socket.socket] = []  # this process 0's claim on its port, held until it exits


def _check_port_free(coordinator: str, port: int) -> None:
    """Raise ``JaxninjaError`` when process 0 cannot serve the job on ``port`` (JAX's
    coordinator listens on every address), before JAX tries and logs from C++: in use by
    another program, by another job, or by this one's other ``--process-id 0``.

    The TCP probe alone leaves a gap before JAX binds the port, and gRPC's ``SO_REUSEPORT``
    lets two coordinators share it, each then waiting for processes that never come: two
    ``--process-id 0`` started at the same moment both passed it (seen in CI). So on Linux
    process 0 first takes an abstract Unix socket named after the port, held while it lives
    (no file; the kernel frees it when the process ends): the second one finds it taken."""
    problem = _port_claimed(port) or _port_in_use(port)
    if problem:
        _release_claims()
        raise JaxninjaError(
            f"--coordinator {coordinator}: process 0 cannot listen on port {port} "
            f"({problem}: another program, or another process started with "
            f"--process-id 0, holds it); choose another port"
        )


def _port_claimed(port: int) -> str | None:
    """Take this machine's claim on ``port`` (Linux); the reason when another process has it."""
    if not sys.platform.startswith("linux"):
        return None
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0jaxninja-coordinator-port-{port}")
    except OSError as e:
        claim.close()
        return e.strerror or str(e)
    _CLAIMS.append(claim)
    return None


def _release_claims() -> None:
    while _CLAIMS:
        _CLAIMS.pop().close()


def _port_in_use(port: int) -> str | None:
    """Bind ``port`` on every address as a server would; the reason when that fails."""
    for family, host in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 here
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server does
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # both families
            try:
                probe.bind((host, port))
            except OSError as e:
                return e.strerror or str(e)
        return None
    return None
