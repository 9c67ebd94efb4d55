"""Tests for jaxninja.ops: the custom-VJP ops against autodiff of their plain-jnp references,
and their bad inputs.

We check our VJPs the way we tell users to check theirs: with
:func:`jaxninja.testing.assert_vjp_matches` (hand-written VJP vs autodiff of the plain-jnp
reference, random or given cotangent) and :func:`jaxninja.testing.check_finite_differences`
(reverse mode, up to second order). Gradient comparisons run in float64 (the ``x64``
fixture) and demand max abs diff <= 1e-12; low-precision tests run in float32 and compare
against float32 computations.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxninja import ops
from jaxninja.testing import assert_vjp_matches, check_finite_differences, check_vjp

TOL = 1e-12


def close(a, b, tol: float = TOL) -> None:
    """Every leaf of two pytrees equal to within ``tol`` (absolute)."""
    chex.assert_trees_all_close(a, b, atol=tol, rtol=0)


def ce_inputs(shape, axis, seed=0, dtype=np.float64, with_where=False):
    """Random logits, labels (the shape without ``axis``), cotangent and optional mask."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape) * 2.0
    label_shape = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    labels = rng.integers(0, shape[axis], size=label_shape).astype(np.int32)
    ct = rng.standard_normal(label_shape)
    where = rng.random(label_shape) < 0.6 if with_where else None
    return (
        jnp.asarray(logits.astype(dtype)),
        jnp.asarray(labels),
        jnp.asarray(ct.astype(dtype)),
        None if where is None else jnp.asarray(where),
    )


def bn_inputs(x_shape, gain_shape, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape) * 3.0 + 1.5
    gain = rng.standard_normal(gain_shape) * 0.1 + 1.0
    bias = rng.standard_normal(gain_shape) * 0.1
    dy = rng.standard_normal(x_shape)
    return tuple(jnp.asarray(a.astype(dtype)) for a in (x, gain, bias, dy))


# ------------------------------------------------------------------ cross-entropy VJP

CE_CASES = [
    # (logits shape, class axis, with where)
    ((5,), -1, False),
    ((4, 7), -1, False),
    ((3, 4, 7), -1, False),  # leading batch dims
    ((6, 4), 0, False),  # classes on axis 0
    ((3, 5, 4), 1, False),  # classes in the middle
    ((8, 6), -1, True),
    ((3, 4, 6), 1, True),
]


@pytest.mark.parametrize("shape,axis,with_where", CE_CASES)
def test_cross_entropy_vjp_matches_reference(x64, shape, axis, with_where):
    z, y, ct, where = ce_inputs(shape, axis, seed=len(shape), with_where=with_where)

    def custom(z):
        return ops.cross_entropy(z, y, axis=axis, where=where)

    def ref(z):
        return ops.cross_entropy_reference(z, y, axis=axis, where=where)

    assert assert_vjp_matches(custom, ref, z, cotangent=ct) <= TOL
    out, vjp = jax.vjp(custom, z)
    (dz,) = vjp(ct)
    assert out.dtype == jnp.float64 and out.shape == y.shape
    assert dz.shape == z.shape and dz.dtype == jnp.float64
    assert np.abs(np.asarray(dz)).max() > 0.01  # not trivially zero


def test_cross_entropy_values_against_numpy(x64):
    z, y, _, _ = ce_inputs((6, 5), -1, seed=3)
    zn = np.asarray(z)
    lse = np.log(np.exp(zn - zn.max(1, keepdims=True)).sum(1)) + zn.max(1)
    want = lse - zn[np.arange(6), np.asarray(y)]
    close(jax.jit(ops.cross_entropy)(z, y), want)
    # the lecture's mean loss and its fused gradient (softmax - onehot) / n
    dz = jax.jit(jax.grad(lambda z: ops.cross_entropy(z, y).mean()))(z)
    p = np.exp(zn - lse[:, None])
    p[np.arange(6), np.asarray(y)] -= 1
    close(dz, p / 6)


def test_cross_entropy_large_logits_are_stable(x64):
    z = jnp.array([[1000.0, 0.0, -1000.0], [-1000.0, 1000.0, 0.0]])
    y = jnp.array([0, 2])
    loss, dz = jax.jit(jax.value_and_grad(lambda z: ops.cross_entropy(z, y).sum()))(z)
    np.testing.assert_allclose(float(loss), 1000.0, atol=TOL)
    np.testing.assert_allclose(np.asarray(dz), [[0, 0, 0], [0, 1, -1]], atol=TOL)


# --------------------------------------------------------------------- batch-norm VJP

BN_CASES = [
    # (x shape, axis, gain shape, unbiased)
    ((2, 3), 0, (1, 3), True),  # n = 2, the smallest batch Bessel's correction allows
    ((2, 3), 0, (3,), False),
    ((32, 64), 0, (1, 64), True),  # the lecture's shape
    ((7, 5), 0, (5,), False),
    ((4, 3, 5), (0, 1), (1, 1, 5), True),  # tuple axis
    ((4, 3, 5), (0, 1), (5,), False),
    ((5, 6), 1, (5, 1), True),  # axis != 0
    ((3, 4, 5), (0, 2), (1, 4, 1), True),
    ((6, 4), -2, (4,), True),  # negative axis
]


@pytest.mark.parametrize("x_shape,axis,gain_shape,unbiased", BN_CASES)
def test_batch_norm_vjp_matches_reference(x64, x_shape, axis, gain_shape, unbiased):
    x, gain, bias, dy = bn_inputs(x_shape, gain_shape, seed=len(x_shape))
    kw = dict(axis=axis, unbiased=unbiased)

    def custom(x, g, b):
        return ops.batch_norm(x, g, b, **kw)

    def ref(x, g, b):
        return ops.batch_norm_reference(x, g, b, **kw)

    assert assert_vjp_matches(custom, ref, x, gain, bias, argnums=(0, 1, 2), cotangent=dy) <= TOL
    y, vjp = jax.vjp(custom, x, gain, bias)
    grads = vjp(dy)
    assert y.shape == x.shape and y.dtype == jnp.float64
    for g, v in zip(grads, (x, gain, bias), strict=True):
        assert g.shape == v.shape and g.dtype == v.dtype
    if x.size // gain.size > 2:  # with 2 rows, xhat = +-1/sqrt(2) whatever x is: dx ~ 0
        assert np.abs(np.asarray(grads[0])).max() > 0.01


@pytest.mark.parametrize("unbiased", [True, False])
def test_batch_norm_forward_against_numpy(x64, unbiased):
    x, gain, bias, _ = bn_inputs((9, 4), (1, 4), seed=1)
    xn = np.asarray(x)
    var = xn.var(0, ddof=1 if unbiased else 0, keepdims=True)
    want = np.asarray(gain) * (xn - xn.mean(0, keepdims=True)) / np.sqrt(var + 1e-5)
    want = want + np.asarray(bias)
    close(ops.batch_norm(x, gain, bias, unbiased=unbiased), want)


def test_batch_norm_backward_is_the_lecture_formula(x64):
    """dx = gain*var_inv/n * (n*dy - sum(dy) - n/(n-1) * xhat * sum(dy*xhat))."""
    x, gain, bias, dy = bn_inputs((32, 8), (1, 8), seed=2)
    dx = jax.jit(lambda x, dy: jax.vjp(lambda x: ops.batch_norm(x, gain, bias), x)[1](dy)[0])(x, dy)
    xn, dyn, g = np.asarray(x), np.asarray(dy), np.asarray(gain)
    n = 32
    var_inv = (xn.var(0, ddof=1, keepdims=True) + 1e-5) ** -0.5
    xhat = (xn - xn.mean(0, keepdims=True)) * var_inv
    want = (g * var_inv / n) * (n * dyn - dyn.sum(0) - n / (n - 1) * xhat * (dyn * xhat).sum(0))
    close(dx, want)


# ------------------------------------------------------------ finite differences, jit


def test_cross_entropy_check_grads(x64):
    axis = 1
    z, y, _, _ = ce_inputs((2, 3, 4), axis, seed=5)
    f = jax.jit(lambda z: ops.cross_entropy(z, y, axis=axis))  # jit: 3x cheaper here
    check_finite_differences(f, z, order=2)


@pytest.mark.parametrize(
    "x_shape,axis,gain_shape,unbiased",
    [((5, 3), 0, (1, 3), True), ((4, 2, 3), (0, 1), (3,), False)],
)
def test_batch_norm_check_grads(x64, x_shape, axis, gain_shape, unbiased):
    x, gain, bias, _ = bn_inputs(x_shape, gain_shape, seed=6)

    @jax.jit
    def f(x, g, b):
        return ops.batch_norm(x, g, b, axis=axis, unbiased=unbiased)

    check_finite_differences(f, x, gain, bias, order=2)


# ------------------------------------------------------------------ vmap, grad of grad


def test_cross_entropy_grad_of_grad(x64):
    z, y, ct, _ = ce_inputs((4, 5), -1, seed=11)

    def f(op):
        return lambda z: (op(z, y) * ct).sum()

    # reverse over reverse: the VJP of our gradient vs autodiff's VJP of autodiff's gradient
    assert_vjp_matches(jax.grad(f(ops.cross_entropy)), jax.grad(f(ops.cross_entropy_reference)), z)
    hess = jax.jit(jax.jacrev(jax.grad(f(ops.cross_entropy))))(z)
    hess_ref = jax.jit(jax.jacrev(jax.grad(f(ops.cross_entropy_reference))))(z)
    assert hess.shape == (4, 5, 4, 5)
    close(hess, hess_ref)
    assert np.abs(np.asarray(hess)).max() > 0.01


def test_batch_norm_grad_of_grad(x64):
    x, gain, bias, dy = bn_inputs((5, 3), (3,), seed=12)

    def f(op):
        return lambda x, g, b: (jnp.tanh(op(x, g, b)) * dy).sum()

    argnums = (0, 1, 2)

    def hessian(op):
        return jax.jit(jax.jacrev(jax.grad(f(op), argnums), argnums))

    grad, grad_ref = (
        jax.grad(f(ops.batch_norm), argnums),
        jax.grad(f(ops.batch_norm_reference), argnums),
    )
    assert_vjp_matches(grad, grad_ref, x, gain, bias, argnums=argnums)
    hess = hessian(ops.batch_norm)(x, gain, bias)
    hess_ref = hessian(ops.batch_norm_reference)(x, gain, bias)
    assert hess[0][0].shape == (5, 3, 5, 3)
    close(hess, hess_ref)


# ----------------------------------------------------------------------- where masks


def test_where_mask_zeroes_loss_and_gradient_rows(x64):
    z, y, _, _ = ce_inputs((6, 5), -1, seed=13)
    where = jnp.array([True, False, True, True, False, True])

    @jax.jit
    def loss_and_grad(z, where):
        loss, vjp = jax.vjp(lambda z: ops.cross_entropy(z, y, where=where), z)
        return loss, vjp(jnp.ones_like(loss))[0]

    loss, dz = loss_and_grad(z, where)
    assert np.all(np.asarray(loss)[[1, 4]] == 0.0)
    assert np.all(np.asarray(dz)[[1, 4]] == 0.0)
    # the kept rows are exactly the unmasked computation
    full, dfull = loss_and_grad(z, jnp.ones(6, bool))
    keep = np.asarray(where)
    close(np.asarray(loss)[keep], np.asarray(full)[keep])
    close(np.asarray(dz)[keep], np.asarray(dfull)[keep])


def test_where_mask_hides_out_of_range_padding_labels(x64):
    """A masked row may carry a padding label (-1): zero loss and zero gradient, no NaN."""
    z, _, _, _ = ce_inputs((4, 5), -1, seed=14)
    y = jnp.array([0, -1, 3, 5])
    where = jnp.array([True, False, True, False])
    for op in (ops.cross_entropy, ops.cross_entropy_reference):
        loss, dz = jax.jit(jax.value_and_grad(lambda z, op=op: op(z, y, where=where).sum()))(z)
        assert np.isfinite(float(loss))
        dz = np.asarray(dz)
        assert np.all(np.isfinite(dz)) and np.all(dz[[1, 3]] == 0.0)


# ---------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype,rtol", [(jnp.bfloat16, 2**-7), (jnp.float16, 2**-10)])
def test_cross_entropy_low_precision(dtype, rtol):
    z32, y, _, _ = ce_inputs((16, 27), -1, seed=15, dtype=np.float32)
    z = z32.astype(dtype)
    zup = z.astype(jnp.float32)  # the same values, in float32

    @jax.jit
    @jax.value_and_grad
    def loss(z):
        assert ops.cross_entropy(z, y).dtype == z.dtype
        return ops.cross_entropy(z, y).mean()

    value, dz = loss(z)
    value32, dz32 = loss(zup)
    assert value.dtype == dtype and dz.dtype == dtype and dz.shape == z.shape
    np.testing.assert_allclose(float(value), float(value32), rtol=rtol)
    scale = float(jnp.abs(dz32).max())
    close(dz, dz32, rtol * scale)
    assert np.all(np.isfinite(np.asarray(dz, np.float32)))


@pytest.mark.parametrize("dtype,rtol", [(jnp.bfloat16, 2**-7), (jnp.float16, 2**-10)])
def test_batch_norm_low_precision(dtype, rtol):
    x32, gain, bias, dy32 = bn_inputs((32, 16), (1, 16), seed=16, dtype=np.float32)
    x, dy = x32.astype(dtype), dy32.astype(dtype)

    @jax.jit
    def f(x, dy):
        y, vjp = jax.vjp(lambda x: ops.batch_norm(x, gain, bias), x)
        return y, vjp(dy)[0]

    y, dx = f(x, dy)
    y32, dx32 = f(x.astype(jnp.float32), dy.astype(jnp.float32))
    assert y.dtype == dtype and dx.dtype == dtype
    close(y, y32, 2 * rtol * float(jnp.abs(y32).max()))
    close(dx, dx32, 2 * rtol * float(jnp.abs(dx32).max()))
    mean, var = ops.batch_stats(x)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32


# ------------------------------------------------------------- bad labels and inputs


def test_out_of_range_labels_give_nan_rows():
    z, _, _, _ = ce_inputs((4, 27), -1, seed=17, dtype=np.float32)
    y = jnp.array([3, 27, -1, 26])
    clamped = jnp.array([3, 26, 0, 26])  # what clamping would silently compute
    for op in (ops.cross_entropy, ops.cross_entropy_reference):
        f = jax.jit(op)
        loss, loss_clamped = np.asarray(f(z, y)), np.asarray(f(z, clamped))
        assert np.isnan(loss[1]) and np.isnan(loss[2])
        assert np.all(np.isfinite(loss[[0, 3]]))
        np.testing.assert_array_equal(loss[[0, 3]], loss_clamped[[0, 3]])
    dz = jax.jit(jax.grad(lambda z: ops.cross_entropy(z, y).sum()))(z)
    dz = np.asarray(dz)
    assert np.all(np.isnan(dz[[1, 2]])) and np.all(np.isfinite(dz[[0, 3]]))


@pytest.mark.parametrize("jit", [False, True])
def test_labels_shape_mismatch_names_both_shapes(jit):
    z, y = np.zeros((4, 5), np.float32), np.zeros((3,), np.int32)
    f = ops.cross_entropy
    if jit:
        f = jax.jit(f)
    with pytest.raises(ValueError) as err:
        f(z, y)
    assert "(3,)" in str(err.value) and "(4, 5)" in str(err.value)


def test_out_of_range_labels_give_nan_not_a_clamped_class():
    logits = jnp.zeros((4, 5))
    labels = jnp.array([0, -1, 5, 4])
    loss = np.asarray(ops.cross_entropy(logits, labels))
    assert np.isfinite(loss[[0, 3]]).all() and np.isnan(loss[[1, 2]]).all()
    assert np.isnan(float(ops.cross_entropy(logits, labels).mean()))
    g = np.asarray(jax.grad(lambda z: ops.cross_entropy(z, labels).sum())(logits))
    assert np.isfinite(g[[0, 3]]).all() and np.isnan(g[[1, 2]]).all()


@pytest.mark.parametrize("jit", [False, True])
def test_shape_mismatch_raises_at_trace_time_naming_both_shapes(jit):
    def ce(z, y):
        return ops.cross_entropy(z, y)

    def bn(x, g, b):
        return ops.batch_norm(x, g, b)

    ce, bn = (jax.jit(ce), jax.jit(bn)) if jit else (ce, bn)
    with pytest.raises(ValueError, match=r"labels shape \(3,\).*logits shape \(4, 5\)"):
        ce(jnp.zeros((4, 5)), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match=r"gain shape \(1, 7\).*x shape \(4, 5\)"):
        bn(jnp.ones((4, 5)), jnp.ones((1, 7)), jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match=r"bias shape \(3,\).*x shape \(4, 5\)"):
        bn(jnp.ones((4, 5)), jnp.ones((1, 5)), jnp.zeros((3,)))
    # ... and when only traced, never run: jax.eval_shape raises the same error.
    with pytest.raises(ValueError, match=r"labels shape \(4, 1\).*logits shape \(4, 5\)"):
        jax.eval_shape(ops.cross_entropy, jnp.zeros((4, 5)), jnp.zeros((4, 1), jnp.int32))


def test_integer_logits_and_float_labels_are_type_errors():
    with pytest.raises(TypeError, match="floating"):
        ops.cross_entropy(np.zeros((4, 5), np.int32), np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="integer"):
        ops.cross_entropy(np.zeros((4, 5), np.float32), np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="floating"):
        jax.jit(ops.cross_entropy_reference)(np.zeros((4, 5), np.int32), np.zeros(4, np.int32))
    with pytest.raises(TypeError, match="floating"):
        ops.batch_norm(np.ones((4, 5), np.int32), np.ones(5, np.float32), np.zeros(5, np.float32))


@pytest.mark.parametrize("f", [ops.batch_norm, ops.batch_norm_with_stats, ops.batch_norm_reference])
def test_batch_norm_one_row_unbiased_is_a_value_error(f):
    x, g, b = (np.full((1, 5), v, np.float32) for v in (1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="at least 2 rows"):
        f(x, g, b)
    with pytest.raises(ValueError, match="at least 2 rows"):
        jax.jit(f)(x, g, b)
    # unbiased=False is defined for one row: xhat = 0, so y = bias
    y = jax.jit(lambda x: f(x, g, b, unbiased=False))(x)
    y = y[0] if isinstance(y, tuple) else y
    np.testing.assert_array_equal(np.asarray(y), np.zeros((1, 5)))


def test_batch_norm_bad_shapes():
    x, one, zero = np.ones((4, 5), np.float32), np.float32(1), np.float32(0)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        ops.batch_norm(x, np.ones(4, np.float32), zero)
    with pytest.raises(ValueError, match="out of range"):
        ops.batch_norm(x, one, zero, axis=2)


def test_forward_mode_is_a_documented_type_error():
    """custom_vjp has no JVP: jax.jvp / jax.jacfwd raise TypeError (a documented limit)."""
    z, y = np.ones((3, 4), np.float32), np.array([0, 1, 2], np.int32)
    x = np.arange(12.0, dtype=np.float32).reshape(4, 3)
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda z: ops.cross_entropy(z, y), (z,), (z,))
    with pytest.raises(TypeError, match="forward-mode"):  # at trace time, under jit too
        jax.jit(lambda x: jax.jvp(lambda x: ops.batch_norm(x, g, b), (x,), (x,)))(x)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jit(jax.jacfwd(lambda x: ops.batch_norm_with_stats(x, g, b)[0]))(x)


def test_hessian_forward_over_reverse_works(x64):
    """jax.hessian is jacfwd(jacrev(f)): the outer JVP differentiates the (plain-jnp)
    backward rule, not the custom_vjp, so it works and matches the reference."""
    z, y, _, _ = ce_inputs((3, 4), -1, seed=21)
    x, gain, bias, dy = bn_inputs((5, 3), (3,), seed=22)

    @jax.jit
    def hessians(z, x):
        def ce(op):
            return jax.hessian(lambda z: op(z, y).sum())(z)

        def bn(op):
            return jax.hessian(lambda x: (jnp.tanh(op(x, gain, bias)) * dy).sum())(x)

        return (
            (ce(ops.cross_entropy), bn(ops.batch_norm)),
            (ce(ops.cross_entropy_reference), bn(ops.batch_norm_reference)),
        )

    got, want = hessians(z, x)
    assert got[0].shape == (3, 4, 3, 4) and got[1].shape == (5, 3, 5, 3)
    close(got, want)


# ------------------------------------------------------------ statistics and with_stats


@pytest.mark.parametrize(
    "x_shape,axis,unbiased", [((10, 4), 0, True), ((3, 4, 5), (0, 2), False), ((6, 7), 1, True)]
)
def test_batch_stats_against_numpy(x64, x_shape, axis, unbiased):
    x, _, _, _ = bn_inputs(x_shape, (1,), seed=18)
    mean, var = jax.jit(lambda x: ops.batch_stats(x, axis=axis, unbiased=unbiased))(x)
    xn = np.asarray(x)
    want_mean = xn.mean(axis=axis, keepdims=True)
    want_var = xn.var(axis=axis, ddof=1 if unbiased else 0, keepdims=True)
    assert mean.shape == want_mean.shape and var.shape == want_var.shape
    close(mean, want_mean)
    close(var, want_var)


def test_batch_stats_float16_are_float32():
    x = jnp.asarray(np.arange(12.0).reshape(6, 2), jnp.float16)
    mean, var = ops.batch_stats(x)
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(mean), [[5.0, 6.0]])
    np.testing.assert_allclose(np.asarray(var), [[14.0, 14.0]])  # ddof=1 of 0,2,...,10


@pytest.mark.parametrize(
    "x_shape,axis,gain_shape,unbiased",
    [((8, 4), 0, (1, 4), True), ((3, 4, 5), (0, 1), (5,), False)],
)
def test_batch_norm_with_stats_gradients_through_the_statistics(
    x64, x_shape, axis, gain_shape, unbiased
):
    x, gain, bias, dy = bn_inputs(x_shape, gain_shape, seed=19)
    rng = np.random.default_rng(20)
    stat_shape = tuple(1 if i in np.atleast_1d(axis) else d for i, d in enumerate(x_shape))
    dmean, dvar = (jnp.asarray(rng.standard_normal(stat_shape)) for _ in range(2))
    kw = dict(axis=axis, unbiased=unbiased)

    def custom(x, g, b):
        y, mean, var = ops.batch_norm_with_stats(x, g, b, **kw)
        return (y * dy).sum() + (mean * dmean).sum() + (var * dvar).sum()

    def ref(x, g, b):
        mean, var = ops.batch_stats(x, **kw)
        y = ops.batch_norm_reference(x, g, b, **kw)
        return (y * dy).sum() + (mean * dmean).sum() + (var * dvar).sum()

    def aux_only(x):  # the statistics used only as auxiliary data
        return (ops.batch_norm_with_stats(x, gain, bias, **kw)[0] * dy).sum()

    def plain(x):
        return (ops.batch_norm(x, gain, bias, **kw) * dy).sum()

    @jax.jit
    def everything(x, gain, bias):
        return {
            "outputs": ops.batch_norm_with_stats(x, gain, bias, **kw),
            "expected_outputs": (ops.batch_norm(x, gain, bias, **kw), *ops.batch_stats(x, **kw)),
            "got": jax.value_and_grad(custom, (0, 1, 2))(x, gain, bias),
            "want": jax.value_and_grad(ref, (0, 1, 2))(x, gain, bias),
            "aux_only": jax.grad(aux_only)(x),
            "plain": jax.grad(plain)(x),
        }

    r = everything(x, gain, bias)
    close(r["outputs"], r["expected_outputs"])
    assert r["outputs"][1].shape == stat_shape
    close(r["got"], r["want"])
    close(r["aux_only"], r["plain"])


# ------------------------------------------------ masks, evaluation mode, running averages


@pytest.mark.parametrize("gain_shape", [(5,), (9, 5)])
@pytest.mark.parametrize("unbiased", [True, False])
def test_batch_norm_where_mask_matches_reference(x64, gain_shape, unbiased):
    x, gain, bias, _ = bn_inputs((9, 5), gain_shape, seed=23)
    where = jnp.asarray(np.random.default_rng(23).random((9, 1)) < 0.6).at[:2].set(True)
    kw = dict(unbiased=unbiased, where=where)
    maxdiff = assert_vjp_matches(
        lambda x, g, b: ops.batch_norm_with_stats(x, g, b, **kw),
        lambda x, g, b: (ops.batch_norm_reference(x, g, b, **kw), *ops.batch_stats(x, **kw)),
        x, gain, bias, argnums=(0, 1, 2),
    )  # fmt: skip
    assert maxdiff <= TOL
    assert_vjp_matches(
        lambda x: ops.batch_norm(x, gain, bias, **kw),
        lambda x: ops.batch_norm_reference(x, gain, bias, **kw),
        x,
    )
    # the statistics are those of the kept rows only
    keep = np.asarray(where)[:, 0]
    mean, var = ops.batch_stats(x, **kw)
    xs = np.asarray(x)[keep]
    np.testing.assert_allclose(mean[0], xs.mean(0), rtol=0, atol=TOL)
    np.testing.assert_allclose(var[0], xs.var(0, ddof=int(unbiased)), rtol=0, atol=TOL)


def test_batch_norm_where_ignores_what_masked_rows_hold(x64):
    x, gain, bias, _ = bn_inputs((6, 3), (3,), seed=24)
    where = jnp.array([True, True, True, True, False, False])[:, None]
    y = ops.batch_norm(x, gain, bias, where=where)
    y_huge = ops.batch_norm(x.at[4:].set(1e300), gain, bias, where=where)
    np.testing.assert_array_equal(y[:4], y_huge[:4])
    np.testing.assert_allclose(y[:4], ops.batch_norm(x[:4], gain, bias), rtol=0, atol=TOL)


def test_batch_norm_eval_against_numpy(x64):
    x, gain, bias, _ = bn_inputs((5, 4), (4,), seed=25)
    rng = np.random.default_rng(25)
    mean, var = rng.standard_normal((1, 4)), rng.random((1, 4)) + 0.5
    want = np.asarray(gain) * (np.asarray(x) - mean) / np.sqrt(var + 1e-3) + np.asarray(bias)
    got = jax.jit(lambda *a: ops.batch_norm_eval(*a, eps=1e-3))(x, gain, bias, mean, var)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    # with the batch's own statistics it is the training-mode op
    bmean, bvar = ops.batch_stats(x)
    np.testing.assert_allclose(
        ops.batch_norm_eval(x, gain, bias, bmean, bvar), ops.batch_norm(x, gain, bias), atol=TOL
    )


def test_batch_norm_eval_low_precision_and_strict_configs():
    """equinox's test settings: strict dtype promotion, rank promotion raises."""
    x = jnp.asarray(np.random.default_rng(26).standard_normal((8, 3)), jnp.bfloat16)
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        mean, var = ops.batch_stats(x)
        y = ops.batch_norm_eval(x, jnp.ones(3), jnp.zeros(3), mean, var)
        y_train, dx = jax.value_and_grad(
            lambda x: ops.batch_norm(x, jnp.ones(3), jnp.zeros(3)).astype(jnp.float32).sum()
        )(x)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    ref = ops.batch_norm(x.astype(jnp.float32), jnp.ones(3), jnp.zeros(3))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=2e-2)


def test_running_average_default_is_flax_momentum():
    running = {"mean": jnp.zeros((1, 3)), "var": jnp.ones((1, 3))}
    batch = {"mean": jnp.full((1, 3), 2.0), "var": jnp.full((1, 3), 5.0)}
    out = jax.jit(ops.running_average)(running, batch)
    np.testing.assert_allclose(out["mean"], 0.01 * 2.0, rtol=1e-6)  # flax's, Equinox's 0.99
    np.testing.assert_allclose(out["var"], 0.99 + 0.01 * 5.0, rtol=1e-6)
    lecture = ops.running_average(running, batch, momentum=0.999)
    np.testing.assert_allclose(lecture["var"], 0.999 + 0.001 * 5.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\['var'\] has shape \(1, 3\)"):
        ops.running_average(running, {**batch, "var": jnp.ones(4)})


GOOD_MOMENTA = [0, 1, -0.0, 0.25, np.float32(0.5), np.float64(0.75), np.int64(1), jnp.asarray(0.5)]
BAD_MOMENTA = [
    (float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError),
    (1.5, ValueError), (-0.01, ValueError), (np.float32(1.5), ValueError),
    (np.float64(1.5), ValueError), (np.float32("nan"), ValueError),
    (jnp.asarray(1.5), ValueError), (True, TypeError), ("0.5", TypeError),
    (np.full(2, 0.5), TypeError), (0.5j, TypeError), (None, TypeError),
]  # fmt: skip


@pytest.mark.parametrize("momentum", GOOD_MOMENTA, ids=repr)
def test_running_average_concrete_momenta_in_range(momentum):
    running, batch = {"m": jnp.full(3, 2.0)}, {"m": jnp.full(3, 6.0)}
    want = float(momentum) * 2.0 + (1.0 - float(momentum)) * 6.0
    got = ops.running_average(running, batch, momentum)["m"]
    assert got.shape == (3,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("momentum,error", BAD_MOMENTA, ids=repr)
def test_running_average_bad_concrete_momenta_are_refused(momentum, error):
    """Python, NumPy and concrete JAX scalars are checked alike (np.float32(1.5) was not)."""
    with pytest.raises(error, match="momentum must be"):
        ops.running_average({"m": jnp.zeros(3)}, {"m": jnp.ones(3)}, momentum)


def test_running_average_traced_momentum_outside_the_range_is_nan():
    """A traced momentum cannot be checked at trace time: a bad one poisons every leaf."""
    running = {"mean": jnp.zeros((1, 3)), "var": jnp.ones(3)}
    batch = {"mean": jnp.ones((1, 3)), "var": jnp.full(3, 3.0)}
    f = jax.jit(ops.running_average)
    for m in (0.0, 0.25, 1.0):
        out = f(running, batch, m)
        np.testing.assert_allclose(out["var"], m + (1 - m) * 3.0, rtol=1e-6)
    for m in (1.5, -0.5, float("nan"), float("inf")):
        out = f(running, batch, m)
        assert all(np.all(np.isnan(leaf)) for leaf in jax.tree.leaves(out)), m
    with pytest.raises(TypeError, match="real scalar"):
        f(running, batch, jnp.full(3, 0.5))


@pytest.mark.parametrize("stat_shape", [(4,), (1, 4)])
@pytest.mark.parametrize("param_shape", [(4,), (1, 4)])
def test_flax_and_lecture_statistic_shapes_are_interchangeable(x64, stat_shape, param_shape):
    """flax keeps gain, bias and statistics as (H,), the lecture as (1, H): both work,
    each result keeping its own input's shape."""
    x, gain, bias, dy = bn_inputs((6, 4), (1, 4), seed=29)
    mean, var = ops.batch_stats(x)
    assert mean.shape == var.shape == (1, 4)
    g = gain.reshape(param_shape)
    b = bias.reshape(param_shape)
    # evaluation mode with the batch's own statistics is training mode, whatever the shapes
    y_eval = ops.batch_norm_eval(x, g, b, mean.reshape(stat_shape), var.reshape(stat_shape))
    close(y_eval, ops.batch_norm(x, gain, bias))
    y, vjp = jax.vjp(lambda g, b: ops.batch_norm(x, g, b), g, b)
    dgain, dbias = vjp(dy)
    close(y, y_eval)
    assert dgain.shape == dbias.shape == param_shape
    close(dgain.reshape(1, 4), jax.grad(lambda g: (ops.batch_norm(x, g, bias) * dy).sum())(gain))
    # running averages: either shape of statistic updates either shape of running average
    running = {"mean": jnp.zeros(stat_shape), "var": jnp.ones(stat_shape)}
    for batch in ({"mean": mean, "var": var}, {"mean": mean[0], "var": var[0]}):
        out = ops.running_average(running, batch, 0.5)
        assert out["mean"].shape == out["var"].shape == stat_shape
        close(out["var"].reshape(1, 4), 0.5 + 0.5 * var)
    for bad in (jnp.ones(5), jnp.ones((2, 4))):
        with pytest.raises(ValueError, match="differ only in size-1 dims"):
            ops.running_average(running, {"mean": bad, "var": var})


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_bad_eps_is_refused(eps):
    x = np.ones((4, 3), np.float32)
    for f in (ops.batch_norm, ops.batch_norm_with_stats, ops.batch_norm_reference):
        with pytest.raises(ValueError, match="eps must be finite and >= 0"):
            f(x, 1.0, 0.0, eps=eps)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        ops.batch_norm_eval(x, 1.0, 0.0, 0.0, 1.0, eps=eps)


def test_batch_stats_one_row_unbiased_is_a_value_error():
    with pytest.raises(ValueError, match="at least 2 rows"):
        ops.batch_stats(np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="where shape"):
        ops.batch_stats(np.ones((4, 3), np.float32), where=np.ones((3, 4), bool))


# ------------------------------------------- cross-entropy: drop-in details (issues 11, 13)


def test_cross_entropy_axis_and_where_positional_like_optax(x64):
    z, y, ct, where = ce_inputs((3, 6, 4), 1, seed=27, with_where=True)
    got = ops.cross_entropy(z, y, 1, where)
    np.testing.assert_array_equal(got, ops.cross_entropy(z, y, axis=1, where=where))
    np.testing.assert_allclose(got, ops.cross_entropy_reference(z, y, 1, where), rtol=0, atol=TOL)


@pytest.mark.parametrize("axis", [(1, 3), (3, 2), (-1, -2), (0, 1, 3)])
def test_cross_entropy_tuple_axis_is_a_flat_index_in_tuple_order(x64, axis):
    """A label indexes the slice over ``axis`` flattened in the tuple's order (optax)."""
    rng = np.random.default_rng(28)
    z = jnp.asarray(rng.standard_normal((2, 3, 4, 5)))
    axes = tuple(a % 4 for a in axis)
    batch = tuple(a for a in range(4) if a not in axes)
    flat = jnp.transpose(z, batch + axes).reshape(tuple(z.shape[a] for a in batch) + (-1,))
    y = jnp.asarray(rng.integers(0, flat.shape[-1], flat.shape[:-1]), jnp.int32)
    np.testing.assert_allclose(ops.cross_entropy(z, y, axis), ops.cross_entropy(flat, y), atol=TOL)
    assert_vjp_matches(
        lambda z: ops.cross_entropy(z, y, axis),
        lambda z: ops.cross_entropy_reference(z, y, axis),
        z,
    )


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int64])
def test_cross_entropy_any_label_dtype_gives_the_int32_answer(dtype):
    """300 classes: more than uint8/int8 hold. The class index must never wrap."""
    z = jnp.asarray(np.random.default_rng(29).standard_normal((6, 300)), jnp.float32)
    values = np.array([0, 1, 100, np.iinfo(dtype).max, -1, 299], np.int64)
    labels = values.astype(dtype)  # what the narrow dtype holds (e.g. 255, not 299)
    held = labels.astype(np.int64)
    with jax.enable_x64(dtype == np.int64):
        got, g = jax.jit(jax.value_and_grad(lambda z: ops.cross_entropy(z, labels).sum()))(z)
        ref = ops.cross_entropy_reference(z, labels)
    i32 = np.where((held >= 0) & (held < 300), held, -1).astype(np.int32)  # same meaning
    want, g_want = jax.jit(jax.value_and_grad(lambda z: ops.cross_entropy(z, i32).sum()))(z)
    per_row = np.asarray(ops.cross_entropy(z, i32))
    np.testing.assert_array_equal(np.asarray(ops.cross_entropy(z, labels)), per_row)
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(ops.cross_entropy_reference(z, i32)))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(g_want))
    assert np.isnan(float(got)) == np.isnan(float(want))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_masked_non_finite_rows_give_exactly_zero_loss_and_gradient(x64, bad):
    z, y, ct, _ = ce_inputs((5, 7), -1, seed=30)
    z = z.at[1].set(bad).at[3, 2].set(bad)
    y = y.at[3].set(-1)  # and a padding label
    where = jnp.array([True, False, True, False, True])
    for op in (ops.cross_entropy, ops.cross_entropy_reference):

        def loss(z, op=op):
            return (op(z, y, where=where) * ct).sum()

        value, dz = jax.jit(jax.value_and_grad(loss))(z)
        d2 = jax.jit(jax.grad(lambda z: (jax.grad(loss)(z) ** 2).sum()))(z)
        assert np.isfinite(float(value))
        for d in (np.asarray(dz), np.asarray(d2)):
            assert np.all(d[[1, 3]] == 0.0) and np.all(np.isfinite(d))
    kept = np.asarray(where)
    assert_vjp_matches(
        lambda z: ops.cross_entropy(z, y, where=where)[kept],
        lambda z: ops.cross_entropy_reference(z, y, where=where)[kept],
        z,
    )


def test_large_logit_gradient_is_normalised_like_optax():
    """exp(z - lse) carries lse's rounding (ulp 8 at 1e8); exp(z - max) / sum does not."""
    z = jnp.array([[1e8, 1e8 - 16.0, 1e8 - 64.0, 0.0], [1e4, 1e4 + 1.0, 0.0, 0.0]], jnp.float32)
    y = jnp.array([1, 0])
    dz = np.asarray(jax.jit(jax.grad(lambda z: ops.cross_entropy(z, y).sum()))(z), np.float64)
    zz = np.asarray(z, np.float64)
    p = np.exp(zz - zz.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[[0, 1], [1, 0]] -= 1.0
    np.testing.assert_allclose(dz, p, rtol=1e-6, atol=1e-30)


def _strict_case(z, x, y):
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        dz = jax.grad(lambda z: ops.cross_entropy(z, y, where=y > 0).astype(jnp.float32).sum())(z)
        ref = ops.cross_entropy_reference(z, y)
        g = jnp.ones(3, x.dtype)
        dx = jax.grad(lambda x: ops.batch_norm(x, g, g).astype(jnp.float32).sum())(x)
        y2, mean, _ = ops.batch_norm_with_stats(x, g, g, unbiased=False)
        dw = jax.grad(
            lambda w: (
                ops.linear_cross_entropy(x[:4], w, y, bias=z[0], where=y > 0, chunk_size=4)
                .astype(jnp.float32)
                .sum()
            )
        )(z[:3])
    return dz, ref, dx, y2, mean, dw


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_ops_under_strict_dtype_and_rank_promotion(dtype):
    """equinox's test configuration: 16-bit inputs and a (features,) gain still work."""
    rng = np.random.default_rng(31)
    z = jnp.asarray(rng.standard_normal((4, 9)), dtype)
    x = jnp.asarray(rng.standard_normal((6, 3)), dtype)
    dz, ref, dx, y2, mean, dw = _strict_case(z, x, jnp.asarray([0, 8, 3, 2], jnp.uint8))
    assert dz.dtype == dtype and ref.dtype == dtype and dx.dtype == dtype
    assert dw.dtype == dtype and dw.shape == (3, 9) and np.all(np.isfinite(dw))
    assert y2.dtype == dtype and mean.dtype == jnp.float32
    assert np.all(np.asarray(dz[0], np.float32) == 0.0) and np.all(np.isfinite(dz[1:]))


def test_per_logit_where_leaves_classes_out_of_the_normaliser(x64):
    z, y, ct, _ = ce_inputs((4, 6), -1, seed=32)
    mask = jnp.asarray(np.random.default_rng(32).random((4, 6)) < 0.5).at[0].set(False)
    mask = mask.at[1:, 0].set(True)
    losses = ops.cross_entropy(z, y, where=mask)
    assert float(losses[0]) == 0.0  # no class kept: the row is masked
    zz = np.where(np.asarray(mask), np.asarray(z), -np.inf)[1:]  # row 0 has no class
    lse = np.log(np.exp(zz - zz.max(1, keepdims=True)).sum(1)) + zz.max(1)
    want = lse - np.asarray(z)[np.arange(1, 4), np.asarray(y)[1:]]
    np.testing.assert_allclose(losses[1:], want, rtol=0, atol=TOL)
    assert_vjp_matches(
        lambda z: ops.cross_entropy(z, y, where=mask),
        lambda z: ops.cross_entropy_reference(z, y, where=mask),
        z,
    )


@pytest.mark.parametrize("unbiased", [True, False])
def test_synced_batch_norm_grad_through_vmap_axis_name(x64, unbiased):
    """flax/equinox's pattern: jax.grad outside jax.vmap(..., axis_name=...) of the
    synchronised op (once a NameError: unbound axis name), and grad inside the vmap."""
    x, gain, bias, dy = bn_inputs((6, 3), (3,), seed=33)

    def local(xi, dyi, g, b):
        y = ops.batch_norm(xi[None], g, b, axis_name="b", unbiased=unbiased)
        return (y[0] * dyi).sum()

    def total(x, g, b):
        return jax.vmap(local, in_axes=(0, 0, None, None), axis_name="b")(x, dy, g, b).sum()

    def ref(x, g, b):
        return (ops.batch_norm_reference(x, g, b, unbiased=unbiased) * dy).sum()

    got = jax.jit(jax.grad(total, argnums=(0, 1, 2)))(x, gain, bias)
    want = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(x, gain, bias)
    chex.assert_trees_all_close(got, want, atol=TOL, rtol=0)
    inside = jax.vmap(jax.grad(local), in_axes=(0, 0, None, None), axis_name="b")
    np.testing.assert_allclose(inside(x, dy, gain, bias), want[0], rtol=0, atol=TOL)


def test_global_batch_of_one_under_shard_map_is_a_value_error():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))
    spec = jax.sharding.PartitionSpec("d")
    x = np.ones((1, 3), np.float32)
    for f in (
        lambda x: ops.batch_stats(x, axis_name="d")[1],
        lambda x: ops.batch_norm(x, 1.0, 0.0, axis_name="d"),
        lambda x: ops.batch_norm_with_stats(x, 1.0, 0.0, axis_name="d")[0],
    ):
        with pytest.raises(ValueError, match="at least 2 rows"):
            jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))(x)


# ------------------------------------------------------------- fused linear + CE


def lce_inputs(n=(3, 4), d=5, v=19, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*n, d))
    w = rng.standard_normal((d, v)) / np.sqrt(d)
    b = rng.standard_normal(v)
    y = rng.integers(0, v, n)
    return tuple(jnp.asarray(a.astype(dtype)) for a in (x, w, b)) + (jnp.asarray(y),)


def test_linear_cross_entropy_finite_differences_and_grad_of_grad(x64):
    x, w, b, y = lce_inputs(seed=50)

    def fused(x, w, b):
        return ops.linear_cross_entropy(x, w, y, bias=b, chunk_size=6)

    def unfused(x, w, b):
        return ops.cross_entropy_reference(x @ w + b, y)

    check_finite_differences(jax.jit(fused), x, w, b, order=2)
    ct = jnp.asarray(np.random.default_rng(51).standard_normal(y.shape))

    def loss(f):
        return lambda x, w, b: (f(x, w, b) * ct).sum()

    argnums = (0, 1, 2)
    assert_vjp_matches(
        jax.grad(loss(fused), argnums), jax.grad(loss(unfused), argnums), x, w, b, argnums=argnums
    )


def test_linear_cross_entropy_low_precision():
    x, w, b, y = lce_inputs(n=(16,), d=8, v=300, seed=53, dtype=np.float32)
    x16, w16 = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)

    @jax.jit
    def grads(x, w):
        f = lambda x, w: ops.linear_cross_entropy(x, w, y, chunk_size=128)  # noqa: E731
        return jax.value_and_grad(lambda x, w: f(x, w).astype(jnp.float32).mean(), (0, 1))(x, w)

    (l16, (dx16, dw16)), (l32, (dx32, dw32)) = (
        grads(x16, w16),
        grads(x16.astype(jnp.float32), w16.astype(jnp.float32)),
    )
    assert dx16.dtype == dw16.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(l16), float(l32), rtol=2**-7)
    for a, b32 in ((dx16, dx32), (dw16, dw32)):
        close(a.astype(jnp.float32), b32, 2**-7 * float(jnp.abs(b32).max()))


def test_linear_cross_entropy_bad_inputs_are_clear_errors():
    x, w, b, y = lce_inputs(n=(4,), seed=54, dtype=np.float32)
    with pytest.raises(ValueError, match=r"x shape \(4, 5\) and w shape \(4, 19\)"):
        ops.linear_cross_entropy(x, w[:4], y)
    with pytest.raises(ValueError, match=r"labels shape \(3,\)"):
        ops.linear_cross_entropy(x, w, y[:3])
    with pytest.raises(ValueError, match=r"bias shape \(18,\)"):
        ops.linear_cross_entropy(x, w, y, bias=b[:18])
    with pytest.raises(ValueError, match="chunk_size"):
        ops.linear_cross_entropy(x, w, y, chunk_size=0)
    with pytest.raises(TypeError, match="integer"):
        ops.linear_cross_entropy(x, w, y.astype(jnp.float32))


def test_linear_cross_entropy_keeps_no_logits_sized_temporaries():
    """The compiled gradient's temporaries are bounded by the chunk, not by V."""
    n, d, v, chunk = 256, 16, 8192, 256
    x, w = jnp.zeros((n, d)), jnp.zeros((d, v))
    y = jnp.zeros(n, jnp.int32)

    def temp(f):
        g = jax.jit(jax.grad(lambda x, w: f(x, w).mean(), argnums=(0, 1)))
        return g.lower(x, w).compile().memory_analysis().temp_size_in_bytes

    fused = temp(lambda x, w: ops.linear_cross_entropy(x, w, y, chunk_size=chunk))
    unfused = temp(lambda x, w: ops.cross_entropy(x @ w, y))
    assert unfused >= n * v * 4  # the (N, V) logits
    assert fused <= 4 * n * chunk * 4  # a few (N, chunk) blocks: 1/8 of the logits here


# ------------------------------------- cross-entropy options, layouts, finiteness (issue 20)

# Each option alone, then all at once; (w_layout, chunk_size) rotates over the alone cases
# and the combined case runs every pair. Chunk 4 of V=19: 5 chunks, the last one slid.
OPTIONS = {
    "softcap": dict(softcap=1.5),
    "label_smoothing": dict(label_smoothing=0.2),
    "z_loss": dict(z_loss=0.05),
    "ignore_index": dict(ignore_index=-100),
    "where": dict(where=True),
    "all": dict(where=True, ignore_index=-100, softcap=1.5, label_smoothing=0.2, z_loss=0.05),
}
LAYOUT_CHUNK = [("dv", 4), ("vd", None), ("vd", 4), ("dv", None)]
OPTION_CASES = [(k, *LAYOUT_CHUNK[i % 4]) for i, k in enumerate(list(OPTIONS)[:-1])]
OPTION_CASES += [("all", layout, chunk) for layout, chunk in LAYOUT_CHUNK]


def option_inputs(name: str, seed: int = 60):
    """x (3, 4, 5), w (5, 19), bias, labels (two of them -100) and the option's kwargs."""
    x, w, b, y = lce_inputs(seed=seed)
    y = y.at[0, 1].set(-100).at[2, 3].set(-100)
    kwargs = dict(OPTIONS[name])
    if kwargs.pop("where", False):
        kwargs["where"] = jnp.asarray(np.random.default_rng(seed).random(y.shape) < 0.7)
    if "ignore_index" not in kwargs:  # keep the labels in range
        y = jnp.where(y < 0, 7, y)
    return x, w, b, y, kwargs


def loss_and_lse(op, y, kwargs, ct, ct_lse):
    """A scalar of both outputs, with random cotangents: their VJPs are what we compare."""

    def f(x, w, b):
        out = op(x, w, y, bias=b, return_lse=True, **kwargs)
        return (out.loss * ct).sum() + (out.lse * ct_lse).sum()

    return f


def unfused(op, layout):
    """``op(x @ w + bias, labels, ...)`` with the fused op's signature."""

    def f(x, w, labels, *, bias, **kwargs):
        return op(x @ (w if layout == "dv" else w.T) + bias, labels, **kwargs)

    return f


@pytest.fixture(scope="module")
def option_grads():
    """Values and gradients (x, w, bias) of fused, cross_entropy and reference, per case."""
    results = {}
    with jax.enable_x64(True):
        rng = np.random.default_rng(61)
        ct, ct_lse = (jnp.asarray(rng.standard_normal((3, 4))) for _ in range(2))
        for name, layout, chunk in OPTION_CASES:
            x, w, b, y, kw = option_inputs(name)
            wl = w if layout == "dv" else w.T

            fused = functools.partial(ops.linear_cross_entropy, w_layout=layout, chunk_size=chunk)
            impls = (
                fused,
                unfused(ops.cross_entropy, layout),
                unfused(ops.cross_entropy_reference, layout),
            )
            grad = [
                jax.value_and_grad(loss_and_lse(f, y, kw, ct, ct_lse), (0, 1, 2)) for f in impls
            ]
            got = [jax.jit(g)(x, wl, b) for g in grad]
            results[name, layout, chunk] = jax.tree.map(np.asarray, got)
    return results


@pytest.mark.parametrize("name,layout,chunk", OPTION_CASES)
def test_linear_cross_entropy_options_match_the_reference(option_grads, name, layout, chunk):
    fused, unfused, ref = option_grads[name, layout, chunk]
    chex.assert_trees_all_close(fused, ref, atol=1e-10, rtol=0)
    chex.assert_trees_all_close(unfused, ref, atol=1e-10, rtol=0)
    chex.assert_tree_all_finite(fused)
    assert all(float(jnp.abs(g).max()) > 1e-3 for g in fused[1])  # not trivially zero


def numpy_loss(z, y, softcap=None, label_smoothing=0.0, z_loss=0.0, ignore_index=None, where=None):
    """The options from their definitions, in numpy: per-row losses and lse."""
    z = np.asarray(z, np.float64).reshape(-1, z.shape[-1])
    y = np.asarray(y).reshape(-1)
    keep = np.ones(y.shape, bool) if where is None else np.asarray(where).reshape(-1)
    keep = keep & (y != ignore_index)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    lse = np.log(np.exp(z).sum(1))
    logp = z - lse[:, None]
    ce = -logp[np.arange(len(y)), np.where(keep, y, 0)]
    loss = (1 - label_smoothing) * ce + label_smoothing * -logp.mean(1) + z_loss * lse**2
    return np.where(keep, loss, 0.0), np.where(keep, lse, 0.0), keep


@pytest.mark.parametrize("name", list(OPTIONS))
def test_cross_entropy_options_against_their_definitions(x64, name):
    x, w, b, y, kw = option_inputs(name, seed=62)
    z = x @ w + b
    want, want_lse, keep = numpy_loss(z, y, **kw)
    for op in (ops.cross_entropy, ops.cross_entropy_reference):
        got = op(z, y, return_lse=True, **kw)
        close(np.asarray(got.loss).reshape(-1), want, 1e-12)
        close(np.asarray(got.lse).reshape(-1), want_lse, 1e-12)
        close(op(z, y, reduction="sum", **kw), want.sum(), 1e-12)
        close(op(z, y, reduction="mean", **kw), want.sum() / keep.sum(), 1e-12)
    fused = ops.linear_cross_entropy(x, w, y, bias=b, reduction="mean", chunk_size=4, **kw)
    close(fused, want.sum() / keep.sum(), 1e-12)


def test_linear_cross_entropy_grad_of_grad_with_options(x64):
    x, w, b, y, kw = option_inputs("all", seed=63)
    ct = jnp.asarray(np.random.default_rng(63).standard_normal(y.shape))

    def loss(f):
        return lambda x, w, b: (f(x, w, b) * ct).sum()

    fused = loss(lambda x, w, b: ops.linear_cross_entropy(x, w.T, y, bias=b, w_layout="vd",
                                                          chunk_size=4, **kw))  # fmt: skip
    ref = loss(lambda x, w, b: ops.cross_entropy_reference(x @ w + b, y, **kw))
    argnums = (0, 1, 2)
    err = assert_vjp_matches(
        jax.grad(fused, argnums), jax.grad(ref, argnums), x, w, b, argnums=argnums
    )
    assert err <= 1e-10


def test_reductions_divide_by_the_rows_that_count(x64):
    x, w, b, y, kw = option_inputs("all", seed=64)
    per_row = ops.linear_cross_entropy(x, w, y, bias=b, **kw)
    counted = np.asarray(kw["where"]) & (np.asarray(y) != -100)
    assert np.all(np.asarray(per_row)[~counted] == 0.0) and counted.sum() < y.size
    mean = ops.linear_cross_entropy(x, w, y, bias=b, reduction="mean", **kw)
    close(mean, np.asarray(per_row).sum() / counted.sum())
    g = jax.grad(lambda x: ops.linear_cross_entropy(x, w, y, bias=b, reduction="sum", **kw))(x)
    assert np.all(np.asarray(g)[~counted] == 0.0)
    nothing = jnp.zeros(y.shape, bool)  # no row counts: the mean is 0, not 0/0
    assert float(ops.cross_entropy(x @ w + b, y, where=nothing, reduction="mean")) == 0.0


def finiteness_cases():
    """Logits holding a whole chunk of -inf classes (a label among them), NaN and inf rows,
    and masked rows holding NaN; the second case without the unmasked NaN/inf rows (so dw
    and db must come back finite)."""
    rng = np.random.default_rng(65)
    x = rng.standard_normal((6, 3))
    w = rng.standard_normal((3, 12))
    b = rng.standard_normal(12)
    b[:4] = -np.inf  # chunk 0 of chunk_size 4: all -inf (the online max starts at -inf)
    y = rng.integers(0, 12, 6)
    y[4] = 2
    where = np.array([True, True, False, True, True, False])
    bad = x.copy()
    bad[1], bad[3, 0] = np.nan, np.inf
    bad[[2, 5]] = np.nan  # masked rows
    clean = x.copy()
    clean[[2, 5]] = np.nan
    return [tuple(map(jnp.asarray, (xx, w, b, y, where))) for xx in (bad, clean)]


def _masked_rows_first(x, mask):
    """What a masked row means in the unfused path too: it contributes nothing (0 * NaN
    in x.T @ dz would otherwise put a masked row's NaN into dw)."""
    return x if mask is None else jnp.where(mask[:, None], x, 0.0)


def _value_and_grads(f, *args):
    out, vjp = jax.vjp(f, *args)
    return (out, *vjp(jnp.ones_like(out)))


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("options", [{}, {"softcap": 2.0, "label_smoothing": 0.1, "z_loss": 0.01}])
def test_ops_are_exactly_as_finite_as_the_unfused_reference(x64, case, options):
    """Issue 22: the online log-sum-exp once met exp(-inf - -inf) on a -inf chunk."""
    x, w, b, y, where = finiteness_cases()[case]

    @jax.jit
    def ref(x, w, b, m):
        return ops.cross_entropy_reference(_masked_rows_first(x, m) @ w + b, y, where=m, **options)

    @jax.jit
    def fused(x, w, b, m):
        return ops.linear_cross_entropy(x, w, y, bias=b, where=m, chunk_size=4, **options)

    @jax.jit
    def plain(x, w, b, m):
        return ops.cross_entropy(_masked_rows_first(x, m) @ w + b, y, where=m, **options)

    for mask in (None, where):
        want = _value_and_grads(functools.partial(ref, m=mask), x, w, b)
        for op in (fused, plain):
            got = _value_and_grads(functools.partial(op, m=mask), x, w, b)
            for a, r in zip(got, want, strict=True):
                np.testing.assert_array_equal(np.isfinite(a), np.isfinite(r))
                finite = np.isfinite(r)
                np.testing.assert_allclose(np.asarray(a)[finite], np.asarray(r)[finite], atol=1e-10)
    assert np.isnan(np.asarray(want[1])).any() == (case == 0)  # the unmasked NaN row's dx
    if case == 1:  # no unmasked NaN: every gradient is finite, the masked rows' exactly 0
        _, dx, dw, db = _value_and_grads(functools.partial(fused, m=where), x, w, b)
        chex.assert_tree_all_finite((dw, db))
        assert np.all(np.asarray(dx)[[2, 5]] == 0.0)


def test_empty_batches_and_empty_features(x64):
    assert ops.cross_entropy(jnp.zeros((0, 5)), jnp.zeros(0, jnp.int32)).shape == (0,)  # optax's
    empty_rows = ops.cross_entropy(jnp.zeros((2, 5, 0)), jnp.zeros((2, 0), jnp.int32), axis=1)
    assert empty_rows.shape == (2, 0)
    x0, w = jnp.zeros((0, 3)), jnp.ones((3, 5))
    y0 = jnp.zeros(0, jnp.int32)
    assert ops.linear_cross_entropy(x0, w, y0).shape == (0,)
    dx, dw = jax.grad(lambda x, w: ops.linear_cross_entropy(x, w, y0, reduction="mean"), (0, 1))(
        x0, w)  # fmt: skip
    assert dx.shape == (0, 3) and np.all(np.asarray(dw) == 0.0)
    # D = 0: the logits are the bias alone
    b, y = jnp.arange(5.0), jnp.array([0, 4])
    got = ops.linear_cross_entropy(jnp.zeros((2, 0)), jnp.zeros((0, 5)), y, bias=b)
    close(got, ops.cross_entropy(jnp.broadcast_to(b, (2, 5)), y))
    with pytest.raises(ValueError, match=r"no classes \(V = 0\)"):
        ops.linear_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((3, 0)), y)
    with pytest.raises(ValueError, match="no classes"):
        ops.cross_entropy(jnp.zeros((2, 0)), y)


def test_mixed_precision_promotes_and_returns_float32_losses():
    x, w, b, y = lce_inputs(n=(16,), d=8, v=300, seed=66, dtype=np.float32)
    x16 = x.astype(jnp.bfloat16)

    def grads(x, w, b):
        f = lambda x, w, b: ops.linear_cross_entropy(x, w, y, bias=b, chunk_size=128)  # noqa: E731
        return jax.value_and_grad(lambda *a: f(*a).mean(), (0, 1, 2))(x, w, b)

    loss, (dx, dw, db) = jax.jit(grads)(x16, w, b.astype(jnp.bfloat16))
    assert loss.dtype == jnp.float32  # not rounded to bfloat16
    assert (dx.dtype, dw.dtype, db.dtype) == (jnp.bfloat16, jnp.float32, jnp.bfloat16)
    want, (dx32, dw32, _) = jax.jit(grads)(x16.astype(jnp.float32), w, b.astype(jnp.bfloat16))
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    close(dw, dw32, 1e-6)
    losses = ops.linear_cross_entropy(x16, w.astype(jnp.bfloat16), y)
    assert losses.dtype == jnp.float32
    with jax.numpy_dtype_promotion("strict"), pytest.raises(TypeError, match="promot"):
        ops.linear_cross_entropy(x16, w, y)


BAD_OPTIONS = [
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
    (dict(softcap="30"), TypeError, "softcap"),
    (dict(w_layout="DV"), ValueError, "w_layout"),
    (dict(vocab_axis_name="v"), ValueError, "vocab_axis_name='v'"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(w_layout="vd"), ValueError, r'w must be \(V, D\) for w_layout="vd"'),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_OPTIONS)
def test_bad_options_are_one_clear_error(kwargs, error, match):
    x, w, b, y = lce_inputs(n=(4,), seed=67, dtype=np.float32)
    with pytest.raises(error, match=match):
        ops.linear_cross_entropy(x, w, y, bias=b, **kwargs)
    linear_only = {"w_layout", "vocab_axis_name", "chunk_size"}
    if not linear_only & kwargs.keys():
        for op in (ops.cross_entropy, ops.cross_entropy_reference):
            with pytest.raises(error, match=match):
                op(x @ w, y, **kwargs)


def test_vocabulary_parallel_on_4_devices_equals_one_device():
    """Megatron's vocabulary-parallel head: tests/scripts/vocab_parallel_cases.py runs the op
    inside shard_map on 4 forced CPU devices (a fresh process: the device count is fixed
    when jax starts) and prints its differences from the one-device op; and under plain
    jit with w sharded over the vocabulary, whether w is all-gathered and how dw is sharded."""
    script = Path(__file__).parent / "scripts" / "vocab_parallel_cases.py"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(script), "4"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 9
    for name, r in results.items():
        assert r["values"] <= 1e-10 and r["grads"] <= 1e-10, (name, r)
        if name.startswith("jit/"):  # w sharded by NamedSharding under plain jit
            assert r["all_gathers"] == 0 and r["dw_sharded_like_w"], (name, r)
        else:
            assert r["grad_scale"] > 1.0 and r["finite"], (name, r)


def test_check_vjp_on_linear_cross_entropy_with_its_options_as_keyword_variants(x64):
    x, w, b, y, kwargs = option_inputs("all", seed=68)

    def fused(x, w, b, **k):
        return ops.linear_cross_entropy(x, w, y, bias=b, chunk_size=4, **k)

    def reference(x, w, b, **k):
        out = ops.cross_entropy_reference(x @ w + b, y, **k)
        return out.astype(jnp.promote_types(out.dtype, jnp.float32))  # as the fused op returns

    variants = [{k: v} for k, v in kwargs.items()] + [kwargs, dict(kwargs, reduction="mean")]
    settings = ["all_args", "keywords", "second_order", "jit", "vmap", "low_precision"]
    report = check_vjp(fused, reference, x, w, b, keyword_variants=variants, settings=settings)
    assert sorted(report.checked) == sorted(settings)


# ------------------------------------- check_vjp: every setting on our ops (issue 19)
# The whole matrix of jaxninja.testing.check_vjp (jit, vmap, scan, checkpoint, 16 bits,
# second order, one row, scaled inputs, keyword variants...), float32 at the natural point.
# It replaces the per-transformation tests (jit/no jit variants, vmap) that it covers.


@pytest.fixture(scope="module")
def f32_inputs():
    rng = np.random.default_rng(60)
    x = jnp.asarray(rng.standard_normal((6, 5)) * 3.0 + 1.5, jnp.float32)
    gain = jnp.asarray(rng.standard_normal((1, 5)) * 0.1 + 1.0, jnp.float32)
    bias = jnp.asarray(rng.standard_normal((1, 5)) * 0.1, jnp.float32)
    logits = jnp.asarray(rng.standard_normal((5, 5)) * 2.0, jnp.float32)  # square: axis=0 too
    labels = jnp.asarray(rng.integers(0, 5, 5), jnp.int32)
    return x, gain, bias, logits, labels, jnp.asarray(rng.random((5, 5)) < 0.7)


def test_cross_entropy_check_vjp(f32_inputs):
    *_, logits, labels, per_logit = f32_inputs
    variants = [{"axis": 0}, {"where": labels != 2}, {"where": per_logit}]
    report = check_vjp(
        ops.cross_entropy, ops.cross_entropy_reference, logits, labels, keyword_variants=variants
    )
    assert set(report.not_applicable) == {"each_output", "shard_map"}


def test_batch_norm_check_vjp(f32_inputs):
    x, gain, bias, *_ = f32_inputs
    variants = [{"unbiased": False}, {"axis": 1}, {"where": (jnp.arange(6) != 3)[:, None]}]
    report = check_vjp(
        ops.batch_norm, ops.batch_norm_reference, x, gain, bias, keyword_variants=variants
    )
    assert set(report.not_applicable) == {"each_output", "one_row", "shard_map"}
    assert "at least 2 rows" in report.not_applicable["one_row"]  # refused by both


def test_batch_norm_with_stats_check_vjp(f32_inputs):
    x, gain, bias, *_ = f32_inputs

    def ref(x, gain, bias, **kw):
        return (ops.batch_norm_reference(x, gain, bias, **kw), *ops.batch_stats(x, **kw))

    report = check_vjp(
        ops.batch_norm_with_stats, ref, x, gain, bias, keyword_variants=[{"unbiased": False}]
    )
    assert "each_output" in report.checked


def test_linear_cross_entropy_check_vjp(x64, f32_inputs):
    """In float64: the fused and the unfused op multiply in other orders, and at setting
    ``scaled``'s logits (x and w both x 1000: 1e6) float32 rounding alone can flip which of
    two near-tied classes wins (seen with ``JAX_DISABLE_MOST_OPTIMIZATIONS=1``, which changes
    XLA's CPU code, as another backend would). Setting ``low_precision`` still runs 16-bit."""
    x, *_, labels, _ = f32_inputs
    x = x[:5, :4].astype(jnp.float64)  # D = 4: one_row slices the arrays with leading axis N = 5
    w = jnp.asarray(np.random.default_rng(61).standard_normal((4, 7)) / 2)
    b = jnp.linspace(-1.0, 1.0, 7, dtype=jnp.float64)

    def fused(x, w, labels, **kw):
        return ops.linear_cross_entropy(x, w, labels, chunk_size=3, **kw)

    def unfused(x, w, labels, bias=0.0, where=None):
        out = ops.cross_entropy_reference(x @ w + bias, labels, where=where)
        return out.astype(jnp.promote_types(out.dtype, jnp.float32))  # as the fused op returns

    variants = [{"bias": b}, {"where": labels != 1}]
    report = check_vjp(fused, unfused, x, w, labels, keyword_variants=variants)
    assert set(report.not_applicable) == {"each_output", "shard_map"}
