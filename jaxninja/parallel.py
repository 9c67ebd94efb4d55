"""Data-parallel training over a 1-D device mesh, on one process or a job of many.

Each global batch is split over the devices of all processes; batch norm and the loss
reduce over the global batch (``axis_name``) and ``jax.grad`` of the replicated parameters
is already the sum over devices, so any layout trains the same model as one device, up to
float rounding. README "Data-parallel training" and "Many machines" tell the rest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax import Array
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxninja import model, stderr_filter, train
from jaxninja.errors import JaxninjaError
from jaxninja.train import AXIS, ConfigError, TrainConfig

HEARTBEAT_TIMEOUT = 30  # seconds without a heartbeat: a process counts as dead (JAX: 100)
CONNECT_TIMEOUT = 300  # seconds to wait for every process to join (they may start apart)
SHUTDOWN_TIMEOUT = 300  # seconds a finished process waits at exit (process 0 still evaluates)


class DistributedError(JaxninjaError):
    """A multi-process job that cannot start or continue; the message says why."""


def data_mesh(cfg: TrainConfig, devices: int | None = None) -> Mesh | None:
    """The 1-D mesh of ``devices`` devices for ``cfg``, or ``None`` for one device.

    ``None``: all of ``jax.devices()`` (one for ``manual``, which has no cross-device rule).
    :class:`~jaxninja.train.ConfigError` for a bad count, or one that ``cfg`` cannot use.
    """
    available = jax.device_count()
    data_parallel = train.BACKENDS[cfg.backend].data_parallel
    if jax.process_count() > 1:
        _check_job_devices(cfg, devices, available)
    if devices is None and not data_parallel:
        return None
    n = available if devices is None else devices
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"devices must be a positive integer, got {devices!r}")
    if n > available:
        hint = f"; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting"
        raise ConfigError(
            f"--devices {n} asks for more devices than the {available} there are"
            + (hint if jax.default_backend() == "cpu" else "")
        )
    if cfg.batch_size % n:
        raise ConfigError(
            f"batch_size {cfg.batch_size} does not divide evenly over {n} devices"
            + (" (--devices defaults to all of them)" if devices is None else "")
            + f"; use a --batch-size that is a multiple of {n} or a --devices that "
            f"divides {cfg.batch_size}"
        )
    if n > 1 and not data_parallel:
        raise ConfigError(
            f"backend {cfg.backend!r} runs on one device only (asked for {n}); "
            f"pass --devices 1 or --backend custom_vjp"
        )
    return Mesh(np.array(jax.devices()[:n]), (AXIS,)) if n > 1 else None


def _check_job_devices(cfg: TrainConfig, devices: int | None, available: int) -> None:
    """A multi-process job trains on every device of every process, never on one alone."""
    processes = jax.process_count()
    if devices not in (None, available):
        raise ConfigError(
            f"--devices {devices}: a job of {processes} processes trains on all "
            f"{available} of their devices; leave --devices out"
        )
    if not train.BACKENDS[cfg.backend].data_parallel:
        raise ConfigError(
            f"backend {cfg.backend!r} runs on one device only; a job of "
            f"{processes} processes needs --backend custom_vjp or autodiff"
        )


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
    return jax.jit(jax.shard_map(loss_and_grads, mesh=mesh, in_specs=specs, out_specs=(P(), P())))


LAUNCHERS = {  # a launcher's process count -> one more variable that JAX's detection reads
    "JAX_COORDINATOR_ADDRESS": None,  # JAX's own: an address, not a count
    "SLURM_STEP_NUM_TASKS": "SLURM_STEP_NODELIST",  # srun: a job step's task count
    "OMPI_COMM_WORLD_SIZE": "OMPI_MCA_orte_hnp_uri",  # Open MPI's mpirun
}


def launched_job(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a launcher (``srun``, ``mpirun``, ``JAX_COORDINATOR_ADDRESS``) started this
    process as one of several, a job JAX joins with no arguments.

    >>> launched_job({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "x;tcp://h:1"})
    True
    """
    for count, needs in LAUNCHERS.items():
        value = environ.get(count, "")
        if needs is None and value:
            return True
        if needs and environ.get(needs) and value.isdigit() and int(value) > 1:
            return True
    return False


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
    ``process_id``, or none: then join a launcher's job (:func:`launched_job`) or run alone
    (returns 1). CPU collectives use gloo; stderr goes through :mod:`jaxninja.stderr_filter`.

    >>> initialize(environ={})  # no flags, no launcher: one process
    1
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes}
    given["--process-id"] = process_id
    missing = [flag for flag, value in given.items() if value is None]
    if len(missing) == 3 and not launched_job(environ):
        return 1
    if 0 < len(missing) < 3:
        raise DistributedError(
            f"--coordinator, --num-processes and --process-id go together; missing "
            f"{', '.join(missing)}"
        )
    _check_job_args(coordinator, num_processes, process_id, heartbeat_timeout)
    if jax.distributed.is_initialized():
        return jax.process_count()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _guard_stderr(coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "process 0")
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes,
            process_id,
            initialization_timeout=CONNECT_TIMEOUT,
            heartbeat_timeout_seconds=heartbeat_timeout,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT,
        )
    except Exception as e:  # JAX raises several types; the message is what matters
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = coordinator or "the launcher's coordinator"
        raise DistributedError(f"cannot join the job at {where}: {first}") from None
    return jax.process_count()


def _check_job_args(coordinator, num_processes, process_id, heartbeat_timeout) -> None:
    host, _, port = (coordinator or "").rpartition(":")  # "[::1]:PORT" for IPv6
    if coordinator is not None and not (host and port.isdigit() and 0 < int(port) < 65536):
        raise DistributedError(
            f"--coordinator must be HOST:PORT with a port in 1..65535, got {coordinator!r}"
        )
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or 1):
        raise DistributedError(
            f"--process-id must be in 0..{(num_processes or 1) - 1} "
            f"(--num-processes {num_processes}), got {process_id}"
        )
    if heartbeat_timeout < 1:
        raise DistributedError(f"--heartbeat-timeout must be >= 1, got {heartbeat_timeout}")


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


def largest(value: int) -> int:
    """The largest ``value`` over all processes (a collective), e.g. a signal's number.

    >>> largest(15)  # one process
    15
    """
    if jax.process_count() == 1:
        return value
    return int(np.max(multihost_utils.process_allgather(np.array(value, np.int32))))


def check_same(text: str, what: str) -> None:
    """Raise :class:`DistributedError` on every process unless all hold the same
    ``text`` (at most 64 ASCII characters, e.g. the data file's sha256)."""
    if jax.process_count() == 1:
        return
    mine = np.frombuffer(text.encode("ascii").ljust(64)[:64], np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(mine))
    differ = [i for i, row in enumerate(everyone) if not np.array_equal(row, everyone[0])]
    if differ:
        raise DistributedError(
            f"process(es) {', '.join(map(str, differ))} have a different {what} than "
            f"process 0; every process needs the same one"
        )


def lost_process(error: BaseException) -> str | None:
    """The one line for a JAX runtime error in a job (a collective lost its peer), or ``None``.

    >>> lost_process(RuntimeError("x")) is None  # one process: not ours to explain
    True
    """
    if not isinstance(error, jax.errors.JaxRuntimeError) or not jax.distributed.is_initialized():
        return None
    first = (str(error).strip().splitlines() or [""])[0][:200]
    return f"a collective with another process failed ({first}); {stderr_filter.RESTART}"


def _guard_stderr(coordinator: str) -> None:
    """Route this process's stderr (fd 2) through a :mod:`jaxninja.stderr_filter` process."""
    sys.stderr.flush()
    read, write = os.pipe()
    cmd = [sys.executable, "-m", "jaxninja.stderr_filter", coordinator, str(CONNECT_TIMEOUT)]
    subprocess.Popen(cmd, stdin=read, start_new_session=True)  # signals: for the job only
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
