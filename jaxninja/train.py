"""Training, batch-norm calibration and evaluation: Exercise 4 as a fused, jitted loop.

One training step is ``grads = backend(params, Xb, Yb)`` followed by an ``optax.sgd``
update. :func:`make_train_chunk` fuses ``n`` such steps into one compiled
``jax.lax.scan``; the minibatch indices of step ``s`` come from
``fold_in(key(seed), s)``, so a run is a pure function of its config and the result does
not depend on how it was chunked (which is what makes ``--resume`` exact).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxninja import model, ninja, ops

Array = jax.Array
BACKENDS = ("custom_vjp", "manual", "autodiff")
FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


def _is_int(value: Any) -> bool:
    """A JSON/Python integer, not a bool (``True`` is an ``int`` to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


class ConfigError(ValueError):
    """A training configuration that cannot run; the message names the field."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters; the defaults are the lecture's Exercise 4."""

    n_embd: int = 10
    n_hidden: int = 200
    block_size: int = 3
    batch_size: int = 32
    steps: int = 200_000
    lr: float = 0.1
    lr_decay_step: int = 100_000  # lr * lr_decay from this step on (0.1 -> 0.01)
    lr_decay: float = 0.1
    seed: int = 42
    backend: str = "custom_vjp"
    running_stats: bool = False  # track batch-norm running averages (momentum 0.001)
    chunk_steps: int = 10_000  # steps per compiled chunk: progress lines, checkpoints

    def validate(self) -> TrainConfig:
        """Return self, or raise :class:`ConfigError` naming the bad field."""
        for name in ("n_embd", "n_hidden", "block_size", "steps", "chunk_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not _is_int(self.batch_size) or self.batch_size < 2:
            raise ConfigError(
                f"batch_size must be at least 2 (batch norm divides by n-1), "
                f"got {self.batch_size!r}"
            )
        for name in ("lr", "lr_decay"):
            value = getattr(self, name)
            number = isinstance(value, float) or _is_int(value)
            if not number or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
            if value > FLOAT32_MAX:  # it would become inf in the float32 update
                raise ConfigError(f"{name} must be at most {FLOAT32_MAX:.3g}, got {value!r}")
        if not _is_int(self.lr_decay_step) or self.lr_decay_step < 0:
            raise ConfigError(f"lr_decay_step must be >= 0, got {self.lr_decay_step!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.running_stats, bool):
            raise ConfigError(f"running_stats must be true or false, got {self.running_stats!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build and validate a config from (untrusted) JSON data."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d).validate()


class TrainState(NamedTuple):
    params: model.Params
    opt_state: optax.OptState
    step: Array  # int32 scalar: number of updates done
    bn_running: model.BNStats  # running mean/var (unused unless running_stats)


GradFn = Callable[[model.Params, Array, Array], tuple[Array, model.Params]]


def gradient_fn(backend: str) -> GradFn:
    """``(params, X, Y) -> (loss, grads)`` for a backend name.

    * ``custom_vjp``: ``jax.grad`` of :func:`jaxninja.model.loss` (our VJP rules);
    * ``manual``: :func:`jaxninja.ninja.manual_grads` (no autodiff at all);
    * ``autodiff``: ``jax.grad`` of the plain-``jnp`` :func:`jaxninja.model.reference_loss`.
    """
    if backend == "custom_vjp":
        return jax.value_and_grad(model.loss)
    if backend == "manual":
        return ninja.manual_grads
    if backend == "autodiff":
        return jax.value_and_grad(model.reference_loss)
    raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def make_optimizer(
    cfg: TrainConfig, lr: float | Array | None = None
) -> optax.GradientTransformation:
    """Plain SGD, ``lr`` (default ``cfg.lr``; a traced value in sweeps) for steps
    ``< lr_decay_step`` and ``lr * lr_decay`` after."""
    lr = cfg.lr if lr is None else lr
    return optax.sgd(optax.piecewise_constant_schedule(lr, {cfg.lr_decay_step: cfg.lr_decay}))


def init_state(cfg: TrainConfig, vocab_size: int, dtype: Any = jnp.float32) -> TrainState:
    params = model.init_params(
        jax.random.key(cfg.seed), vocab_size, cfg.n_embd, cfg.n_hidden, cfg.block_size, dtype
    )
    running = {
        "mean": jnp.zeros((1, cfg.n_hidden), jnp.promote_types(dtype, jnp.float32)),
        "var": jnp.ones((1, cfg.n_hidden), jnp.promote_types(dtype, jnp.float32)),
    }
    return TrainState(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32), running)


def batch_indices(
    cfg: TrainConfig, steps: Array, n_examples: int, seed: int | Array | None = None
) -> Array:
    """Minibatch row indices ``(len(steps), batch_size)``: step ``s`` draws uniformly with
    replacement from ``fold_in(key(seed), s)``, whatever chunk it runs in. ``seed``
    (default ``cfg.seed``) may be a traced value, as in sweeps."""
    seed = cfg.seed if seed is None else seed
    data_key = jax.random.fold_in(jax.random.key(seed), 1)  # not the init key
    return jax.vmap(
        lambda s: jax.random.randint(
            jax.random.fold_in(data_key, s), (cfg.batch_size,), 0, n_examples
        )
    )(steps)


def train_step(
    cfg: TrainConfig,
    grad_fn: GradFn,
    optimizer: optax.GradientTransformation,
    axis_name: Any = None,
) -> Callable[[TrainState, tuple[Array, Array]], tuple[TrainState, Array]]:
    """One SGD step on a gathered minibatch ``(Xb, Yb)``: the body of the chunk's scan
    (``axis_name``: the batch is split over that mesh axis, see :mod:`jaxninja.parallel`)."""

    def step(state: TrainState, batch: tuple[Array, Array]) -> tuple[TrainState, Array]:
        Xb, Yb = batch
        loss, grads = grad_fn(state.params, Xb, Yb)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        running = state.bn_running
        if cfg.running_stats:  # the lecture's running averages, momentum 0.001
            hprebn = model.hidden_preactivation(state.params, Xb)
            mean, var = ops.batch_stats(hprebn, axis_name=axis_name)
            running = jax.tree.map(
                lambda r, b: 0.999 * r + 0.001 * b, running, {"mean": mean, "var": var}
            )
        return TrainState(params, opt_state, state.step + 1, running), loss

    return step


def make_train_chunk(cfg: TrainConfig, n_steps: int, unroll: int = 1) -> jax.stages.Wrapped:
    """A jitted ``(state, Xtr, Ytr) -> (state, losses[n_steps])`` running ``n_steps``
    SGD steps in one ``lax.scan``. The state's buffers are donated (updated in place).

    Speed notes (measured with ``jaxninja bench``, see :mod:`jaxninja.bench`): the
    minibatches of the whole chunk are drawn and gathered *before* the scan, as one
    vectorised gather (``n_steps * batch_size * (block_size + 1)`` int32s, 5 MB for the
    default 10,000-step chunk), so the loop body holds only the training step; two
    scalar gathers of random rows per step cost more than the step's small kernels.
    ``unroll=1`` is the fastest on CPU (unrolling only adds buffer copies)."""
    step = train_step(cfg, gradient_fn(cfg.backend), make_optimizer(cfg))

    def chunk(state: TrainState, Xtr: Array, Ytr: Array) -> tuple[TrainState, Array]:
        idx = batch_indices(cfg, state.step + jnp.arange(n_steps), Xtr.shape[0])
        return jax.lax.scan(step, state, (Xtr[idx], Ytr[idx]), unroll=min(unroll, n_steps))

    return jax.jit(chunk, donate_argnums=0)


@jax.jit
def calibrate_bn(params: model.Params, X: Array) -> model.BNStats:
    """The lecture's post-training calibration: mean and unbiased variance of ``hprebn``
    over all of ``X`` (the whole training set), ``{"mean": (1, H), "var": (1, H)}``."""
    mean, var = ops.batch_stats(model.hidden_preactivation(params, X))
    return {"mean": mean, "var": var}


@jax.jit
def evaluate(params: model.Params, bn_stats: model.BNStats, X: Array, Y: Array) -> Array:
    """Mean cross-entropy of ``(X, Y)`` in eval mode (batch norm with ``bn_stats``)."""
    return ops.cross_entropy(model.forward(params, X, bn_stats), Y).mean()
