"""Checks and helpers shared by the ops: dtypes, axes, masks, mesh-varying parameters."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Axis = int | Sequence[int]


def compute_dtype(dtype: Any) -> Any:
    """float16/bfloat16 are computed in float32; float32/float64 in themselves."""
    # Not jnp.promote_types: it refuses bfloat16 + float32 under strict promotion.
    return jnp.dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def check_dtype(name: str, a: Array, kind: Any = jnp.floating) -> None:
    if not jnp.issubdtype(a.dtype, kind):
        what = "a floating-point array" if kind is jnp.floating else "integer class ids"
        raise TypeError(f"{name} must be {what}, got dtype {a.dtype}")


def normalize_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """``axis`` (an int or a sequence of ints) as non-negative axes, in the caller's order."""
    if not isinstance(axis, int | Sequence):
        raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}")
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if not all(-ndim <= a < ndim for a in axes):
        raise ValueError(f"axis={axis} is out of range for an array of rank {ndim}")
    if len({a % ndim for a in axes}) != len(axes):
        raise ValueError(f"axis={axis} repeats an axis")
    return tuple(a % ndim for a in axes)


def masked(where: Array | None, a: Array) -> Array:
    """``a`` where the mask (a row mask gets ``a``'s trailing axes) is True, 0 elsewhere."""
    if where is None:
        return a
    where = where.reshape(where.shape + (1,) * (a.ndim - where.ndim))
    return jnp.where(where, a, jnp.zeros((), a.dtype))


def varying_like(x: Array, p: Any) -> Any:
    """``p`` (gain, bias, w) cast to vary over the mesh axes that ``x`` varies on."""
    # Under shard_map(check_vma=True) a rule's cotangents must match its inputs' type; the
    # cast's transpose is a psum, so a replicated parameter's gradient is the global sum.
    if p is None:
        return p
    missing = tuple(jax.typeof(x).manual_axis_type.varying - jax.typeof(p).manual_axis_type.varying)
    return lax.pcast(p, missing, to="varying") if missing else p


def label_index(labels: Array, num_classes: int) -> tuple[Array, Array]:
    """``(index, valid)``: int32 class index (0 where invalid) and ``0 <= label < V``."""
    # Compared in the labels' own dtype: a uint8 label never wraps against 300 classes.
    info = jnp.iinfo(labels.dtype)
    valid = jnp.ones(labels.shape, bool) if num_classes > info.max else labels < num_classes
    if info.min < 0:
        valid = valid & (labels >= 0)
    return jnp.where(valid, labels, 0).astype(jnp.int32), valid


def row_losses(losses: Array, valid: Array, rows: Array | None) -> Array:
    """NaN for a bad label (never a silently clamped answer), 0 for a masked row."""
    # A product, not a select: autodiff of the reference then gives a bad label's row a NaN
    # gradient too, as the hand-written rules do (row_cotangent).
    return masked(rows, losses * jnp.where(valid, 1, jnp.nan).astype(losses.dtype))


def row_cotangent(g: Array, valid: Array, rows: Array | None) -> Array:
    """The losses' cotangent: exactly 0 on a masked row, NaN on a kept row with a bad label."""
    bad = ~valid if rows is None else ~valid & rows
    return jnp.where(bad, jnp.nan, masked(rows, g))


# ------------------------------------------------------------- cross-entropy options

REDUCTIONS = ("none", "sum", "mean")


class LossOptions(NamedTuple):
    """The static (hashable) options of the cross-entropy ops, checked once at the edge."""

    softcap: float | None = None  # logits c * tanh(z / c)
    label_smoothing: float = 0.0  # (1 - e) * CE(y) + e * mean_j(-log p_j)
    z_loss: float = 0.0  # k * lse**2 per row


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {value!r}")
    return float(value)


def check_loss_options(
    softcap: Any, label_smoothing: Any, z_loss: Any, reduction: Any, ignore_index: Any
) -> LossOptions:
    """Refuse a bad option with one error naming it; return the options as floats."""
    cap = None if softcap is None else _number("softcap", softcap)
    if cap is not None and not (0 < cap < math.inf):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    smoothing = _number("label_smoothing", label_smoothing)
    if not 0 <= smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    k = _number("z_loss", z_loss)
    if not 0 <= k < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if ignore_index is not None and (
        isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral)
    ):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    return LossOptions(cap, smoothing, k)


def kept_rows(rows: Array | None, labels: Array, ignore_index: int | None) -> Array | None:
    """The row mask with the ``ignore_index`` rows left out (None: every row counts)."""
    if ignore_index is None:
        return rows
    info = jnp.iinfo(labels.dtype)
    if not info.min <= ignore_index <= info.max:  # no label of this dtype can equal it
        return rows
    keep = labels != jnp.asarray(ignore_index, labels.dtype)
    return keep if rows is None else rows & keep


def reduce_losses(losses: Array, rows: Array | None, reduction: str) -> Array:
    """``reduction`` of per-row losses, summed in at least float32, in the losses' dtype.
    ``"mean"`` divides by the number of rows that count (0 when none does)."""
    if reduction == "none":
        return losses
    total = jnp.sum(losses.astype(compute_dtype(losses.dtype)))
    if reduction == "mean":
        count = losses.size if rows is None else jnp.sum(rows)
        total = total / jnp.maximum(count, 1).astype(total.dtype)
    return total.astype(losses.dtype)


def vary_over(a: Array, *refs: Any) -> Array:
    """``a`` cast to vary over every mesh axis that one of ``refs`` varies over."""
    # A scan carry must keep its type: one started from x alone would not vary over the
    # vocabulary axis that w's chunks bring in.
    want = frozenset().union(
        *(jax.typeof(r).manual_axis_type.varying for r in refs if r is not None)
    )
    missing = tuple(want - jax.typeof(a).manual_axis_type.varying)
    return lax.pcast(a, missing, to="varying") if missing else a
