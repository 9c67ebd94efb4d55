"""Cross-entropy with a hand-written VJP (Exercise 2): :func:`cross_entropy` and its reference."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxninja.ops._validation import (
    Array,
    Axis,
    check_dtype,
    compute_dtype,
    label_index,
    masked,
    normalize_axes,
    row_cotangent,
    row_losses,
)


class _Rows(NamedTuple):
    """Cross-entropy inputs in the layout the rules use: classes last, masks resolved."""

    x: Array  # (..., V) logits, classes last (a transposed copy only if they were not)
    labels: Any  # (...) integer labels, any integer dtype (None in a cotangent)
    rows: Array | None  # (...) bool: rows that count (None: all)
    classes: Array | None  # (..., V) bool: classes in the normaliser (None: all)


def _to_rows(a: Array, batch: tuple[int, ...], classes: tuple[int, ...]) -> Array:
    """Transpose ``a`` to (batch axes, class axes) and flatten the class axes."""
    if batch + classes != tuple(range(a.ndim)):
        a = jnp.transpose(a, batch + classes)
    return a.reshape(a.shape[: len(batch)] + (-1,))


def _cross_entropy_rows(logits: Any, labels: Any, axis: Any, where: Any) -> _Rows:
    """Validate once at the edge and bring the inputs to the :class:`_Rows` layout."""
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    check_dtype("logits", logits)
    check_dtype("labels", labels, jnp.integer)
    if logits.ndim == 0:
        raise ValueError("logits must have at least one axis (the classes), got a scalar")
    axes = normalize_axes(axis, logits.ndim)  # a tuple: optax's flat-index order
    batch = tuple(a for a in range(logits.ndim) if a not in axes)
    expected = tuple(logits.shape[a] for a in batch)
    if labels.shape != expected:
        raise ValueError(
            f"labels shape {labels.shape} does not match logits shape {logits.shape} "
            f"without the class axis {axis} (expected {expected})"
        )
    rows = classes = None
    if where is not None:
        where = jnp.asarray(where, dtype=bool)
        if where.shape == logits.shape:  # optax's per-logit mask
            classes = _to_rows(where, batch, axes)
            rows = jnp.any(classes, axis=-1)
            classes = classes | ~rows[..., None]  # an all-masked row stays finite
        elif where.shape == expected:
            rows = where
        else:
            raise ValueError(
                f"where shape {where.shape} must equal labels shape {expected} "
                f"(a row mask) or logits shape {logits.shape} (a per-logit mask)"
            )
    return _Rows(_to_rows(logits, batch, axes), labels, rows, classes)


def _masked_logits(r: _Rows) -> Array:
    """Logits, masked rows set to 0 (whatever they held) and masked classes to -inf."""
    x = masked(r.rows, r.x)
    if r.classes is not None:
        x = jnp.where(r.classes, x, jnp.asarray(-jnp.inf, x.dtype))
    return x


def _label_logit(r: _Rows, index: Array) -> Array:
    """``z[..., y]``, 0 on masked rows (taken even if a per-logit mask leaves ``y`` out)."""
    return masked(r.rows, jnp.take_along_axis(r.x, index[..., None], axis=-1)[..., 0])


def cross_entropy_reference(
    logits: Array, labels: Array, axis: Axis = -1, where: Array | None = None
) -> Array:
    """Plain-``jnp`` cross-entropy (autodiff's baseline); contract of :func:`cross_entropy`.

    >>> import jax.numpy as jnp, numpy as np
    >>> losses = cross_entropy_reference(jnp.zeros((2, 4)), jnp.array([0, 3]))
    >>> np.asarray(losses, np.float64).round(4).tolist()  # log(4) each
    [1.3863, 1.3863]
    """
    r = _cross_entropy_rows(logits, labels, axis, where)
    x = _masked_logits(r).astype(compute_dtype(r.x.dtype))
    index, valid = label_index(r.labels, x.shape[-1])
    logprobs = jax.nn.log_softmax(x, axis=-1)
    if r.classes is None:
        label_logprob = jnp.take_along_axis(logprobs, index[..., None], axis=-1)[..., 0]
    else:  # the label's own logit, even if the per-logit mask leaves its class out
        label_logprob = _label_logit(r, index).astype(x.dtype) - jax.nn.logsumexp(x, -1)
    return row_losses(-label_logprob, valid, r.rows).astype(r.x.dtype)


@jax.custom_vjp
def _cross_entropy(r: _Rows) -> Array:
    return _cross_entropy_fwd(r)[0]


def _cross_entropy_fwd(r: _Rows):
    x = _masked_logits(r)
    dtype = compute_dtype(x.dtype)
    # The max is exact in any dtype: take it before the cast, so no float32 copy of
    # 16-bit logits is ever needed. It only shifts exp's argument: no gradient.
    m = lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)).astype(dtype)
    s = jnp.sum(jnp.exp(x.astype(dtype) - m), axis=-1, keepdims=True)
    index, valid = label_index(r.labels, x.shape[-1])
    label_logit = _label_logit(r, index).astype(dtype)
    losses = row_losses(jnp.log(s[..., 0]) + m[..., 0] - label_logit, valid, r.rows)
    # Residuals: the logits (the caller holds them) and two numbers per row; recomputing
    # exp is faster on CPU than writing and re-reading an (N, V) residual.
    return losses.astype(x.dtype), (r, m, s, index, valid)


def _cross_entropy_bwd(residuals, g):
    r, m, s, index, valid = residuals
    g = row_cotangent(g.astype(m.dtype), valid, r.rows)[..., None]
    x = _masked_logits(r)
    # The fused rule of Exercise 2, d loss / d z_j = softmax_j - [j = y], with softmax
    # normalised as exp(z - max) / sum (as optax): exp(z - lse) would carry the rounding
    # of lse, wrong at logits of 1e8 in float32.
    p = jnp.exp(x.astype(m.dtype) - m) * (g / s)
    if x.dtype == m.dtype:  # p - g * onehot: in p's own dtype a per-row scatter is fastest
        flat = p.reshape(-1, p.shape[-1])
        rows = jnp.arange(flat.shape[0])
        dx = flat.at[rows, index.reshape(-1)].add(-g.reshape(-1)).reshape(p.shape)
    else:  # for 16-bit logits the select fuses with the cast
        onehot = lax.broadcasted_iota(jnp.int32, p.shape, p.ndim - 1) == index[..., None]
        dx = jnp.where(onehot, p - g, p)
    return (_Rows(dx.astype(x.dtype), None, None, None),)


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def cross_entropy(
    logits: Array, labels: Array, axis: Axis = -1, where: Array | None = None
) -> Array:
    r"""Per-example softmax cross-entropy with integer labels, with a fused VJP: losses of
    shape ``labels.shape`` in ``logits``' dtype.

    .. math::
        \ell_i = \log \sum_j e^{z_{ij}} - z_{i, y_i}, \qquad
        \frac{\partial \ell_i}{\partial z_{ij}} = \mathrm{softmax}(z_i)_j - [j = y_i]

    Keeps two numbers per row (``max``, ``sum exp``); the backward pass recomputes ``exp``.
    A label outside ``[0, num_classes)`` gives NaN loss and gradient for its row.

    Args:
      logits: ``(..., num_classes)`` floating scores (the class axis is ``axis``).
      labels: integer class ids, the shape of ``logits`` without ``axis``.
      axis: the class axis, or a tuple of axes (then a label is a flat index into
        ``logits``' slice over those axes, in the tuple's order, as in optax).
      where: optional bool mask, the shape of ``labels`` (False rows get loss 0 and
        gradient exactly 0, whatever they hold) or of ``logits`` (optax's per-logit mask).

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> labels = jnp.array([0, 2])
    >>> np.asarray(cross_entropy(logits, labels), np.float64).round(4).tolist()
    [0.2395, 1.0986]
    >>> dlogits = jax.grad(lambda z: cross_entropy(z, labels).mean())(logits)
    >>> np.asarray(dlogits * 2, np.float64).round(4).tolist()  # softmax - onehot
    [[-0.213, 0.1065, 0.1065], [0.3333, 0.3333, -0.6667]]
    """
    return _cross_entropy(_cross_entropy_rows(logits, labels, axis, where))
