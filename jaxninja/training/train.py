"""Training, batch-norm calibration and evaluation: Exercise 4 as a fused, jitted loop.

One step is ``grads = backend(params, Xb, Yb)`` and an optax update (``OPTIMIZERS``,
``SCHEDULES``);
``make_train_chunk`` fuses ``n`` steps into one ``lax.scan``. Step ``s`` draws its batch
from ``fold_in(key(seed), s)``: a run is a pure function of its config, however chunked
(so ``--resume`` is exact).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import time
from collections.abc import Callable, Iterator, Set
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxninja import ops
from jaxninja.errors import ConfigError as ConfigError  # its home before jaxninja.errors
from jaxninja.errors import listing
from jaxninja.lecture import model, ninja
from jaxninja.limits import check_float32, check_int

Array = jax.Array
AXIS = "data"  # the mesh axis a data-parallel batch is split over


def _manual(params: model.Params, X: Array, Y: Array, axis_name: Any = None):
    loss, grads = ninja.manual_grads(params, X, Y)
    return (loss, calibrate_bn(params, X)), grads  # the statistics: pruned unless used


class Backend(NamedTuple):
    grad: Callable[..., Any]  # (params, X, Y, axis_name=None) -> ((loss, batch_stats), grads)
    data_parallel: bool  # has a cross-device (``axis_name``) rule
    batch_norm_optional: bool  # trains a network without batch norm too
    about: str


_autodiff = jax.value_and_grad(model.loss_with_stats, has_aux=True)
BACKENDS: dict[str, Backend] = {  # the one table of training backends
    "custom_vjp": Backend(_autodiff, True, True, "jax.grad through the hand-written VJPs"),
    "manual": Backend(_manual, False, False, "ninja.manual_grads: no autodiff at all (Exercise 4)"),
    "autodiff": Backend(
        partial(_autodiff, reference=True), True, True, "jax.grad of the plain-jnp references"
    ),
}


def check_choice(name: str, value: Any, choices: Any) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices`` (a registry)."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def check_keys(what: str, d: dict, fields: Set[str], optional: Set[str] = frozenset()) -> None:
    """Raise ``ConfigError`` naming the ``missing`` (not in ``optional``) or ``unknown``
    keys of ``d``: the one field check of configs and checkpoint metadata."""
    for problem, names in (("missing", fields - optional - set(d)), ("unknown", set(d) - fields)):
        if names:
            raise ConfigError(f"{problem} {what}field(s): {listing(names)}")


def _schedule_step(cfg: TrainConfig, lr: Any) -> optax.Schedule:
    return optax.piecewise_constant_schedule(lr, {cfg.lr_decay_step: cfg.lr_decay})


def _schedule_cosine(cfg: TrainConfig, lr: Any) -> optax.Schedule:
    return optax.cosine_decay_schedule(lr, cfg.steps, alpha=cfg.lr_decay)


def _schedule_constant(cfg: TrainConfig, lr: Any) -> optax.Schedule:
    return optax.constant_schedule(lr)


SCHEDULES: dict[str, Callable[[TrainConfig, Any], optax.Schedule]] = {
    "step": _schedule_step,  # lr, then lr * lr_decay from lr_decay_step on (the lecture's)
    "cosine": _schedule_cosine,  # lr down to lr * lr_decay at the last step
    "constant": _schedule_constant,  # lr throughout
}
OPTIMIZERS: dict[str, Callable[[optax.Schedule], optax.GradientTransformation]] = {
    "sgd": optax.sgd,  # the lecture's
    "adam": optax.adam,
    "adamw": optax.adamw,  # weight decay 1e-4 (optax's default)
}
# Fields added after checkpoints of jaxninja-checkpoint-1 were written: a config without them
# was trained with their defaults (which reproduce the earlier code bit for bit), so it loads.
ADDED_FIELDS = frozenset(
    {"batch_norm", "init", "w2_scale", "b2_scale", "optimizer", "schedule", "warmup", "eval_every"}
)
# Fields the compiled chunk takes as arguments or never sees (they only set the initial state):
# configs that differ only in these share one compiled program (a sweep's members).
PROGRAM_FREE: dict[str, Any] = {
    "seed": 0,
    "lr": 1.0,
    "init": "kaiming",
    "w2_scale": 0.0,
    "b2_scale": 0.0,
}
CHOICES: dict[str, Any] = {  # the config fields that name a registry entry
    "backend": BACKENDS,
    "init": model.INITS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
}


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
    batch_norm: bool = True  # False: hpreact = hprebn (no bngain/bnbias, nothing to calibrate)
    init: str = "kaiming"  # W1's scale: a key of model.INITS
    w2_scale: float = 0.1  # W2 = randn * w2_scale (Part 3's fix: 0.01)
    b2_scale: float = 0.1  # b2 = randn * b2_scale (Part 3's fix: 0)
    optimizer: str = "sgd"  # a key of OPTIMIZERS
    schedule: str = "step"  # a key of SCHEDULES
    warmup: int = 0  # the lr rises linearly over the first ``warmup`` steps
    eval_every: int = 0  # validation loss and diagnostics every N steps (0: at the end only)

    def validate(self) -> TrainConfig:
        """Return self, or raise ``ConfigError`` naming the bad field.

        Raises:
            ConfigError: a field of the wrong type, out of range, or an unknown choice; a
                combination no backend can train (``running_stats`` or backend ``manual``
                without batch norm).
        """
        for name in ("n_embd", "n_hidden", "block_size", "steps", "chunk_steps"):
            check_int(name, getattr(self, name))
        check_int("batch_size", self.batch_size, 2, why=" (batch norm divides by n-1)")
        for name in ("lr_decay_step", "seed", "warmup", "eval_every"):
            check_int(name, getattr(self, name), 0)
        for name in ("lr", "lr_decay"):
            check_float32(name, getattr(self, name))
        check_float32("lr * lr_decay", self.lr * self.lr_decay)
        for name in ("w2_scale", "b2_scale"):
            check_float32(name, getattr(self, name), zero=True)
        for name in ("running_stats", "batch_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, registry in CHOICES.items():
            check_choice(name, getattr(self, name), registry)
        if not self.batch_norm and self.running_stats:
            raise ConfigError("running_stats needs batch norm; drop one of the two")
        if not self.batch_norm and not BACKENDS[self.backend].batch_norm_optional:
            raise ConfigError(
                f"backend {self.backend!r} is the lecture's network with batch norm; without "
                f"batch norm use backend custom_vjp or autodiff"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, what: str = "config ") -> TrainConfig:
        """Build and validate a config from (untrusted) JSON data.

        Args:
            d: every field of the config, but those of ``ADDED_FIELDS`` may be missing
                (they take their defaults: a checkpoint written before they existed).
            what: the kind of data, for the messages (e.g. ``"config file x.toml: "``).

        Raises:
            ConfigError: not an object, a missing or unknown field, or a bad value.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{what}must be a JSON object, got {type(d).__name__}")
        check_keys(what, d, {f.name for f in dataclasses.fields(cls)}, ADDED_FIELDS)
        return cls(**d).validate()


class TrainState(NamedTuple):
    params: model.Params
    opt_state: optax.OptState
    step: Array  # int32 scalar: number of updates done
    bn_running: model.BNStats  # running mean/var (unused unless running_stats)


def make_schedule(cfg: TrainConfig, lr: float | Array | None = None) -> optax.Schedule:
    """The learning rate of each step: ``SCHEDULES`` ``[cfg.schedule]`` of ``lr``
    (default ``cfg.lr``; a traced value in sweeps), times ``min(1, (step + 1) / warmup)``
    with a warmup.

    Examples:
        >>> f = make_schedule(TrainConfig(lr_decay_step=3))
        >>> [round(float(f(s)), 4) for s in (0, 2, 3)]
        [0.1, 0.1, 0.01]
    """
    base = SCHEDULES[cfg.schedule](cfg, cfg.lr if lr is None else lr)
    if not cfg.warmup:
        return base  # exactly the schedule: the lecture's numbers, bit for bit
    warmup = cfg.warmup

    def schedule(step: Any) -> Any:
        return base(step) * jnp.minimum(1.0, (step + 1) / warmup)

    return schedule


def make_optimizer(
    cfg: TrainConfig, lr: float | Array | None = None
) -> optax.GradientTransformation:
    """``OPTIMIZERS`` ``[cfg.optimizer]`` on ``make_schedule`` ``(cfg, lr)``; the
    default config is the lecture's: SGD, ``lr`` for steps ``< lr_decay_step`` and
    ``lr * lr_decay`` after."""
    return OPTIMIZERS[cfg.optimizer](make_schedule(cfg, lr))


def init_params(cfg: TrainConfig, vocab_size: int, dtype: Any = jnp.float32) -> model.Params:
    """The initial parameters of ``cfg`` (seed, shapes, batch norm, init and scales)."""
    return model.init_params(
        jax.random.key(cfg.seed),
        vocab_size,
        cfg.n_embd,
        cfg.n_hidden,
        cfg.block_size,
        dtype,
        batch_norm=cfg.batch_norm,
        init=cfg.init,
        w2_scale=cfg.w2_scale,
        b2_scale=cfg.b2_scale,
    )


def init_state(cfg: TrainConfig, vocab_size: int, dtype: Any = jnp.float32) -> TrainState:
    """Step 0 of ``cfg``: its parameters, optimizer state and running statistics (``{}``
    without batch norm: none)."""
    params = init_params(cfg, vocab_size, dtype)
    shape = (1, cfg.n_hidden)
    stats_dtype = jnp.promote_types(dtype, jnp.float32)
    running = {"mean": jnp.zeros(shape, stats_dtype), "var": jnp.ones(shape, stats_dtype)}
    running = running if cfg.batch_norm else {}
    return TrainState(params, make_optimizer(cfg).init(params), jnp.zeros((), jnp.int32), running)


def program_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the ``PROGRAM_FREE`` fields set to fixed values: equal for configs
    that can share one compiled chunk (seed and lr then passed as arguments)."""
    return dataclasses.replace(cfg, **PROGRAM_FREE)


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
    """What ``run_chunks`` yields after each chunk."""

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
    eval_every: int = 0,
    compiled: dict[int, Any] | None = None,
) -> Iterator[Chunk]:
    """The one training loop: steps ``start..steps`` in chunks that end at every multiple of
    ``chunk_steps`` and of ``eval_every`` (if not 0), and at ``steps``.

    Args:
        make_chunk: ``n -> jitted (state, *args) -> (state, losses)``; compiled ahead of
            time once per length (compile time measured apart).
        state: the state at step ``start``.
        *args: the other arguments of each chunk.
        start: the first step of the run.
        steps: the number of steps of the run.
        chunk_steps: chunks end at multiples of it...
        eval_every: ...and of this (if not 0).
        compiled: the compiled chunks by length, shared by the calls that pass the same
            dict (the members of a sweep run one after another); default: this call's own.

    Yields:
        A ``Chunk`` after each chunk.
    """
    compiled = {} if compiled is None else compiled
    every = [k for k in (chunk_steps, eval_every) if k]
    while start < steps:
        n = min([steps - start] + [k - start % k for k in every])
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
    over all of ``X`` (the whole training set), ``{"mean": (1, H), "var": (1, H)}``; ``{}``
    for a network without batch norm."""
    if not model.has_batch_norm(params):
        return {}
    mean, var = ops.batch_stats(model.hidden_preactivation(params, X))
    return {"mean": mean, "var": var}


@jax.jit
def evaluate(params: model.Params, bn_stats: model.BNStats, X: Array, Y: Array) -> Array:
    """Mean cross-entropy of ``(X, Y)`` in eval mode (batch norm, if any, with ``bn_stats``)."""
    return ops.cross_entropy(model.forward(params, X, bn_stats), Y).mean()


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields of a config file: a JSON object (``.json``) or a TOML table (``.toml``)
    whose keys are ``TrainConfig``'s field names (any subset: the rest come from
    elsewhere, e.g. the defaults or the command line).

    Args:
        path: the file; its suffix picks the format (JSON unless ``.toml``).

    Returns:
        The fields, not yet validated as a whole (``TrainConfig.validate`` does that).

    Raises:
        ConfigError: an unreadable file, a syntax error (with its line), not a table, an
            unknown field.

    Examples:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     p = pathlib.Path(tmp, "c.toml")
        ...     _ = p.write_text("n_hidden = 64\\noptimizer = 'adam'\\n")
        ...     read_config_file(p)
        {'n_hidden': 64, 'optimizer': 'adam'}
    """
    path = Path(path)
    try:
        text = _read_text(path)
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ConfigError(f"config file {path}: cannot read ({reason})") from None
    try:
        if path.suffix.lower() == ".toml":
            fields = tomllib.loads(text)
        else:
            fields = json.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: not valid TOML ({e})") from None
    except ValueError as e:
        raise ConfigError(f"config file {path}: not valid JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ConfigError(f"config file {path}: must hold an object of config fields")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    check_keys(f"config file {path}: ", fields, names, names)
    try:  # its values with the defaults for the rest: an error names the file
        TrainConfig(**fields).validate()
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    return fields


MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes


def _read_text(path: Path) -> str:
    """The text of regular file ``path`` (a FIFO or device is refused before it can block)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(0, "not a regular file")
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise OSError(0, f"over {MAX_CONFIG_BYTES} bytes")
    return raw.decode("utf-8")
