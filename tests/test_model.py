"""Tests for jaxninja.lecture.model, the network: init shapes and scales, forward modes, the
loss and its gradients."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxninja import ops
from jaxninja.lecture import model

TOL = 1e-12


@functools.cache
def lecture_params(seed: int = 42) -> dict[str, jax.Array]:
    """float32 ``model.init_params`` for H = 64 (eager, as users call it), once per seed.

    (Eager ``jax.random`` compiles a kernel per shape: one H keeps the tests fast.)
    """
    return model.init_params(jax.random.key(seed), 27, n_hidden=64)


def maxdiff(a, b) -> float:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in leaves
    )


def as64(params) -> dict[str, jax.Array]:
    """Cast to float64 (call inside a test with the ``x64`` fixture)."""
    return {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in params.items()}


# ------------------------------------------------------------------------------ init


def expected_shapes(n_hidden: int) -> dict[str, tuple[int, ...]]:
    return {
        "C": (27, 10),
        "W1": (30, n_hidden),
        "b1": (n_hidden,),
        "W2": (n_hidden, 27),
        "b2": (27,),
        "bngain": (1, n_hidden),
        "bnbias": (1, n_hidden),
    }


@pytest.mark.parametrize("n_hidden,count", [(64, 4137), (200, 12297)])
def test_init_params_shapes_and_count(n_hidden, count):
    # jax.eval_shape runs init_params abstractly: shapes and dtypes, nothing compiled
    p = jax.eval_shape(lambda k: model.init_params(k, 27, n_hidden=n_hidden), jax.random.key(0))
    assert {k: v.shape for k, v in p.items()} == expected_shapes(n_hidden)
    assert sum(math.prod(v.shape) for v in p.values()) == count
    assert all(v.dtype == jnp.float32 for v in p.values())
    real = lecture_params()  # and the real thing, for H = 64
    assert {k: v.shape for k, v in real.items()} == expected_shapes(64)
    assert sum(v.size for v in real.values()) == 4137


def test_init_params_float64_and_other_sizes(x64):
    p = jax.eval_shape(
        lambda k: model.init_params(k, 5, n_embd=2, n_hidden=4, block_size=2, dtype=jnp.float64),
        jax.random.key(0),
    )
    assert {k: v.shape for k, v in p.items()} == {
        "C": (5, 2), "W1": (4, 4), "b1": (4,), "W2": (4, 5), "b2": (5,),
        "bngain": (1, 4), "bnbias": (1, 4),
    }  # fmt: skip
    assert all(v.dtype == jnp.float64 for v in p.values())


def test_init_scales_are_the_lecture_s():
    p = {k: np.asarray(v, np.float64) for k, v in lecture_params().items()}
    w1_std = (5 / 3) / math.sqrt(30)  # Kaiming for tanh, fan_in 30
    assert abs(p["W1"].std() / w1_std - 1) < 0.10
    assert abs(p["C"].std() - 1.0) < 0.10
    assert abs(p["W2"].std() / 0.1 - 1) < 0.10
    for k in ("b1", "b2", "bnbias"):
        assert abs(p[k].std() / 0.1 - 1) < 0.25, k
        assert abs(p[k].mean()) < 0.05, k
    assert abs(p["bngain"].mean() - 1.0) < 0.03 and abs(p["bngain"].std() / 0.1 - 1) < 0.25
    # deliberately no zeros: zeros can hide a wrong backward pass
    assert all(np.all(v != 0) for v in p.values())


def test_init_is_deterministic_and_depends_on_the_key():
    a, b = lecture_params(), model.init_params(jax.random.key(42), 27, n_hidden=64)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = lecture_params(seed=0)
    assert not np.array_equal(a["W1"], c["W1"])


# --------------------------------------------------------------------------- forward


def test_forward_with_batch_stats_equals_training_mode(x64, params_np, batch):
    p = jax.tree.map(jnp.asarray, params_np(0, 64))
    X, _ = batch(32, seed=1)

    @jax.jit
    def both(p, X):
        mean, var = ops.batch_stats(model.hidden_preactivation(p, X))
        return model.forward(p, X), model.forward(p, X, {"mean": mean, "var": var})

    train_mode, with_stats = both(p, X)
    assert train_mode.shape == (32, 27) and train_mode.dtype == jnp.float64
    assert maxdiff(train_mode, with_stats) <= TOL


def test_forward_with_stats_is_per_example(x64, params_np, batch):
    """With fixed statistics (evaluation), any batch size works and rows are independent."""
    p = jax.tree.map(jnp.asarray, params_np(1, 16))
    X, _ = batch(5, seed=2)
    stats = {"mean": jnp.full((1, 16), 0.3), "var": jnp.full((1, 16), 2.0)}
    f = jax.jit(model.forward)
    full = f(p, X, stats)
    one = f(p, X[3:4], stats)
    assert one.shape == (1, 27)
    assert maxdiff(one[0], full[3]) <= TOL


# ----------------------------------------------------------------------- loss, grads


def test_grad_of_loss_equals_grad_of_reference_loss(f64_case):
    """jax.grad through the custom-VJP ops == jax.grad through plain jnp (float64)."""
    case = f64_case(64, 32, 0)  # real batch, lecture shapes; shared with test_ninja
    params = case["params"]
    (loss, grads), (ref_loss, ref_grads) = case["loss"], case["reference_loss"]
    assert abs(float(loss) - float(ref_loss)) <= TOL
    assert set(grads) == set(params)
    for k in params:
        assert grads[k].shape == params[k].shape and grads[k].dtype == np.float64
        assert maxdiff(grads[k], ref_grads[k]) <= TOL, k
    # b1 is followed by batch norm, which subtracts the batch mean: d loss / d b1 = 0
    assert float(np.abs(grads["b1"]).max()) < 1e-15
    assert min(float(np.abs(g).max()) for k, g in grads.items() if k != "b1") > 1e-4


def test_loss_with_stats(x64, params_np, batch):
    p = jax.tree.map(jnp.asarray, params_np(3, 64))
    X, Y = batch(32, seed=4)

    @jax.jit
    def both(p, X, Y):
        return (
            jax.value_and_grad(model.loss_with_stats, has_aux=True)(p, X, Y),
            jax.value_and_grad(model.loss)(p, X, Y),
            ops.batch_stats(model.hidden_preactivation(p, X)),
        )

    ((loss, stats), grads), (loss2, grads2), (mean, var) = both(p, X, Y)
    assert abs(float(loss) - float(loss2)) <= TOL
    assert maxdiff(grads, grads2) <= TOL
    assert stats["mean"].shape == stats["var"].shape == (1, 64)
    assert maxdiff((stats["mean"], stats["var"]), (mean, var)) <= TOL


def test_float32_initial_loss_is_the_lecture_s(splits):
    """At init the loss is near -log(1/27) = 3.30, a bit above it with this init (the
    lecture prints 3.78 at step 0), and the float32 path stays float32."""
    p = lecture_params()
    X, Y = splits.data["train"]
    X, Y = X[:4096], Y[:4096]
    logits, (loss, grads) = jax.jit(
        lambda p, X, Y: (model.forward(p, X), jax.value_and_grad(model.loss)(p, X, Y))
    )(p, X, Y)
    assert logits.dtype == loss.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in grads.values())
    assert 3.3 < float(loss) < 3.9
