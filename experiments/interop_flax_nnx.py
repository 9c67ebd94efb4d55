"""Interop: jaxninja's ops inside a Flax NNX module.

The lecture's MLP as an ``nnx.Module`` whose batch norm and loss are our ops:

* training mode: :func:`jaxninja.ops.batch_norm_with_stats` (batch statistics, fused VJP)
  and :func:`jaxninja.ops.running_average` into ``nnx.BatchStat`` variables;
* evaluation mode (``model.eval()``): :func:`jaxninja.ops.batch_norm_eval` with them;
* the head and the loss fused: :func:`jaxninja.ops.linear_cross_entropy` never builds the
  ``(batch, vocab)`` logits.

``reference=True`` builds the same module on plain autodiff (the references and an
unfused head), the baseline the tests compare gradients with. Run it::

    python experiments/interop_flax_nnx.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxninja import ops
from jaxninja.lecture.data import Vocab, build_dataset

WORDS = "emma olivia ava isabella sophia charlotte mia amelia harper evelyn abigail".split()


class BatchNorm(nnx.Module):
    """Batch norm on our ops: batch statistics in training, running ones in eval."""

    def __init__(self, features: int, *, momentum: float = 0.999, reference: bool = False):
        self.gain = nnx.Param(jnp.ones((1, features)))
        self.bias = nnx.Param(jnp.zeros((1, features)))
        self.mean = nnx.BatchStat(jnp.zeros((1, features)))
        self.var = nnx.BatchStat(jnp.ones((1, features)))
        self.momentum, self.reference, self.use_running_average = momentum, reference, False

    def __call__(self, x: jax.Array) -> jax.Array:
        gain, bias = self.gain[...], self.bias[...]
        if self.use_running_average:  # set by model.eval(), cleared by model.train()
            return ops.batch_norm_eval(x, gain, bias, self.mean[...], self.var[...])
        if self.reference:
            return ops.batch_norm_reference(x, gain, bias)
        y, mean, var = ops.batch_norm_with_stats(x, gain, bias)
        running = {"mean": self.mean[...], "var": self.var[...]}
        new = ops.running_average(running, jax.lax.stop_gradient({"mean": mean, "var": var}),
                                  self.momentum)  # fmt: skip
        self.mean[...], self.var[...] = new["mean"], new["var"]
        return y


class MLP(nnx.Module):
    def __init__(self, vocab: int, *, block: int = 3, embd: int = 10, hidden: int = 64,
                 reference: bool = False, rngs: nnx.Rngs):  # fmt: skip
        self.embed = nnx.Embed(vocab, embd, rngs=rngs)
        self.hidden = nnx.Linear(block * embd, hidden, use_bias=False, rngs=rngs)
        self.bn = BatchNorm(hidden, momentum=0.9, reference=reference)  # lecture: 0.999
        self.head = nnx.Linear(hidden, vocab, rngs=rngs)
        self.reference = reference

    def features(self, X: jax.Array) -> jax.Array:
        emb = self.embed(X).reshape(X.shape[0], -1)
        return jnp.tanh(self.bn(self.hidden(emb)))

    def __call__(self, X: jax.Array) -> jax.Array:
        return self.head(self.features(X))  # logits, for sampling

    def loss(self, X: jax.Array, Y: jax.Array) -> jax.Array:
        h, w, b = self.features(X), self.head.kernel[...], self.head.bias[...]
        if self.reference:
            return ops.cross_entropy_reference(h @ w + b, Y).mean()
        return ops.linear_cross_entropy(h, w, Y, bias=b).mean()


def make_data(words: list[str] = WORDS, block: int = 3):
    vocab = Vocab.from_words(words)
    X, Y = build_dataset(words, vocab, block)
    return jnp.asarray(X), jnp.asarray(Y), vocab.size


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, X: jax.Array, Y: jax.Array) -> jax.Array:
    loss, grads = nnx.value_and_grad(lambda m: m.loss(X, Y))(model)
    optimizer.update(model, grads)
    return loss


def train(steps: int = 100, lr: float = 0.1, seed: int = 0):
    X, Y, vocab = make_data()
    model = MLP(vocab, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)
    losses = [float(train_step(model, optimizer, X, Y)) for _ in range(steps)]
    return model, losses


def main() -> None:
    model, losses = train()
    X, Y, _ = make_data()
    model.eval()  # batch norm now uses the running statistics
    eval_loss = ops.cross_entropy(model(X), Y).mean()
    print(f"nnx MLP: loss {losses[0]:.4f} -> {losses[-1]:.4f}; eval mode {float(eval_loss):.4f}")


if __name__ == "__main__":
    main()
