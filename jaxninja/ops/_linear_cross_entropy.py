"""Fused linear + cross-entropy that never builds the ``(N, V)`` logits."""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import lax

from jaxninja.ops._cross_entropy import (
    LossAndLse,
    LossOptions,
    cap_slope,
    finish,
    rescale,
    row_coefficients,
    row_loss,
    shift,
    soft_cap,
)
from jaxninja.ops._validation import (
    Array,
    check_dtype,
    check_loss_options,
    compute_dtype,
    kept_rows,
    label_index,
    masked,
    row_cotangent,
    row_losses,
    vary_over,
    varying_like,
)

_BLOCKS = "jaxninja_vocabulary_blocks"  # the vmap axis of the vocabulary's blocks
LAYOUTS = ("dv", "vd")  # w is (D, V) (x @ w) or (V, D) (tied embeddings, torch's Linear)

# dot_general contracting dims (of the left, of the right operand), per layout, for the
# logits x . w_c, the features' cotangent dz . w_c and w_c's cotangent.
_LOGITS = {"dv": (1, 0), "vd": (1, 1)}
_DX = {"dv": (1, 1), "vd": (1, 0)}


class _Linear(NamedTuple):
    """Inputs of the fused op, rows flattened: ``x (N, D)``, ``w``, ``bias (V,)``."""

    x: Array
    w: Array  # (D, V) or (V, D), as w_layout says; V local under vocab_axis_name
    bias: Array | None
    labels: Any  # (N,), any integer dtype (None in a cotangent)
    rows: Array | None  # (N,) bool: rows that count (None: all)


class _Static(NamedTuple):
    """What the rules need besides the arrays (hashable: a custom_vjp nondiff argument)."""

    chunk: int  # classes per chunk
    layout: str  # "dv" or "vd"
    opts: LossOptions
    axis_name: Any  # the vocabulary's mesh axis, or None
    dtype: Any  # the inputs' promoted dtype; computed in compute_dtype(dtype)
    blocks: int  # equal blocks of the vocabulary, vmapped (1: none)


class _Chunk(NamedTuple):
    z: Array  # (N, chunk) capped logits in the compute dtype, -inf off the chunk's own columns
    capped: Array  # the same before the -inf (what the cap's slope is taken from)
    wc: Array  # w's slice
    start: Array  # its first column
    cols: Array  # (chunk,) its columns
    own: Array  # (1, chunk) the columns this chunk owns (the slid last one shares some)


def _vocab_size(w: Array, layout: str) -> int:
    return w.shape[1] if layout == "dv" else w.shape[0]


def _dot(a: Array, b: Array, dims: tuple[int, int], st: _Static) -> Array:
    """``a . b`` contracting ``dims``, in the inputs' promoted dtype (no cast for one dtype),
    accumulated in the compute dtype."""
    # Only the chunk is cast (a whole-w cast would be hoisted out of the loop: a copy of w).
    a, b = a.astype(st.dtype), b.astype(st.dtype)
    dn = (((dims[0],), (dims[1],)), ((), ()))
    return lax.dot_general(a, b, dn, preferred_element_type=compute_dtype(st.dtype))


def _chunk_logits(lin: _Linear, x: Array, k: Array, st: _Static) -> _Chunk:
    """Capped logits of class chunk ``k``, ``(N, chunk)``; the last chunk is slid back to end
    at V (no padded w) and is -inf on the columns it shares."""
    v, chunk = _vocab_size(lin.w, st.layout), st.chunk
    start = jnp.minimum(k * chunk, v - chunk)
    wc = lax.dynamic_slice_in_dim(lin.w, start, chunk, axis=1 if st.layout == "dv" else 0)
    z = _dot(x, wc, _LOGITS[st.layout], st)
    if lin.bias is not None:
        z = z + lax.dynamic_slice_in_dim(lin.bias, start, chunk).astype(z.dtype)[None]
    capped = soft_cap(z, st.opts)
    cols = start + lax.iota(jnp.int32, chunk)
    own = (cols >= k * chunk)[None]
    return _Chunk(jnp.where(own, capped, -jnp.inf), capped, wc, start, cols, own)


def _chunks(lin: _Linear, st: _Static) -> Array:
    return jnp.arange(-(-_vocab_size(lin.w, st.layout) // st.chunk))


class _Labels(NamedTuple):
    label: Array  # (N,) int32 class id in this slice of the vocabulary (where here)
    here: Array  # (N,) bool: the label's class is in this slice


def _slices(st: _Static) -> Any:
    """The axis over which the vocabulary's slices combine: the user's mesh axis, the
    blocks' vmap axis, or None (one slice)."""
    return _BLOCKS if st.blocks > 1 else st.axis_name


def _labels(lin: _Linear, st: _Static) -> _Labels:
    v, ax = _vocab_size(lin.w, st.layout), _slices(st)
    if ax is None:
        index, valid = label_index(lin.labels, v)
        return _Labels(index, valid)
    index, valid = label_index(lin.labels, v * lax.axis_size(ax))
    local = index - lax.axis_index(ax) * v
    here = valid & (local >= 0) & (local < v)
    return _Labels(jnp.where(here, local, 0), here)


def _label_logit(lin: _Linear, x: Array, st: _Static) -> Array:
    """Capped ``z_y`` per row: one column of w per row, gathered (summed over the slices)."""
    lab = _labels(lin, st)
    w_y = jnp.take(lin.w, lab.label, axis=1 if st.layout == "dv" else 0)
    w_y = w_y.T if st.layout == "dv" else w_y  # (N, D)
    dtype = compute_dtype(st.dtype)
    z_y = jnp.sum(x.astype(dtype) * w_y.astype(dtype), axis=1)
    if lin.bias is not None:
        z_y = z_y + jnp.take(lin.bias, lab.label).astype(dtype)
    if _slices(st) is not None:  # a where, not a product: another slice's column may be inf
        z_y = lax.psum(jnp.where(lab.here, z_y, jnp.zeros((), dtype)), _slices(st))
    return soft_cap(z_y, st.opts)


class _Stats(NamedTuple):
    """Per row, over the whole vocabulary: the max, ``sum exp(z - shift(max))``, the sum of
    the logits (label smoothing) and the label's logit."""

    m: Array
    s: Array
    total: Array
    label_logit: Array


def _forward_stats(lin: _Linear, x: Array, st: _Static) -> _Stats:
    """Online log-sum-exp over this slice's chunks, then combined over the slices."""

    def body(carry, k):  # rescale the running sum to the new max
        m, s, total = carry
        c = _chunk_logits(lin, x, k, st)
        m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(c.z, axis=1)))
        s = s * rescale(m, m_new) + jnp.sum(jnp.exp(c.z - shift(m_new)[:, None]), axis=1)
        if st.opts.label_smoothing:
            total = total + jnp.sum(jnp.where(c.own, c.capped, 0), axis=1)
        return (m_new, s, total), None

    # Carries that vary like the logits: under shard_map they vary over x's and w's axes.
    zero = vary_over(jnp.zeros(x.shape[:1], compute_dtype(st.dtype)), x, lin.w, lin.bias)
    (m, s, total), _ = lax.scan(body, (zero - jnp.inf, zero, zero), _chunks(lin, st))
    m, ax = lax.stop_gradient(m), _slices(st)
    if ax is not None:
        m_all = lax.stop_gradient(lax.pmax(m, ax))
        s, total, m = lax.psum(s * rescale(m, m_all), ax), lax.psum(total, ax), m_all
    return _Stats(m, s, total, _label_logit(lin, x, st))


def _over_slices(fn: Any, lin: _Linear, st: _Static, w_out: bool) -> Any:
    """``fn(lin)``, or with ``st.blocks`` blocks: ``fn`` vmapped over equal blocks of the
    vocabulary (its collectives over the blocks' axis), w's cotangent put back together.
    A w sharded over the vocabulary is then used where it lies: no all-gather under jit."""
    if st.blocks == 1:
        return fn(lin)
    axis = 1 if st.layout == "dv" else 0
    v = lin.w.shape[axis]
    w = lin.w.reshape(lin.w.shape[:axis] + (st.blocks, v // st.blocks) + lin.w.shape[axis + 1 :])
    bias = None if lin.bias is None else lin.bias.reshape(st.blocks, -1)

    def block(w, bias):
        return fn(lin._replace(w=w, bias=bias))

    out_axes = (None, axis, 0) if w_out else None
    out = jax.vmap(block, (axis, 0), out_axes, axis_name=_BLOCKS)(w, bias)
    if not w_out:
        return out
    dx, dw, db = out
    return dx, dw.reshape(lin.w.shape), None if db is None else db.reshape(-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _linear_cross_entropy(lin: _Linear, st: _Static) -> tuple[Array, Array]:
    return _linear_cross_entropy_fwd(lin, st)[0]


def _vocab_total(lin: _Linear, st: _Static) -> int:
    v = _vocab_size(lin.w, st.layout)
    return v if st.axis_name is None else v * lax.axis_size(st.axis_name)


def _linear_cross_entropy_fwd(lin: _Linear, st: _Static):
    x = masked(lin.rows, lin.x)  # masked rows: 0
    stats = _over_slices(lambda lin: _forward_stats(lin, x, st), lin, st, w_out=False)
    lse = jnp.log(stats.s) + shift(stats.m)
    mean = stats.total / _vocab_total(lin, st) if st.opts.label_smoothing else None
    loss = row_loss(lse, stats.label_logit, mean, st.opts)
    valid = label_index(lin.labels, _vocab_total(lin, st))[1]
    out = (row_losses(loss, valid, lin.rows), masked(lin.rows, lse))
    return out, (lin, stats.m, stats.s, lse)


def _chunk_cotangent(c: _Chunk, coef: Any, m: Array, lab: _Labels, lin: _Linear, st: _Static):
    """Exercise 2 on one chunk: ``dz = scale exp(z - shift) - label [j = y] - uniform``,
    through the cap; exactly 0 off the chunk's own columns and on masked rows."""
    dz = jnp.exp(c.z - shift(m)[:, None]) * coef.scale[:, None]
    if coef.uniform is not None:
        dz = dz - coef.uniform[:, None]
    onehot = (c.cols[None] == lab.label[:, None]) & lab.here[:, None]
    dz = cap_slope(jnp.where(onehot, dz - coef.label[:, None], dz), c.capped, st.opts)
    keep = c.own if lin.rows is None else c.own & lin.rows[:, None]
    return jnp.where(keep, dz, 0)


def _typed_over(w: Array, axis_name: Any) -> bool:
    """Whether ``w`` is typed as varying over the vocabulary axis (shard_map's check_vma)."""
    if axis_name is None:
        return False
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return set(names) <= jax.typeof(w).manual_axis_type.varying


def _backward_scan(lin: _Linear, x: Array, coef: Any, m: Array, st: _Static):
    """dx (summed over the slices), dw and dbias of this slice."""
    lab, axis = _labels(lin, st), 1 if st.layout == "dv" else 0

    def body(carry, k):
        dx, dw, db = carry
        c = _chunk_logits(lin, x, k, st)
        dz = _chunk_cotangent(c, coef, m, lab, lin, st)
        # Exercise 1's matmul rules fold dz into dx, dw, db at once. dw/db keep w's dtype:
        # each column is written once (the slid last chunk adds exact zeros to the columns
        # it shares), so nothing is rounded twice.
        dx = dx + _dot(dz, c.wc, _DX[st.layout], st)
        dwc = _dot(x, dz, (0, 0), st) if st.layout == "dv" else _dot(dz, x, (0, 0), st)
        dwc = dwc + lax.dynamic_slice_in_dim(dw, c.start, st.chunk, axis).astype(dwc.dtype)
        dw = lax.dynamic_update_slice_in_dim(dw, dwc.astype(dw.dtype), c.start, axis)
        dbc = lax.dynamic_slice_in_dim(db, c.start, st.chunk).astype(dz.dtype) + jnp.sum(dz, 0)
        db = lax.dynamic_update_slice_in_dim(db, dbc.astype(db.dtype), c.start, 0)
        return (dx, dw, db), None

    dw = jnp.zeros_like(lin.w)  # lin.w varies like x (varying_like)
    db = jnp.zeros(dw.shape[axis], dw.dtype if lin.bias is None else lin.bias.dtype)
    dx = vary_over(jnp.zeros_like(x, dtype=m.dtype), lin.w, lin.bias)
    (dx, dw, db), _ = lax.scan(body, (dx, dw, vary_over(db, lin.w)), _chunks(lin, st))
    if st.blocks > 1 or _typed_over(lin.w, st.axis_name):  # x is replicated over the slices
        dx = lax.psum(dx, _slices(st))  # (check_vma=False: shard_map's transpose sums them)
    return dx, dw, None if lin.bias is None else db


def _linear_cross_entropy_bwd(st: _Static, residuals, cotangents):
    lin, m, s, lse = residuals
    x = masked(lin.rows, lin.x)
    g, h = (ct.astype(m.dtype) for ct in cotangents)
    if st.axis_name is not None and not _typed_over(lin.w, st.axis_name):
        # check_vma=False: shard_map's transpose hands each device 1/n of a replicated
        # output's cotangent (and sums the replicated x's): the whole one is their sum.
        g, h = lax.psum((g, h), st.axis_name)
    g = row_cotangent(g, label_index(lin.labels, _vocab_total(lin, st))[1], lin.rows)
    h = masked(lin.rows, h)
    coef = row_coefficients(g, h, lse, s, _vocab_total(lin, st), st.opts)
    dx, dw, dbias = _over_slices(lambda lin: _backward_scan(lin, x, coef, m, st), lin, st, True)
    return (_Linear(dx.astype(lin.x.dtype), dw, dbias, None, None),)


_linear_cross_entropy.defvjp(_linear_cross_entropy_fwd, _linear_cross_entropy_bwd)


def _promoted_dtype(x: Array, w: Array, bias: Array | None) -> Any:
    """The inputs' dtype as ``jnp`` promotes it (strict promotion refuses a mix, clearly)."""
    arrays = {"x": x, "w": w, "bias": bias}
    for name, a in arrays.items():
        if a is not None:
            check_dtype(name, a)
    dtypes = {name: a.dtype for name, a in arrays.items() if a is not None}
    try:
        return jnp.result_type(*dtypes.values())
    except jax.dtypes.TypePromotionError as err:  # jax_numpy_dtype_promotion="strict"
        raise TypeError(f"dtypes {dtypes} do not promote under strict promotion") from err


def _check_shapes(x: Array, w: Array, bias: Array | None, labels: Array, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"w_layout must be one of {LAYOUTS}, got {layout!r}")
    d_axis = 0 if layout == "dv" else 1
    if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[d_axis]:
        want = "(D, V)" if layout == "dv" else "(V, D)"
        raise ValueError(
            f"x shape {x.shape} and w shape {w.shape} do not fit: w must be {want} "
            f'for w_layout="{layout}", D = x.shape[-1]'
        )
    if w.shape[1 - d_axis] == 0:
        raise ValueError(f"w shape {w.shape} has no classes (V = 0): the loss is undefined")
    if bias is not None and bias.shape != (w.shape[1 - d_axis],):
        raise ValueError(f"bias shape {bias.shape} must be (V,) = {(w.shape[1 - d_axis],)}")
    check_dtype("labels", labels, jnp.integer)
    if labels.shape != x.shape[:-1]:
        raise ValueError(f"labels shape {labels.shape} must be x shape without D {x.shape[:-1]}")


def _check_axis_name(name: Any) -> None:
    if name is None:
        return
    try:
        lax.axis_size(name)
    except NameError as err:
        raise ValueError(
            f"vocab_axis_name={name!r} is not a mapped axis here: call linear_cross_entropy "
            f"inside shard_map (or vmap/pmap) over a mesh axis named {name!r}"
        ) from err


def _chunk_size(chunk_size: Any, n: int, v: int) -> int:
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return min(v, chunk_size or max(128, (2**22 // max(n, 1)) // 128 * 128))


def _blocks(v: int) -> int:
    """Blocks of the vocabulary to vmap over: the most devices that divide V (a w sharded
    over the vocabulary on up to that many devices then stays where it lies); 1 device, or
    inside shard_map (where w is already this device's): 1."""
    if jax.sharding.get_abstract_mesh().manual_axes:
        return 1
    devices = jax.device_count()
    return max(b for b in range(1, devices + 1) if devices % b == 0 and v % b == 0)


@overload
def linear_cross_entropy(
    x: Array,
    w: Array,
    labels: Array,
    *,
    bias: Array | None = None,
    where: Array | None = None,
    ignore_index: int | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    return_lse: Literal[False] = False,
    w_layout: str = "dv",
    vocab_axis_name: Any = None,
    chunk_size: int | None = None,
) -> Array: ...


@overload
def linear_cross_entropy(
    x: Array,
    w: Array,
    labels: Array,
    *,
    bias: Array | None = None,
    where: Array | None = None,
    ignore_index: int | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    return_lse: Literal[True],
    w_layout: str = "dv",
    vocab_axis_name: Any = None,
    chunk_size: int | None = None,
) -> LossAndLse: ...


def linear_cross_entropy(
    x: Array,
    w: Array,
    labels: Array,
    *,
    bias: Array | None = None,
    where: Array | None = None,
    ignore_index: int | None = None,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    return_lse: bool = False,
    w_layout: str = "dv",
    vocab_axis_name: Any = None,
    chunk_size: int | None = None,
) -> Array | LossAndLse:
    r"""``cross_entropy(x @ w + bias, labels, ...)`` without ever building the ``(N, V)``
    logits: the last layer and loss of a language model, fused.

    With ``z = x W + b`` (soft-capped, ``c tanh(z / c)``, if ``softcap=c``) and the loss of
    ``cross_entropy`` per row,

    $$
    dz_{ij} = g_i\Big((1 + 2k\,\mathrm{lse}_i)\,\mathrm{softmax}(z_i)_j
    - (1 - e)[j = y_i] - e/V\Big),\qquad
    dx = dz\,W^\top,\quad dW = x^\top dz,\quad db = \textstyle\sum_i dz_{i\cdot}
    $$

    (Exercise 2, then Exercise 1's matmul rules). Both passes scan over chunks of classes
    (online log-sum-exp forward, logits recomputed backward): only ``(N, chunk)`` blocks
    are alive, and the cap, smoothing, z-loss and masks happen inside them. Values and
    finiteness are those of ``cross_entropy_reference`` on ``x @ w + bias`` (a chunk of
    ``-inf`` logits included); ``jax.grad`` of ``jax.grad``, ``jit``, ``vmap`` and
    ``shard_map`` work; forward mode does not.

    Args:
      x: ``(..., D)`` features, floating.
      w: ``(D, V)`` (``w_layout="dv"``) or ``(V, D)`` (``"vd"``: tied embeddings, torch's
        and Equinox's ``Linear``), used as it is: no transposed copy.
      labels: ``x.shape[:-1]`` integer class ids, any integer dtype.
      bias: optional ``(V,)``.
      where: optional boolean row mask, the shape of ``labels``: False rows get loss 0 and
        gradient exactly 0 (to ``x``, ``w`` and ``bias``), whatever they hold.
      ignore_index: rows whose label equals it count as masked (e.g. ``-100``).
      softcap: ``c > 0``: logits ``c * tanh(z / c)``.
      label_smoothing: ``e`` in ``[0, 1)``: ``lse - (1 - e) z_y - e mean(z)``.
      z_loss: ``k >= 0``: adds ``k * lse**2`` per row.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over the rows that count).
      return_lse: also return the per-row log-sum-exp (0 on masked rows), differentiable.
      w_layout: ``"dv"`` or ``"vd"``, the layout of ``w``.
      vocab_axis_name: inside ``shard_map``, the mesh axis over which ``w`` (and
        ``bias``) hold consecutive equal slices of the vocabulary (Megatron's
        vocabulary-parallel cross-entropy): the max, the sum of exps and the label's logit
        are combined with collectives, so the result is the single-device op's and ``dw``
        stays local. ``x`` and ``labels`` (global class ids) must be replicated over it;
        rows may be split over another axis (then ``"mean"`` is over the local rows).
      chunk_size: classes per chunk; ``None`` picks ``2**22 / N`` rounded down to a
        multiple of 128 (16 MiB float32 blocks; all of V for small N).

    Returns:
      The losses, ``labels.shape`` (a scalar if reduced), or ``LossAndLse``
      ``(loss, lse)`` with ``return_lse``. Inputs of different float dtypes promote as
      ``jnp`` does; 16-bit inputs are computed in float32 and the losses and lse come back
      in float32; each gradient comes back in its own input's dtype. A label outside
      ``[0, V)`` on a row that counts gives NaN for that row.

    Raises:
      TypeError: non-floating ``x``/``w``/``bias``, non-integer labels, dtypes strict
        promotion refuses, an option of the wrong type.
      ValueError: shapes that do not fit, ``V = 0``, an option out of its range,
        ``w_layout`` unknown, ``vocab_axis_name`` not a mapped axis (each names itself).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxninja.ops import cross_entropy, linear_cross_entropy
        >>> x, w = jnp.ones((2, 3)), jnp.arange(12.0).reshape(3, 4) / 10
        >>> labels = jnp.array([3, 0])
        >>> fused = linear_cross_entropy(x, w, labels, chunk_size=3)
        >>> bool(jnp.allclose(fused, cross_entropy(x @ w, labels)))
        True
        >>> tied = linear_cross_entropy(x, w.T, labels, w_layout="vd", softcap=30.0)
        >>> bool(jnp.allclose(tied, cross_entropy(x @ w, labels, softcap=30.0)))
        True
    """
    opts = check_loss_options(softcap, label_smoothing, z_loss, reduction, ignore_index)
    x, w, labels = jnp.asarray(x), jnp.asarray(w), jnp.asarray(labels)
    bias = None if bias is None else jnp.asarray(bias)
    dtype = _promoted_dtype(x, w, bias)
    _check_shapes(x, w, bias, labels, w_layout)
    _check_axis_name(vocab_axis_name)
    if where is not None and jnp.shape(where) != labels.shape:
        raise ValueError(f"where shape {jnp.shape(where)} must equal labels shape {labels.shape}")
    rows = None if where is None else jnp.asarray(where, bool)
    rows = kept_rows(rows, labels, ignore_index)
    n = math.prod(labels.shape)
    v = _vocab_size(w, w_layout)
    blocks = 1 if vocab_axis_name is not None else _blocks(v)
    chunk = min(v // blocks, -(-_chunk_size(chunk_size, n, v) // blocks))
    st = _Static(chunk, w_layout, opts, vocab_axis_name, dtype, blocks)
    w, bias = varying_like(x, w), varying_like(x, bias)
    flat_rows = None if rows is None else rows.reshape(n)
    lin = _Linear(x.reshape(n, x.shape[-1]), w, bias, labels.reshape(n), flat_rows)
    losses, lse = _linear_cross_entropy(lin, st)
    return finish(
        losses.reshape(labels.shape), lse.reshape(labels.shape), rows, reduction, return_lse
    )
