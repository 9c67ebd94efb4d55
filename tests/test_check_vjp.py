"""Tests for jaxninja.testing.check_vjp (jaxninja/testing/_matrix.py): the settings matrix passes
right rules, names the failing setting of a wrong one, runs one setting per pytest id, and refuses
bad calls with a clear error.

The zoo of wrong rules (one per bug class, each caught) is tests/test_check_vjp_zoo.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxninja import ops
from jaxninja.testing import SETTINGS, VJPReport, check_vjp


def softplus_ref(x):
    return jnp.logaddexp(x, 0.0)


@jax.custom_vjp
def softplus(x):
    return softplus_ref(x)


softplus.defvjp(lambda x: (softplus(x), x), lambda x, g: (g * jax.nn.sigmoid(x),))

X = jnp.linspace(-3.0, 3.0, 8)


def test_every_setting_is_its_own_pytest_id():
    assert len(SETTINGS) == len(set(SETTINGS)) == 14
    assert SETTINGS[0] == "all_args" and "shard_map" in SETTINGS


@pytest.mark.parametrize("setting", SETTINGS)
def test_right_softplus_passes_each_setting(setting):
    """The pytest form: one setting per test id."""
    report = check_vjp(softplus, softplus_ref, X, settings=[setting])
    assert isinstance(report, VJPReport)
    not_for_one_output = {"each_output": "one output", "keywords": "no keyword_variants"}
    not_for_one_output["shard_map"] = "no shard_specs"
    if setting in not_for_one_output:
        assert report.checked == ()
        assert not_for_one_output[setting] in report.not_applicable[setting]
    else:
        assert report.checked == (setting,)
        bound = 2e-2 if setting == "low_precision" else 1e-4  # bfloat16's rounding
        assert 0.0 <= report.max_abs_diff[setting] < bound


def test_skip_switches_settings_off_by_name():
    report = check_vjp(softplus, softplus_ref, X, settings=["all_args", "jit"], skip=["jit"])
    assert report.checked == ("all_args",)


def test_wrong_factor_names_setting_argument_and_worst_element():
    @jax.custom_vjp
    def twice(x):
        return softplus_ref(x)

    twice.defvjp(lambda x: (twice(x), x), lambda x, g: (2 * g * jax.nn.sigmoid(x),))
    with pytest.raises(AssertionError) as err:
        check_vjp(twice, softplus_ref, X)
    msg = str(err.value)
    assert "setting 'all_args'" in msg and "f=twice vs reference=softplus_ref" in msg
    assert "VJP differs for argument 0 'x' (shape (8,), float32)" in msg
    assert "worst element at index" in msg and "reference gives" in msg


def test_f_raising_where_the_reference_does_not_is_a_failure():
    @jax.custom_vjp
    def squeezing(x):
        return softplus_ref(x)

    def fwd(x):  # a per-row residual squeezed: at one row it becomes a scalar
        return squeezing(x), (x, jnp.squeeze(jnp.max(x, axis=1, keepdims=True)))

    def bwd(res, g):
        x, row_max = res
        return (g * jax.nn.sigmoid(x) + 0.0 * row_max[:, None],)

    squeezing.defvjp(fwd, bwd)
    x = jnp.ones((4, 3))
    check_vjp(squeezing, softplus_ref, x, settings=["all_args"])
    with pytest.raises(AssertionError, match=r"setting 'one_row'.*\n.*f raised"):
        check_vjp(squeezing, softplus_ref, x, settings=["one_row"])


def test_a_setting_where_the_reference_raises_too_is_not_applicable():
    x, g, b = jnp.ones((4, 3)) + jnp.arange(3.0), jnp.ones((1, 3)), jnp.zeros((1, 3))
    report = check_vjp(ops.batch_norm, ops.batch_norm_reference, x, g, b, settings=["one_row"])
    assert report.checked == ()
    assert "at least 2 rows" in report.not_applicable["one_row"]


def test_pytree_of_parameters_and_integer_arguments():
    """A params dict and an integer array: every float leaf differentiated, ints closed over."""

    def loss(params, x, labels, f):
        return f(x @ params["w"] + params["b"], labels)

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), "b": jnp.zeros(5)}
    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, 6), jnp.int32)

    def ours(p, x, y):
        return loss(p, x, y, ops.cross_entropy)

    def ref(p, x, y):
        return loss(p, x, y, ops.cross_entropy_reference)

    report = check_vjp(ours, ref, params, x, labels, settings=["all_args", "vmap"])
    assert report.checked == ("all_args", "vmap")

    def wrong_b(p, x, y):  # the bias gradient dropped
        return ours({"w": p["w"], "b": jax.lax.stop_gradient(p["b"])}, x, y)

    with pytest.raises(AssertionError, match=r"argument 0 'p' at path \['b'\]"):
        check_vjp(wrong_b, ref, params, x, labels, settings=["all_args"])


# --------------------------------------------------------------------------- bad calls


def test_reference_with_another_output_structure_is_a_type_error():
    with pytest.raises(TypeError, match="different output structures or shapes"):
        check_vjp(softplus, lambda x: (softplus_ref(x), x), X)
    with pytest.raises(TypeError, match=r"f: \(8,\)\n  reference: \(\)"):
        check_vjp(softplus, lambda x: softplus_ref(x).sum(), X)


def test_argnums_out_of_range_or_integer_is_clear():
    y = jnp.arange(8)
    with pytest.raises(ValueError, match="argnums=2 is out of range for 2 positional args"):
        check_vjp(lambda x, y: x * y, lambda x, y: x * y, X, y, argnums=2)
    with pytest.raises(TypeError, match="argument 1 'y' in argnums holds no floating array"):
        check_vjp(lambda x, y: x * y, lambda x, y: x * y, X, y, argnums=1)
    with pytest.raises(TypeError, match="no argument holds a floating array"):
        check_vjp(lambda y: y, lambda y: y, y)


def test_unknown_setting_and_bad_keyword_variants():
    with pytest.raises(ValueError, match="unknown setting 'vamp'; the settings are all_args"):
        check_vjp(softplus, softplus_ref, X, skip=["vamp"])
    with pytest.raises(TypeError, match="keyword_variants must be a sequence of dicts"):
        check_vjp(softplus, softplus_ref, X, keyword_variants={"axis": 0})
    with pytest.raises(TypeError, match="reference must be callable"):
        check_vjp(softplus, None, X)


def test_shard_specs_that_do_not_fit_are_value_errors():
    x = jnp.ones((6, 3))

    def bn(x, axis_name=None):
        return ops.batch_norm(x, 1.0, 0.0, axis_name=axis_name)

    def ref(x):
        return ops.batch_norm_reference(x, 1.0, 0.0)

    with pytest.raises(ValueError, match="exactly one mesh axis name"):
        check_vjp(bn, ref, x, shard_specs=((P(),), P()))
    with pytest.raises(ValueError, match="one spec per positional argument"):
        check_vjp(bn, ref, x, shard_specs=((P("d"), P()), P("d")))
    with pytest.raises(ValueError, match=r"has fewer axes than P\(None, None, 'd'\)"):
        check_vjp(bn, ref, x, shard_specs=((P(None, None, "d"),), P("d")))
    with pytest.raises(TypeError, match="not a jax.sharding.PartitionSpec"):
        check_vjp(bn, ref, x, shard_specs=(("d",), P("d")))
    with pytest.raises(TypeError, match="f takes no axis_name"):
        check_vjp(ref, ref, x, shard_specs=((P("d"),), P("d")))
