"""Fused linear + cross-entropy that never builds the ``(N, V)`` logits."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxninja.ops._validation import (
    Array,
    check_dtype,
    compute_dtype,
    label_index,
    masked,
    row_cotangent,
    row_losses,
    varying_like,
)


class _Linear(NamedTuple):
    """Inputs of the fused op, rows flattened: ``x (N, D)``, ``w (D, V)``, ``bias (V,)``."""

    x: Array
    w: Array
    bias: Array | None
    labels: Any  # (N,), any integer dtype (None in a cotangent)
    rows: Array | None  # (N,) bool: rows that count (None: all)


def _check_linear(x, w, bias, labels, where, chunk_size) -> None:
    for name, a in {"x": x, "w": w, "bias": bias}.items():
        if a is not None:
            check_dtype(name, a)
            if a.dtype != x.dtype:
                raise TypeError(f"{name} dtype {a.dtype} must equal x dtype {x.dtype}")
    check_dtype("labels", labels, jnp.integer)
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x shape {x.shape} and w shape {w.shape} do not give x @ w (D, V)")
    if bias is not None and bias.shape != w.shape[1:]:
        raise ValueError(f"bias shape {bias.shape} must be (V,) = {w.shape[1:]}")
    if labels.shape != x.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} must be x shape without D {x.shape[:-1]}")
    if where is not None and jnp.shape(where) != labels.shape:
        raise ValueError(f"where shape {jnp.shape(where)} must equal labels shape {labels.shape}")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def _dot(a: Array, b: Array) -> Array:
    """``a @ b`` in b's dtype, accumulated in the compute dtype."""
    # 16-bit w is never copied to float32: a whole-w cast would be hoisted out of the loop.
    return jnp.dot(a.astype(b.dtype), b, preferred_element_type=compute_dtype(b.dtype))


def _chunk_logits(lin: _Linear, x: Array, k: Array, chunk: int):
    """Logits of class chunk ``k``, ``(N, chunk)`` in the compute dtype; the last chunk is
    slid back to end at V (no padded w) and is -inf on the columns it shares."""
    v = lin.w.shape[1]
    start = jnp.minimum(k * chunk, v - chunk)
    wc = lax.dynamic_slice_in_dim(lin.w, start, chunk, axis=1)
    z = _dot(x, wc)
    if lin.bias is not None:
        z = z + lax.dynamic_slice_in_dim(lin.bias, start, chunk).astype(z.dtype)[None]
    cols = start + lax.iota(jnp.int32, chunk)
    own = (cols >= k * chunk)[None]
    return jnp.where(own, z, -jnp.inf), wc, start, cols, own


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _linear_cross_entropy(lin: _Linear, chunk: int) -> Array:
    return _linear_cross_entropy_fwd(lin, chunk)[0]


def _linear_cross_entropy_fwd(lin: _Linear, chunk: int):
    x = masked(lin.rows, lin.x)  # masked rows: 0
    v, dtype = lin.w.shape[1], compute_dtype(x.dtype)

    def body(carry, k):  # online log-sum-exp: rescale the running sum to the new max
        m, s = carry
        z = _chunk_logits(lin, x, k, chunk)[0]
        m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(z, axis=1)))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        return (m_new, s), None

    # Carries shaped from x: under shard_map they vary over its mesh axes, as they must.
    zero = jnp.zeros_like(x[:, 0], dtype=dtype)
    (m, s), _ = lax.scan(body, (zero - jnp.inf, zero), jnp.arange(-(-v // chunk)))
    index, valid = label_index(lin.labels, v)
    w_y = jnp.take(lin.w, index, axis=1).T.astype(dtype)  # (N, D): one column per row
    label_logit = jnp.sum(x.astype(dtype) * w_y, axis=1)
    if lin.bias is not None:
        label_logit = label_logit + jnp.take(lin.bias, index).astype(dtype)
    losses = row_losses(jnp.log(s) + m - label_logit, valid, lin.rows)
    return losses.astype(lin.x.dtype), (lin, m, s, index, valid)


def _linear_cross_entropy_bwd(chunk: int, residuals, g):
    lin, m, s, index, valid = residuals
    x = masked(lin.rows, lin.x)
    g = row_cotangent(g.astype(m.dtype), valid, lin.rows)
    scale = (g / s)[:, None]

    def body(carry, k):
        dx, dw, db = carry
        z, wc, start, cols, own = _chunk_logits(lin, x, k, chunk)
        # Exercise 2 on this chunk: dz = g * (exp(z - m) / s - onehot), 0 off its own
        # columns; then Exercise 1's matmul rules fold it into dx, dw, db at once.
        p = jnp.exp(z - m[:, None]) * scale
        dz = jnp.where((cols[None] == index[:, None]) & own, p - g[:, None], p)
        dx = dx + _dot(dz, wc.T)
        # dw/db keep w's dtype: each column is written once (the slid last chunk adds
        # exact zeros to the columns it shares), so nothing is rounded twice.
        dwc = lax.dynamic_slice_in_dim(dw, start, chunk, axis=1).astype(dz.dtype) + _dot(x.T, dz)
        dw = lax.dynamic_update_slice_in_dim(dw, dwc.astype(dw.dtype), start, axis=1)
        dbc = lax.dynamic_slice_in_dim(db, start, chunk).astype(dz.dtype) + jnp.sum(dz, axis=0)
        db = lax.dynamic_update_slice_in_dim(db, dbc.astype(db.dtype), start, 0)
        return (dx, dw, db), None

    dw = jnp.zeros_like(lin.w)  # lin.w varies like x (varying_like)
    init = (jnp.zeros_like(x, dtype=m.dtype), dw, dw[0])
    (dx, dw, db), _ = lax.scan(body, init, jnp.arange(-(-lin.w.shape[1] // chunk)))
    dbias = None if lin.bias is None else db.astype(lin.bias.dtype)
    return (_Linear(dx.astype(lin.x.dtype), dw, dbias, None, None),)


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def linear_cross_entropy(
    x: Array,
    w: Array,
    labels: Array,
    *,
    bias: Array | None = None,
    where: Array | None = None,
    chunk_size: int | None = None,
) -> Array:
    r"""``cross_entropy(x @ w + bias, labels)`` (``labels.shape``, ``x``'s dtype) without ever
    building the ``(N, V)`` logits.

    .. math::
        \ell_i = \log \sum_j e^{z_{ij}} - z_{i y_i},\qquad
        dz_{ij} = g_i\,\big(\mathrm{softmax}(z_i)_j - [j = y_i]\big),\qquad
        dx = dz\,W^\top,\quad dW = x^\top dz,\quad db = \textstyle\sum_i dz_{i\cdot}

    for ``z = x W + b`` (Exercise 2, then Exercise 1's matmul rules). Both passes scan over
    chunks of classes (online log-sum-exp forward, logits recomputed backward): only
    ``(N, chunk)`` blocks are alive. Same guarantees as :func:`cross_entropy`.

    Args:
      x: ``(..., D)`` features; w: ``(D, V)``; bias: optional ``(V,)``; all one dtype.
      labels: ``x.shape[:-1]`` integer class ids.
      where: optional boolean row mask, the shape of ``labels``.
      chunk_size: classes per chunk; ``None`` picks ``2**22 / N`` rounded down to a
        multiple of 128 (16 MiB float32 blocks; all of V for small N).

    >>> import jax, jax.numpy as jnp
    >>> from jaxninja.ops import cross_entropy, linear_cross_entropy
    >>> x, w = jnp.ones((2, 3)), jnp.arange(12.0).reshape(3, 4) / 10
    >>> labels = jnp.array([3, 0])
    >>> fused = linear_cross_entropy(x, w, labels, chunk_size=3)
    >>> bool(jnp.allclose(fused, cross_entropy(x @ w, labels)))
    True
    """
    x, w, labels = jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels)
    bias = None if bias is None else jnp.asarray(bias)
    _check_linear(x, w, bias, labels, where, chunk_size)
    rows = None if where is None else jnp.asarray(where, bool).reshape(-1)
    n, v = math.prod(labels.shape), w.shape[1]
    chunk = min(v, chunk_size or max(128, (2**22 // max(n, 1)) // 128 * 128))
    w, bias = varying_like(x, w), varying_like(x, bias)
    lin = _Linear(x.reshape(n, x.shape[-1]), w, bias, labels.reshape(n), rows)
    return _linear_cross_entropy(lin, chunk).reshape(labels.shape)
