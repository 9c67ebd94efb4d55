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
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxninja import model, train
from jaxninja.train import AXIS, ConfigError, TrainConfig

Array = jax.Array

__all__ = ["AXIS", "data_mesh", "sharded_loss_and_grads"]


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
