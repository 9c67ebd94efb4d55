"""The Exercise-4 network as pure functions on a params dict.

``init_params(key, ...) -> params`` and ``forward(params, X) -> logits``: no classes, no
hidden state. The architecture (lecture notation, ``n`` examples, ``H`` hidden units)::

    emb    = C[X]                       (n, block_size, n_embd)
    embcat = emb.reshape(n, -1)         (n, block_size * n_embd)
    hprebn = embcat @ W1 + b1           (n, H)
    hpreact = batch_norm(hprebn, bngain, bnbias)   (Bessel-corrected variance, eps 1e-5)
    h      = tanh(hpreact)              (n, H)
    logits = h @ W2 + b2                (n, vocab_size)
    loss   = mean cross-entropy(logits, Y)

The dtype of every computation follows the params (``init_params(..., dtype=...)``):
float32 by default, float64 (with ``jax_enable_x64``) for exact gradient checks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxninja import ops

Array = jax.Array
Params = dict[str, Array]
BNStats = dict[str, Array]

BN_EPS = 1e-5
PARAM_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")


def init_params(
    key: Array,
    vocab_size: int = 27,
    n_embd: int = 10,
    n_hidden: int = 200,
    block_size: int = 3,
    dtype: Any = jnp.float32,
) -> Params:
    """Parameters with the lecture's (deliberately non-standard) init scales.

    ``W1`` is Kaiming-scaled for tanh, ``(5/3)/sqrt(fan_in)``; the biases, ``W2`` and the
    batch-norm affine parameters are small random numbers rather than zeros, because
    zeros can hide a wrong backward pass.

    Returns:
      ``{"C": (vocab, n_embd), "W1": (block*n_embd, H), "b1": (H,), "W2": (H, vocab),
      "b2": (vocab,), "bngain": (1, H), "bnbias": (1, H)}``.

    >>> import jax
    >>> p = init_params(jax.random.key(42), n_hidden=64)
    >>> {k: v.shape for k, v in p.items()}["W1"], sum(v.size for v in p.values())
    ((30, 64), 4137)
    """
    fan_in = n_embd * block_size
    kC, k1, kb1, k2, kb2, kg, kb = jax.random.split(key, 7)

    def normal(k: Array, shape: tuple[int, ...]) -> Array:
        return jax.random.normal(k, shape, dtype)

    return {
        "C": normal(kC, (vocab_size, n_embd)),
        "W1": normal(k1, (fan_in, n_hidden)) * (5 / 3) / fan_in**0.5,
        "b1": normal(kb1, (n_hidden,)) * 0.1,
        "W2": normal(k2, (n_hidden, vocab_size)) * 0.1,
        "b2": normal(kb2, (vocab_size,)) * 0.1,
        "bngain": normal(kg, (1, n_hidden)) * 0.1 + 1.0,
        "bnbias": normal(kb, (1, n_hidden)) * 0.1,
    }


def hidden_preactivation(params: Params, X: Array) -> Array:
    """``hprebn = C[X].reshape(n, -1) @ W1 + b1``, the input to batch norm, ``(n, H)``."""
    emb = params["C"][X]
    embcat = emb.reshape(emb.shape[0], -1)
    return embcat @ params["W1"] + params["b1"]


def _head(params: Params, hpreact: Array) -> Array:
    h = jnp.tanh(hpreact)
    return h @ params["W2"] + params["b2"]


def forward(params: Params, X: Array, bn_stats: BNStats | None = None) -> Array:
    """Logits ``(n, vocab_size)`` for contexts ``X`` ``(n, block_size)`` of int ids.

    With ``bn_stats=None`` batch norm uses the batch's own statistics (training mode,
    through :func:`jaxninja.ops.batch_norm`); with ``{"mean": (1, H), "var": (1, H)}``
    it uses those (evaluation and sampling, any batch size).

    >>> import jax, jax.numpy as jnp
    >>> p = init_params(jax.random.key(0))
    >>> forward(p, jnp.zeros((4, 3), jnp.int32)).shape
    (4, 27)
    """
    hprebn = hidden_preactivation(params, X)
    if bn_stats is None:
        hpreact = ops.batch_norm(hprebn, params["bngain"], params["bnbias"], eps=BN_EPS)
    else:
        bnraw = (hprebn - bn_stats["mean"]) * jax.lax.rsqrt(bn_stats["var"] + BN_EPS)
        hpreact = params["bngain"] * bnraw.astype(hprebn.dtype) + params["bnbias"]
    return _head(params, hpreact)


def loss(params: Params, X: Array, Y: Array) -> Array:
    """Mean cross-entropy in training mode, on the custom-VJP ops.

    ``jax.grad(loss)`` runs the hand-written rules of :mod:`jaxninja.ops`.

    >>> import jax, jax.numpy as jnp
    >>> p = init_params(jax.random.key(0))
    >>> X, Y = jnp.zeros((8, 3), jnp.int32), jnp.arange(8)
    >>> sorted(jax.grad(loss)(p, X, Y)) == sorted(p)
    True
    """
    return ops.cross_entropy(forward(params, X), Y).mean()


def loss_with_stats(params: Params, X: Array, Y: Array) -> tuple[Array, BNStats]:
    """:func:`loss` that also returns the batch-norm statistics of this batch.

    For ``jax.value_and_grad(..., has_aux=True)`` when tracking running averages.
    """
    hprebn = hidden_preactivation(params, X)
    hpreact, mean, var = ops.batch_norm_with_stats(
        hprebn, params["bngain"], params["bnbias"], eps=BN_EPS
    )
    logits = _head(params, hpreact)
    return ops.cross_entropy(logits, Y).mean(), {"mean": mean, "var": var}


def reference_loss(params: Params, X: Array, Y: Array) -> Array:
    """The same loss in plain ``jnp`` (no custom VJPs): what ``jax.grad`` differentiates
    in the ``autodiff`` backend and in the tests' baselines."""
    hprebn = hidden_preactivation(params, X)
    hpreact = ops.batch_norm_reference(hprebn, params["bngain"], params["bnbias"], eps=BN_EPS)
    return ops.cross_entropy_reference(_head(params, hpreact), Y).mean()
