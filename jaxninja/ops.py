"""Reusable ops with hand-written VJPs: the fused rules of Exercises 2 and 3.

:func:`cross_entropy`, :func:`linear_cross_entropy`, :func:`batch_norm` and
:func:`batch_norm_with_stats` are :func:`jax.custom_vjp` ops whose backward rules are
differentiable ``jnp`` (``jax.jacrev(jax.grad(f))`` works; ``jax.jvp`` of the op itself
raises ``TypeError``); the rest is plain ``jnp``, the ``*_reference`` functions being the
autodiff baselines. 16-bit inputs are computed in float32 and come back in their dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Axis = int | Sequence[int]

__all__ = [
    "batch_norm",
    "batch_norm_eval",
    "batch_norm_reference",
    "batch_norm_with_stats",
    "batch_stats",
    "cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy",
    "running_average",
]


def _compute_dtype(dtype: Any) -> Any:
    """float16/bfloat16 are computed in float32; float32/float64 in themselves."""
    # Not jnp.promote_types: it refuses bfloat16 + float32 under strict promotion.
    return jnp.dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _check_dtype(name: str, a: Array, kind: Any = jnp.floating) -> None:
    if not jnp.issubdtype(a.dtype, kind):
        what = "a floating-point array" if kind is jnp.floating else "integer class ids"
        raise TypeError(f"{name} must be {what}, got dtype {a.dtype}")


def _axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """``axis`` (an int or a sequence of ints) as non-negative axes, in the caller's order."""
    if not isinstance(axis, int | Sequence):
        raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}")
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not all(-ndim <= a < ndim for a in axes):
        raise ValueError(f"axis={axis} is out of range for an array of rank {ndim}")
    if len({a % ndim for a in axes}) != len(axes):
        raise ValueError(f"axis={axis} repeats an axis")
    return tuple(a % ndim for a in axes)


def _masked(where: Array | None, a: Array) -> Array:
    """``a`` where the mask (a row mask gets ``a``'s trailing axes) is True, 0 elsewhere."""
    if where is None:
        return a
    where = where.reshape(where.shape + (1,) * (a.ndim - where.ndim))
    return jnp.where(where, a, jnp.zeros((), a.dtype))


def _varying_like(x: Array, p: Any) -> Any:
    """``p`` (gain, bias, w) cast to vary over the mesh axes that ``x`` varies on."""
    # Under shard_map(check_vma=True) a rule's cotangents must match its inputs' type; the
    # cast's transpose is a psum, so a replicated parameter's gradient is the global sum.
    if p is None:
        return p
    missing = tuple(jax.typeof(x).manual_axis_type.varying - jax.typeof(p).manual_axis_type.varying)
    return lax.pcast(p, missing, to="varying") if missing else p


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
    _check_dtype("logits", logits)
    _check_dtype("labels", labels, jnp.integer)
    if logits.ndim == 0:
        raise ValueError("logits must have at least one axis (the classes), got a scalar")
    axes = _axes(axis, logits.ndim)  # a tuple: optax's flat-index order
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


def _label_index(labels: Array, num_classes: int) -> tuple[Array, Array]:
    """``(index, valid)``: int32 class index (0 where invalid) and ``0 <= label < V``."""
    # Compared in the labels' own dtype: a uint8 label never wraps against 300 classes.
    info = jnp.iinfo(labels.dtype)
    valid = jnp.ones(labels.shape, bool) if num_classes > info.max else labels < num_classes
    if info.min < 0:
        valid = valid & (labels >= 0)
    return jnp.where(valid, labels, 0).astype(jnp.int32), valid


def _row_losses(losses: Array, valid: Array, rows: Array | None) -> Array:
    """NaN for a bad label (never a silently clamped answer), 0 for a masked row."""
    return _masked(rows, jnp.where(valid, losses, jnp.nan))


def _row_cotangent(g: Array, valid: Array, rows: Array | None) -> Array:
    """The losses' cotangent: exactly 0 on a masked row, NaN on a kept row with a bad label."""
    bad = ~valid if rows is None else ~valid & rows
    return jnp.where(bad, jnp.nan, _masked(rows, g))


def _masked_logits(r: _Rows) -> Array:
    """Logits, masked rows set to 0 (whatever they held) and masked classes to -inf."""
    x = _masked(r.rows, r.x)
    if r.classes is not None:
        x = jnp.where(r.classes, x, jnp.asarray(-jnp.inf, x.dtype))
    return x


def _label_logit(r: _Rows, index: Array) -> Array:
    """``z[..., y]``, 0 on masked rows (taken even if a per-logit mask leaves ``y`` out)."""
    return _masked(r.rows, jnp.take_along_axis(r.x, index[..., None], axis=-1)[..., 0])


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
    x = _masked_logits(r).astype(_compute_dtype(r.x.dtype))
    index, valid = _label_index(r.labels, x.shape[-1])
    logprobs = jax.nn.log_softmax(x, axis=-1)
    if r.classes is None:
        label_logprob = jnp.take_along_axis(logprobs, index[..., None], axis=-1)[..., 0]
    else:  # the label's own logit, even if the per-logit mask leaves its class out
        label_logprob = _label_logit(r, index).astype(x.dtype) - jax.nn.logsumexp(x, -1)
    return _row_losses(-label_logprob, valid, r.rows).astype(r.x.dtype)


@jax.custom_vjp
def _cross_entropy(r: _Rows) -> Array:
    return _cross_entropy_fwd(r)[0]


def _cross_entropy_fwd(r: _Rows):
    x = _masked_logits(r)
    dtype = _compute_dtype(x.dtype)
    # The max is exact in any dtype: take it before the cast, so no float32 copy of
    # 16-bit logits is ever needed. It only shifts exp's argument: no gradient.
    m = lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)).astype(dtype)
    s = jnp.sum(jnp.exp(x.astype(dtype) - m), axis=-1, keepdims=True)
    index, valid = _label_index(r.labels, x.shape[-1])
    label_logit = _label_logit(r, index).astype(dtype)
    losses = _row_losses(jnp.log(s[..., 0]) + m[..., 0] - label_logit, valid, r.rows)
    # Residuals: the logits (the caller holds them) and two numbers per row; recomputing
    # exp is faster on CPU than writing and re-reading an (N, V) residual.
    return losses.astype(x.dtype), (r, m, s, index, valid)


def _cross_entropy_bwd(residuals, g):
    r, m, s, index, valid = residuals
    g = _row_cotangent(g.astype(m.dtype), valid, r.rows)[..., None]
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
            _check_dtype(name, a)
            if a.dtype != x.dtype:
                raise TypeError(f"{name} dtype {a.dtype} must equal x dtype {x.dtype}")
    _check_dtype("labels", labels, jnp.integer)
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
    return jnp.dot(a.astype(b.dtype), b, preferred_element_type=_compute_dtype(b.dtype))


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
    x = _masked(lin.rows, lin.x)  # masked rows: 0
    v, dtype = lin.w.shape[1], _compute_dtype(x.dtype)

    def body(carry, k):  # online log-sum-exp: rescale the running sum to the new max
        m, s = carry
        z = _chunk_logits(lin, x, k, chunk)[0]
        m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(z, axis=1)))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        return (m_new, s), None

    # Carries shaped from x: under shard_map they vary over its mesh axes, as they must.
    zero = jnp.zeros_like(x[:, 0], dtype=dtype)
    (m, s), _ = lax.scan(body, (zero - jnp.inf, zero), jnp.arange(-(-v // chunk)))
    index, valid = _label_index(lin.labels, v)
    w_y = jnp.take(lin.w, index, axis=1).T.astype(dtype)  # (N, D): one column per row
    label_logit = jnp.sum(x.astype(dtype) * w_y, axis=1)
    if lin.bias is not None:
        label_logit = label_logit + jnp.take(lin.bias, index).astype(dtype)
    losses = _row_losses(jnp.log(s) + m - label_logit, valid, lin.rows)
    return losses.astype(lin.x.dtype), (lin, m, s, index, valid)


def _linear_cross_entropy_bwd(chunk: int, residuals, g):
    lin, m, s, index, valid = residuals
    x = _masked(lin.rows, lin.x)
    g = _row_cotangent(g.astype(m.dtype), valid, lin.rows)
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

    dw = jnp.zeros_like(lin.w)  # lin.w varies like x (_varying_like)
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
    w, bias = _varying_like(x, w), _varying_like(x, bias)
    lin = _Linear(x.reshape(n, x.shape[-1]), w, bias, labels.reshape(n), rows)
    return _linear_cross_entropy(lin, chunk).reshape(labels.shape)


def _check_eps(eps: Any) -> float:
    """``eps`` is a static, finite, non-negative float (it is added to a variance)."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a number, got {eps!r}") from None
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return value


def _check_broadcast(shape: tuple[int, ...], **params: Any) -> None:
    for name, p in params.items():
        try:
            ok = jnp.broadcast_shapes(jnp.shape(p), shape) == shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{name} shape {jnp.shape(p)} does not broadcast to x shape {shape}")


def _lift(p: Array, ndim: int, dtype: Any) -> Array:
    """``p`` at rank ``ndim`` in ``dtype``: explicit, for strict rank and dtype promotion."""
    p = jnp.asarray(p, dtype)
    return p.reshape((1,) * (ndim - p.ndim) + p.shape)


def _count(shape: tuple[int, ...], axes: tuple[int, ...], axis_name: Any) -> int:
    """Number of rows the statistics are taken over (global with ``axis_name``): static."""
    names = () if axis_name is None else axis_name
    names = names if isinstance(names, tuple) else (names,)
    return math.prod([shape[a] for a in axes] + [int(lax.axis_size(a)) for a in names])


def _sum(x: Array, axes: tuple[int, ...], axis_name: Any) -> Array:
    s = jnp.sum(x, axis=axes, keepdims=True)
    return s if axis_name is None else lax.psum(s, axis_name)


def _prepare_batch_norm(x, gain, bias, axis, eps, unbiased, axis_name, where):
    """Validated arrays and static arguments, in the order the custom VJPs take them."""
    x, gain, bias = jnp.asarray(x), jnp.asarray(gain), jnp.asarray(bias)
    axes = tuple(sorted(_axes(axis, x.ndim)))
    for name, a in {"x": x, "gain": gain, "bias": bias}.items():
        _check_dtype(name, a)
    _check_broadcast(x.shape, gain=gain, bias=bias)
    if where is not None:
        _check_broadcast(x.shape, where=where)
        where = jnp.broadcast_to(jnp.asarray(where, dtype=bool), x.shape)
    # With a mask the count is data-dependent: too few kept rows give NaN (documented).
    elif unbiased and _count(x.shape, axes, axis_name) < 2:
        raise ValueError(
            f"batch norm with unbiased=True needs at least 2 rows to normalise over "
            f"(Bessel's correction divides by n-1), got x shape {x.shape} with axis={axes}"
            + ("" if axis_name is None else f" on each of {_count((), (), axis_name)} devices")
        )
    gain, bias = _varying_like(x, gain), _varying_like(x, bias)
    return x, gain, bias, where, axes, _check_eps(eps), bool(unbiased), axis_name


def _stats(x, where, axes, unbiased, axis_name):
    """``(mean, var, n)`` of ``x`` (already in the compute dtype) over ``axes``."""
    if where is None:
        n: Any = _count(x.shape, axes, axis_name)
        mean = _sum(x, axes, axis_name) / n
    else:
        n = _sum(where.astype(x.dtype), axes, axis_name)
        mean = _sum(_masked(where, x), axes, axis_name) / n
    dev = _masked(where, x - mean)
    var = _sum(jnp.square(dev), axes, axis_name) / (n - 1 if unbiased else n)
    return mean, var, n


def batch_stats(
    x: Array,
    *,
    unbiased: bool = True,
    axis: Axis = 0,
    axis_name: Any = None,
    where: Array | None = None,
) -> tuple[Array, Array]:
    """Batch mean and variance over ``axis`` (kept as size-1 dims), in at least float32.

    The keyword arguments are :func:`batch_norm`'s.

    >>> import jax.numpy as jnp
    >>> mean, var = batch_stats(jnp.array([[1.0], [2.0], [3.0]]))
    >>> mean.tolist(), var.tolist()
    ([[2.0]], [[1.0]])
    """
    x, _, _, where, axes, _, unbiased, axis_name = _prepare_batch_norm(
        x, 1.0, 0.0, axis, 0.0, unbiased, axis_name, where
    )
    return _stats(x.astype(_compute_dtype(x.dtype)), where, axes, unbiased, axis_name)[:2]


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``x`` down to ``shape``: the transpose of broadcasting ``shape`` to x.shape."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, d in enumerate(shape) if d == 1 and x.shape[i + lead] != 1
    )
    return jnp.sum(x, axis=axes).reshape(shape) if axes else x


def _bn_forward(x, gain, bias, where, axes, eps, unbiased, axis_name):
    xc = x.astype(_compute_dtype(x.dtype))
    mean, var, n = _stats(xc, where, axes, unbiased, axis_name)
    var_inv = lax.rsqrt(var + eps)
    y = _lift(gain, x.ndim, xc.dtype) * ((xc - mean) * var_inv) + _lift(bias, x.ndim, xc.dtype)
    # Residuals: x itself (the caller holds it: no (N, H) copy, 16 bits stay 16 bits) and
    # per-feature numbers; the backward pass recomputes x - mean where it needs it.
    return y.astype(x.dtype), mean, var, (x, mean, var_inv, gain, bias, where, n)


def _constant_over(p: Array, axes: tuple[int, ...], ndim: int) -> bool:
    """Whether ``p``, broadcast to rank ``ndim``, has size 1 along every axis of ``axes``."""
    lead = ndim - p.ndim
    return all(a < lead or p.shape[a - lead] == 1 for a in axes)


def _bn_backward(axes, unbiased, axis_name, res, dy, dmean=None, dvar=None):
    x, mean, var_inv, gain, bias, where, n = res
    dy = dy.astype(mean.dtype)  # y has the dtype of x; the rule runs in mean's
    xs = x.astype(mean.dtype)
    ddof = 1 if unbiased else 0
    constant = _constant_over(gain, axes, dy.ndim)
    g = _lift(gain, dy.ndim, dy.dtype)
    # dxhat = gain * dy; for a gain constant over the batch axes (the usual (1, features))
    # the sums are taken over dy and gain is multiplied in after them.
    dxhat = dy if constant else dy * g
    # A shift k, the mean rounded to 7 mantissa bits: sum(dxhat * (x - mean)) is taken as
    # sum(dxhat * (x - k)) - (mean - k) * sum(dxhat) (cancellation costs at most 2^-8
    # |mean| / std) and x - mean as x - (k + (mean - k)) (exact: Sterbenz), so that no two
    # passes broadcast the same vector and XLA CPU's reduction fusions store no (N, H) operand.
    bits = jnp.finfo(mean.dtype).nexp
    k = lax.stop_gradient(lax.reduce_precision(mean, exponent_bits=bits, mantissa_bits=7))
    d = mean - k
    s1 = jnp.sum(dxhat, axis=axes, keepdims=True)
    s2 = (jnp.sum(dxhat * (xs - k), axis=axes, keepdims=True) - d * s1) * var_inv
    xc = xs - (k + d)  # x - mean
    # dgain, dbias: this device's part (before the psum below); under check_vma the cast
    # of _varying_like makes jax.grad sum them, else callers psum them like any gradient.
    dgain = _reduce_to(s2 if constant else dy * xc * var_inv, gain.shape).astype(gain.dtype)
    bias_sum = constant and _constant_over(bias, axes, dy.ndim)
    dbias = _reduce_to(s1 if bias_sum else dy, bias.shape).astype(bias.dtype)
    if axis_name is not None:
        s1, s2 = lax.psum((s1, s2), axis_name)
    # The fused rule of Exercise 3, generalised to ddof, masks m and device-global sums:
    # dx = a * (dxhat - m * (sum(dxhat) / n + xhat * sum(dxhat * xhat) / (n - ddof)))
    # with xhat = (x - mean) * var_inv and a = var_inv (times gain when dxhat is dy);
    # the per-feature factors are folded first: the (N, H) pass is one multiply-add.
    a = var_inv * g if constant else var_inv
    dx = a * dxhat - _masked(where, a * s1 / n + (a * var_inv * s2 / (n - ddof)) * xc)
    if dmean is not None:  # cotangents of the returned statistics, if anyone used them
        dx = dx + _masked(where, dmean / n + dvar * (2.0 / (n - ddof)) * xc)
    return dx.astype(x.dtype), dgain, dbias, None


def _batch_norm_op(name: str, with_stats: bool) -> Any:
    """The custom-VJP op over :func:`_bn_forward`'s arguments: ``y`` or ``(y, mean, var)``."""

    def fwd(x, gain, bias, where, axes, eps, unbiased, axis_name):
        y, mean, var, res = _bn_forward(x, gain, bias, where, axes, eps, unbiased, axis_name)
        return ((y, mean, var) if with_stats else y), res

    def bwd(axes, eps, unbiased, axis_name, res, cotangents):
        dy, dmean, dvar = cotangents if with_stats else (cotangents, None, None)
        return _bn_backward(axes, unbiased, axis_name, res, dy, dmean, dvar)

    def primal(*args):
        return fwd(*args)[0]

    primal.__name__ = primal.__qualname__ = name  # jaxprs, tracebacks and tests show it
    op = jax.custom_vjp(primal, nondiff_argnums=(4, 5, 6, 7))
    op.defvjp(fwd, bwd)
    return op


_batch_norm = _batch_norm_op("_batch_norm", with_stats=False)
_batch_norm_with_stats = _batch_norm_op("_batch_norm_with_stats", with_stats=True)


def batch_norm(
    x: Array,
    gain: Array,
    bias: Array,
    *,
    eps: float = 1e-5,
    unbiased: bool = True,
    axis: Axis = 0,
    axis_name: Any = None,
    where: Array | None = None,
) -> Array:
    r"""Batch normalisation with the batch's statistics and a fused, hand-written VJP; ``y``
    has the shape and dtype of ``x``.

    .. math::
        \hat x = (x - \mu)(\sigma^2 + \epsilon)^{-1/2}, \qquad y = \gamma \hat x + \beta

    with :math:`\mu, \sigma^2` over ``axis`` (``n`` rows; ``unbiased=False`` is flax's
    ``BatchNorm``). The VJP is Exercise 3's closed form, with a row mask ``m``:

    .. math::
        dx = \frac{\gamma (\sigma^2+\epsilon)^{-1/2}}{n}\Big(n\,dy - m\big(\textstyle\sum dy
             + \frac{n}{n-\mathrm{ddof}}\,\hat x \sum (dy\,\hat x)\big)\Big),\quad
        d\gamma = \textstyle\sum dy\,\hat x,\quad d\beta = \sum dy

    (sums over ``axis``). A replicated ``gain``/``bias`` gets the map's usual gradient:
    summed over devices under ``shard_map(check_vma=True)``, else the device's own part.

    Args:
      x: ``(n, ...)`` activations (any rank).
      gain, bias: broadcast to ``x``, e.g. ``(1, features)`` or ``(features,)``.
      eps: added to the variance; finite and ``>= 0``.
      unbiased: divide the variance by ``n - 1`` (Bessel's correction; needs ``n >= 2``).
      axis: int or tuple of ints, the axes reduced over (the batch axes, as in ``jnp.mean``;
        flax's ``axis`` is the feature axis).
      axis_name: a ``shard_map``/``pmap``/``vmap`` axis: global-batch statistics and sums.
      where: optional bool mask broadcastable to ``x`` (flax's ``mask``): statistics over
        the True entries only (fewer than ``1 + unbiased`` give NaN).

    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    >>> batch_norm(x, jnp.ones((1, 2)), jnp.zeros((1, 2)), eps=0.0).round(4).tolist()
    [[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]
    >>> jax.grad(lambda x: (batch_norm(x, jnp.ones(2), jnp.zeros(2)) ** 3).sum())(x).shape
    (3, 2)
    """
    return _batch_norm(*_prepare_batch_norm(x, gain, bias, axis, eps, unbiased, axis_name, where))


def batch_norm_with_stats(
    x: Array,
    gain: Array,
    bias: Array,
    *,
    eps: float = 1e-5,
    unbiased: bool = True,
    axis: Axis = 0,
    axis_name: Any = None,
    where: Array | None = None,
) -> tuple[Array, Array, Array]:
    """:func:`batch_norm` (same keyword arguments) that also returns the ``(mean, var)`` it
    used, from the same pass; they keep ``axis`` as size-1 dims, in at least float32. The
    VJP covers all three outputs (zero cotangents when they are only auxiliary data).

    >>> import jax.numpy as jnp
    >>> y, mean, var = batch_norm_with_stats(jnp.array([[0.0], [2.0]]), 1.0, 0.0)
    >>> mean.tolist(), var.tolist()
    ([[1.0]], [[2.0]])
    """
    args = _prepare_batch_norm(x, gain, bias, axis, eps, unbiased, axis_name, where)
    return _batch_norm_with_stats(*args)


def batch_norm_reference(
    x: Array,
    gain: Array,
    bias: Array,
    *,
    eps: float = 1e-5,
    unbiased: bool = True,
    axis: Axis = 0,
    axis_name: Any = None,
    where: Array | None = None,
) -> Array:
    """Plain-``jnp`` batch norm (autodiff's baseline); the arguments of :func:`batch_norm`.

    >>> import jax.numpy as jnp, numpy as np
    >>> x = jnp.array([[1.0], [3.0]])
    >>> y = batch_norm_reference(x, 1.0, 0.0, eps=0.0)
    >>> np.asarray(y, np.float64).round(4).tolist()  # +-1/sqrt(2): var is 2 with n-1
    [[-0.7071], [0.7071]]
    """
    args = _prepare_batch_norm(x, gain, bias, axis, eps, unbiased, axis_name, where)
    return _bn_forward(*args)[0]


def batch_norm_eval(
    x: Array, gain: Array, bias: Array, mean: Array, var: Array, *, eps: float = 1e-5
) -> Array:
    r"""Batch norm with given statistics: evaluation and sampling (any batch size).

    .. math::
        y = \gamma\,(x - \mu)\,(\sigma^2 + \epsilon)^{-1/2} + \beta

    with ``mean``/``var`` e.g. running averages or whole-training-set statistics, all
    broadcasting to ``x``. Computed in at least float32, returned in ``x``'s dtype.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    >>> batch_norm_eval(x, 2.0, 1.0, jnp.array([[1.0, 2.0]]), 4.0, eps=0.0).tolist()
    [[1.0, 1.0], [3.0, 3.0]]
    """
    x = jnp.asarray(x)
    _check_dtype("x", x)
    _check_broadcast(x.shape, gain=gain, bias=bias, mean=mean, var=var)
    dtype = _compute_dtype(x.dtype)
    g, b, mu, v = (_lift(p, x.ndim, dtype) for p in (gain, bias, mean, var))
    y = g * (x.astype(dtype) - mu) * lax.rsqrt(v + _check_eps(eps)) + b
    return y.astype(x.dtype)


def running_average(running: Any, batch: Any, momentum: Any = 0.999) -> Any:
    """``momentum * running + (1 - momentum) * batch``, leaf by leaf over two pytrees.

    flax's convention (the lecture's ``0.999 * running + 0.001 * batch`` is
    ``momentum=0.999``); each result keeps its running leaf's shape and dtype.

    >>> import jax.numpy as jnp
    >>> running_average({"mean": jnp.zeros(2)}, {"mean": jnp.ones(2)}, momentum=0.75)
    {'mean': Array([0.25, 0.25], dtype=float32)}
    """
    if isinstance(momentum, int | float) and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")

    def update(path, r, b):
        r, b = jnp.asarray(r), jnp.asarray(b)
        if r.shape != b.shape:
            raise ValueError(
                f"running{jax.tree_util.keystr(path)} has shape {r.shape} but the batch "
                f"statistic has shape {b.shape}"
            )
        # A Python momentum stays a weak Python float: 1 - 0.999 is rounded once, to r's.
        m = momentum if isinstance(momentum, int | float) else jnp.asarray(momentum, r.dtype)
        return (m * r + (1 - m) * b.astype(r.dtype)).astype(r.dtype)

    return jax.tree_util.tree_map_with_path(update, running, batch)
