"""The stax interop example runs: training, a vmapped ensemble, donation, our custom VJPs."""

from __future__ import annotations

import functools
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_experiment

from jaxninja import ops
from jaxninja.testing import assert_vjp_matches


@pytest.fixture(scope="module")
def stax_ex() -> ModuleType:
    return load_experiment("interop_stax")


@pytest.fixture(scope="module")
def data(stax_ex):
    return stax_ex.make_data()


def test_loss_decreases_with_the_jitted_donating_step(stax_ex, data):
    X, Y, vocab_size = data
    init_fn, apply_fn = stax_ex.make_model(vocab_size)
    params = stax_ex.init(init_fn, jax.random.key(0))
    step = stax_ex.make_train_step(apply_fn)
    losses = []
    for _ in range(30):
        old = params
        params, loss = step(params, X, Y, 0.1)
        losses.append(float(loss))
    # The donated buffers were consumed: the step updated the params in place.
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(old))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.5, losses
    assert losses[-1] < losses[len(losses) // 2] < losses[0]


def test_vmapped_ensemble_equals_looping_members(stax_ex, data):
    X, Y, vocab_size = data
    X, Y = X[:64], Y[:64]
    init_fn, apply_fn = stax_ex.make_model(vocab_size)
    keys = jax.random.split(jax.random.key(1), 3)
    stacked = jax.vmap(functools.partial(stax_ex.init, init_fn))(keys)
    members = [stax_ex.init(init_fn, k) for k in keys]
    # Different seeds give different members, and vmapped init = per-member init.
    for m, member in enumerate(members):
        for a, b in zip(
            jax.tree_util.tree_leaves(member), jax.tree_util.tree_leaves(stacked), strict=True
        ):
            np.testing.assert_allclose(b[m], a, rtol=1e-6, atol=1e-6)
    w0 = jax.tree_util.tree_leaves(stacked)[0]
    assert not np.allclose(w0[0], w0[1])

    ens_step = stax_ex.make_train_step(apply_fn, ensemble=True)
    one_step = stax_ex.make_train_step(apply_fn)
    for _ in range(3):
        stacked, ens_loss = ens_step(stacked, X, Y, 0.1)
        stepped = [one_step(p, X, Y, 0.1) for p in members]
        members = [p for p, _ in stepped]
        np.testing.assert_allclose(ens_loss, [float(l) for _, l in stepped], rtol=1e-5)
    for m, member in enumerate(members):
        for a, b in zip(
            jax.tree_util.tree_leaves(member), jax.tree_util.tree_leaves(stacked), strict=True
        ):
            np.testing.assert_allclose(b[m], a, rtol=1e-5, atol=1e-6)


def test_train_runs_an_ensemble(stax_ex, data):
    X, Y, vocab_size = data
    params, losses = stax_ex.train(X, Y, vocab_size, n_members=2, steps=40, batch_size=32)
    assert losses[0].shape == (2,)
    first, last = np.asarray(losses[0]), np.mean(np.asarray(losses[-10:]), axis=0)
    assert (last < first).all(), (first, last)


def test_loss_jaxpr_calls_our_custom_vjps(stax_ex, data):
    X, Y, vocab_size = data
    init_fn, apply_fn = stax_ex.make_model(vocab_size)
    params = stax_ex.init(init_fn, jax.random.key(0))
    jaxpr = str(jax.make_jaxpr(functools.partial(stax_ex.loss_fn, apply_fn))(params, X, Y))
    assert jaxpr.count("custom_vjp_call") == 2  # batch_norm and cross_entropy
    ref_jaxpr = str(
        jax.make_jaxpr(functools.partial(stax_ex.loss_fn, apply_fn, reference=True))(params, X, Y)
    )
    assert ref_jaxpr.count("custom_vjp_call") == 1  # the model's batch norm is still ours
    _, ref_apply = stax_ex.make_model(vocab_size, reference=True)
    ref_jaxpr = str(
        jax.make_jaxpr(functools.partial(stax_ex.loss_fn, ref_apply, reference=True))(params, X, Y)
    )
    assert "custom_vjp_call" not in ref_jaxpr


def test_grad_runs_our_backward_rules(stax_ex, data, monkeypatch):
    """jax.grad of the stax loss calls the hand-written bwd functions of jaxninja.ops."""
    calls: list[str] = []
    for op in (ops._cross_entropy, ops._batch_norm):  # the custom_vjp objects
        assert isinstance(op, jax.custom_vjp), "jaxninja.ops changed its internals"
        bwd = op.bwd

        def counting(*a, _bwd=bwd, _name=op.__name__):
            calls.append(_name)
            return _bwd(*a)

        monkeypatch.setattr(op, "bwd", counting)
    X, Y, vocab_size = data
    init_fn, apply_fn = stax_ex.make_model(vocab_size)
    params = stax_ex.init(init_fn, jax.random.key(0))
    jax.make_jaxpr(jax.grad(functools.partial(stax_ex.loss_fn, apply_fn)))(params, X, Y)
    assert sorted(calls) == ["_batch_norm", "_cross_entropy"]


def test_grad_through_the_model_matches_autodiff(stax_ex, data):
    """Whole-model gradient on our ops vs on the plain-jnp references, in float64."""
    X, Y, vocab_size = data
    with jax.enable_x64(True):
        init_fn, apply_fn = stax_ex.make_model(vocab_size)
        _, ref_apply = stax_ex.make_model(vocab_size, reference=True)
        params = stax_ex.init(init_fn, jax.random.key(0))
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
        assert_vjp_matches(
            functools.partial(stax_ex.loss_fn, apply_fn),
            functools.partial(stax_ex.loss_fn, ref_apply, reference=True),
            params,
            X[:48],
            Y[:48],
        )
