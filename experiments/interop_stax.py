"""Interop: jaxninja's custom-VJP ops inside a plain stax-style model.

No framework needed: ``jax.example_libraries.stax`` models are ``(init_fn, apply_fn)``
pairs of pure functions, and :func:`jaxninja.ops.batch_norm` /
:func:`jaxninja.ops.cross_entropy` are plain functions too, so they drop in as a layer
and a loss. ``jax.grad`` of the loss then runs our hand-written backward rules. This
example also shows the two transformations people ask about:

* an **ensemble** of models with different seeds: stack their params along a new leading
  axis and ``jax.vmap`` the init, the loss and the whole train step over it (custom VJPs
  batch like any other function);
* a ``jax.jit`` train step with **donated buffers** (``donate_argnums``): the old params
  and optimizer state are consumed, so XLA may update them in place.

The model is the lecture's: embedding -> flatten -> Dense -> batch norm -> tanh -> Dense.

Run it (on a few built-in names, or on the full data set with ``JAXNINJA_DATA`` set)::

    python experiments/interop_stax.py
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.example_libraries import stax

from jaxninja import ops
from jaxninja.lecture.data import Vocab, build_dataset, load_words

Array = jax.Array
Params = Any  # the nested tuples of a stax model
InitFn = Callable[[Array, tuple[int, ...]], tuple[tuple[int, ...], Params]]
ApplyFn = Callable[..., Array]

WORDS = (
    "emma olivia ava isabella sophia charlotte mia amelia harper evelyn abigail emily "
    "elizabeth mila ella avery sofia camila aria scarlett victoria madison luna grace "
    "chloe penelope layla riley zoey nora lily eleanor hannah lillian addison aubrey"
).split()


# ----------------------------------------------------------------------- stax layers


def Embedding(vocab_size: int, n_embd: int) -> tuple[InitFn, ApplyFn]:
    """stax layer: int ids ``(n, block)`` -> embeddings ``(n, block, n_embd)``."""

    def init_fn(rng, input_shape):
        return (*input_shape, n_embd), jax.random.normal(rng, (vocab_size, n_embd))

    def apply_fn(params, inputs, **kwargs):
        return params[inputs]

    return init_fn, apply_fn


def BatchNorm(eps: float = 1e-5, *, reference: bool = False) -> tuple[InitFn, ApplyFn]:
    """stax layer: :func:`jaxninja.ops.batch_norm` over the batch axis (batch statistics,
    Bessel's correction), with a learnt ``(gain, bias)`` initialised as in the lecture.

    ``reference=True`` uses :func:`jaxninja.ops.batch_norm_reference` (plain autodiff)
    instead: the baseline for checking the custom VJP through a whole model."""
    bn = ops.batch_norm_reference if reference else ops.batch_norm

    def init_fn(rng, input_shape):
        kg, kb = jax.random.split(rng)
        shape = (1, input_shape[-1])
        gain = 1.0 + 0.1 * jax.random.normal(kg, shape)
        bias = 0.1 * jax.random.normal(kb, shape)
        return input_shape, (gain, bias)

    def apply_fn(params, inputs, **kwargs):
        gain, bias = params
        return bn(inputs, gain, bias, eps=eps)

    return init_fn, apply_fn


def make_model(
    vocab_size: int = 27, n_embd: int = 10, n_hidden: int = 64, *, reference: bool = False
) -> tuple[InitFn, ApplyFn]:
    """The lecture's MLP as a ``stax.serial`` model: ``(init_fn, apply_fn)``.

    ``reference=True`` builds the same model on the plain-autodiff batch norm."""
    return stax.serial(
        Embedding(vocab_size, n_embd),
        stax.Flatten,
        stax.Dense(n_hidden),
        BatchNorm(reference=reference),
        stax.Tanh,
        stax.Dense(vocab_size),
    )


def init(init_fn: InitFn, key: Array, block_size: int = 3) -> Params:
    """Params of one model; ``jax.vmap(functools.partial(init, init_fn))(keys)`` stacks
    an ensemble."""
    _, params = init_fn(key, (-1, block_size))
    return params


def loss_fn(
    apply_fn: ApplyFn, params: Params, X: Array, Y: Array, *, reference: bool = False
) -> Array:
    """Mean cross-entropy of the model, through :func:`jaxninja.ops.cross_entropy`
    (or, with ``reference=True``, :func:`jaxninja.ops.cross_entropy_reference`)."""
    ce = ops.cross_entropy_reference if reference else ops.cross_entropy
    return ce(apply_fn(params, X), Y).mean()


# ------------------------------------------------------------------------ training


def sgd_step(
    apply_fn: ApplyFn, params: Params, X: Array, Y: Array, lr: float
) -> tuple[Params, Array]:
    """One plain-SGD step of one model: ``(new_params, loss)``. Not jitted: compose it."""
    loss, grads = jax.value_and_grad(functools.partial(loss_fn, apply_fn))(params, X, Y)
    new_params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    return new_params, loss


def make_train_step(
    apply_fn: ApplyFn, *, ensemble: bool = False
) -> Callable[[Params, Array, Array, float], tuple[Params, Array]]:
    """A jitted ``step(params, X, Y, lr) -> (params, loss)`` that **donates** ``params``.

    With ``ensemble=True`` the params carry a leading member axis and the step is
    ``jax.vmap``-ed over it (every member sees the same batch; its losses come back as a
    vector). After a call the donated input params are invalid: always rebind,
    ``params, loss = step(params, X, Y, lr)``.
    """
    step = functools.partial(sgd_step, apply_fn)
    if ensemble:
        step = jax.vmap(step, in_axes=(0, None, None, None))
    return jax.jit(step, donate_argnums=0)


def make_data(words: list[str] | None = None, block_size: int = 3) -> tuple[Array, Array, int]:
    """``(X, Y, vocab_size)`` from ``words`` (default: the built-in names)."""
    words = list(WORDS) if words is None else words
    vocab = Vocab.from_words(words)
    X, Y = build_dataset(words, vocab, block_size)
    return jnp.asarray(X), jnp.asarray(Y), vocab.size


def train(
    X: Array,
    Y: Array,
    vocab_size: int,
    *,
    n_members: int = 4,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 0.1,
    seed: int = 0,
) -> tuple[Params, list[Array]]:
    """Train an ensemble of ``n_members`` models (different init seeds) at once.

    Returns the stacked params and the per-step loss vectors ``(n_members,)``.
    """
    init_fn, apply_fn = make_model(vocab_size)
    keys = jax.random.split(jax.random.key(seed), n_members + 1)
    params = jax.vmap(functools.partial(init, init_fn))(keys[1:])
    step = make_train_step(apply_fn, ensemble=True)
    losses = []
    batch_key = keys[0]
    for _ in range(steps):
        batch_key, k = jax.random.split(batch_key)
        ix = jax.random.randint(k, (batch_size,), 0, X.shape[0])
        params, loss = step(params, X[ix], Y[ix], lr)
        losses.append(loss)
    return params, losses


def main() -> None:
    path = os.environ.get("JAXNINJA_DATA")
    words = load_words(path) if path else None
    X, Y, vocab_size = make_data(words)
    steps = 1000
    params, losses = train(X, Y, vocab_size, steps=steps)
    print(f"{X.shape[0]} examples, ensemble of {losses[0].shape[0]} stax models, {steps} steps")
    print("first-step losses:", [round(float(v), 4) for v in losses[0]])
    print("last-step losses: ", [round(float(v), 4) for v in losses[-1]])
    _, apply_fn = make_model(vocab_size)
    full = jax.vmap(functools.partial(loss_fn, apply_fn), in_axes=(0, None, None))(params, X, Y)
    print("full-data losses: ", [round(float(v), 4) for v in full])


if __name__ == "__main__":
    main()
