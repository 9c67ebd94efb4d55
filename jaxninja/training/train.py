"""Training, batch-norm calibration and evaluation: Exercise 4 as a fused, jitted loop.

One step is ``grads = backend(params, Xb, Yb)`` and an ``optax.sgd`` update;
:func:`make_train_chunk` fuses ``n`` steps into one ``lax.scan``. Step ``s`` draws its batch
from ``fold_in(key(seed), s)``: a run is a pure function of its config, however chunked
(so ``--resume`` is exact).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxninja import ops
from jaxninja.errors import JaxninjaError, listing
from jaxninja.lecture import model, ninja

Array = jax.Array
FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)
FLOAT32_TINY = float(jnp.finfo(jnp.float32).tiny)  # smaller becomes 0 or denormal
INT32_MAX = 2**31 - 1
AXIS = "data"  # the mesh axis a data-parallel batch is split over


class ConfigError(JaxninjaError):
    """A training configuration that cannot run; the message names the field."""


def _manual(params: model.Params, X: Array, Y: Array, axis_name: Any = None):
    loss, grads = ninja.manual_grads(params, X, Y)
    return (loss, calibrate_bn(params, X)), grads  # the statistics: pruned unless used


class Backend(NamedTuple):
    grad: Callable[..., Any]  # (params, X, Y, axis_name=None) -> ((loss, batch_stats), grads)
    data_parallel: bool  # has a cross-device (``axis_name``) rule
    about: str


_autodiff = jax.value_and_grad(model.loss_with_stats, has_aux=True)
BACKENDS: dict[str, Backend] = {  # the one table of training backends
    "custom_vjp": Backend(_autodiff, True, "jax.grad through the hand-written VJPs"),
    "manual": Backend(_manual, False, "ninja.manual_grads: no autodiff at all (Exercise 4)"),
    "autodiff": Backend(
        partial(_autodiff, reference=True), True, "jax.grad of the plain-jnp references"
    ),
}


def _check_int(name: str, value: Any, low: int, kind: str = "a positive integer") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:  # True is an int
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    if value > INT32_MAX:  # steps, schedule boundaries and seeds travel as int32
        raise ConfigError(f"{name} must be at most {INT32_MAX}, got {value!r}")


def _check_positive_float(name: str, value: Any) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    if not FLOAT32_TINY <= value <= FLOAT32_MAX:  # float32 would make it 0 or inf
        raise ConfigError(
            f"{name} must be between {FLOAT32_TINY:.3g} and {FLOAT32_MAX:.3g} (float32), "
            f"got {value!r}"
        )


@dataclasses.dataclass(frozen=True)
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
    running_stats: bool = False  # track batch-norm running averages (momentum 0.999)
    chunk_steps: int = 10_000  # steps per compiled chunk: progress lines, checkpoints

    def validate(self) -> TrainConfig:
        """Return self, or raise :class:`ConfigError` naming the bad field."""
        for name in ("n_embd", "n_hidden", "block_size", "steps", "chunk_steps"):
            _check_int(name, getattr(self, name), 1)
        _check_int("batch_size", self.batch_size, 2, "at least 2 (batch norm divides by n-1)")
        _check_int("lr_decay_step", self.lr_decay_step, 0, "a non-negative integer")
        _check_int("seed", self.seed, 0, "a non-negative integer")
        _check_positive_float("lr", self.lr)
        _check_positive_float("lr_decay", self.lr_decay)
        _check_positive_float("lr * lr_decay", self.lr * self.lr_decay)
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
        """Build and validate a config from (untrusted) JSON data: every field required."""
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        for problem, names in (("missing", fields - set(d)), ("unknown", set(d) - fields)):
            if names:
                raise ConfigError(f"{problem} config field(s): {listing(names)}")
        return cls(**d).validate()


class TrainState(NamedTuple):
    params: model.Params
    opt_state: optax.OptState
    step: Array  # int32 scalar: number of updates done
    bn_running: model.BNStats  # running mean/var (unused unless running_stats)


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
    shape, stats_dtype = (1, cfg.n_hidden), jnp.promote_types(dtype, jnp.float32)
    running = {"mean": jnp.zeros(shape, stats_dtype), "var": jnp.ones(shape, stats_dtype)}
    return TrainState(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32), running)


def batch_indices(
    cfg: TrainConfig, steps: Array, n_examples: int, seed: int | Array | None = None
) -> Array:
    """Minibatch row indices ``(len(steps), batch_size)``: step ``s`` draws uniformly with
    replacement from ``fold_in(key(seed), s)``, whatever chunk it runs in. ``seed``
    (default ``cfg.seed``) may be a traced value, as in sweeps."""
    key = jax.random.key(cfg.seed if seed is None else seed)
    data_key = jax.random.fold_in(key, 1)  # not the init key

    def draw(s: Array) -> Array:
        return jax.random.randint(jax.random.fold_in(data_key, s), (cfg.batch_size,), 0, n_examples)

    return jax.vmap(draw)(steps)


def train_step(
    cfg: TrainConfig, optimizer: optax.GradientTransformation, axis_name: Any = None
) -> Callable[[TrainState, tuple[Array, Array]], tuple[TrainState, Array]]:
    """One SGD step on a gathered minibatch ``(Xb, Yb)`` (the body of the chunk's scan), split
    over the mesh axis ``axis_name`` if given; ``cfg.running_stats`` updates the running
    averages (momentum 0.999) from the step's own forward pass (``has_aux``)."""
    grad_fn = BACKENDS[cfg.backend].grad

    def step(state: TrainState, batch: tuple[Array, Array]) -> tuple[TrainState, Array]:
        (loss, stats), grads = grad_fn(state.params, *batch, axis_name=axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        running = state.bn_running
        if cfg.running_stats:
            running = ops.running_average(running, stats, momentum=model.BN_MOMENTUM)
        return TrainState(params, opt_state, state.step + 1, running), loss

    return step


def make_train_chunk(
    cfg: TrainConfig, n_steps: int, mesh: Mesh | None = None
) -> jax.stages.Wrapped:
    """A jitted ``(state, Xtr, Ytr, seed=None, lr=None) -> (state, losses[n_steps])``:
    ``n_steps`` SGD steps in one ``lax.scan``, the state donated. ``seed``/``lr`` (traced, as
    in sweeps) replace ``cfg.seed``/``cfg.lr``; with a ``mesh`` each device trains on its slice
    of the same global batch, in one ``shard_map``. The chunk's minibatches are gathered first."""

    def chunk(
        state: TrainState, Xtr: Array, Ytr: Array, seed: Array | None = None, lr: Any = None
    ) -> tuple[TrainState, Array]:
        step = train_step(cfg, make_optimizer(cfg, lr), None if mesh is None else AXIS)
        scan = partial(jax.lax.scan, step)  # unroll=1: the fastest on CPU (README "Speed")
        if mesh is not None:  # batches (n_steps, batch, ...): split the batch axis
            scan = jax.shard_map(scan, mesh=mesh, in_specs=(P(), P(None, AXIS)), out_specs=P())
        idx = batch_indices(cfg, state.step + jnp.arange(n_steps), Xtr.shape[0], seed)
        return scan(state, (Xtr[idx], Ytr[idx]))

    if mesh is None:
        return jax.jit(chunk, donate_argnums=0)
    replicated = NamedSharding(mesh, P())
    return jax.jit(chunk, donate_argnums=0, in_shardings=replicated, out_shardings=replicated)


class Chunk(NamedTuple):
    """What :func:`run_chunks` yields after each chunk."""

    step: int  # steps done, after this chunk
    state: Any
    losses: np.ndarray  # the chunk's per-step losses (leading axes: members, if any)
    compile_seconds: float  # spent compiling before this chunk (0 when reused)
    run_seconds: float


def run_chunks(
    make_chunk: Callable[[int], jax.stages.Wrapped],
    state: Any,
    *args: Any,
    start: int,
    steps: int,
    chunk_steps: int,
) -> Iterator[Chunk]:
    """The one training loop: steps ``start..steps`` in chunks of ``chunk_steps``; the jitted
    ``make_chunk(n)``, ``(state, *args) -> (state, losses)``, is compiled ahead of time once
    per length (compile time measured apart)."""
    compiled: dict[int, Any] = {}
    while start < steps:
        n = min(chunk_steps, steps - start)
        t0 = time.perf_counter()
        if n not in compiled:
            compiled[n] = make_chunk(n).lower(state, *args).compile()
        t1 = time.perf_counter()
        state, losses = compiled[n](state, *args)
        while not losses.is_ready():  # wait in Python, so signal handlers run meanwhile
            time.sleep(0.005)
        start += n
        yield Chunk(start, state, np.asarray(losses), t1 - t0, time.perf_counter() - t1)


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
