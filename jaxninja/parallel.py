"""Data-parallel training: each batch split over a 1-D device mesh, batch norm synchronized.

The global batch of every step is the one single-device training draws
(:func:`jaxninja.train.batch_indices`); its rows are split into equal, contiguous slices,
one per device, and the parameters are replicated. Inside ``jax.shard_map`` (with the
default ``check_vma=True``):

* batch norm takes its mean and variance over the *global* batch (``lax.psum`` of sums
  and counts, Bessel's correction on the global ``n``), and its hand-written backward
  rule psums its two batch reductions, so each device's ``dx`` is exactly its slice of
  the single-device ``dx`` (:func:`jaxninja.ops.batch_norm` with ``axis_name``);
* the loss is the mean over the global batch: ``psum(sum of local losses) / global n``;
* gradients with respect to the replicated parameters come out summed over devices:
  under ``check_vma`` the transpose of using a replicated value on varying data is a
  ``psum``, so ``jax.grad`` returns the global gradient on every device, and every device
  applies the same SGD update.

So a run on ``N`` devices computes the same parameters as a run on one device, up to the
order of floating-point additions. One device is today's path
(:func:`jaxninja.train.make_train_chunk`), untouched.

The mesh spans ``jax.devices()`` (all devices of all processes), so the same code runs on
CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before ``jax`` is
imported), on GPUs and on TPUs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxninja import model, ops, train
from jaxninja.train import ConfigError, TrainConfig, TrainState

Array = jax.Array
AXIS = "data"
"""The mesh axis the batch is split over."""

__all__ = [
    "AXIS",
    "bench_data_parallel",
    "data_mesh",
    "make_sharded_train_chunk",
    "sharded_loss",
    "sharded_loss_and_grads",
]


def data_mesh(cfg: TrainConfig, devices: int | None = None) -> Mesh | None:
    """The 1-D mesh of ``devices`` devices for ``cfg``, or ``None`` for one device.

    ``devices=None`` means all of ``jax.devices()`` (all processes' devices), or one
    device for the ``manual`` backend.

    Raises :class:`~jaxninja.train.ConfigError` when ``devices`` is not a positive
    integer, exceeds the devices there are, when ``cfg.batch_size`` does not divide by
    it, or when the backend cannot run sharded (``manual`` has no cross-device rule).
    """
    available = jax.device_count()
    if devices is None and cfg.backend == "manual":
        return None  # the hand-written backward pass has no cross-device rule
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
    if cfg.backend == "manual":
        raise ConfigError(
            f"backend 'manual' runs on one device only (asked for {n}); "
            f"pass --devices 1 or --backend custom_vjp"
        )
    return Mesh(np.array(jax.devices()[:n]), (AXIS,))


def sharded_loss(
    params: model.Params, X: Array, Y: Array, axis_name: Any = AXIS, backend: str = "custom_vjp"
) -> Array:
    """The model's mean cross-entropy over the global batch, called inside ``shard_map``.

    ``X``, ``Y`` are this device's rows. ``backend="custom_vjp"`` runs the hand-written
    rules of :mod:`jaxninja.ops`; ``"autodiff"`` the plain-``jnp`` references. Same value
    as :func:`jaxninja.model.loss` on the concatenated batch.
    """
    if backend == "custom_vjp":
        bn, ce = ops.batch_norm, ops.cross_entropy
    elif backend == "autodiff":
        bn, ce = ops.batch_norm_reference, ops.cross_entropy_reference
    else:
        raise ConfigError(f"backend {backend!r} cannot run sharded; use custom_vjp or autodiff")
    hprebn = model.hidden_preactivation(params, X)
    hpreact = bn(hprebn, params["bngain"], params["bnbias"], eps=model.BN_EPS, axis_name=axis_name)
    losses = ce(model._head(params, hpreact), Y)
    n_global = lax.psum(losses.shape[0], axis_name)
    return lax.psum(jnp.sum(losses), axis_name) / n_global


def sharded_loss_and_grads(
    mesh: Mesh, backend: str = "custom_vjp"
) -> Callable[[model.Params, Array, Array], tuple[Array, model.Params]]:
    """A jitted ``(params, X, Y) -> (loss, grads)`` on the global batch ``X, Y`` split
    over ``mesh``'s rows; the same numbers as ``jax.value_and_grad(model.loss)``."""
    grad = jax.value_and_grad(lambda p, x, y: sharded_loss(p, x, y, AXIS, backend))
    fn = jax.shard_map(grad, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()))
    return jax.jit(fn)


def make_sharded_train_chunk(
    cfg: TrainConfig, n_steps: int, mesh: Mesh, unroll: int = 1
) -> jax.stages.Wrapped:
    """:func:`jaxninja.train.make_train_chunk` over ``mesh``: a jitted
    ``(state, Xtr, Ytr) -> (state, losses[n_steps])``.

    The state and the training set are replicated; step ``s`` draws the same global batch
    as single-device training and each device trains on its contiguous slice of it. The
    whole scan runs inside one ``shard_map``, so the only communication is the
    all-reduces of batch norm, the loss and the gradients. The state is donated.
    """
    n_dev = mesh.shape[AXIS]
    if cfg.batch_size % n_dev:
        raise ConfigError(
            f"batch_size {cfg.batch_size} does not divide evenly over {n_dev} devices"
        )
    grad_fn = jax.value_and_grad(lambda p, x, y: sharded_loss(p, x, y, AXIS, cfg.backend))
    step = train.train_step(cfg, grad_fn, train.make_optimizer(cfg), axis_name=AXIS)
    sharded_scan = jax.shard_map(
        lambda state, batches: lax.scan(step, state, batches, unroll=min(unroll, n_steps)),
        mesh=mesh,
        in_specs=(P(), P(None, AXIS)),  # batches (n_steps, batch, ...): split the batch
        out_specs=(P(), P()),
    )

    def chunk(state: TrainState, Xtr: Array, Ytr: Array) -> tuple[TrainState, Array]:
        idx = train.batch_indices(cfg, state.step + jnp.arange(n_steps), Xtr.shape[0])
        return sharded_scan(state, (Xtr[idx], Ytr[idx]))

    replicated = NamedSharding(mesh, P())
    return jax.jit(chunk, donate_argnums=0, in_shardings=replicated, out_shardings=replicated)


def bench_data_parallel(
    device_counts: Sequence[int] | None = None,
    *,
    batch_size: int = 4096,
    n_hidden: int = 1024,
    steps: int = 20,
    repeats: int = 3,
    n_examples: int = 100_000,
    backend: str = "custom_vjp",
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Training steps per second against the number of devices, in this process.

    For each count ``n`` (default: 1, 2, 4, ... up to ``jax.device_count()``) compiles one
    chunk of ``steps`` steps (``n == 1``: :func:`jaxninja.train.make_train_chunk`, else
    :func:`make_sharded_train_chunk`) on a synthetic training set and reports the best of
    ``repeats`` timed runs: ``{"devices", "steps_per_second", "ms_per_step",
    "compile_seconds", "final_loss"}``. Forced CPU devices share the machine's cores, so
    on CPU this measures overhead, not speed-up.
    """
    available = jax.device_count()
    if device_counts is None:
        device_counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= available]
    cfg = TrainConfig(
        batch_size=batch_size, n_hidden=n_hidden, steps=steps, chunk_steps=steps,
        backend=backend,
    ).validate()  # fmt: skip
    rng = np.random.default_rng(0)
    Xtr = jnp.asarray(rng.integers(0, 27, (n_examples, cfg.block_size), dtype=np.int32))
    Ytr = jnp.asarray(rng.integers(0, 27, (n_examples,), dtype=np.int32))
    results = []
    for n in device_counts:
        mesh = data_mesh(cfg, n)
        t = time.perf_counter()
        fn: Any = (
            train.make_train_chunk(cfg, steps)
            if mesh is None
            else make_sharded_train_chunk(cfg, steps, mesh)
        )
        state = train.init_state(cfg, 27)
        compiled = fn.lower(state, Xtr, Ytr).compile()
        compile_s = time.perf_counter() - t
        best = float("inf")
        losses = None
        for _ in range(repeats):
            state = train.init_state(cfg, 27)
            jax.block_until_ready(state)
            t = time.perf_counter()
            state, losses = compiled(state, Xtr, Ytr)
            jax.block_until_ready(losses)
            best = min(best, time.perf_counter() - t)
        row = {
            "devices": n,
            "steps_per_second": round(steps / best, 2),
            "ms_per_step": round(1e3 * best / steps, 3),
            "compile_seconds": round(compile_s, 2),
            "final_loss": round(float(np.asarray(losses)[-1]), 4),
        }
        if log is not None:
            log(
                f"devices {n:2d}: {row['steps_per_second']:8.2f} steps/s "
                f"({row['ms_per_step']:.2f} ms/step, batch {batch_size}, H {n_hidden}, "
                f"{jax.devices()[0].platform})"
            )
        results.append(row)
    return results
