"""Interop: jaxninja's ops inside an Equinox module.

Equinox style: the model maps ONE example, and the batch is a ``jax.vmap`` with an
``axis_name``, across which the batch norm synchronises its statistics (the pattern of
``eqx.nn.BatchNorm``). Here that batch norm is :func:`jaxninja.ops.batch_norm` with
``axis_name="batch"``, and ``eqx.filter_grad`` of the loss runs its hand-written backward
rule through the vmap. The head and the loss are fused in
:func:`jaxninja.ops.linear_cross_entropy`. ``reference=True`` gives the same model on
plain autodiff. Run it::

    python experiments/interop_equinox.py
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from jaxninja import ops
from jaxninja.lecture.data import Vocab, build_dataset

WORDS = "emma olivia ava isabella sophia charlotte mia amelia harper evelyn abigail".split()
AXIS = "batch"


class MLP(eqx.Module):
    embed: eqx.nn.Embedding
    hidden: eqx.nn.Linear
    gain: jax.Array
    bias: jax.Array
    w_out: jax.Array
    b_out: jax.Array
    reference: bool = eqx.field(static=True, default=False)

    def __init__(self, vocab: int, key: jax.Array, *, block: int = 3, embd: int = 10,
                 hidden: int = 64, reference: bool = False):  # fmt: skip
        k1, k2, k3 = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab, embd, key=k1)
        self.hidden = eqx.nn.Linear(block * embd, hidden, use_bias=False, key=k2)
        self.gain, self.bias = jnp.ones(hidden), jnp.zeros(hidden)
        self.w_out = 0.1 * jax.random.normal(k3, (hidden, vocab))
        self.b_out = jnp.zeros(vocab)
        self.reference = reference

    def features(self, x: jax.Array) -> jax.Array:
        """One example ``(block,)`` -> hidden ``(hidden,)``; call under vmap(axis_name)."""
        pre = self.hidden(jax.vmap(self.embed)(x).reshape(-1))[None]  # (1, hidden)
        return jnp.tanh(ops.batch_norm(pre, self.gain, self.bias, axis_name=AXIS))[0]


def loss(model: MLP, X: jax.Array, Y: jax.Array) -> jax.Array:
    """Mean cross-entropy of a batch ``X (batch, block)``, ``Y (batch,)``."""
    if model.reference:  # plain autodiff: the references, whole batch, unfused head
        pre = jax.vmap(lambda x: model.hidden(jax.vmap(model.embed)(x).reshape(-1)))(X)
        h = jnp.tanh(ops.batch_norm_reference(pre, model.gain, model.bias))
        return ops.cross_entropy_reference(h @ model.w_out + model.b_out, Y).mean()
    h = jax.vmap(model.features, axis_name=AXIS)(X)  # (batch, hidden)
    return ops.linear_cross_entropy(h, model.w_out, Y, bias=model.b_out).mean()


def make_data(words: list[str] = WORDS, block: int = 3):
    vocab = Vocab.from_words(words)
    X, Y = build_dataset(words, vocab, block)
    return jnp.asarray(X), jnp.asarray(Y), vocab.size


@eqx.filter_jit
def train_step(model: MLP, opt_state, X: jax.Array, Y: jax.Array, optimizer):
    value, grads = eqx.filter_value_and_grad(loss)(model, X, Y)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, value


def train(steps: int = 100, lr: float = 0.1, seed: int = 0):
    X, Y, vocab = make_data()
    model = MLP(vocab, jax.random.key(seed))
    optimizer = optax.sgd(lr)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    losses = []
    for _ in range(steps):
        model, opt_state, value = train_step(model, opt_state, X, Y, optimizer)
        losses.append(float(value))
    return model, losses


def main() -> None:
    _, losses = train()
    print(f"equinox MLP: loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
