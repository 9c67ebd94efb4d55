"""Data-parallel training: each batch split over a 1-D device mesh, batch norm synchronized.

The global batch of every step is the one single-device training draws
(:func:`jaxninja.train.batch_indices`); its rows are split into equal, contiguous slices,
one per device, and the parameters are replicated. Inside ``jax.shard_map`` (with the
default ``check_vma=True``):

* batch norm takes its mean and variance over the *global* batch (``lax.psum`` of sums
  and counts, Bessel's correction on the global ``n``), and its hand-written backward
  rule psums its two batch reductions, so each device's ``dx`` is exactly its slice of
  the single-device ``dx`` (:func:`jaxninja.ops.batch_norm` with ``axis_name``);
* the loss is the mean over the global batch (:func:`jaxninja.model.loss` with
  ``axis_name``);
* gradients with respect to the replicated parameters come out summed over devices:
  under ``check_vma`` the transpose of using a replicated value on varying data is a
  ``psum``, so ``jax.grad`` returns the global gradient on every device, and every device
  applies the same SGD update.

So a run on ``N`` devices computes the same parameters as a run on one device, up to the
order of floating-point additions. The chunk itself is
:func:`jaxninja.train.make_train_chunk` with ``mesh=data_mesh(...)``.

The mesh spans ``jax.devices()`` (all devices of all processes), so the same code runs on
CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before ``jax`` is
imported), on GPUs and on TPUs.

**Many processes** (one per host or per GPU, started by the cluster's launcher):
:func:`initialize` joins JAX's distributed runtime (``jax.distributed.initialize``; gloo
collectives on CPU) before anything else touches a device. The mesh then spans every
process's devices and the training chunk is the same program: the state and the training
set are global arrays replicated on every device (:func:`replicate`; every process reads
the same data file, :func:`check_same`), the batch indices are drawn inside the program
from the same seed, and each device trains on its own rows of each global batch, so
``P`` processes x ``D`` devices train the same model as one process with ``P * D``
devices, or one device, up to float rounding.
Process 0 alone reads and writes the run directory; the others receive its state
(:func:`from_main`) and agree with it on stopping (:func:`largest`). Calibration,
evaluation and sampling at the end run on process 0 alone, on its first device, with the
(replicated) trained parameters (:func:`local`).

A process that dies takes the job down: JAX's coordination service notices the missing
heartbeats (``heartbeat_timeout`` seconds; a dead process 0 is noticed at once) and ends
every other process. JAX ends them from a C++ thread with a multi-line fatal log; a small
filter process between the process and its stderr (:mod:`jaxninja.stderr_filter`) turns
that into one ``error:`` line; a collective that fails first is one line too
(:func:`lost_process`). Every file of the run directory is written atomically, so the last
checkpoint stays valid and ``--resume`` continues, with any process count.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxninja import model, stderr_filter, train
from jaxninja.errors import JaxninjaError
from jaxninja.train import AXIS, ConfigError, TrainConfig

Array = jax.Array

__all__ = [
    "AXIS",
    "DistributedError",
    "check_same",
    "data_mesh",
    "from_main",
    "initialize",
    "is_main",
    "largest",
    "leave_job",
    "local",
    "lost_process",
    "replicate",
    "sharded_loss_and_grads",
]

HEARTBEAT_TIMEOUT = 30
"""Seconds without a heartbeat after which a process counts as dead (JAX's default: 100)."""
CONNECT_TIMEOUT = 300
"""Seconds every process waits for all the others to join (they may start minutes apart)."""
SHUTDOWN_TIMEOUT = 300
"""Seconds a finished process waits for the others at exit (process 0 still evaluates)."""


class DistributedError(JaxninjaError):
    """A multi-process job that cannot start or continue; the message says why."""


def data_mesh(cfg: TrainConfig, devices: int | None = None) -> Mesh | None:
    """The 1-D mesh of ``devices`` devices for ``cfg``, or ``None`` for one device.

    ``devices=None`` means all of ``jax.devices()`` (all processes' devices), or one
    device for the ``manual`` backend.

    Raises :class:`~jaxninja.train.ConfigError` when ``devices`` is not a positive
    integer, exceeds the devices there are, when ``cfg.batch_size`` does not divide by
    it, or when the backend cannot run sharded (``manual`` has no cross-device rule).
    """
    available = jax.device_count()
    data_parallel = train.BACKENDS[cfg.backend].data_parallel
    if jax.process_count() > 1:
        _check_job_devices(cfg, devices, available)
    if devices is None and not data_parallel:
        return None  # e.g. manual: the hand-written backward pass has no cross-device rule
    n = available if devices is None else devices
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"devices must be a positive integer, got {devices!r}")
    if n > available:
        hint = (
            f"; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting"
            if jax.default_backend() == "cpu"
            else ""
        )
        raise ConfigError(
            f"--devices {n} asks for more devices than the {available} there are{hint}"
        )
    if cfg.batch_size % n:
        raise ConfigError(
            f"batch_size {cfg.batch_size} does not divide evenly over {n} devices"
            + (" (--devices defaults to all of them)" if devices is None else "")
            + f"; use a --batch-size that is a multiple of {n} or a --devices that "
            f"divides {cfg.batch_size}"
        )
    if n == 1:
        return None
    if not data_parallel:
        raise ConfigError(
            f"backend {cfg.backend!r} runs on one device only (asked for {n}); "
            f"pass --devices 1 or --backend custom_vjp"
        )
    return Mesh(np.array(jax.devices()[:n]), (AXIS,))


def _check_job_devices(cfg: TrainConfig, devices: int | None, available: int) -> None:
    """A multi-process job trains on every device of every process, never on one alone."""
    if devices not in (None, available):
        raise ConfigError(
            f"--devices {devices}: a job of {jax.process_count()} processes trains on all "
            f"{available} of their devices; leave --devices out"
        )
    if not train.BACKENDS[cfg.backend].data_parallel:
        raise ConfigError(
            f"backend {cfg.backend!r} runs on one device only; a job of "
            f"{jax.process_count()} processes needs --backend custom_vjp or autodiff"
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
    fn = jax.shard_map(loss_and_grads, mesh=mesh, in_specs=specs, out_specs=(P(), P()))
    return jax.jit(fn)


# --------------------------------------------------------------- joining a job


def parse_coordinator(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6) -> ``(host, port)``.

    >>> parse_coordinator("node001:8476")
    ('node001', 8476)
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"--coordinator must be HOST:PORT with a port in 1..65535, got {address!r}"
        )
    return host, int(port)


LAUNCHERS = {
    "JAX_COORDINATOR_ADDRESS": None,  # JAX's own; the rest is detected by JAX
    "SLURM_STEP_NUM_TASKS": "SLURM_STEP_NODELIST",  # srun: a job step's task count
    "OMPI_COMM_WORLD_SIZE": "OMPI_MCA_orte_hnp_uri",  # Open MPI's mpirun
}
"""Environment variables of launchers whose job JAX joins without arguments: the variable
(a process count, except JAX's address) and one more that JAX's detection reads."""


def launched_job(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a launcher started this process as one of several that JAX can join
    with no arguments (Slurm's ``srun``, Open MPI's ``mpirun``, ``JAX_COORDINATOR_ADDRESS``).

    >>> launched_job({}), launched_job({"SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NODELIST": "n1"})
    (False, False)
    >>> launched_job({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_hnp_uri": "x;tcp://10.0.0.1:1"})
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

    With ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes`` and
    ``process_id`` this process joins that job; with none of them, JAX's own cluster
    detection joins the job a launcher started (:func:`launched_job`), and otherwise the
    process runs alone (returns 1, nothing initialized). CPU collectives use gloo. A
    process missing ``heartbeat_timeout`` seconds of heartbeats ends the job
    (:mod:`jaxninja.stderr_filter` makes that one ``error:`` line).

    >>> initialize(environ={})  # no flags, no launcher: one process
    1
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes}
    given["--process-id"] = process_id
    missing = [flag for flag, value in given.items() if value is None]
    if len(missing) == len(given) and not launched_job(environ):
        return 1
    if missing and len(missing) < len(given):
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
    if coordinator is not None:
        parse_coordinator(coordinator)
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
    """End this process of a multi-process job now with ``exit_code`` (after flushing
    stdout/stderr), skipping JAX's exit barrier, where it would wait for processes that
    wait for it; the others see it gone and stop. Alone: return ``exit_code``.

    >>> leave_job(2)  # one process: nothing to leave
    2
    """
    if jax.distributed.is_initialized() and jax.process_count() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    return exit_code


# ------------------------------------------------------- data across processes


def is_main() -> bool:
    """Whether this is process 0, the one that prints and writes the run directory."""
    return jax.process_index() == 0


def from_main(tree: Any, mesh: Mesh | None) -> Any:
    """Process 0's value of pytree ``tree`` (same structure everywhere), as arrays
    replicated on every device of ``mesh`` (``None``: left on this process's default
    device). Every process must call it: it is a collective."""
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
    """Replicated (global) arrays as arrays on this process's default device: what
    single-device code (calibration, evaluation, sampling) takes."""
    return jax.tree.map(lambda a: jax.numpy.asarray(np.asarray(a)), tree)


def largest(value: int) -> int:
    """The largest ``value`` over all processes (a collective): e.g. the number of a
    signal one process got, so that every process stops after the same chunk.

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


# ------------------------------------------------------ a dead process: one line


def lost_process(error: BaseException) -> str | None:
    """The one-line message for a JAX runtime error in a multi-process job (a collective
    whose peer went away: gloo reports a reset connection), else ``None``.

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
    subprocess.Popen(
        [sys.executable, "-m", "jaxninja.stderr_filter", coordinator, str(CONNECT_TIMEOUT)],
        stdin=read,
        close_fds=True,
        start_new_session=True,  # Ctrl-C / Slurm's signals reach the job, not the filter
    )
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
