"""Cross-entropy with a hand-written VJP (Exercise 2): ``cross_entropy`` and its reference,
and the per-row loss algebra that ``jaxninja.ops.linear_cross_entropy`` shares."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import lax

from jaxninja.ops._validation import (
    Array,
    Axis,
    LossOptions,
    check_dtype,
    check_loss_options,
    compute_dtype,
    kept_rows,
    label_index,
    masked,
    normalize_axes,
    reduce_losses,
    row_cotangent,
    row_losses,
)


class LossAndLse(NamedTuple):
    """What ``return_lse=True`` returns: the (reduced) loss and the per-row log-sum-exp."""

    loss: Array
    lse: Array


# ------------------------------------------------------------ the per-row loss algebra


def soft_cap(z: Array, opts: LossOptions) -> Array:
    """Gemma 2's soft-capped logits ``c * tanh(z / c)`` (``z`` itself without ``softcap``)."""
    return z if opts.softcap is None else opts.softcap * jnp.tanh(z / opts.softcap)


def cap_slope(dz: Array, capped: Array, opts: LossOptions) -> Array:
    """``dz`` through the cap: ``d(c tanh(z/c))/dz = 1 - tanh(z/c)**2``, from the capped value."""
    return dz if opts.softcap is None else dz * (1 - jnp.square(capped / opts.softcap))


def shift(m: Array) -> Array:
    """The shift exp sees: the row max where finite, else 0 (as ``jax.nn.logsumexp``), so a
    row or chunk of -inf logits never meets ``exp(-inf - -inf)``."""
    return jnp.where(jnp.isfinite(m), m, jnp.zeros((), m.dtype))


def rescale(m: Array, m_new: Array) -> Array:
    """``exp(m - m_new)``, the factor that moves a running sum of exps to a new max; 1 when
    the max did not move (both -inf or both +inf included)."""
    return jnp.exp(jnp.where(m == m_new, jnp.zeros((), m.dtype), m - m_new))


def row_loss(lse: Array, label_logit: Array, mean_logit: Array | None, opts: LossOptions) -> Array:
    """``lse - (1 - e) z_y - e mean(z) + k lse**2`` (terms of a zero option left out: 0 * inf
    would be NaN)."""
    e, k = opts.label_smoothing, opts.z_loss
    loss = lse - (1 - e) * label_logit if e else lse - label_logit
    if mean_logit is not None:
        loss = loss - e * mean_logit
    return loss + k * jnp.square(lse) if k else loss


class RowCoefficients(NamedTuple):
    """``d loss / d z_j = scale * exp(z_j - shift(m)) - label * [j = y] - uniform``."""

    scale: Array  # (g (1 + 2 k lse) + h) / s: g, h the cotangents of the loss and of lse
    label: Array  # g (1 - e)
    uniform: Array | None  # g e / num_classes (None without label smoothing)


def row_coefficients(
    g: Array, h: Array, lse: Array, s: Array, num_classes: Any, opts: LossOptions
) -> RowCoefficients:
    """The per-row coefficients of the logits' cotangent for loss cotangent ``g`` and lse
    cotangent ``h`` (both already 0 on masked rows)."""
    e, k = opts.label_smoothing, opts.z_loss
    a = g * (1 + 2 * k * lse) + h if k else g + h
    uniform = g * (e / num_classes) if e else None
    return RowCoefficients(a / s, g * (1 - e) if e else g, uniform)


def finish(losses: Array, lse: Array, rows: Array | None, reduction: str, return_lse: bool) -> Any:
    """The public ops' result: ``reduction`` of the losses, with the lse if asked for."""
    loss = reduce_losses(losses, rows, reduction)
    return LossAndLse(loss, lse) if return_lse else loss


# ------------------------------------------------------------------------ cross_entropy


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
    lead = a.shape[: len(batch)]
    return a.reshape(lead + (math.prod(a.shape[len(batch) :]),))  # not -1: any size may be 0


def _check_logits(logits: Array, labels: Array, axis: Any) -> tuple[tuple[int, ...], ...]:
    """Refuse bad dtypes and shapes; return the (class axes, batch axes)."""
    check_dtype("logits", logits)
    check_dtype("labels", labels, jnp.integer)
    if logits.ndim == 0:
        raise ValueError("logits must have at least one axis (the classes), got a scalar")
    axes = normalize_axes(axis, logits.ndim)  # a tuple: optax's flat-index order
    batch = tuple(a for a in range(logits.ndim) if a not in axes)
    if math.prod(logits.shape[a] for a in axes) == 0:
        raise ValueError(f"logits shape {logits.shape} has no classes on axis {axis}")
    expected = tuple(logits.shape[a] for a in batch)
    if labels.shape != expected:
        raise ValueError(
            f"labels shape {labels.shape} does not match logits shape {logits.shape} "
            f"without the class axis {axis} (expected {expected})"
        )
    return axes, batch


def _cross_entropy_rows(logits: Any, labels: Any, axis: Any, where: Any, ignore: Any) -> _Rows:
    """Validate once at the edge and bring the inputs to the ``_Rows`` layout."""
    logits, labels = jnp.asarray(logits), jnp.asarray(labels)
    axes, batch = _check_logits(logits, labels, axis)
    rows = classes = None
    if where is not None:
        where = jnp.asarray(where, dtype=bool)
        if where.shape == logits.shape:  # optax's per-logit mask
            classes = _to_rows(where, batch, axes)
            rows = jnp.any(classes, axis=-1)
            classes = classes | ~rows[..., None]  # an all-masked row stays finite
        elif where.shape == labels.shape:
            rows = where
        else:
            raise ValueError(
                f"where shape {where.shape} must equal labels shape {labels.shape} "
                f"(a row mask) or logits shape {logits.shape} (a per-logit mask)"
            )
    rows = kept_rows(rows, labels, ignore)
    return _Rows(_to_rows(logits, batch, axes), labels, rows, classes)


def _capped_logits(r: _Rows, opts: LossOptions) -> Array:
    """Logits with masked rows set to 0 (whatever they held), then capped; classes unmasked.
    Without a cap they stay in their own dtype (the max is exact in any dtype)."""
    x = masked(r.rows, r.x)
    return soft_cap(x.astype(compute_dtype(x.dtype)), opts) if opts.softcap else x


def _drop_classes(r: _Rows, z: Array, fill: float) -> Array:
    """``z`` with the classes the per-logit mask leaves out set to ``fill``."""
    if r.classes is None:
        return z
    return jnp.where(r.classes, z, jnp.asarray(fill, z.dtype))


def _label_logit(r: _Rows, index: Array, opts: LossOptions, dtype: Any) -> Array:
    """Capped ``z[..., y]``, 0 on masked rows (taken even if a per-logit mask leaves ``y`` out)."""
    z_y = jnp.take_along_axis(r.x, index[..., None], axis=-1)[..., 0]
    return soft_cap(masked(r.rows, z_y).astype(dtype), opts)


def _num_classes(r: _Rows) -> Any:
    """Classes in each row's normaliser: V, or the per-logit mask's count."""
    return r.x.shape[-1] if r.classes is None else jnp.sum(r.classes, axis=-1)


def _mean_logit(r: _Rows, z: Array, dtype: Any) -> Array:
    """The mean capped logit over the classes in the normaliser."""
    total = jnp.sum(_drop_classes(r, z, 0.0).astype(dtype), axis=-1)
    return total / jnp.asarray(_num_classes(r), dtype)


@overload
def cross_entropy_reference(
    logits: Array,
    labels: Array,
    axis: Axis = -1,
    where: Array | None = None,
    *,
    ignore_index: int | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    return_lse: Literal[False] = False,
) -> Array: ...


@overload
def cross_entropy_reference(
    logits: Array,
    labels: Array,
    axis: Axis = -1,
    where: Array | None = None,
    *,
    ignore_index: int | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    return_lse: Literal[True],
) -> LossAndLse: ...


def cross_entropy_reference(
    logits: Array,
    labels: Array,
    axis: Axis = -1,
    where: Array | None = None,
    *,
    ignore_index: int | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    return_lse: bool = False,
) -> Array | LossAndLse:
    r"""Plain-``jnp`` ``cross_entropy`` differentiated by autodiff: the tests' baseline.

    Written the obvious way on the whole ``(..., num_classes)`` logits, capped first:

    $$
    \log p_j = z_j - \mathrm{lse}(z), \qquad
    \ell = -(1 - e) \log p_y - e\, \overline{\log p} + k\, \mathrm{lse}(z)^2
    $$

    (``jax.nn.logsumexp``; ``e = label_smoothing``, ``k = z_loss``), so that autodiff, not
    a hand-written rule, gives its gradient. A bad label's row is NaN in value and gradient,
    as in ``cross_entropy``.

    Args:
      logits: ``(..., num_classes)`` floating scores.
      labels: integer class ids, the shape of ``logits`` without ``axis``.
      axis: the class axis or a tuple of axes, as in ``cross_entropy``.
      where: a row mask (``labels.shape``) or a per-logit mask (``logits.shape``).
      ignore_index: rows with this label count as masked.
      softcap: ``c > 0`` caps the logits to ``c * tanh(z / c)``.
      label_smoothing: ``e`` in ``[0, 1)``.
      z_loss: ``k >= 0``.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over the rows that count).
      return_lse: also return the per-row log-sum-exp.

    Returns:
      What ``cross_entropy`` returns for the same arguments.

    Raises:
      TypeError: as ``cross_entropy`` (dtypes, option types).
      ValueError: as ``cross_entropy`` (shapes, option ranges; each named).

    Examples:
        >>> import jax.numpy as jnp, numpy as np
        >>> losses = cross_entropy_reference(jnp.zeros((2, 4)), jnp.array([0, 3]))
        >>> np.asarray(losses, np.float64).round(4).tolist()  # log(4) each
        [1.3863, 1.3863]
    """
    opts = check_loss_options(softcap, label_smoothing, z_loss, reduction, ignore_index)
    r = _cross_entropy_rows(logits, labels, axis, where, ignore_index)
    dtype = compute_dtype(r.x.dtype)
    z = soft_cap(masked(r.rows, r.x).astype(dtype), opts)
    index, valid = label_index(r.labels, z.shape[-1])
    lse = jax.nn.logsumexp(_drop_classes(r, z, -jnp.inf), axis=-1)
    label_logprob = _label_logit(r, index, opts, dtype) - lse
    losses = -label_logprob
    if opts.label_smoothing:
        mean_logprob = _mean_logit(r, z, dtype) - lse
        losses = -(1 - opts.label_smoothing) * label_logprob
        losses = losses - opts.label_smoothing * mean_logprob
    if opts.z_loss:
        losses = losses + opts.z_loss * jnp.square(lse)
    losses = row_losses(losses, valid, r.rows).astype(r.x.dtype)
    return finish(losses, masked(r.rows, lse).astype(r.x.dtype), r.rows, reduction, return_lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _cross_entropy(r: _Rows, opts: LossOptions) -> tuple[Array, Array]:
    return _cross_entropy_fwd(r, opts)[0]


def _cross_entropy_fwd(r: _Rows, opts: LossOptions):
    dtype = compute_dtype(r.x.dtype)
    z = _capped_logits(r, opts)
    # The max only shifts exp's argument: no gradient.
    m = lax.stop_gradient(jnp.max(_drop_classes(r, z, -jnp.inf), axis=-1)).astype(dtype)
    exps = jnp.exp(_drop_classes(r, z, -jnp.inf).astype(dtype) - shift(m)[..., None])
    s = jnp.sum(exps, axis=-1)
    lse = jnp.log(s) + shift(m)
    index, valid = label_index(r.labels, r.x.shape[-1])
    mean = _mean_logit(r, z, dtype) if opts.label_smoothing else None
    loss = row_loss(lse, _label_logit(r, index, opts, dtype), mean, opts)
    losses = row_losses(loss, valid, r.rows)
    # Residuals: the logits (the caller holds them) and three numbers per row; recomputing
    # exp is faster on CPU than writing and re-reading an (N, V) residual.
    out = (losses.astype(r.x.dtype), masked(r.rows, lse).astype(r.x.dtype))
    return out, (r, m, s, lse, index, valid)


def _minus_label(p: Array, index: Array, label: Array, same_dtype: bool) -> Array:
    """``p - label * onehot(index)``."""
    if same_dtype:  # in p's own dtype a per-row scatter is fastest
        flat = p.reshape(-1, p.shape[-1])
        rows = jnp.arange(flat.shape[0])
        return flat.at[rows, index.reshape(-1)].add(-label.reshape(-1)).reshape(p.shape)
    # for 16-bit logits the select fuses with the cast
    onehot = lax.broadcasted_iota(jnp.int32, p.shape, p.ndim - 1) == index[..., None]
    return jnp.where(onehot, p - label[..., None], p)


def _cross_entropy_bwd(opts: LossOptions, residuals, cotangents):
    r, m, s, lse, index, valid = residuals
    g = row_cotangent(cotangents[0].astype(m.dtype), valid, r.rows)
    h = masked(r.rows, cotangents[1].astype(m.dtype))
    coef = row_coefficients(g, h, lse, s, _num_classes(r), opts)
    z = _capped_logits(r, opts)
    # The fused rule of Exercise 2, d loss / d z_j = softmax_j - [j = y], with softmax
    # normalised as exp(z - max) / sum (as optax): exp(z - lse) would carry the rounding
    # of lse, wrong at logits of 1e8 in float32.
    p = jnp.exp(_drop_classes(r, z, -jnp.inf).astype(m.dtype) - shift(m)[..., None])
    p = p * coef.scale[..., None]
    if coef.uniform is not None:
        p = p - coef.uniform[..., None]
    p = _drop_classes(r, p, 0.0)  # a left-out class gets exactly 0, whatever the row holds
    dz = cap_slope(_minus_label(p, index, coef.label, z.dtype == m.dtype), z, opts)
    return (_Rows(dz.astype(r.x.dtype), None, None, None),)


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@overload
def cross_entropy(
    logits: Array,
    labels: Array,
    axis: Axis = -1,
    where: Array | None = None,
    *,
    ignore_index: int | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    return_lse: Literal[False] = False,
) -> Array: ...


@overload
def cross_entropy(
    logits: Array,
    labels: Array,
    axis: Axis = -1,
    where: Array | None = None,
    *,
    ignore_index: int | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    return_lse: Literal[True],
) -> LossAndLse: ...


def cross_entropy(
    logits: Array,
    labels: Array,
    axis: Axis = -1,
    where: Array | None = None,
    *,
    ignore_index: int | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    return_lse: bool = False,
) -> Array | LossAndLse:
    r"""Softmax cross-entropy with integer labels and a fused VJP; a drop-in for
    ``optax.softmax_cross_entropy_with_integer_labels``.

    For a row of logits ``z`` (soft-capped to ``c tanh(z / c)`` first if ``softcap=c``) and
    its label ``y``:

    $$
    \ell = \mathrm{lse}(z) - (1 - e)\, z_y - e\, \overline{z} + k\, \mathrm{lse}(z)^2,
    \qquad
    \frac{\partial \ell}{\partial z_j} = (1 + 2k\,\mathrm{lse})\,\mathrm{softmax}(z)_j
    - (1 - e)\,[j = y] - e / V
    $$

    with ``lse = log sum_j exp(z_j)``, ``e = label_smoothing`` (torch's and Liger's
    definition: ``(1 - e) CE(y) + e mean_j(-log p_j)``), ``k = z_loss`` (PaLM's z-loss) and
    ``z-bar`` the mean logit over the classes in the normaliser. The defaults give optax's
    result (optax's own test class for its function passes with ours swapped in, except its
    forward-mode ``check_grads``). Forward keeps three numbers per row (``max``, ``sum
    exp``, ``lse``); the backward pass recomputes ``exp(z - max) / sum`` (normalised as
    optax, right at logits of 1e8 in float32). A label outside ``[0, num_classes)`` gives a
    NaN loss and NaN gradient for its row, never a silently clamped answer (a uint8 label
    against 300 classes never wraps). A row of logits is exactly as finite as in
    ``cross_entropy_reference``: a row or class of ``-inf`` logits gives what
    ``jax.nn.logsumexp`` gives, never ``exp(-inf - -inf)``. ``jax.grad`` of ``jax.grad``
    works; forward mode does not.

    Args:
      logits: ``(..., num_classes)`` floating scores (the class axis is ``axis``).
      labels: integer class ids of any integer dtype, the shape of ``logits`` without
        ``axis``.
      axis: the class axis, or a tuple of axes (then a label is a flat index into
        ``logits``' slice over those axes, in the tuple's order, as in optax).
      where: optional bool mask, the shape of ``labels`` (False rows get loss 0 and
        gradient exactly 0, whatever they hold: padding labels, inf, NaN) or of ``logits``
        (optax's per-logit mask: False classes leave the normaliser; a row with none left
        counts as masked).
      ignore_index: rows whose label equals it count as masked, as with ``where``
        (torch's ``ignore_index=-100``); ``None``: no label is ignored.
      softcap: ``c > 0``: logits ``c * tanh(z / c)`` (Gemma 2); ``None``: no cap.
      label_smoothing: ``e`` in ``[0, 1)``.
      z_loss: ``k >= 0``: adds ``k * lse**2`` per row.
      reduction: ``"none"`` (per-row losses), ``"sum"`` or ``"mean"`` (divided by the
        number of rows that count: not masked, not ignored; 0 if none does).
      return_lse: also return the per-row log-sum-exp of the (capped) logits,
        differentiable, 0 on masked rows.

    Returns:
      The losses, ``labels.shape`` (a scalar for ``"sum"`` and ``"mean"``) in ``logits``'
      dtype (16-bit logits are computed in float32), or with ``return_lse`` a
      ``LossAndLse`` ``(loss, lse)``, ``lse`` of shape ``labels.shape``.

    Raises:
      TypeError: non-floating logits, non-integer labels, an option of the wrong type.
      ValueError: shapes that do not fit (both are named), an ``axis`` out of range, or
        an option out of its range (the option is named).

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        >>> labels = jnp.array([0, 2])
        >>> np.asarray(cross_entropy(logits, labels), np.float64).round(4).tolist()
        [0.2395, 1.0986]
        >>> dlogits = jax.grad(lambda z: cross_entropy(z, labels).mean())(logits)
        >>> np.asarray(dlogits * 2, np.float64).round(4).tolist()  # softmax - onehot
        [[-0.213, 0.1065, 0.1065], [0.3333, 0.3333, -0.6667]]
        >>> padded = jnp.array([0, -100])  # the second row is padding
        >>> float(cross_entropy(logits, padded, ignore_index=-100, reduction="mean"))
        0.2395...
    """
    opts = check_loss_options(softcap, label_smoothing, z_loss, reduction, ignore_index)
    r = _cross_entropy_rows(logits, labels, axis, where, ignore_index)
    losses, lse = _cross_entropy(r, opts)
    return finish(losses, lse, r.rows, reduction, return_lse)
