"""Tests for jaxninja.testing: it passes our ops, and fails a wrong VJP helpfully."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_experiment

from jaxninja.ops import (
    batch_norm,
    batch_norm_reference,
    batch_norm_with_stats,
    batch_stats,
    cross_entropy,
    cross_entropy_reference,
)
from jaxninja.testing import assert_vjp_matches, check_finite_differences, default_tolerances


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def softplus_ref(x):
    return jnp.logaddexp(x, 0.0)


def make_softplus(factor: float = 1.0):
    """A custom-VJP softplus whose backward rule is ``factor`` times the right one."""

    @jax.custom_vjp
    def softplus(x):
        return softplus_ref(x)

    softplus.defvjp(lambda x: (softplus(x), x), lambda x, g: (factor * g * jax.nn.sigmoid(x),))
    return softplus


def bn_inputs(dtype, n=32, h=64, seed=0):
    kx, kg, kb = jax.random.split(jax.random.key(seed), 3)
    x = 3.0 * jax.random.normal(kx, (n, h), dtype) + 1.0
    gain = 1.0 + 0.1 * jax.random.normal(kg, (1, h), dtype)
    bias = 0.1 * jax.random.normal(kb, (1, h), dtype)
    return x, gain, bias


def ce_inputs(dtype, n=32, k=27, seed=0):
    kz, ky = jax.random.split(jax.random.key(seed))
    return 2.0 * jax.random.normal(kz, (n, k), dtype), jax.random.randint(ky, (n,), 0, k)


# ------------------------------------------------------------ passes for our ops


def test_cross_entropy_matches_reference_float64(x64):
    logits, labels = ce_inputs(jnp.float64)
    maxdiff = assert_vjp_matches(cross_entropy, cross_entropy_reference, logits, labels)
    assert maxdiff < 1e-15  # per-example losses: the gradient is softmax - onehot, O(1)


def test_cross_entropy_options_match_reference_float64(x64):
    logits, labels = ce_inputs(jnp.float64, n=6, k=5)
    where = jnp.arange(6) % 3 != 0

    def f(z):
        return cross_entropy(z.T, labels, axis=0, where=where).mean()

    def ref(z):
        return cross_entropy_reference(z.T, labels, axis=0, where=where).mean()

    assert_vjp_matches(f, ref, logits)


def test_batch_norm_matches_reference_float64(x64):
    x, gain, bias = bn_inputs(jnp.float64)
    maxdiff = assert_vjp_matches(batch_norm, batch_norm_reference, x, gain, bias, argnums=(0, 1, 2))
    assert maxdiff < 1e-12


@pytest.mark.parametrize("unbiased", [True, False])
def test_batch_norm_options_match_reference_float64(x64, unbiased):
    x = jax.random.normal(jax.random.key(1), (4, 6, 5), jnp.float64)
    gain = 1.0 + jnp.arange(5.0, dtype=jnp.float64) / 10
    bias = jnp.full((5,), 0.3, jnp.float64)

    def f(x, gain, bias):
        return batch_norm(x, gain, bias, axis=(0, 1), unbiased=unbiased)

    def ref(x, gain, bias):
        return batch_norm_reference(x, gain, bias, axis=(0, 1), unbiased=unbiased)

    assert_vjp_matches(f, ref, x, gain, bias, argnums=(0, 1, 2))


def test_batch_norm_with_stats_matches_reference_float64(x64):
    """All three outputs get a random cotangent, so the mean/var terms are exercised."""
    x, gain, bias = bn_inputs(jnp.float64, n=16, h=8)

    def ref(x, gain, bias):
        return (batch_norm_reference(x, gain, bias), *batch_stats(x))

    assert_vjp_matches(batch_norm_with_stats, ref, x, gain, bias, argnums=(0, 1, 2))


def test_our_ops_pass_float32_defaults():
    logits, labels = ce_inputs(jnp.float32)
    assert_vjp_matches(cross_entropy, cross_entropy_reference, logits, labels)
    x, gain, bias = bn_inputs(jnp.float32)
    assert_vjp_matches(batch_norm, batch_norm_reference, x, gain, bias, argnums=(0, 1, 2))


def test_pytree_arguments(x64):
    """A params dict: every leaf compared; the model loss on our ops vs on the references."""
    x, gain, bias = bn_inputs(jnp.float64, n=16, h=8)
    labels = jnp.arange(16) % 8

    def loss(p, ops_bn, ops_ce):
        return ops_ce(jnp.tanh(ops_bn(x, p["gain"], p["bias"])), labels).mean()

    params = {"gain": gain, "bias": bias}
    assert_vjp_matches(
        lambda p: loss(p, batch_norm, cross_entropy),
        lambda p: loss(p, batch_norm_reference, cross_entropy_reference),
        params,
    )


@pytest.mark.parametrize("order", [1, 2])
def test_finite_differences_pass_for_our_ops(x64, order):
    logits, labels = ce_inputs(jnp.float64, n=8, k=5)
    check_finite_differences(cross_entropy, logits, labels, argnums=0, order=order)
    x, gain, bias = bn_inputs(jnp.float64, n=8, h=3)
    check_finite_differences(batch_norm, x, gain, bias, order=order)


def test_default_tolerances():
    assert default_tolerances(jnp.float64) == (1e-12, 1e-10)
    atol32, rtol32 = default_tolerances(jnp.float32)
    assert atol32 > 1e-12 and rtol32 > 1e-10
    assert default_tolerances(jnp.bfloat16)[0] >= default_tolerances(jnp.float16)[0] >= atol32
    with pytest.raises(TypeError, match="non-floating"):
        default_tolerances(jnp.int32)


# ------------------------------------------------ fails, and says why, for wrong VJPs


def test_right_softplus_passes(x64):
    x = jnp.linspace(-4.0, 4.0, 9, dtype=jnp.float64)
    assert assert_vjp_matches(make_softplus(1.0), softplus_ref, x) < 1e-15


def test_wrong_softplus_fails_with_a_helpful_message(x64):
    bad = make_softplus(2.0)
    x = jnp.linspace(-4.0, 4.0, 9, dtype=jnp.float64)
    with pytest.raises(AssertionError) as info:
        assert_vjp_matches(bad, softplus_ref, x)
    msg = str(info.value)
    assert "VJP of f=softplus does not match autodiff of reference=softplus_ref" in msg
    assert "for argument 0 'x' (shape (9,), float64)" in msg
    assert "9 of 9 elements differ beyond atol=1e-12, rtol=1e-10" in msg
    assert "cotangent: standard normal, seed=0" in msg
    # The report is right: recompute the worst element from the numbers it names.
    m = re.search(
        r"max abs diff (\S+); worst element at index \((\d+),\): "
        r"f gives (\S+), reference gives (\S+)",
        msg,
    )
    assert m, msg
    maxdiff, idx, got, want = float(m[1]), int(m[2]), float(m[3]), float(m[4])
    ct = jax.random.normal(jax.random.split(jax.random.key(0), 1)[0], (9,), jnp.float64)
    expected = ct * jax.nn.sigmoid(x)
    np.testing.assert_allclose(want, expected[idx], rtol=1e-9)
    np.testing.assert_allclose(got, 2 * expected[idx], rtol=1e-9)
    np.testing.assert_allclose(maxdiff, np.max(np.abs(expected)), rtol=1e-3)


def test_wrong_vjp_float32_fails_too():
    x = jnp.linspace(-4.0, 4.0, 9)
    with pytest.raises(AssertionError, match=r"float32\): 9 of 9 elements differ"):
        assert_vjp_matches(make_softplus(1.01), softplus_ref, x)


def test_names_the_argument_and_pytree_path(x64):
    sp_bad = make_softplus(0.5)

    def f(scale, params):
        return scale * sp_bad(params["layers"][1]["w"]) + params["layers"][0]["b"]

    def ref(scale, params):
        return scale * softplus_ref(params["layers"][1]["w"]) + params["layers"][0]["b"]

    params = {"layers": [{"b": jnp.ones(3)}, {"w": jnp.arange(3.0) - 1.0}]}
    assert_vjp_matches(f, ref, 2.0, params, argnums=0)  # scale alone: its VJP is right
    with pytest.raises(AssertionError) as info:
        assert_vjp_matches(f, ref, 2.0, params, argnums=(0, 1))
    msg = str(info.value)
    assert "for argument 1 'params' at path ['layers'][1]['w'] (shape (3,), float64)" in msg


def test_output_mismatch_is_reported(x64):
    x = jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)
    with pytest.raises(AssertionError) as info:
        assert_vjp_matches(make_softplus(), lambda x: softplus_ref(x) + 1e-6, x)
    msg = str(info.value)
    assert "outputs of f=softplus and reference=<lambda> differ" in msg
    assert "5 of 5 elements differ" in msg and "max abs diff 1e-06" in msg

    with pytest.raises(AssertionError, match="shape"):
        assert_vjp_matches(make_softplus(), lambda x: softplus_ref(x)[None], x)
    with pytest.raises(AssertionError, match="different output structures"):
        assert_vjp_matches(make_softplus(), lambda x: (softplus_ref(x), x), x)


def test_random_cotangent_catches_what_ones_hide(x64):
    """A rule that returns mean(g) everywhere is right for g = 1 and wrong otherwise."""

    @jax.custom_vjp
    def ident(x):
        return x

    ident.defvjp(lambda x: (x, None), lambda _, g: (jnp.full_like(g, g.mean()),))
    x = jnp.arange(4.0, dtype=jnp.float64)
    assert_vjp_matches(ident, lambda x: x, x, cotangent=jnp.ones(4, jnp.float64))
    with pytest.raises(AssertionError, match="cotangent: standard normal, seed=3"):
        assert_vjp_matches(ident, lambda x: x, x, seed=3)
    with pytest.raises(AssertionError, match="cotangent: given"):
        assert_vjp_matches(ident, lambda x: x, x, cotangent=jnp.arange(4.0))


def test_tolerances_can_be_loosened(x64):
    x = jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)
    assert_vjp_matches(make_softplus(1.001), softplus_ref, x, rtol=1e-2)


def test_finite_differences_fail_for_a_wrong_vjp(x64):
    x = jnp.linspace(-2.0, 2.0, 7, dtype=jnp.float64)
    with pytest.raises(AssertionError) as info:
        check_finite_differences(make_softplus(2.0), x)
    msg = str(info.value)
    assert "finite-difference check of softplus's reverse-mode derivatives (order=1" in msg
    assert "VJP" in msg and "cotangent projection" in msg


def test_finite_differences_catch_a_wrong_second_derivative(x64):
    """The VJP is right, but its own derivative is not: only order=2 sees it."""

    @jax.custom_vjp
    def softplus(x):
        return softplus_ref(x)

    def bwd(x, g):  # right value, wrong derivative: stop_gradient hides d sigmoid / dx
        return (g * jax.lax.stop_gradient(jax.nn.sigmoid(x)),)

    softplus.defvjp(lambda x: (softplus(x), x), bwd)
    x = jnp.linspace(-2.0, 2.0, 7, dtype=jnp.float64)
    check_finite_differences(softplus, x, order=1)
    with pytest.raises(AssertionError, match=r"order=2.*VJP of VJP"):
        check_finite_differences(softplus, x, order=2)


def test_argument_validation():
    x = jnp.ones(3)
    with pytest.raises(TypeError, match=r"argument 1 'labels'.*argnums="):
        check_finite_differences(cross_entropy, jnp.ones((3, 2)), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="out of range"):
        assert_vjp_matches(softplus_ref, softplus_ref, x, argnums=1)
    with pytest.raises(ValueError, match="repeats"):
        assert_vjp_matches(softplus_ref, softplus_ref, x, argnums=(0, -1))
    with pytest.raises(ValueError, match="order"):
        check_finite_differences(softplus_ref, x, order=0)


# ------------------------------------------------------ the worked example: layer norm


def test_layer_norm_example(x64):
    ln = load_experiment("custom_op_layernorm")
    assert ln.check() < 1e-12
    x, gain, bias = ln.example_inputs(jnp.float64, shape=(2, 3, 6), seed=1)
    assert_vjp_matches(ln.layer_norm, ln.layer_norm_reference, x, gain, bias, argnums=(0, 1, 2))


def test_layer_norm_example_float32():
    ln = load_experiment("custom_op_layernorm")
    x, gain, bias = ln.example_inputs(jnp.float32, shape=(32, 64))
    assert_vjp_matches(ln.layer_norm, ln.layer_norm_reference, x, gain, bias, argnums=(0, 1, 2))


# ------------------------------------------ refuses what it cannot compare (issue 13)


@pytest.mark.parametrize(
    ("args", "argnums", "match"),
    [
        ((jnp.ones((3, 2)), jnp.zeros(3, jnp.int32)), 1, r"argument 1 'labels'.*dtype int32"),
        ((jnp.ones((3, 2)), None), 1, r"argument 1 'labels', which holds no array \(None\)"),
        ((jnp.ones((3, 2)), 2), 1, r"argument 1 'labels'.*dtype int"),
        ((jnp.ones((3, 2)), jnp.zeros(3, bool)), 1, r"argument 1 'labels'.*dtype bool"),
        (({"w": jnp.ones(2), "n": 3},), 0, r"argument 0 'p' at path \['n'\].*dtype int"),
    ],
    ids=["int-array", "None", "python-int", "bool", "int-leaf-in-pytree"],
)
def test_assert_vjp_matches_refuses_non_floating_arguments(args, argnums, match):
    """Differentiating an integer or None argument compares nothing: it is an error,
    never a silent pass with maxdiff 0."""

    def f(p, labels=None):
        return jnp.sum(jax.tree.leaves(p)[0])

    with pytest.raises(TypeError, match=match) as info:
        assert_vjp_matches(f, f, *args, argnums=argnums)
    assert "assert_vjp_matches differentiates" in str(info.value)
    with pytest.raises(TypeError, match=match):
        check_finite_differences(f, *args, argnums=argnums)


def test_float_arguments_next_to_integer_ones_still_work(x64):
    logits, labels = ce_inputs(jnp.float64, n=5, k=4)
    assert (
        assert_vjp_matches(cross_entropy, cross_entropy_reference, logits, labels, argnums=0)
        < 1e-14
    )


def test_no_arguments_is_refused():
    with pytest.raises(ValueError, match="argnums"):
        assert_vjp_matches(lambda: 0.0, lambda: 0.0)
    with pytest.raises(ValueError, match="argnums"):
        check_finite_differences(lambda: 0.0)


def test_complex_leaves_use_their_parts_tolerance(x64):
    assert default_tolerances(jnp.complex128) == default_tolerances(jnp.float64)
    assert default_tolerances(jnp.complex64) == default_tolerances(jnp.float32)
    z = jnp.array([1.0 + 2.0j, -0.5 + 0.25j])
    assert_vjp_matches(lambda z: z * z, lambda z: z**2, z)
    with pytest.raises(AssertionError, match=r"2 of 2 elements differ"):
        assert_vjp_matches(lambda z: z * z, lambda z: z**2 * (1 + 1e-6), z)


def test_integer_outputs_must_be_equal(x64):
    x = jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float64)

    def f(x):
        return softplus_ref(x), jnp.argmax(x)

    assert_vjp_matches(f, f, x)
    with pytest.raises(AssertionError, match=r"output at path \[1\].*1 of 1 elements differ"):
        assert_vjp_matches(f, lambda x: (softplus_ref(x), jnp.argmin(x)), x, atol=10.0)


def test_nan_and_inf_compare_as_documented(x64):
    x = jnp.array([0.0, 1.0, 2.0])

    def with_special(x):
        return x * jnp.array([jnp.nan, jnp.inf, 1.0])

    assert_vjp_matches(with_special, with_special, x)  # NaN matches NaN, inf matches inf
    with pytest.raises(AssertionError, match=r"worst element at index \(0,\)"):
        assert_vjp_matches(with_special, lambda x: x * jnp.array([1.0, jnp.inf, 1.0]), x)
