"""Property-based tests of the custom-VJP ops at random shapes, scales and dtypes (a
cross-cutting suite over jaxninja.ops; the ops' example-based tests are test_ops.py).

* forward: finite wherever the math is finite (logits up to +-1e4, batch variances from
  1e-8 to 1e8), in float32, float64 and (cross-entropy) bfloat16, and close to a float64
  NumPy / ``jnp`` reference;
* backward: the hand-written VJPs equal autodiff of the plain-``jnp`` references in
  float64, to a tolerance relative to the scale of the terms involved.

Shapes are drawn from small sets so that the jitted checks compile a bounded number of
times; ``max_examples`` is modest and there is no deadline (compiling is slow).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxninja import ops

SETTINGS = settings(max_examples=30, deadline=None)
DTYPES = {"float32": jnp.float32, "float64": jnp.float64, "bfloat16": jnp.bfloat16}

seeds = st.integers(0, 2**32 - 1)


def _eps(dtype) -> float:
    return float(jnp.finfo(dtype).eps)


# ------------------------------------------------------------------ cross-entropy


def _ce_numpy(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float64 cross-entropy by hand: max-subtracted log-sum-exp minus the label logit."""
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(-1))
    return lse - z[np.arange(len(y)), y]


@functools.partial(jax.jit, static_argnames="masked")
def _ce_both(z, y, g, where, masked):
    """Loss and VJP of the custom op and of the reference, for the same inputs."""
    w = where if masked else None
    loss, vjp = jax.vjp(lambda z: ops.cross_entropy(z, y, where=w), z)
    ref, ref_vjp = jax.vjp(lambda z: ops.cross_entropy_reference(z, y, where=w), z)
    return loss, vjp(g)[0], ref, ref_vjp(g)[0]


ce_cases = st.tuples(
    st.sampled_from([1, 6]),  # rows
    st.sampled_from([2, 27]),  # classes
    st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e4]),  # logit scale
    seeds,
    st.booleans(),  # with a ``where`` mask
)


def _ce_inputs(n, c, scale, seed, dtype):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)) * scale
    z[0, rng.integers(c)] = scale  # at least one logit at full scale
    if n > 1:
        z[1] = np.where(rng.random(c) < 0.5, scale, -scale)  # a row of +-scale ties
    y = rng.integers(0, c, n)
    g = rng.standard_normal(n)
    where = rng.random(n) < 0.7
    return jnp.asarray(z, dtype), jnp.asarray(y, jnp.int32), jnp.asarray(g, dtype), where


@SETTINGS
@given(ce_cases, st.sampled_from(sorted(DTYPES)))
def test_cross_entropy_forward_finite_and_accurate(case, dtype_name):
    n, c, scale, seed, masked = case
    dtype = DTYPES[dtype_name]
    with jax.enable_x64(dtype is jnp.float64):
        z, y, g, where = _ce_inputs(n, c, scale, seed, dtype)
        loss, dz, ref, _ = _ce_both(z, y, g, jnp.asarray(where), masked)
        assert loss.dtype == dtype and loss.shape == (n,)
        assert dz.dtype == dtype and dz.shape == (n, c)
        loss, dz, ref = (np.asarray(a.astype(jnp.float32 if dtype is jnp.bfloat16 else dtype))
                         for a in (loss, dz, ref))  # fmt: skip
        zq = np.asarray(z.astype(jnp.float64 if dtype is jnp.float64 else jnp.float32))
    assert np.isfinite(loss).all() and np.isfinite(dz).all()
    expected = (
        np.where(where, _ce_numpy(zq, np.asarray(y)), 0.0)
        if masked
        else _ce_numpy(zq, np.asarray(y))
    )
    # Rounding: the log-sum-exp is computed in (at least) float32 from logits of size
    # ~scale, then the result is rounded to the output dtype.
    compute_eps = _eps(jnp.promote_types(dtype, jnp.float32))
    tol = 8 * compute_eps * (np.abs(zq).max() + 1) + 2 * _eps(dtype) * np.abs(expected)
    assert (np.abs(loss - expected) <= tol).all(), (loss, expected)
    assert (np.abs(loss - ref) <= tol).all()
    assert (loss >= -tol).all()  # a cross-entropy is never negative


@SETTINGS
@given(ce_cases)
def test_cross_entropy_vjp_matches_autodiff_float64(case):
    n, c, scale, seed, masked = case
    with jax.enable_x64(True):
        z, y, g, where = _ce_inputs(n, c, scale, seed, jnp.float64)
        loss, dz, ref, ref_dz = (np.asarray(a) for a in _ce_both(z, y, g, where, masked))
    np.testing.assert_allclose(loss, ref, rtol=1e-13, atol=1e-13 * (scale + 1))
    # dz = g * (softmax - onehot): |dz| <= |g|; softmax entries are accurate to
    # ~eps * scale (the rounding of z - lse).
    atol = 64 * _eps(jnp.float64) * (scale + 1) * np.abs(np.asarray(g)).max()
    np.testing.assert_allclose(dz, ref_dz, rtol=1e-12, atol=atol)
    if masked:
        assert (dz[~np.asarray(where)] == 0).all()


# --------------------------------------------------------------------- batch norm

bn_cases = st.tuples(
    st.sampled_from([2, 3, 16]),  # rows (unbiased variance needs >= 2)
    st.sampled_from([1, 5]),  # features
    st.sampled_from([1e-8, 1e-4, 1.0, 1e4, 1e8]),  # batch variance
    st.sampled_from([0.0, 1.0, -50.0]),  # mean offset, in units of sqrt(1 + var)
    seeds,
)


def _bn_inputs(n, f, var, offset, seed, dtype):
    rng = np.random.default_rng(seed)
    std = np.sqrt(var)
    x = offset * np.sqrt(1 + var) + std * rng.standard_normal((n, f))
    gain = 1.0 + 0.5 * rng.standard_normal((1, f))
    bias = rng.standard_normal((1, f))
    dy = rng.standard_normal((n, f))
    return tuple(jnp.asarray(a, dtype) for a in (x, gain, bias, dy))


@jax.jit
def _bn_both(x, gain, bias, dy):
    y, vjp = jax.vjp(ops.batch_norm, x, gain, bias)
    ref, ref_vjp = jax.vjp(ops.batch_norm_reference, x, gain, bias)
    return y, vjp(dy), ref, ref_vjp(dy)


def _bn_numpy(x, gain, bias, eps=1e-5):
    x = x.astype(np.float64)
    mean = x.mean(0, keepdims=True)
    var = ((x - mean) ** 2).sum(0, keepdims=True) / (len(x) - 1)
    return gain * (x - mean) / np.sqrt(var + eps) + bias, var


@SETTINGS
@given(bn_cases, st.sampled_from(["float32", "float64"]))
def test_batch_norm_forward_finite_and_accurate(case, dtype_name):
    n, f, var, offset, seed = case
    dtype = DTYPES[dtype_name]
    with jax.enable_x64(dtype is jnp.float64):
        x, gain, bias, dy = _bn_inputs(n, f, var, offset, seed, dtype)
        y, (dx, dgain, dbias), ref, _ = _bn_both(x, gain, bias, dy)
        assert y.dtype == dx.dtype == dtype and y.shape == dx.shape == (n, f)
        y, dx, dgain, dbias, ref = (np.asarray(a) for a in (y, dx, dgain, dbias, ref))
        xs, gs, bs = (np.asarray(a, np.float64) for a in (x, gain, bias))
    assert all(np.isfinite(a).all() for a in (y, dx, dgain, dbias))
    expected, batch_var = _bn_numpy(xs, gs, bs)
    # Centring x costs ~eps * |x|; normalising multiplies that by 1/sqrt(var + 1e-5).
    eps = _eps(dtype)
    err = eps * (np.abs(xs).max(0) + 1) / np.sqrt(batch_var + 1e-5) * np.abs(gs)
    tol = 16 * n * err + 4 * eps * (np.abs(expected) + 1)
    assert (np.abs(y - expected) <= tol).all(), np.abs(y - expected).max()
    assert (np.abs(y - ref) <= tol).all()


@SETTINGS
@given(bn_cases)
def test_batch_norm_vjp_matches_autodiff_float64(case):
    n, f, var, offset, seed = case
    with jax.enable_x64(True):
        x, gain, bias, dy = _bn_inputs(n, f, var, offset, seed, jnp.float64)
        y, grads, ref, ref_grads = _bn_both(x, gain, bias, dy)
        y, ref = np.asarray(y), np.asarray(ref)
        grads = [np.asarray(a) for a in grads]
        ref_grads = [np.asarray(a) for a in ref_grads]
        _, bvar = ops.batch_stats(x)
        var_inv = 1 / np.sqrt(np.asarray(bvar) + 1e-5)
    np.testing.assert_array_equal(y, ref)  # the same forward code
    dy, gain, xs = np.asarray(dy), np.asarray(gain), np.asarray(x)
    eps = _eps(jnp.float64)
    # dx = gain*var_inv/n * (n*dy - sum(dy) - n/(n-1) * xhat * sum(dy*xhat)): its terms
    # are ~ n * |gain*dy| * var_inv, so the difference of two roundings is relative to that
    # (dx itself can cancel to ~0, e.g. for n = 2), times the conditioning of centring x
    # (rounding of x - mean is ~eps * |x|, amplified by var_inv in xhat).
    cond = 1 + np.abs(xs).max(0) * var_inv[0]
    term = n * np.abs(gain * dy).max(0) * var_inv[0]
    dx, ref_dx = grads[0], ref_grads[0]
    assert (np.abs(dx - ref_dx) <= 1e3 * eps * cond * (term + 1e-300)).all(), (dx, ref_dx)
    for got, want in zip(grads[1:], ref_grads[1:], strict=True):  # dgain, dbias
        scale = n * np.abs(dy).max(0) * (1 + np.sqrt(n))  # |xhat| <= sqrt(n - 1)
        assert (np.abs(got - want) <= 1e3 * eps * cond * scale).all(), (got, want)


@jax.jit
def _bn_stats_both(x, gain, bias, cot):
    def ref(x, gain, bias):
        return (ops.batch_norm_reference(x, gain, bias), *ops.batch_stats(x))

    out, vjp = jax.vjp(ops.batch_norm_with_stats, x, gain, bias)
    ref_out, ref_vjp = jax.vjp(ref, x, gain, bias)
    return out, vjp(cot), ref_out, ref_vjp(cot)


@settings(max_examples=25, deadline=None)
@given(bn_cases)
def test_batch_norm_with_stats_vjp_matches_autodiff_float64(case):
    """Cotangents flowing into the returned mean and variance are handled too."""
    n, f, var, offset, seed = case
    rng = np.random.default_rng(seed + 1)
    with jax.enable_x64(True):
        x, gain, bias, dy = _bn_inputs(n, f, var, offset, seed, jnp.float64)
        # Cotangents of mean/var scaled so each contributes ~ the dy term to dx.
        std = np.sqrt(var + 1e-5)
        dmean = jnp.asarray(rng.standard_normal((1, f)) / std)
        dvar = jnp.asarray(rng.standard_normal((1, f)) / std**2)
        out, grads, ref_out, ref_grads = _bn_stats_both(x, gain, bias, (dy, dmean, dvar))
        grads = [np.asarray(a) for a in grads]
        ref_grads = [np.asarray(a) for a in ref_grads]
        for a, b in zip(out, ref_out, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    eps = _eps(jnp.float64)
    for got, want in zip(grads, ref_grads, strict=True):
        scale = np.abs(want).max() + np.abs(got).max()
        # Relative to the largest entry; the centred x carries |offset| * sqrt(1+var)
        # of cancellation error in the dvar term.
        tol = 1e4 * eps * (scale + 1e-300) * (1 + abs(offset))
        assert np.abs(got - want).max() <= tol, (got, want)


# ----------------------------------------- label dtypes and masked non-finite rows

LABEL_DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32"]


@functools.partial(jax.jit, static_argnames="chunk")
def _ce_all(z, x, w, y, where, chunk):
    """Loss and gradient of the three ops (plain, reference, fused) on the same rows."""

    def run(f, *args):
        return jax.value_and_grad(lambda *a: f(*a).sum(), argnums=tuple(range(len(args))))(*args)

    return (
        run(lambda z: ops.cross_entropy(z, y, where=where), z),
        run(lambda z: ops.cross_entropy_reference(z, y, where=where), z),
        run(lambda x, w: ops.linear_cross_entropy(x, w, y, where=where, chunk_size=chunk), x, w),
    )


def _lce_inputs(seed, n, c, d=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, c)).astype(np.float32)
    return x, w, x @ w


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(LABEL_DTYPES), st.sampled_from([5, 300]), seeds)
def test_any_integer_label_dtype_gives_the_int32_answer(dtype_name, c, seed):
    """Labels drawn over the whole range of a narrow dtype against 5 or 300 classes:
    each op gives exactly what int32 labels with the same values give (NaN where out
    of range), never a wrapped class index."""
    dtype = np.dtype(dtype_name)
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    labels = rng.integers(info.min, int(info.max) + 1, 6, dtype=np.int64)
    labels[:2] = rng.integers(0, min(c, int(info.max) + 1), 2)  # some valid ones
    x, w, z = _lce_inputs(seed, 6, c)
    narrow = labels.astype(dtype)
    wide = np.where(labels < c, labels, -1).astype(np.int32)  # same meaning, int32
    got = _ce_all(z, x, w, jnp.asarray(narrow), None, 128)
    want = _ce_all(z, x, w, jnp.asarray(wide), None, 128)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    per_row = np.asarray(ops.cross_entropy(jnp.asarray(z), jnp.asarray(narrow)))
    assert (np.isnan(per_row) == ((labels < 0) | (labels >= c))).all()


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from([5, 300]),
    st.lists(st.sampled_from([np.inf, -np.inf, np.nan, 1e30, 0.5]), min_size=6, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    seeds,
)
def test_masked_rows_give_exactly_zero_whatever_they_hold(c, fills, keep, seed):
    """Masked rows may hold inf, -inf, NaN, huge values and out-of-range labels: their
    loss and gradient are exactly 0 and the kept rows are unaffected (same values as
    computing on the kept rows alone)."""
    keep = np.array(keep)
    rng = np.random.default_rng(seed)
    x, w, z = _lce_inputs(seed, 6, c)
    labels = rng.integers(0, c, 6)
    for i in np.flatnonzero(~keep):
        z[i, rng.integers(c)] = fills[i]
        z[i, rng.random(c) < 0.3] = fills[i]
        x[i, rng.integers(3)] = fills[i]
        labels[i] = rng.choice([-1, c, labels[i]])
    y, where = jnp.asarray(labels, jnp.int32), jnp.asarray(keep)
    results = _ce_all(jnp.asarray(z), jnp.asarray(x), jnp.asarray(w), y, where, 128)
    clean = _ce_all(  # the same kept rows, with the masked rows replaced by zeros
        jnp.asarray(np.where(keep[:, None], z, 0)),
        jnp.asarray(np.where(keep[:, None], x, 0)),
        jnp.asarray(w),
        jnp.where(where, y, 0),
        where,
        128,
    )
    for (loss, grads), (loss_c, grads_c) in zip(results, clean, strict=True):
        assert np.isfinite(float(loss))
        np.testing.assert_array_equal(float(loss), float(loss_c))
        drow = np.asarray(grads[0])  # d logits or d x, one row per example
        assert (drow[~keep] == 0).all() and np.isfinite(drow).all()
        for g, g_c in zip(grads, grads_c, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(g_c))
