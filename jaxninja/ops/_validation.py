"""Checks and helpers shared by the ops: dtypes, axes, masks, mesh-varying parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    return masked(rows, jnp.where(valid, losses, jnp.nan))


def row_cotangent(g: Array, valid: Array, rows: Array | None) -> Array:
    """The losses' cotangent: exactly 0 on a masked row, NaN on a kept row with a bad label."""
    bad = ~valid if rows is None else ~valid & rows
    return jnp.where(bad, jnp.nan, masked(rows, g))
