"""Differential tests against the peers a user would switch from (a cross-cutting suite:
jaxninja.ops against optax, flax and unfused references).

* ``cross_entropy`` vs ``optax.softmax_cross_entropy_with_integer_labels``: values and
  gradients (row masks, per-logit masks, tuple axes), and optax's own test class for
  integer labels with our op swapped in (its forward-mode ``check_grads`` excepted: no
  ``custom_vjp`` has forward mode, so that one check runs in reverse mode);
* ``batch_norm(unbiased=False)`` vs ``flax.linen.BatchNorm``: values, gradients, masks,
  running averages, and ``axis_name`` inside ``shard_map`` over 4 forced CPU devices
  (in a fresh process: the device count is fixed when jax starts);
* ``linear_cross_entropy`` vs the unfused ``cross_entropy(x @ w + b)`` in float64.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.losses import _classification, _classification_test

from jaxninja import ops
from jaxninja.testing import assert_vjp_matches

TOL = 1e-12
ROOT = Path(__file__).resolve().parents[1]
optax_ce = optax.softmax_cross_entropy_with_integer_labels


def _ce_inputs(shape, axis, seed):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(shape) * 3.0
    axes = (axis,) if isinstance(axis, int) else axis
    axes = tuple(a % len(shape) for a in axes)
    label_shape = tuple(d for i, d in enumerate(shape) if i not in axes)
    v = int(np.prod([shape[a] for a in axes]))
    y = rng.integers(0, v, label_shape)
    return jnp.asarray(z), jnp.asarray(y, jnp.int32), rng.random(label_shape) < 0.6


# ------------------------------------------------------------------------ optax


@pytest.mark.parametrize(
    "shape,axis", [((7, 11), -1), ((3, 5, 4), 1), ((6, 4), 0), ((2, 3, 4, 5), (3, 1))]
)
@pytest.mark.parametrize("masked", [False, True])
def test_cross_entropy_matches_optax(x64, shape, axis, masked):
    z, y, where = _ce_inputs(shape, axis, seed=len(shape))
    w = jnp.asarray(where) if masked else None
    maxdiff = assert_vjp_matches(
        lambda z: ops.cross_entropy(z, y, axis, w), lambda z: optax_ce(z, y, axis, w), z
    )
    assert maxdiff <= TOL


def test_cross_entropy_per_logit_mask_matches_optax(x64):
    z, y, _ = _ce_inputs((6, 9), -1, seed=40)
    mask = jnp.asarray(np.random.default_rng(40).random((6, 9)) < 0.5).at[2].set(False)
    assert_vjp_matches(
        lambda z: ops.cross_entropy(z, y, where=mask), lambda z: optax_ce(z, y, where=mask), z
    )


@pytest.mark.parametrize("dtype,atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_cross_entropy_low_precision_close_to_optax(dtype, atol):
    z, y, _ = _ce_inputs((16, 300), -1, seed=41)
    z = z.astype(dtype)

    def both(f):
        return jax.jit(jax.value_and_grad(lambda z: f(z, y).astype(jnp.float32).mean()))(z)

    (ours, d_ours), (theirs, d_theirs) = both(ops.cross_entropy), both(optax_ce)
    assert d_ours.dtype == d_theirs.dtype == dtype
    np.testing.assert_allclose(float(ours), float(theirs), rtol=atol)
    np.testing.assert_allclose(
        np.asarray(d_ours, np.float32), np.asarray(d_theirs, np.float32), atol=atol / 16
    )


class OptaxIntegerLabelsTestWithOurOp(
    _classification_test.SoftmaxCrossEntropyWithIntegerLabelsTest
):
    """optax's own test class for integer labels, run against ``ops.cross_entropy``."""

    def setUp(self):
        super().setUp()
        patched = functools.partial(ops.cross_entropy)  # a new object: the patch is visible
        original = _classification.softmax_cross_entropy_with_integer_labels
        _classification.softmax_cross_entropy_with_integer_labels = patched
        self.addCleanup(
            setattr, _classification, "softmax_cross_entropy_with_integer_labels", original
        )

    def test_gradient(self):
        """optax's test_gradient with check_grads in reverse mode (custom_vjp has no
        forward mode), then its finite-gradient-under-a-mask check unchanged."""
        assert _classification.softmax_cross_entropy_with_integer_labels.func is ops.cross_entropy
        jax.test_util.check_grads(
            functools.partial(ops.cross_entropy, labels=self.ts), (self.ys,), order=1,
            modes=["rev"],
        )  # fmt: skip
        loss_fn = lambda *args, **kw: jnp.sum(ops.cross_entropy(*args, **kw))  # noqa: E731
        gs = jax.grad(loss_fn)(self.ys, labels=self.ts, where=self.mask)
        self.assertTrue(jnp.all(jnp.isfinite(gs)))


# ------------------------------------------------------------------------- flax


def _flax_bn(x, scale, bias, mask=None, axis_name=None):
    """flax.linen.BatchNorm in training mode with the given scale/bias: ``(y, stats)``."""
    bn = nn.BatchNorm(
        use_running_average=False, momentum=0.9, epsilon=1e-5, axis_name=axis_name,
        dtype=x.dtype, param_dtype=x.dtype, use_fast_variance=False,
    )  # fmt: skip
    variables = {
        "params": {"scale": scale, "bias": bias},
        "batch_stats": {"mean": jnp.zeros_like(scale), "var": jnp.ones_like(scale)},
    }
    return bn.apply(variables, x, mask=mask, mutable=["batch_stats"])


@pytest.mark.parametrize("masked", [False, True])
def test_batch_norm_biased_matches_flax(x64, masked):
    rng = np.random.default_rng(42)
    x = jnp.asarray(rng.standard_normal((12, 5)) * 2 + 1)
    scale, bias = jnp.asarray(rng.random(5) + 0.5), jnp.asarray(rng.standard_normal(5))
    mask = jnp.asarray(rng.random((12, 1)) < 0.7).at[:2].set(True) if masked else None
    maxdiff = assert_vjp_matches(
        lambda x, s, b: ops.batch_norm(x, s, b, unbiased=False, where=mask),
        lambda x, s, b: _flax_bn(x, s, b, None if mask is None else jnp.broadcast_to(
            mask, x.shape))[0],
        x, scale, bias, argnums=(0, 1, 2),
    )  # fmt: skip
    assert maxdiff <= 1e-12
    # flax's running averages are ours with momentum=0.9 (its statistics, ours): our
    # (1, 5) statistics update flax-shaped (5,) running averages as they are
    _, state = _flax_bn(x, scale, bias, None if mask is None else jnp.broadcast_to(mask, x.shape))
    mean, var = ops.batch_stats(x, unbiased=False, where=mask)
    running = ops.running_average(
        {"mean": jnp.zeros(5), "var": jnp.ones(5)}, {"mean": mean, "var": var}, 0.9
    )
    for k in ("mean", "var"):
        assert running[k].shape == state["batch_stats"][k].shape == (5,)
        np.testing.assert_allclose(running[k], state["batch_stats"][k], rtol=0, atol=TOL)


def test_batch_norm_eval_matches_flax_running_average_mode(x64):
    rng = np.random.default_rng(43)
    x = jnp.asarray(rng.standard_normal((7, 4)))
    scale, bias = jnp.asarray(rng.random(4) + 0.5), jnp.asarray(rng.standard_normal(4))
    mean, var = jnp.asarray(rng.standard_normal(4)), jnp.asarray(rng.random(4) + 0.1)
    bn = nn.BatchNorm(use_running_average=True, epsilon=1e-3, dtype=jnp.float64)
    want = bn.apply(
        {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}, x
    )
    got = ops.batch_norm_eval(x, scale, bias, mean, var, eps=1e-3)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


# ------------------------------------------------------------- fused linear + CE


@pytest.mark.parametrize(
    "lead,d,v,chunk,with_bias",
    [((9,), 4, 13, 4, True), ((2, 5), 3, 23, 7, False), ((3, 2, 2), 5, 16, 16, True),
     ((6,), 2, 10, None, True), ((4,), 3, 9, 100, False)],
)  # fmt: skip
def test_linear_cross_entropy_matches_unfused(x64, lead, d, v, chunk, with_bias):
    """float64 to 1e-12; V not a multiple of the chunk; leading dims; a row mask."""
    rng = np.random.default_rng(sum(lead) + v)
    x = jnp.asarray(rng.standard_normal((*lead, d)))
    w = jnp.asarray(rng.standard_normal((d, v)))
    b = jnp.asarray(rng.standard_normal(v)) if with_bias else jnp.zeros(v)
    y = jnp.asarray(rng.integers(0, v, lead), jnp.int32)
    y = y.reshape(-1).at[0].set(v - 1).reshape(lead)  # a label in the last (slid) chunk
    where = jnp.asarray(rng.random(lead) < 0.7)
    for mask in (None, where):

        def fused(x, w, b, mask=mask):
            return ops.linear_cross_entropy(
                x, w, y, bias=b if with_bias else None, where=mask, chunk_size=chunk
            )

        def unfused(x, w, b, mask=mask):
            return ops.cross_entropy_reference(x @ w + b, y, where=mask)

        assert assert_vjp_matches(fused, unfused, x, w, b, argnums=(0, 1, 2) if with_bias
                                  else (0, 1)) <= TOL  # fmt: skip


def test_linear_cross_entropy_bad_labels_and_masked_rows(x64):
    rng = np.random.default_rng(44)
    x = jnp.asarray(rng.standard_normal((6, 3)))
    w = jnp.asarray(rng.standard_normal((3, 11)))
    y = jnp.asarray([0, 11, -1, 10, 4, 2])
    losses = ops.linear_cross_entropy(x, w, y, chunk_size=4)
    unfused = ops.cross_entropy(x @ w, y)
    np.testing.assert_array_equal(np.isnan(losses), [False, True, True, False, False, False])
    np.testing.assert_allclose(losses, unfused, rtol=0, atol=TOL)
    # masked: the bad labels and non-finite rows give 0 loss and exactly 0 gradient
    where = jnp.array([True, False, False, True, False, True])
    x_bad = x.at[4].set(jnp.nan).at[1].set(jnp.inf)
    value, (dx, dw) = jax.value_and_grad(
        lambda x, w: ops.linear_cross_entropy(x, w, y, where=where, chunk_size=4).sum(), (0, 1)
    )(x_bad, w)
    assert np.isfinite(float(value)) and np.all(np.isfinite(dw))
    assert np.all(np.asarray(dx)[[1, 2, 4]] == 0.0)
    keep = np.asarray(where)
    want_dx, want_dw = jax.grad(lambda x, w: ops.cross_entropy(x @ w, y[keep]).sum(), (0, 1))(
        x[keep], w
    )
    np.testing.assert_allclose(dx[keep], want_dx, rtol=0, atol=TOL)
    np.testing.assert_allclose(dw, want_dw, rtol=0, atol=TOL)


# ---------------------------------------------- 4 forced CPU devices, shard_map

_SHARDED = textwrap.dedent(
    """
    import json, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from jax.sharding import Mesh, PartitionSpec as P
    jax.config.update("jax_enable_x64", True)
    import flax.linen as nn
    from jaxninja import ops

    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 5)) * 2 + 1)
    dy = jnp.asarray(rng.standard_normal((16, 5)))
    scale, bias = jnp.asarray(rng.random(5) + 0.5), jnp.asarray(rng.standard_normal(5))

    def flax_bn(x, s, b, axis_name):
        bn = nn.BatchNorm(use_running_average=False, axis_name=axis_name, dtype=x.dtype,
                          param_dtype=x.dtype, use_fast_variance=False)
        v = {"params": {"scale": s, "bias": b},
             "batch_stats": {"mean": jnp.zeros(5), "var": jnp.ones(5)}}
        return bn.apply(v, x, mutable=["batch_stats"])[0]

    def ours(x, s, b, axis_name):
        return ops.batch_norm(x, s, b, unbiased=False, axis_name=axis_name)

    def grads(bn):
        def local(x, s, b, dy):
            loss = lambda x, s, b: lax.psum((bn(x, s, b, "d") * dy).sum(), "d")
            return (bn(x, s, b, "d"), *jax.grad(loss, argnums=(0, 1, 2))(x, s, b))
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P(), P(), P("d")),
                                     out_specs=(P("d"), P("d"), P(), P())))(x, scale, bias, dy)

    def global_ref(x, s, b):
        return (ops.batch_norm_reference(x, s, b, unbiased=False) * dy).sum()

    want = (ops.batch_norm_reference(x, scale, bias, unbiased=False),
            *jax.grad(global_ref, argnums=(0, 1, 2))(x, scale, bias))
    got_ours, got_flax = grads(ours), grads(flax_bn)
    diff = lambda a, b: max(float(jnp.abs(p - q).max()) for p, q in zip(a, b))

    # linear_cross_entropy data-parallel over rows, w and bias replicated
    xs = jnp.asarray(rng.standard_normal((16, 4)))
    w = jnp.asarray(rng.standard_normal((4, 19)))
    b = jnp.asarray(rng.standard_normal(19))
    y = jnp.asarray(rng.integers(0, 19, 16))
    def lce(x, w, b, y, axis_name=None):
        loss = ops.linear_cross_entropy(x, w, y, bias=b, chunk_size=6).sum()
        return loss if axis_name is None else lax.psum(loss, axis_name)
    lce_want = jax.grad(lce, argnums=(0, 1, 2))(xs, w, b, y)
    lce_got = jax.jit(jax.shard_map(
        lambda x, w, b, y: jax.grad(lce, argnums=(0, 1, 2))(x, w, b, y, "d"), mesh=mesh,
        in_specs=(P("d"), P(), P(), P("d")), out_specs=(P("d"), P(), P())))(xs, w, b, y)
    print(json.dumps({"ours_vs_global": diff(got_ours, want),
                      "ours_vs_flax": diff(got_ours, got_flax),
                      "lce_vs_one_device": diff(lce_got, lce_want)}))
    """
)


@pytest.fixture(scope="module")
def sharded():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_synced_batch_norm_matches_flax_under_shard_map(sharded):
    """4 devices: y, dx, dscale, dbias equal flax's BatchNorm(axis_name) and the
    one-device op on the global batch (float64)."""
    assert sharded["ours_vs_flax"] <= 1e-12
    assert sharded["ours_vs_global"] <= 1e-12


def test_linear_cross_entropy_data_parallel_under_shard_map(sharded):
    assert sharded["lce_vs_one_device"] <= 1e-12
