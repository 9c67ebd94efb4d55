"""The interop examples run (a cross-cutting suite: jaxninja.ops inside stax, flax nnx and
equinox models): training, a vmapped ensemble, donation, our custom VJPs."""

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
    # the custom_vjp objects
    for op in (ops._cross_entropy._cross_entropy, ops._batch_norm._batch_norm):
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


# ------------------------------------------------------------- Flax NNX, Equinox


@pytest.fixture(scope="module")
def nnx_ex() -> ModuleType:
    return load_experiment("interop_flax_nnx")


@pytest.fixture(scope="module")
def eqx_ex() -> ModuleType:
    return load_experiment("interop_equinox")


def test_nnx_module_trains_on_our_ops_and_evaluates_with_running_stats(nnx_ex):
    model, losses = nnx_ex.train(steps=40)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses
    X, Y, _ = nnx_ex.make_data()
    mean, var = ops.batch_stats(model.hidden(model.embed(X).reshape(X.shape[0], -1)))
    assert not np.allclose(model.bn.mean[...], 0.0)  # running averages moved ...
    np.testing.assert_allclose(model.bn.mean[...], mean, rtol=0.1, atol=0.1)  # ... to these
    model.eval()
    eval_loss = float(ops.cross_entropy(model(X), Y).mean())
    assert abs(eval_loss - losses[-1]) < 0.2


def test_nnx_gradient_is_autodiff_of_the_reference_model(nnx_ex):
    from flax import nnx

    X, Y, vocab = nnx_ex.make_data()
    with jax.enable_x64(True):
        models = [nnx_ex.MLP(vocab, reference=r, rngs=nnx.Rngs(0)) for r in (False, True)]
        splits = [nnx.split(m, nnx.Param, ...) for m in models]
        params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), splits[0][1])

        def loss_of(graphdef):
            return lambda params, rest: nnx.merge(graphdef, params, rest, copy=True).loss(X, Y)

        (g0, _, rest), (g1, _, _) = splits
        jaxpr = str(jax.make_jaxpr(loss_of(g0))(params, rest))
        assert jaxpr.count("custom_vjp_call") == 2  # batch norm and the fused head + loss
        assert_vjp_matches(loss_of(g0), loss_of(g1), params, rest)


def test_equinox_module_trains_with_batch_norm_synchronised_over_vmap(eqx_ex):
    _, losses = eqx_ex.train(steps=40)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses


def test_equinox_gradient_is_autodiff_of_the_reference_model(eqx_ex):
    import equinox as eqx

    X, Y, vocab = eqx_ex.make_data()
    with jax.enable_x64(True):
        models = [eqx_ex.MLP(vocab, jax.random.key(0), reference=r) for r in (False, True)]
        parts = [eqx.partition(m, eqx.is_array) for m in models]
        leaves = [p.astype(jnp.float64) for p in jax.tree_util.tree_leaves(parts[0][0])]

        def loss_of(params, static):  # of the leaves: the two models' treedefs differ
            treedef = jax.tree_util.tree_structure(params)
            return lambda leaves: eqx_ex.loss(
                eqx.combine(jax.tree_util.tree_unflatten(treedef, leaves), static), X, Y
            )

        ours, ref = (loss_of(*part) for part in parts)
        assert str(jax.make_jaxpr(ours)(leaves)).count("custom_vjp_call") == 2
        assert_vjp_matches(ours, ref, leaves)
