"""Tests for jaxninja.lecture.ninja, the four exercises: manual gradients against jax.grad,
and the check report."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr

from jaxninja.lecture import model, ninja

TOL = 1e-12

# (n_hidden, batch size, seed): the lecture's H = 64 and n = 32, and a non-lecture H with a
# small odd batch. Batches are real examples from names.txt; float64 throughout.
CASES = [(64, 32, 0), (100, 7, 1)]


def maxdiff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b), initial=0.0))


@pytest.fixture(params=CASES, ids=lambda c: f"H{c[0]}-n{c[1]}")
def case(request, f64_case):
    """See conftest.f64_case: params, X, Y, acts, ex1, ex1_ref, fused, manual, loss..."""
    return f64_case(*request.param)


# ------------------------------------------------------------------------- Exercise 1


def test_exercise1_all_26_gradients_match_autodiff(case):
    grads, ref = case["ex1"], case["ex1_ref"]
    assert set(grads) == set(ref) == set(ninja.GRADIENTS) and len(ninja.GRADIENTS) == 26
    for name in ninja.GRADIENTS:
        assert grads[name].dtype == np.float64, name
        assert maxdiff(grads[name], ref[name]) <= TOL, name
    # the comparison is not vacuous: the gradients are far from zero
    assert np.abs(grads["C"]).max() > 1e-3 and np.abs(grads["hprebn"]).max() > 1e-4


def test_every_gradient_has_the_shape_of_its_value(case):
    acts, grads, Y = case["acts"], case["ex1"], case["Y"]
    values = {**acts, **case["params"]}
    assert len(acts) == 20 and set(acts) == set(ninja.INTERMEDIATES)
    for name, g in grads.items():
        assert g.shape == values[name].shape, name
    assert acts["loss"].shape == ()
    assert grads["emb"].shape == (len(Y), 3, 10) and grads["C"].shape == (27, 10)


def test_forward_atomized_loss_equals_model_loss(case):
    assert abs(float(case["acts"]["loss"]) - float(case["loss"][0])) <= TOL


def test_fused_rules_agree_with_the_atomized_chain(case):
    """Exercises 2 and 3: one expression each, equal to the chain of small steps."""
    grads, ref, fused, Y = case["ex1"], case["ex1_ref"], case["fused"], case["Y"]
    assert maxdiff(fused["logits"], grads["logits"]) <= TOL
    assert maxdiff(fused["logits"], ref["logits"]) <= TOL
    assert maxdiff(fused["hprebn"], grads["hprebn"]) <= TOL
    assert maxdiff(fused["hprebn"], ref["hprebn"]) <= TOL
    # dlogits rows sum to zero (softmax minus one-hot), and the label column is negative
    np.testing.assert_allclose(fused["logits"].sum(1), 0.0, atol=TOL)
    assert np.all(fused["logits"][np.arange(len(Y)), Y] < 0)


# ------------------------------------------------------------------------- Exercise 4


def test_manual_grads_float64(case):
    params = case["params"]
    (loss, grads), (loss_c, grads_c), (loss_r, grads_r) = (
        case["manual"], case["loss"], case["reference_loss"]
    )  # fmt: skip
    assert abs(float(loss) - float(loss_c)) <= TOL and abs(float(loss) - float(loss_r)) <= TOL
    assert set(grads) == set(params)
    for k in model.PARAM_NAMES:
        assert grads[k].shape == params[k].shape and grads[k].dtype == np.float64
        assert maxdiff(grads[k], grads_c[k]) <= TOL, k
        assert maxdiff(grads[k], grads_r[k]) <= TOL, k


@jax.jit
def _exercise4(params, X, Y):
    return (
        ninja.manual_grads(params, X, Y),
        jax.value_and_grad(model.loss)(params, X, Y),
        jax.value_and_grad(model.reference_loss)(params, X, Y),
    )


def test_manual_grads_float32(params_np, batch):
    params = jax.tree.map(jnp.asarray, params_np(6, 64, dtype="float32"))
    X, Y = batch(32, seed=6)
    (loss, grads), (loss_c, grads_c), (_, grads_r) = _exercise4(params, X, Y)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), float(loss_c), rtol=1e-6)
    for k in model.PARAM_NAMES:
        assert grads[k].dtype == jnp.float32, k
        for want in (grads_c[k], grads_r[k]):
            scale = float(jnp.abs(want).max())
            if k == "b1":  # mathematically zero (batch norm follows b1): rounding only
                assert maxdiff(grads[k], want) <= 1e-8
            else:
                assert maxdiff(grads[k], want) <= 1e-6 * scale, k


def _primitive_names(jaxpr) -> set[str]:
    """Every primitive in a jaxpr, recursing into sub-jaxprs (pjit, custom_jvp, scan...)."""
    names = set()

    def subjaxprs(value):
        if isinstance(value, ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from subjaxprs(v)

    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in subjaxprs(value):
                names |= _primitive_names(sub)
    return names


def test_manual_grads_uses_no_autodiff(monkeypatch, params_np, batch):
    params = jax.tree.map(jnp.asarray, params_np(7, 16, dtype="float32"))
    X, Y = batch(8, seed=7)

    # positive control: the jaxpr walk does find the custom VJPs in model.loss
    assert any("custom_vjp" in p for p in _primitive_names(jax.make_jaxpr(model.loss)(params, X, Y).jaxpr))  # noqa: E501  # fmt: skip
    names = _primitive_names(jax.make_jaxpr(ninja.manual_grads)(params, X, Y).jaxpr)
    assert not any("custom_vjp" in p for p in names), names
    assert {"dot_general", "tanh", "rsqrt", "scatter-add"} <= names
    # the walk reaches inside nested jits: "log" is only in log_softmax's sub-jaxpr
    top_level = {
        eqn.primitive.name for eqn in jax.make_jaxpr(ninja.manual_grads)(params, X, Y).eqns
    }
    assert "log" in names and "log" not in top_level

    def forbidden(*args, **kwargs):
        raise AssertionError("manual_grads must not use autodiff")

    for fn in ("grad", "vjp", "value_and_grad", "linearize", "jvp", "jacrev", "jacfwd"):
        monkeypatch.setattr(jax, fn, forbidden)
    # jit traces manual_grads, i.e. runs every Python line of it, with the patches active
    loss, grads = jax.jit(ninja.manual_grads)(params, X, Y)
    monkeypatch.undo()
    # (the values are checked against jax.grad in test_manual_grads_float32/float64)
    assert np.isfinite(float(loss)) and set(grads) == set(params)
    assert all(grads[k].shape == params[k].shape for k in params)


# ----------------------------------------------------------------------------- compare


def test_compare_exact_approximate_maxdiff():
    a = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    same = ninja.compare("same", a, a.copy())
    assert (same.exact, same.approximate, same.maxdiff) == (True, True, 0.0)
    b = a.copy()
    b[1, 0] += 1e-6
    close = ninja.compare("close", b, a)
    assert (close.exact, close.approximate) == (False, True)
    assert close.maxdiff == pytest.approx(float(np.float32(3.000001) - np.float32(3.0)))
    far = ninja.compare("far", a + 0.5, a)
    assert (far.exact, far.approximate, far.maxdiff) == (False, False, 0.5)
    with pytest.raises(ValueError, match="shape"):
        ninja.compare("bad", a, a[0])


def test_approximate_is_relative_for_large_entries_absolute_near_zero():
    """One test, numpy.allclose's, decides the column and the verdict (issue 22): a large
    gradient 2e-6 off is approximately right, a mathematically-zero one 5e-7 off too."""
    big = np.array([1.0, -3.0], np.float32)
    assert ninja.grade("probs", big + 2e-6, big).verdict == ninja.APPROXIMATE
    assert ninja.compare("probs", big + 2e-6, big).maxdiff > 1e-6
    zero = np.zeros(3, np.float32)
    assert ninja.grade("b1", zero + 5e-7, zero).verdict == ninja.APPROXIMATE
    assert ninja.grade("b1", zero + 5e-6, zero).verdict == ninja.WRONG
    assert ninja.grade("probs", big * 1.001, big).verdict == ninja.WRONG
    x64 = np.ones(2)
    assert ninja.grade("probs", x64 + 1e-9, x64).verdict == ninja.WRONG  # float64: tighter


def test_grade_verdicts_shapes_and_hints(capsys):
    ref = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    assert ninja.grade("logits", ref.copy(), ref).verdict == ninja.RIGHT
    for blank in (None, ...):
        g = ninja.grade("logits", blank, ref)
        assert (g.verdict, g.shape, g.comparison) == (ninja.MISSING, None, None)
    g = ninja.grade("b2", ref, ref[0])
    assert (g.verdict, g.shape, g.expected_shape) == (ninja.WRONG, (2, 3), (3,))
    assert g.row() == "b2              | shape (2, 3), expected (3,) | wrong"
    assert g.advice().startswith("expected shape (3,), yours (2, 3); hint: b2 is broadcast")
    assert ninja.grade("x", {"a": 1}, ref).verdict == ninja.WRONG  # not an array
    assert ninja.grade("x", np.full_like(ref, np.nan), ref).verdict == ninja.WRONG
    assert set(ninja.HINTS) >= set(ninja.GRADIENTS) | {"logits (fused)", "hprebn (fused)"}

    ninja.cmp("counts", ..., ref)
    ninja.cmp("counts", ref + 1, ref)
    ninja.cmp("counts", ref, ref)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "counts          | not done yet"
    assert lines[1].startswith("    expected shape (2, 3); hint: counts is used twice")
    assert lines[2].endswith(" | wrong") and "approximate: False | maxdiff: 1.0 " in lines[2]
    assert lines[3].startswith("    expected shape (2, 3), yours (2, 3); hint:")
    assert lines[4] == "counts          | exact: True  | approximate: True  | maxdiff: 0.0"
    assert len(lines) == 5


def test_compare_str_has_the_lecture_s_format():
    # the lecture: f'{s:15s} | exact: {str(ex):5s} | approximate: {str(app):5s} | maxdiff: {maxdiff}'  # noqa: E501
    row = str(ninja.compare("logprobs", np.zeros(3), np.zeros(3)))
    assert row == "logprobs        | exact: True  | approximate: True  | maxdiff: 0.0"
    one = np.ones(1, np.float32)
    row = str(ninja.compare("hprebn", one, one + np.finfo(np.float32).eps))
    pattern = r"(\S+)\s* \| exact: (True |False) \| approximate: (True |False) \| maxdiff: (\S+)"
    m = re.fullmatch(pattern, row)
    assert m and row.index("|") == 16 and m.group(1) == "hprebn"
    assert m.group(2) == "False" and m.group(3) == "True "
    assert m.group(4) == "1.1920928955078125e-07"  # the lecture prints the whole float
