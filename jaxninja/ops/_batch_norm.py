"""Batch norm with a hand-written VJP (Exercise 3): statistics, evaluation, running averages."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
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


class _Config(NamedTuple):
    """The static arguments: the custom-VJP ops' one non-differentiable (hashable) argument."""

    axes: tuple[int, ...]  # the axes reduced over: sorted, non-negative
    eps: float
    unbiased: bool
    axis_name: Any  # a mapped axis name (or a tuple of names), or None


class _Inputs(NamedTuple):
    """Validated inputs, in the order the custom-VJP ops take them (``op(*inputs)``)."""

    x: Array
    gain: Array
    bias: Array
    where: Array | None  # bool, x's shape; None: every row counts
    config: _Config


class _Stats(NamedTuple):
    """Batch statistics over ``config.axes``, kept as size-1 dims, in the compute dtype."""

    mean: Array
    var: Array
    n: Any  # the row count: a Python int, or an array of counts under a mask


def _prepare_batch_norm(
    x: Any,
    gain: Any,
    bias: Any,
    *,
    axis: Axis,
    eps: Any,
    unbiased: Any,
    axis_name: Any,
    where: Any,
) -> _Inputs:
    """Validate once at the edge: arrays, shapes, dtypes, the static arguments."""
    x = jnp.asarray(x)
    gain = jnp.asarray(gain)
    bias = jnp.asarray(bias)
    axes = tuple(sorted(normalize_axes(axis, x.ndim)))
    for name, a in {"x": x, "gain": gain, "bias": bias}.items():
        check_dtype(name, a)
    _check_broadcast(x.shape, gain=gain, bias=bias)
    if where is not None:
        _check_broadcast(x.shape, where=where)
        where = jnp.broadcast_to(jnp.asarray(where, dtype=bool), x.shape)
    # With a mask the count is data-dependent: too few kept rows give NaN (documented).
    elif unbiased and _count(x.shape, axes, axis_name) < 2:
        devices = "" if axis_name is None else f" on each of {_count((), (), axis_name)} devices"
        raise ValueError(
            f"batch norm with unbiased=True needs at least 2 rows to normalise over "
            f"(Bessel's correction divides by n-1), got x shape {x.shape} with axis={axes}"
            + devices
        )
    config = _Config(axes, _check_eps(eps), bool(unbiased), axis_name)
    return _Inputs(x, varying_like(x, gain), varying_like(x, bias), where, config)


def _stats(x: Array, where: Array | None, config: _Config) -> _Stats:
    """Mean, variance and row count of ``x`` (already in the compute dtype)."""
    axes = config.axes
    axis_name = config.axis_name
    if where is None:
        n: Any = _count(x.shape, axes, axis_name)
        mean = _sum(x, axes, axis_name) / n
    else:
        n = _sum(where.astype(x.dtype), axes, axis_name)
        mean = _sum(masked(where, x), axes, axis_name) / n
    dev = masked(where, x - mean)
    var = _sum(jnp.square(dev), axes, axis_name) / (n - 1 if config.unbiased else n)
    return _Stats(mean, var, n)


def _reduce_to(x: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``x`` down to ``shape``: the transpose of broadcasting ``shape`` to x.shape."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, d in enumerate(shape) if d == 1 and x.shape[i + lead] != 1
    )
    return jnp.sum(x, axis=axes).reshape(shape) if axes else x


class _Residuals(NamedTuple):
    """What the backward pass keeps from the forward pass: x and per-feature numbers."""

    x: Array  # the caller's own x: no (N, H) copy is stored, 16 bits stay 16 bits
    mean: Array
    var_inv: Array  # (var + eps) ** -1/2
    gain: Array
    bias: Array
    where: Array | None
    n: Any


def _bn_forward(inputs: _Inputs) -> tuple[Array, _Stats, _Residuals]:
    """``y`` in x's dtype, the statistics it used, and the backward pass's residuals."""
    x = inputs.x
    xc = x.astype(compute_dtype(x.dtype))
    stats = _stats(xc, inputs.where, inputs.config)
    var_inv = lax.rsqrt(stats.var + inputs.config.eps)
    gain = _lift(inputs.gain, x.ndim, xc.dtype)
    bias = _lift(inputs.bias, x.ndim, xc.dtype)
    y = gain * ((xc - stats.mean) * var_inv) + bias
    # The backward pass recomputes x - mean where it needs it rather than storing it.
    res = _Residuals(x, stats.mean, var_inv, inputs.gain, inputs.bias, inputs.where, stats.n)
    return y.astype(x.dtype), stats, res


def _constant_over(p: Array, axes: tuple[int, ...], ndim: int) -> bool:
    """Whether ``p``, broadcast to rank ``ndim``, has size 1 along every axis of ``axes``."""
    lead = ndim - p.ndim
    return all(a < lead or p.shape[a - lead] == 1 for a in axes)


def _bn_backward(
    config: _Config, res: _Residuals, dy: Array, dmean: Any = None, dvar: Any = None
) -> tuple[Array, Array, Array, None]:
    """``(dx, dgain, dbias, None)``: Exercise 3's fused rule (``None`` for ``where``)."""
    axes = config.axes
    dy = dy.astype(res.mean.dtype)  # y has the dtype of x; the rule runs in mean's
    xs = res.x.astype(res.mean.dtype)
    ddof = 1 if config.unbiased else 0
    constant = _constant_over(res.gain, axes, dy.ndim)
    g = _lift(res.gain, dy.ndim, dy.dtype)
    # dxhat = gain * dy; for a gain constant over the batch axes (the usual (1, features))
    # the sums are taken over dy and gain is multiplied in after them.
    dxhat = dy if constant else dy * g
    # A shift k, the mean rounded to 7 mantissa bits: sum(dxhat * (x - mean)) is taken as
    # sum(dxhat * (x - k)) - (mean - k) * sum(dxhat) (cancellation costs at most 2^-8
    # |mean| / std) and x - mean as x - (k + (mean - k)) (exact: Sterbenz), so that no two
    # passes broadcast the same vector and XLA CPU's reduction fusions store no (N, H) operand.
    bits = jnp.finfo(res.mean.dtype).nexp
    k = lax.stop_gradient(lax.reduce_precision(res.mean, exponent_bits=bits, mantissa_bits=7))
    d = res.mean - k
    s1 = jnp.sum(dxhat, axis=axes, keepdims=True)
    s2 = (jnp.sum(dxhat * (xs - k), axis=axes, keepdims=True) - d * s1) * res.var_inv
    xc = xs - (k + d)  # x - mean
    # dgain, dbias: this device's part (before the psum below); under check_vma the cast
    # of varying_like makes jax.grad sum them, else callers psum them like any gradient.
    dgain_full = s2 if constant else dy * xc * res.var_inv
    dgain = _reduce_to(dgain_full, res.gain.shape).astype(res.gain.dtype)
    bias_sum = constant and _constant_over(res.bias, axes, dy.ndim)
    dbias = _reduce_to(s1 if bias_sum else dy, res.bias.shape).astype(res.bias.dtype)
    if config.axis_name is not None:
        s1, s2 = lax.psum((s1, s2), config.axis_name)
    # The fused rule of Exercise 3, generalised to ddof, masks m and device-global sums:
    # dx = a * (dxhat - m * (sum(dxhat) / n + xhat * sum(dxhat * xhat) / (n - ddof)))
    # with xhat = (x - mean) * var_inv and a = var_inv (times gain when dxhat is dy);
    # the per-feature factors are folded first: the (N, H) pass is one multiply-add.
    n = res.n
    a = res.var_inv * g if constant else res.var_inv
    dx = a * dxhat - masked(res.where, a * s1 / n + (a * res.var_inv * s2 / (n - ddof)) * xc)
    if dmean is not None:  # cotangents of the returned statistics, if anyone used them
        dx = dx + masked(res.where, dmean / n + dvar * (2.0 / (n - ddof)) * xc)
    return dx.astype(res.x.dtype), dgain, dbias, None


def _batch_norm_op(name: str, with_stats: bool) -> Any:
    """The custom-VJP op over ``_Inputs``: ``y``, or ``(y, mean, var)``."""

    def fwd(
        x: Array, gain: Array, bias: Array, where: Array | None, config: _Config
    ) -> tuple[Any, _Residuals]:
        y, stats, res = _bn_forward(_Inputs(x, gain, bias, where, config))
        return ((y, stats.mean, stats.var) if with_stats else y), res

    def bwd(config: _Config, res: _Residuals, cotangents: Any) -> tuple[Any, ...]:
        if with_stats:
            dy, dmean, dvar = cotangents
            return _bn_backward(config, res, dy, dmean, dvar)
        return _bn_backward(config, res, cotangents)

    def primal(*args: Any) -> Any:
        return fwd(*args)[0]

    primal.__name__ = primal.__qualname__ = name  # jaxprs, tracebacks and tests show it
    op = jax.custom_vjp(primal, nondiff_argnums=(4,))
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
    """Batch normalisation with the batch's own statistics and a fused, hand-written VJP.

    Training mode. Per feature, over the ``n`` rows along ``axis``:

        mean = sum(x) / n
        var  = sum((x - mean)**2) / (n - ddof)     ddof = 1 if unbiased else 0
        xhat = (x - mean) / sqrt(var + eps)
        y    = gain * xhat + bias

    ``jax.grad`` runs Exercise 3's closed form instead of differentiating the forward
    pass (sums over ``axis``; derived on the page "The two fused rules"):

        dx    = gain / sqrt(var + eps) / n * (n*dy - sum(dy) - n/(n - ddof) * xhat * sum(dy*xhat))
        dgain = sum(dy * xhat)
        dbias = sum(dy)

    With ``where`` the sums and ``n`` count the True rows only; a False row is still
    normalised (with the True rows' statistics) but does not move them. With
    ``axis_name`` the statistics and sums are over the global batch; a replicated
    ``gain``/``bias`` then gets the map's usual gradient: summed over devices under
    ``shard_map(check_vma=True)``, else this device's own part.

    ``flax.linen.BatchNorm(use_running_average=False)`` is ``unbiased=False`` with
    ``axis`` the complement of flax's feature axis: the guide's table
    "Coming from flax" maps each of its arguments.

    Args:
      x: ``(n, ...)`` floating activations, any rank.
      gain: any shape that broadcasts to ``x`` (numpy's trailing alignment): flax's
        ``(features,)`` and the lecture's ``(1, features)`` both work. For a feature
        axis other than the last, keep the reduced axes as size-1 dims, e.g.
        ``(1, C, 1)`` for ``x`` of shape ``(N, C, L)`` and ``axis=(0, 2)``.
      bias: as ``gain``.
      eps: added to the variance; finite and ``>= 0``.
      unbiased: divide the variance by ``n - 1`` (Bessel's correction, the lecture's
        choice; needs ``n >= 2``) rather than by ``n`` (flax's).
      axis: int or tuple of ints: the axes reduced over (the batch axes, as in
        ``jnp.mean``; flax's ``axis`` is the feature axis instead).
      axis_name: a ``shard_map``/``pmap``/``vmap`` axis name (or a tuple of names):
        statistics over the global batch (``jax.grad`` inside or outside the map).
      where: optional bool mask that broadcasts to ``x``, e.g. ``(n, 1)`` for padded
        rows: statistics over the True rows only (fewer than ``1 + ddof`` give NaN).

    Returns:
      ``y``: the shape and dtype of ``x`` (16-bit inputs are computed in float32).

    Raises:
      TypeError: ``x``, ``gain`` or ``bias`` is not floating; ``axis`` is not an int or
        a tuple of ints.
      ValueError: ``gain``, ``bias`` or ``where`` does not broadcast to ``x``; ``axis``
        is out of range or repeats an axis; ``eps`` is negative or not finite;
        ``unbiased=True`` with fewer than 2 rows (without a mask).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
      >>> batch_norm(x, jnp.ones((1, 2)), jnp.zeros((1, 2)), eps=0.0).round(4).tolist()
      [[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]
      >>> loss = lambda x, gain: (batch_norm(x, gain, jnp.zeros(2)) ** 3).sum()
      >>> dx, dgain = jax.grad(loss, argnums=(0, 1))(x, jnp.ones(2))
      >>> dx.shape, dgain.shape  # a (features,) gain gets a (features,) gradient
      ((3, 2), (2,))
    """
    inputs = _prepare_batch_norm(
        x, gain, bias, axis=axis, eps=eps, unbiased=unbiased, axis_name=axis_name, where=where
    )
    return _batch_norm(*inputs)


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
    """[`batch_norm`][jaxninja.ops.batch_norm] that also returns the statistics it used.

    One pass gives ``y`` and the ``(mean, var)`` it normalised with, e.g. to update
    running averages (the aux data of ``jax.value_and_grad(..., has_aux=True)``). The VJP
    covers all three outputs: a loss that uses ``mean`` or ``var`` gets their gradient
    too, and statistics used only as auxiliary data cost nothing.

    Args:
      x: as in [`batch_norm`][jaxninja.ops.batch_norm].
      gain: as in ``batch_norm``.
      bias: as in ``batch_norm``.
      eps: as in ``batch_norm``.
      unbiased: as in ``batch_norm`` (it also chooses how ``var`` is returned).
      axis: as in ``batch_norm``.
      axis_name: as in ``batch_norm``.
      where: as in ``batch_norm``.

    Returns:
      ``(y, mean, var)``: ``y`` as from ``batch_norm``; ``mean`` and ``var`` have
      ``x``'s shape with ``axis`` kept as size-1 dims (``(1, H)`` for ``x`` of shape
      ``(N, H)``), in at least float32.

    Raises:
      TypeError: as ``batch_norm``.
      ValueError: as ``batch_norm``.

    Examples:
      >>> import jax.numpy as jnp
      >>> y, mean, var = batch_norm_with_stats(jnp.array([[0.0], [2.0]]), 1.0, 0.0)
      >>> y.shape, mean.tolist(), var.tolist()  # var = ((0-1)**2 + (2-1)**2) / (2-1)
      ((2, 1), [[1.0]], [[2.0]])
    """
    inputs = _prepare_batch_norm(
        x, gain, bias, axis=axis, eps=eps, unbiased=unbiased, axis_name=axis_name, where=where
    )
    return _batch_norm_with_stats(*inputs)


def batch_stats(
    x: Array,
    *,
    unbiased: bool = True,
    axis: Axis = 0,
    axis_name: Any = None,
    where: Array | None = None,
) -> tuple[Array, Array]:
    """The batch mean and variance that [`batch_norm`][jaxninja.ops.batch_norm] uses.

        mean = sum(x) / n
        var  = sum((x - mean)**2) / (n - ddof)     ddof = 1 if unbiased else 0

    over the ``n`` rows along ``axis`` (plain ``jnp``: ``jax.grad`` differentiates it).

    Args:
      x: as in [`batch_norm`][jaxninja.ops.batch_norm].
      unbiased: as in ``batch_norm``.
      axis: as in ``batch_norm``.
      axis_name: as in ``batch_norm``.
      where: as in ``batch_norm``.

    Returns:
      ``(mean, var)``, each of ``x``'s shape with ``axis`` kept as size-1 dims (``(1, H)``
      for ``x`` of shape ``(N, H)``; ``mean[0]`` is flax's ``(H,)``), in at least float32.

    Raises:
      TypeError: as ``batch_norm``.
      ValueError: as ``batch_norm``.

    Examples:
      >>> import jax.numpy as jnp
      >>> mean, var = batch_stats(jnp.array([[1.0], [2.0], [3.0]]))
      >>> mean.tolist(), var.tolist()
      ([[2.0]], [[1.0]])
    """
    inputs = _prepare_batch_norm(
        x, 1.0, 0.0, axis=axis, eps=0.0, unbiased=unbiased, axis_name=axis_name, where=where
    )
    xc = inputs.x.astype(compute_dtype(inputs.x.dtype))
    stats = _stats(xc, inputs.where, inputs.config)
    return stats.mean, stats.var


def batch_norm_eval(
    x: Array, gain: Array, bias: Array, mean: Array, var: Array, *, eps: float = 1e-5
) -> Array:
    """Batch norm with given statistics: evaluation and sampling, any batch size.

        y = gain * (x - mean) / sqrt(var + eps) + bias

    flax's ``BatchNorm(use_running_average=True)``, with ``mean``/``var`` e.g. running
    averages ([`running_average`][jaxninja.ops.running_average]) or the whole training
    set's [`batch_stats`][jaxninja.ops.batch_stats] (the lecture's calibration). Plain
    ``jnp``: ``jax.grad`` differentiates it.

    Args:
      x: floating activations, any rank.
      gain: any shape that broadcasts to ``x``, as in
        [`batch_norm`][jaxninja.ops.batch_norm]: ``(features,)`` or ``(1, features)``.
      bias: as ``gain``.
      mean: as ``gain``: ``batch_stats``' ``(1, features)`` and flax's ``(features,)``
        both work.
      var: as ``mean``.
      eps: added to the variance; finite and ``>= 0``.

    Returns:
      ``y``: the shape and dtype of ``x``, computed in at least float32.

    Raises:
      TypeError: ``x`` is not floating.
      ValueError: ``gain``, ``bias``, ``mean`` or ``var`` does not broadcast to ``x``;
        ``eps`` is negative or not finite.

    Examples:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
      >>> batch_norm_eval(x, 2.0, 1.0, jnp.array([[1.0, 2.0]]), 4.0, eps=0.0).tolist()
      [[1.0, 1.0], [3.0, 3.0]]
      >>> batch_norm_eval(x, 2.0, 1.0, jnp.array([1.0, 2.0]), 4.0, eps=0.0).tolist()
      [[1.0, 1.0], [3.0, 3.0]]
    """
    x = jnp.asarray(x)
    check_dtype("x", x)
    _check_broadcast(x.shape, gain=gain, bias=bias, mean=mean, var=var)
    eps = _check_eps(eps)
    dtype = compute_dtype(x.dtype)
    gain = _lift(gain, x.ndim, dtype)
    bias = _lift(bias, x.ndim, dtype)
    mean = _lift(mean, x.ndim, dtype)
    var = _lift(var, x.ndim, dtype)
    y = gain * (x.astype(dtype) - mean) * lax.rsqrt(var + eps) + bias
    return y.astype(x.dtype)


def _check_momentum(momentum: Any) -> Any:
    """A concrete momentum as a Python float in ``[0, 1]``; a traced one as it is."""
    traced = isinstance(momentum, jax.core.Tracer)
    value = momentum if traced else np.asarray(momentum)  # Python, NumPy or concrete JAX
    real = jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
    if value.shape != () or not real:
        raise TypeError(f"momentum must be a real scalar, got {momentum!r}")
    if traced:
        return momentum
    if not 0.0 <= float(value) <= 1.0:  # NaN fails too
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    # A Python float stays weakly typed: 1 - 0.999 is rounded once, to the running dtype.
    return float(value)


def _running_update(momentum: Any, path: Any, running: Any, batch: Any) -> Array:
    """One leaf of ``running_average``: ``running``'s shape and dtype."""
    running = jnp.asarray(running)
    batch = jnp.asarray(batch)
    where = f"running{jax.tree_util.keystr(path)}"
    check_dtype(where, running)
    if batch.shape != running.shape:
        # (1, H) and (H,) (or (1, C, 1) and (C,)) hold the same numbers in the same order.
        squeeze = [tuple(d for d in shape if d != 1) for shape in (running.shape, batch.shape)]
        if squeeze[0] != squeeze[1]:
            raise ValueError(
                f"{where} has shape {running.shape} but the batch statistic has shape "
                f"{batch.shape} (they may differ only in size-1 dims)"
            )
        batch = batch.reshape(running.shape)
    m = momentum
    if isinstance(momentum, jax.core.Tracer):  # unchecked when traced: outside [0, 1] is NaN
        m = momentum.astype(running.dtype)
        m = jnp.where((m >= 0) & (m <= 1), m, jnp.asarray(jnp.nan, running.dtype))
    return (m * running + (1 - m) * batch.astype(running.dtype)).astype(running.dtype)


def running_average(running: Any, batch: Any, momentum: float | Array = 0.99) -> Any:
    """Running averages of batch statistics, leaf by leaf over two pytrees.

        new = momentum * running + (1 - momentum) * batch

    flax's convention: ``momentum`` is the weight the old value keeps. The default,
    0.99, is flax's and Equinox's. The lecture's
    ``bnmean_running = 0.999 * bnmean_running + 0.001 * bnmeani`` is ``momentum=0.999``,
    which ``jaxninja train --running-stats`` passes explicitly
    (``jaxninja.lecture.model.BN_MOMENTUM``).

    Args:
      running: pytree of floating arrays: the running statistics, e.g.
        ``{"mean": (1, H), "var": (1, H)}``.
      batch: pytree of ``running``'s structure: this batch's statistics, e.g. from
        [`batch_norm_with_stats`][jaxninja.ops.batch_norm_with_stats]. A leaf may
        differ from its running leaf in size-1 dims only: ``(1, H)`` statistics update
        flax's ``(H,)`` running averages and back.
      momentum: a real scalar in ``[0, 1]``: a Python, NumPy or concrete JAX number,
        checked when called. A traced momentum (an argument of a jitted function, e.g.
        a swept hyperparameter) cannot be checked then: outside ``[0, 1]`` or NaN it
        makes every result NaN rather than a wrong average.

    Returns:
      ``running``'s structure, each leaf with its running leaf's shape and dtype.

    Raises:
      TypeError: ``momentum`` is not a real scalar (a bool, a string, an array with
        dims, a complex number); a running leaf is not floating.
      ValueError: ``momentum`` is outside ``[0, 1]`` or NaN; a batch leaf's shape differs
        from its running leaf's in more than size-1 dims; the pytrees differ in structure.

    Examples:
      >>> import jax.numpy as jnp
      >>> running_average({"mean": jnp.zeros(2)}, {"mean": jnp.ones(2)}, momentum=0.75)
      {'mean': Array([0.25, 0.25], dtype=float32)}
      >>> running_average({"mean": jnp.zeros(2)}, {"mean": jnp.ones((1, 2))})["mean"].shape
      (2,)
    """
    momentum = _check_momentum(momentum)

    def update(path: Any, r: Any, b: Any) -> Array:
        return _running_update(momentum, path, r, b)

    return jax.tree_util.tree_map_with_path(update, running, batch)


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
    """[`batch_norm`][jaxninja.ops.batch_norm] in plain ``jnp``: autodiff's baseline.

    The same forward pass, differentiated by ``jax.grad`` step by step rather than by
    the fused rule: what the tests and benchmarks compare ``batch_norm`` against.

    Args:
      x: as in [`batch_norm`][jaxninja.ops.batch_norm].
      gain: as in ``batch_norm``.
      bias: as in ``batch_norm``.
      eps: as in ``batch_norm``.
      unbiased: as in ``batch_norm``.
      axis: as in ``batch_norm``.
      axis_name: as in ``batch_norm``.
      where: as in ``batch_norm``.

    Returns:
      ``y``, as from ``batch_norm``.

    Raises:
      TypeError: as ``batch_norm``.
      ValueError: as ``batch_norm``.

    Examples:
      >>> import jax.numpy as jnp, numpy as np
      >>> x = jnp.array([[1.0], [3.0]])
      >>> y = batch_norm_reference(x, 1.0, 0.0, eps=0.0)
      >>> np.asarray(y, np.float64).round(4).tolist()  # +-1/sqrt(2): var is 2 with n-1
      [[-0.7071], [0.7071]]
    """
    inputs = _prepare_batch_norm(
        x, gain, bias, axis=axis, eps=eps, unbiased=unbiased, axis_name=axis_name, where=where
    )
    return _bn_forward(inputs)[0]
