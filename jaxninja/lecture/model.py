"""The Exercise-4 network as pure functions on a params dict (lecture notation, ``n``
examples, ``H`` hidden units)::

    emb    = C[X]                       (n, block_size, n_embd)
    embcat = emb.reshape(n, -1)         (n, block_size * n_embd)
    hprebn = embcat @ W1 + b1           (n, H)
    hpreact = batch_norm(hprebn, bngain, bnbias)   (Bessel-corrected variance, eps 1e-5)
                                        (without batch norm: hpreact = hprebn)
    h      = tanh(hpreact)              (n, H)
    logits = h @ W2 + b2                (n, vocab_size)
    loss   = mean cross-entropy(logits, Y)

Every computation runs in the params' dtype (float64 with ``jax_enable_x64`` for checks).
The params say which network it is: without ``bngain``/``bnbias`` (``init_params(...,
batch_norm=False)``) there is no batch norm, and its statistics are ``{}`` everywhere.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxninja import ops

Array = jax.Array
Params = dict[str, Array]
BNStats = dict[str, Array]

BN_EPS = 1e-5
# The lecture's running averages: bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani
BN_MOMENTUM = 0.999
PARAM_NAMES = ("C", "W1", "b1", "W2", "b2", "bngain", "bnbias")


INITS = {  # W1's scale for fan-in ``n``: the one table of initialisations (makemore Part 3)
    "kaiming": lambda n: (5 / 3) / n**0.5,  # Kaiming for tanh: gain 5/3 over sqrt(fan_in)
    "randn": lambda n: 1.0,  # plain randn: the saturated-tanh start Part 3 fixes
}


def init_params(
    key: Array,
    vocab_size: int = 27,
    n_embd: int = 10,
    n_hidden: int = 200,
    block_size: int = 3,
    dtype: Any = jnp.float32,
    *,
    batch_norm: bool = True,
    init: str = "kaiming",
    w2_scale: float = 0.1,
    b2_scale: float = 0.1,
) -> Params:
    """Parameters with the lecture's init scales (the defaults).

    ``W1`` is ``randn`` times ``INITS`` ``[init]`` of its fan-in (``kaiming``:
    ``(5/3)/sqrt(fan_in)``); ``b1`` and the batch-norm affine are small random numbers, not
    zeros (zeros can hide a wrong backward pass); ``W2 = randn * w2_scale`` and ``b2 = randn *
    b2_scale`` (Part 3's fix of the first loss: ``0.01`` and ``0`` make it ``~log(27) = 3.3``).

    Args:
        key: PRNG key; the same key gives the same values whatever the other switches.
        vocab_size: the number of characters (rows of ``C``, columns of ``W2``).
        n_embd: the embedding size (columns of ``C``).
        n_hidden: the hidden layer's width.
        block_size: the context length (characters before the one predicted).
        dtype: float dtype of every parameter.
        batch_norm: ``False`` leaves out ``bngain``/``bnbias``: a network without batch norm.
        init: a key of ``INITS``.
        w2_scale: the output layer's weight scale (Part 3: small, so the first loss is ~3.3).
        b2_scale: the output layer's bias scale.

    Returns:
        ``C (vocab, n_embd)``, ``W1 (block*n_embd, H)``, ``b1 (H,)``, ``W2 (H, vocab)``,
        ``b2 (vocab,)`` and, with batch norm, ``bngain``/``bnbias (1, H)``.

    Examples:
        >>> import jax
        >>> p = init_params(jax.random.key(42), n_hidden=64)
        >>> {k: v.shape for k, v in p.items()}["W1"], sum(v.size for v in p.values())
        ((30, 64), 4137)
        >>> sorted(init_params(jax.random.key(0), n_hidden=8, batch_norm=False))
        ['C', 'W1', 'W2', 'b1', 'b2']
    """
    fan_in = n_embd * block_size
    kC, k1, kb1, k2, kb2, kg, kb = jax.random.split(key, 7)
    normal = functools.partial(jax.random.normal, dtype=dtype)
    params = {
        "C": normal(kC, (vocab_size, n_embd)),
        "W1": normal(k1, (fan_in, n_hidden)) * INITS[init](fan_in),
        "b1": normal(kb1, (n_hidden,)) * 0.1,
        "W2": normal(k2, (n_hidden, vocab_size)) * w2_scale,
        "b2": normal(kb2, (vocab_size,)) * b2_scale,
    }
    if batch_norm:
        params["bngain"] = normal(kg, (1, n_hidden)) * 0.1 + 1.0
        params["bnbias"] = normal(kb, (1, n_hidden)) * 0.1
    return params


def has_batch_norm(params: Params) -> bool:
    """Whether ``params`` is a network with batch norm (it has ``bngain``)."""
    return "bngain" in params


def hidden_preactivation(params: Params, X: Array) -> Array:
    """``hprebn = C[X].reshape(n, -1) @ W1 + b1``, the input to batch norm, ``(n, H)``."""
    embcat = params["C"][X].reshape(X.shape[0], -1)
    return embcat @ params["W1"] + params["b1"]


def head(params: Params, hpreact: Array) -> Array:
    """``logits = tanh(hpreact) @ W2 + b2``, ``(n, vocab_size)``."""
    return jnp.tanh(hpreact) @ params["W2"] + params["b2"]


def forward(params: Params, X: Array, bn_stats: BNStats | None = None) -> Array:
    """Logits ``(n, vocab_size)`` for contexts ``X`` ``(n, block_size)`` of int ids.

    ``bn_stats=None``: batch norm with the batch's statistics (training mode); else
    ``{"mean": (1, H), "var": (1, H)}`` (evaluation and sampling, any batch size). Params
    without batch norm ignore ``bn_stats``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> p = init_params(jax.random.key(0))
      >>> forward(p, jnp.zeros((4, 3), jnp.int32)).shape
      (4, 27)
    """
    hprebn = hidden_preactivation(params, X)
    if not has_batch_norm(params):
        return head(params, hprebn)
    gain, bias = params["bngain"], params["bnbias"]
    if bn_stats is None:
        return head(params, ops.batch_norm(hprebn, gain, bias, eps=BN_EPS))
    mean, var = bn_stats["mean"], bn_stats["var"]
    return head(params, ops.batch_norm_eval(hprebn, gain, bias, mean, var, eps=BN_EPS))


def loss_with_stats(
    params: Params, X: Array, Y: Array, *, axis_name: Any = None, reference: bool = False
) -> tuple[Array, BNStats]:
    """Mean cross-entropy in training mode, and the batch's batch-norm statistics (the aux
    data of ``has_aux``: running averages from the same forward pass; ``{}`` without batch
    norm).

    ``reference=True`` runs the plain-``jnp`` references instead of the hand-written VJPs.
    With ``axis_name`` (inside ``shard_map``) ``X, Y`` are this device's rows: batch norm
    and the mean are global, so every device gets the single-device loss.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> p = init_params(jax.random.key(0), n_hidden=8)
      >>> X, Y = jnp.zeros((4, 3), jnp.int32), jnp.arange(4)
      >>> (l, stats), g = jax.value_and_grad(loss_with_stats, has_aux=True)(p, X, Y)
      >>> stats["mean"].shape, sorted(g) == sorted(p)
      ((1, 8), True)
    """
    hprebn = hidden_preactivation(params, X)
    if not has_batch_norm(params):
        return _mean_loss(_cross_entropy(head(params, hprebn), Y, reference), axis_name), {}
    gain, bias = params["bngain"], params["bnbias"]
    if reference:
        hpreact = ops.batch_norm_reference(hprebn, gain, bias, eps=BN_EPS, axis_name=axis_name)
        mean, var = jax.lax.stop_gradient(ops.batch_stats(hprebn, axis_name=axis_name))
        losses = ops.cross_entropy_reference(head(params, hpreact), Y)
    else:
        bn = ops.batch_norm_with_stats(hprebn, gain, bias, eps=BN_EPS, axis_name=axis_name)
        hpreact, mean, var = bn
        losses = ops.cross_entropy(head(params, hpreact), Y)
    return _mean_loss(losses, axis_name), {"mean": mean, "var": var}


def _cross_entropy(logits: Array, Y: Array, reference: bool) -> Array:
    return (ops.cross_entropy_reference if reference else ops.cross_entropy)(logits, Y)


def _mean_loss(losses: Array, axis_name: Any) -> Array:
    """The mean over the global batch: over every device's rows with ``axis_name``."""
    if axis_name is None:
        return losses.mean()
    n_global = jax.lax.psum(losses.shape[0], axis_name)
    return jax.lax.psum(jnp.sum(losses), axis_name) / n_global


def loss(
    params: Params, X: Array, Y: Array, *, axis_name: Any = None, reference: bool = False
) -> Array:
    """``loss_with_stats`` without the statistics; ``jax.grad(loss)`` runs our VJPs.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> p = init_params(jax.random.key(0))
      >>> X, Y = jnp.zeros((8, 3), jnp.int32), jnp.arange(8)
      >>> sorted(jax.grad(loss)(p, X, Y)) == sorted(p)
      True
    """
    return loss_with_stats(params, X, Y, axis_name=axis_name, reference=reference)[0]


def reference_loss(params: Params, X: Array, Y: Array) -> Array:
    """``loss(..., reference=True)``: the plain-``jnp`` baseline autodiff differentiates."""
    return loss(params, X, Y, reference=True)
