"""The custom-VJP ops against autodiff of their plain-jnp references.

Gradient comparisons run in float64 (the ``x64`` fixture) and demand max abs diff <= 1e-12;
low-precision tests run in float32 and compare against float32 computations.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxninja import ops

TOL = 1e-12


def maxdiff(a, b) -> float:
    """Max abs difference over all leaves of two pytrees (shapes must agree)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    out = 0.0
    for x, y in zip(la, lb, strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        out = max(out, float(np.max(np.abs(x - y), initial=0.0)))
    return out


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
    ((32, 27), -1, False),
    ((3, 4, 7), -1, False),  # leading batch dims
    ((2, 3, 4, 5), -1, False),
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

    out, vjp = jax.vjp(custom, z)
    out_ref, vjp_ref = jax.vjp(ref, z)
    assert out.dtype == jnp.float64 and out.shape == y.shape
    assert maxdiff(out, out_ref) <= TOL
    (dz,), (dz_ref,) = vjp(ct), vjp_ref(ct)
    assert dz.shape == z.shape and dz.dtype == jnp.float64
    assert maxdiff(dz, dz_ref) <= TOL
    assert np.abs(np.asarray(dz)).max() > 0.01  # not trivially zero


def test_cross_entropy_values_against_numpy(x64):
    z, y, _, _ = ce_inputs((6, 5), -1, seed=3)
    zn = np.asarray(z)
    lse = np.log(np.exp(zn - zn.max(1, keepdims=True)).sum(1)) + zn.max(1)
    want = lse - zn[np.arange(6), np.asarray(y)]
    assert maxdiff(ops.cross_entropy(z, y), want) <= TOL
    # the lecture's mean loss and its fused gradient (softmax - onehot) / n
    dz = jax.grad(lambda z: ops.cross_entropy(z, y).mean())(z)
    p = np.exp(zn - lse[:, None])
    p[np.arange(6), np.asarray(y)] -= 1
    assert maxdiff(dz, p / 6) <= TOL


def test_cross_entropy_large_logits_are_stable(x64):
    z = jnp.array([[1000.0, 0.0, -1000.0], [-1000.0, 1000.0, 0.0]])
    y = jnp.array([0, 2])
    loss = ops.cross_entropy(z, y)
    np.testing.assert_allclose(np.asarray(loss), [0.0, 1000.0], atol=TOL)
    dz = jax.grad(lambda z: ops.cross_entropy(z, y).sum())(z)
    np.testing.assert_allclose(np.asarray(dz), [[0, 0, 0], [0, 1, -1]], atol=TOL)


# --------------------------------------------------------------------- batch-norm VJP

BN_CASES = [
    # (x shape, axis, gain shape)
    ((2, 3), 0, (1, 3)),  # n = 2, the smallest batch Bessel's correction allows
    ((2, 3), 0, (3,)),
    ((32, 64), 0, (1, 64)),  # the lecture's shape
    ((7, 5), 0, (5,)),
    ((4, 3, 5), (0, 1), (1, 1, 5)),  # tuple axis
    ((4, 3, 5), (0, 1), (5,)),
    ((5, 6), 1, (5, 1)),  # axis != 0
    ((3, 4, 5), (0, 2), (1, 4, 1)),
    ((6, 4), -2, (4,)),  # negative axis
]


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("x_shape,axis,gain_shape", BN_CASES)
def test_batch_norm_vjp_matches_reference(x64, x_shape, axis, gain_shape, unbiased):
    x, gain, bias, dy = bn_inputs(x_shape, gain_shape, seed=len(x_shape))
    kw = dict(axis=axis, unbiased=unbiased)
    y, vjp = jax.vjp(lambda x, g, b: ops.batch_norm(x, g, b, **kw), x, gain, bias)
    y_ref, vjp_ref = jax.vjp(lambda x, g, b: ops.batch_norm_reference(x, g, b, **kw), x, gain, bias)
    assert y.shape == x.shape and y.dtype == jnp.float64
    assert maxdiff(y, y_ref) <= TOL
    grads, grads_ref = vjp(dy), vjp_ref(dy)
    for g, v in zip(grads, (x, gain, bias), strict=True):
        assert g.shape == v.shape and g.dtype == v.dtype
    assert maxdiff(grads, grads_ref) <= TOL
    if x.size // gain.size > 2:  # with 2 rows, xhat = +-1/sqrt(2) whatever x is: dx ~ 0
        assert np.abs(np.asarray(grads[0])).max() > 0.01


@pytest.mark.parametrize("unbiased", [True, False])
def test_batch_norm_forward_against_numpy(x64, unbiased):
    x, gain, bias, _ = bn_inputs((9, 4), (1, 4), seed=1)
    xn = np.asarray(x)
    var = xn.var(0, ddof=1 if unbiased else 0, keepdims=True)
    want = np.asarray(gain) * (xn - xn.mean(0, keepdims=True)) / np.sqrt(var + 1e-5)
    want = want + np.asarray(bias)
    assert maxdiff(ops.batch_norm(x, gain, bias, unbiased=unbiased), want) <= TOL


def test_batch_norm_backward_is_the_lecture_formula(x64):
    """dx = gain*var_inv/n * (n*dy - sum(dy) - n/(n-1) * xhat * sum(dy*xhat))."""
    x, gain, bias, dy = bn_inputs((32, 8), (1, 8), seed=2)
    dx = jax.vjp(lambda x: ops.batch_norm(x, gain, bias), x)[1](dy)[0]
    xn, dyn, g = np.asarray(x), np.asarray(dy), np.asarray(gain)
    n = 32
    var_inv = (xn.var(0, ddof=1, keepdims=True) + 1e-5) ** -0.5
    xhat = (xn - xn.mean(0, keepdims=True)) * var_inv
    want = (g * var_inv / n) * (
        n * dyn - dyn.sum(0) - n / (n - 1) * xhat * (dyn * xhat).sum(0)
    )
    assert maxdiff(dx, want) <= TOL


# ------------------------------------------------------------ finite differences, jit


@pytest.mark.parametrize("shape,axis", [((4, 5), -1), ((2, 3, 4), 1)])
def test_cross_entropy_check_grads(x64, shape, axis):
    z, y, _, _ = ce_inputs(shape, axis, seed=5)
    check_grads(lambda z: ops.cross_entropy(z, y, axis=axis), (z,), order=2, modes=["rev"])


@pytest.mark.parametrize(
    "x_shape,axis,gain_shape,unbiased",
    [((5, 3), 0, (1, 3), True), ((4, 2, 3), (0, 1), (3,), False), ((2, 4), 0, (4,), True)],
)
def test_batch_norm_check_grads(x64, x_shape, axis, gain_shape, unbiased):
    x, gain, bias, _ = bn_inputs(x_shape, gain_shape, seed=6)

    def f(x, g, b):
        return ops.batch_norm(x, g, b, axis=axis, unbiased=unbiased)

    check_grads(f, (x, gain, bias), order=2, modes=["rev"])


class VariantsTest(chex.TestCase):
    """Gradients agree with the reference with and without ``jax.jit``."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy_grad(self):
        with jax.enable_x64(True):
            z, y, ct, where = ce_inputs((8, 6), -1, seed=7, with_where=True)

            def loss(f):
                return lambda z: (f(z, y, where=where) * ct).sum()

            got = self.variant(jax.value_and_grad(loss(ops.cross_entropy)))(z)
            want = jax.value_and_grad(loss(ops.cross_entropy_reference))(z)
            chex.assert_trees_all_close(got, want, atol=TOL, rtol=0)
            chex.assert_tree_all_finite(got)

    @chex.variants(with_jit=True, without_jit=True)
    def test_batch_norm_grad(self):
        with jax.enable_x64(True):
            x, gain, bias, dy = bn_inputs((6, 5), (1, 5), seed=8)

            def loss(f):
                return lambda x, g, b: (jnp.tanh(f(x, g, b)) * dy).sum()

            argnums = (0, 1, 2)
            got = self.variant(jax.grad(loss(ops.batch_norm), argnums))(x, gain, bias)
            want = jax.grad(loss(ops.batch_norm_reference), argnums)(x, gain, bias)
            chex.assert_trees_all_close(got, want, atol=TOL, rtol=0)
            chex.assert_shape(got, [(6, 5), (1, 5), (1, 5)])


# ------------------------------------------------------------------ vmap, grad of grad


def test_cross_entropy_under_vmap(x64):
    z, y, _, _ = ce_inputs((3, 4, 7), -1, seed=9)

    def per_task(f):
        return jax.vmap(jax.value_and_grad(lambda z, y: f(z, y).mean()))

    got = per_task(ops.cross_entropy)(z, y)
    want = per_task(ops.cross_entropy_reference)(z, y)
    assert got[1].shape == (3, 4, 7)
    assert maxdiff(got, want) <= TOL
    # and equal to a Python loop over the tasks
    loop = [jax.grad(lambda z: ops.cross_entropy(z, y[i]).mean())(z[i]) for i in range(3)]
    assert maxdiff(got[1], jnp.stack(loop)) <= TOL


def test_batch_norm_under_vmap(x64):
    """Independent groups, each normalised over its own 8 rows; gain/bias shared."""
    x, gain, bias, dy = bn_inputs((3, 8, 5), (1, 5), seed=10)

    def per_group(f):
        def loss(x, g, b, dy):
            return (f(x, g, b) * dy).sum()

        return jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(0, None, None, 0))

    got = per_group(ops.batch_norm)(x, gain, bias, dy)
    want = per_group(ops.batch_norm_reference)(x, gain, bias, dy)
    assert got[0].shape == (3, 8, 5) and got[1].shape == (3, 1, 5)
    assert maxdiff(got, want) <= TOL
    # vmap of the forward equals normalising each group separately
    y = jax.vmap(ops.batch_norm, in_axes=(0, None, None))(x, gain, bias)
    assert maxdiff(y[1], ops.batch_norm(x[1], gain, bias)) <= TOL


def test_cross_entropy_grad_of_grad(x64):
    z, y, ct, _ = ce_inputs((4, 5), -1, seed=11)

    def f(op):
        return lambda z: (op(z, y) * ct).sum()

    hess = jax.jacrev(jax.grad(f(ops.cross_entropy)))(z)
    hess_ref = jax.jacrev(jax.grad(f(ops.cross_entropy_reference)))(z)
    assert hess.shape == (4, 5, 4, 5)
    assert maxdiff(hess, hess_ref) <= TOL
    assert np.abs(np.asarray(hess)).max() > 0.01


@pytest.mark.parametrize("gain_shape", [(1, 3), (3,)])
def test_batch_norm_grad_of_grad(x64, gain_shape):
    x, gain, bias, dy = bn_inputs((5, 3), gain_shape, seed=12)

    def f(op):
        return lambda x, g, b: (jnp.tanh(op(x, g, b)) * dy).sum()

    argnums = (0, 1, 2)
    hess = jax.jacrev(jax.grad(f(ops.batch_norm), argnums), argnums)(x, gain, bias)
    hess_ref = jax.jacrev(jax.grad(f(ops.batch_norm_reference), argnums), argnums)(x, gain, bias)
    assert hess[0][0].shape == (5, 3, 5, 3)
    assert maxdiff(hess, hess_ref) <= TOL


# ----------------------------------------------------------------------- where masks


def test_where_mask_zeroes_loss_and_gradient_rows(x64):
    z, y, _, _ = ce_inputs((6, 5), -1, seed=13)
    where = jnp.array([True, False, True, True, False, True])
    loss = ops.cross_entropy(z, y, where=where)
    dz = jax.grad(lambda z: ops.cross_entropy(z, y, where=where).sum())(z)
    assert np.all(np.asarray(loss)[[1, 4]] == 0.0)
    assert np.all(np.asarray(dz)[[1, 4]] == 0.0)
    # the kept rows are exactly the unmasked computation
    full = ops.cross_entropy(z, y)
    dfull = jax.grad(lambda z: ops.cross_entropy(z, y).sum())(z)
    keep = np.asarray(where)
    assert maxdiff(np.asarray(loss)[keep], np.asarray(full)[keep]) <= TOL
    assert maxdiff(np.asarray(dz)[keep], np.asarray(dfull)[keep]) <= TOL


def test_where_mask_hides_out_of_range_padding_labels(x64):
    """A masked row may carry a padding label (-1): zero loss and zero gradient, no NaN."""
    z, _, _, _ = ce_inputs((4, 5), -1, seed=14)
    y = jnp.array([0, -1, 3, 5])
    where = jnp.array([True, False, True, False])
    for op in (ops.cross_entropy, ops.cross_entropy_reference):
        loss, dz = jax.value_and_grad(lambda z, op=op: op(z, y, where=where).sum())(z)
        assert np.isfinite(float(loss))
        dz = np.asarray(dz)
        assert np.all(np.isfinite(dz)) and np.all(dz[[1, 3]] == 0.0)


# ---------------------------------------------------------------- low precision


@pytest.mark.parametrize("dtype,rtol", [(jnp.bfloat16, 2**-7), (jnp.float16, 2**-10)])
def test_cross_entropy_low_precision(dtype, rtol):
    z32, y, _, _ = ce_inputs((16, 27), -1, seed=15, dtype=np.float32)
    z = z32.astype(dtype)
    zup = z.astype(jnp.float32)  # the same values, in float32

    def loss(z):
        return ops.cross_entropy(z, y).mean()

    value, dz = jax.value_and_grad(loss)(z)
    value32, dz32 = jax.value_and_grad(loss)(zup)
    assert value.dtype == dtype and dz.dtype == dtype and dz.shape == z.shape
    assert ops.cross_entropy(z, y).dtype == dtype
    np.testing.assert_allclose(float(value), float(value32), rtol=rtol)
    scale = float(jnp.abs(dz32).max())
    assert maxdiff(dz, dz32) <= rtol * scale
    assert np.all(np.isfinite(np.asarray(dz, np.float32)))


@pytest.mark.parametrize("dtype,rtol", [(jnp.bfloat16, 2**-7), (jnp.float16, 2**-10)])
def test_batch_norm_low_precision(dtype, rtol):
    x32, gain, bias, dy32 = bn_inputs((32, 16), (1, 16), seed=16, dtype=np.float32)
    x, dy = x32.astype(dtype), dy32.astype(dtype)

    def f(x):
        return ops.batch_norm(x, gain, bias)

    y, vjp = jax.vjp(f, x)
    y32, vjp32 = jax.vjp(f, x.astype(jnp.float32))
    (dx,), (dx32,) = vjp(dy), vjp32(dy.astype(jnp.float32))
    assert y.dtype == dtype and dx.dtype == dtype
    assert maxdiff(y, y32) <= 2 * rtol * float(jnp.abs(y32).max())
    assert maxdiff(dx, dx32) <= 2 * rtol * float(jnp.abs(dx32).max())
    mean, var = ops.batch_stats(x)
    assert mean.dtype == jnp.float32 and var.dtype == jnp.float32


# ------------------------------------------------------------- bad labels and inputs


def test_out_of_range_labels_give_nan_rows():
    z, _, _, _ = ce_inputs((4, 27), -1, seed=17, dtype=np.float32)
    y = jnp.array([3, 27, -1, 26])
    for op in (ops.cross_entropy, ops.cross_entropy_reference):
        loss = np.asarray(op(z, y))
        assert np.isnan(loss[1]) and np.isnan(loss[2])
        assert np.all(np.isfinite(loss[[0, 3]]))
    # not clamped to class 26 / 0, and the valid rows are unaffected
    valid = ops.cross_entropy(z, jnp.array([3, 26, 0, 26]))
    np.testing.assert_array_equal(np.asarray(ops.cross_entropy(z, y))[[0, 3]], valid[[0, 3]])
    dz = np.asarray(jax.grad(lambda z: ops.cross_entropy(z, y).sum())(z))
    assert np.all(np.isnan(dz[[1, 2]])) and np.all(np.isfinite(dz[[0, 3]]))


@pytest.mark.parametrize("jit", [False, True])
def test_labels_shape_mismatch_names_both_shapes(jit):
    z, y = jnp.zeros((4, 5)), jnp.zeros((3,), jnp.int32)
    f = ops.cross_entropy
    if jit:
        f = jax.jit(f)
    with pytest.raises(ValueError) as err:
        f(z, y)
    assert "(3,)" in str(err.value) and "(4, 5)" in str(err.value)


def test_integer_logits_and_float_labels_are_type_errors():
    with pytest.raises(TypeError, match="floating"):
        ops.cross_entropy(jnp.zeros((4, 5), jnp.int32), jnp.zeros(4, jnp.int32))
    with pytest.raises(TypeError, match="integer"):
        ops.cross_entropy(jnp.zeros((4, 5)), jnp.zeros(4))
    with pytest.raises(TypeError, match="floating"):
        jax.jit(ops.cross_entropy_reference)(
            jnp.zeros((4, 5), jnp.int32), jnp.zeros(4, jnp.int32)
        )
    with pytest.raises(TypeError, match="floating"):
        ops.batch_norm(jnp.ones((4, 5), jnp.int32), jnp.ones(5), jnp.zeros(5))


@pytest.mark.parametrize(
    "f", [ops.batch_norm, ops.batch_norm_with_stats, ops.batch_norm_reference]
)
def test_batch_norm_one_row_unbiased_is_a_value_error(f):
    x, g, b = jnp.ones((1, 5)), jnp.ones((1, 5)), jnp.zeros((1, 5))
    with pytest.raises(ValueError, match="at least 2 rows"):
        f(x, g, b)
    with pytest.raises(ValueError, match="at least 2 rows"):
        jax.jit(f)(x, g, b)
    # unbiased=False is defined for one row: xhat = 0, so y = bias
    y = f(x, g, b, unbiased=False)
    y = y[0] if isinstance(y, tuple) else y
    np.testing.assert_array_equal(np.asarray(y), np.zeros((1, 5)))


def test_batch_norm_bad_shapes():
    x = jnp.ones((4, 5))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        ops.batch_norm(x, jnp.ones(4), jnp.zeros(5))
    with pytest.raises(ValueError, match="out of range"):
        ops.batch_norm(x, jnp.ones(5), jnp.zeros(5), axis=2)


def test_forward_mode_is_a_documented_type_error():
    z, y = jnp.ones((3, 4)), jnp.array([0, 1, 2])
    with pytest.raises(TypeError):
        jax.jvp(lambda z: ops.cross_entropy(z, y), (z,), (z,))
    x, g, b = jnp.arange(12.0).reshape(4, 3), jnp.ones(3), jnp.zeros(3)
    with pytest.raises(TypeError):
        jax.jvp(lambda x: ops.batch_norm(x, g, b), (x,), (x,))
    with pytest.raises(TypeError):
        jax.hessian(lambda z: ops.cross_entropy(z, y).sum())(z)


# ------------------------------------------------------------ statistics and with_stats


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("x_shape,axis", [((10, 4), 0), ((3, 4, 5), (0, 2)), ((6, 7), 1)])
def test_batch_stats_against_numpy(x64, x_shape, axis, unbiased):
    x, _, _, _ = bn_inputs(x_shape, (1,), seed=18)
    mean, var = ops.batch_stats(x, axis=axis, unbiased=unbiased)
    xn = np.asarray(x)
    want_mean = xn.mean(axis=axis, keepdims=True)
    want_var = xn.var(axis=axis, ddof=1 if unbiased else 0, keepdims=True)
    assert mean.shape == want_mean.shape and var.shape == want_var.shape
    assert maxdiff(mean, want_mean) <= TOL and maxdiff(var, want_var) <= TOL


def test_batch_stats_float16_are_float32():
    x = jnp.asarray(np.arange(12.0).reshape(6, 2), jnp.float16)
    mean, var = ops.batch_stats(x)
    assert mean.dtype == var.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(mean), [[5.0, 6.0]])
    np.testing.assert_allclose(np.asarray(var), [[14.0, 14.0]])  # ddof=1 of 0,2,...,10


@pytest.mark.parametrize(
    "x_shape,axis,gain_shape,unbiased",
    [((8, 4), 0, (1, 4), True), ((8, 4), 0, (4,), False), ((3, 4, 5), (0, 1), (5,), True)],
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

    y, mean, var = ops.batch_norm_with_stats(x, gain, bias, **kw)
    assert maxdiff((mean, var), ops.batch_stats(x, **kw)) <= TOL
    assert maxdiff(y, ops.batch_norm(x, gain, bias, **kw)) <= TOL
    got = jax.value_and_grad(custom, (0, 1, 2))(x, gain, bias)
    want = jax.value_and_grad(ref, (0, 1, 2))(x, gain, bias)
    assert maxdiff(got, want) <= TOL
    # statistics used only as auxiliary data: the gradient is batch_norm's
    aux = jax.grad(lambda x: (ops.batch_norm_with_stats(x, gain, bias, **kw)[0] * dy).sum())(x)
    plain = jax.grad(lambda x: (ops.batch_norm(x, gain, bias, **kw) * dy).sum())(x)
    assert maxdiff(aux, plain) <= TOL
