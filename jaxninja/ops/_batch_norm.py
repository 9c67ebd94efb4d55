"""Batch norm with a hand-written VJP (Exercise 3): statistics, evaluation, running averages."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxninja.ops._validation import (
    Array,
    Axis,
    check_dtype,
    compute_dtype,
    masked,
    normalize_axes,
    varying_like,
)


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
    axes = tuple(sorted(normalize_axes(axis, x.ndim)))
    for name, a in {"x": x, "gain": gain, "bias": bias}.items():
        check_dtype(name, a)
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
    gain, bias = varying_like(x, gain), varying_like(x, bias)
    return x, gain, bias, where, axes, _check_eps(eps), bool(unbiased), axis_name


def _stats(x, where, axes, unbiased, axis_name):
    """``(mean, var, n)`` of ``x`` (already in the compute dtype) over ``axes``."""
    if where is None:
        n: Any = _count(x.shape, axes, axis_name)
        mean = _sum(x, axes, axis_name) / n
    else:
        n = _sum(where.astype(x.dtype), axes, axis_name)
        mean = _sum(masked(where, x), axes, axis_name) / n
    dev = masked(where, x - mean)
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
    return _stats(x.astype(compute_dtype(x.dtype)), where, axes, unbiased, axis_name)[:2]


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``x`` down to ``shape``: the transpose of broadcasting ``shape`` to x.shape."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, d in enumerate(shape) if d == 1 and x.shape[i + lead] != 1
    )
    return jnp.sum(x, axis=axes).reshape(shape) if axes else x


def _bn_forward(x, gain, bias, where, axes, eps, unbiased, axis_name):
    xc = x.astype(compute_dtype(x.dtype))
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
    # of varying_like makes jax.grad sum them, else callers psum them like any gradient.
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
    dx = a * dxhat - masked(where, a * s1 / n + (a * var_inv * s2 / (n - ddof)) * xc)
    if dmean is not None:  # cotangents of the returned statistics, if anyone used them
        dx = dx + masked(where, dmean / n + dvar * (2.0 / (n - ddof)) * xc)
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
      gain: broadcast to ``x``, e.g. ``(1, features)`` or ``(features,)``.
      bias: as ``gain``.
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
    check_dtype("x", x)
    _check_broadcast(x.shape, gain=gain, bias=bias, mean=mean, var=var)
    dtype = compute_dtype(x.dtype)
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
