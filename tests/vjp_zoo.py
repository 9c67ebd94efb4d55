"""A zoo of wrong ``jax.custom_vjp`` rules, each modelled on a real JAX issue or a common
mistake (named in its comment), and right rules as controls.

Every wrong rule is right at a natural point and wrong in a setting of
:func:`jaxninja.testing.check_vjp` (``Case.setting``, the one it is modelled for). Used by
tests/test_check_vjp_zoo.py, tests/scripts/check_vjp_shard_cases.py and
experiments/check_vjp_catch_rates.py. Each factory makes fresh functions: some rules keep
Python state.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxninja import ops
from jaxninja.ops._validation import varying_like

RNG = np.random.default_rng(19)
X = jnp.asarray(RNG.standard_normal((6, 5)), jnp.float32)  # activations, 6 rows
GAIN = jnp.asarray(1.0 + 0.1 * RNG.standard_normal(5), jnp.float32)
BIAS = jnp.asarray(0.1 * RNG.standard_normal(5), jnp.float32)
LOGITS = jnp.asarray(2.0 * RNG.standard_normal((6, 5)), jnp.float32)
LABELS = jnp.asarray(RNG.integers(0, 5, 6), jnp.int32)
MASK = jnp.asarray([True, False, True, True, False, True])


class Case(NamedTuple):
    """``check_vjp(f, reference, *args, **options)``; ``setting``: the one the bug is
    modelled for, which catches it on its own (None: a right rule)."""

    name: str
    f: Callable[..., Any]
    reference: Callable[..., Any]
    args: tuple[Any, ...]
    options: dict[str, Any]
    setting: str | None  # None: a right rule (a control)


# ----------------------------------------------------------------------- references


def softplus_ref(x):
    return jnp.logaddexp(x, 0.0)


def layer_norm_ref(x, gain, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return gain * (x - mean) / jnp.sqrt(var + eps) + bias


def cross_entropy_ref(logits, labels, where=None):
    losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]
    return losses if where is None else jnp.where(where, losses, 0.0)


def log_softmax_ref(z, axis=-1):
    return jax.nn.log_softmax(z, axis=axis)


def sin_times_ref(x, y):
    return jnp.sin(x) * y


# ----------------------------------------------------------------- right rules (controls)


def make_softplus(sigmoid: Callable = jax.nn.sigmoid, save: Callable = lambda s: s):
    """softplus with ``dx = g * sigmoid(x)``; ``save`` transforms the residual."""

    @jax.custom_vjp
    def softplus(x):
        return softplus_ref(x)

    softplus.defvjp(lambda x: (softplus(x), save(sigmoid(x))), lambda s, g: (g * s,))
    return softplus


def _ln_bwd(res, dy):
    xhat, inv, gain = res
    dxhat = dy * gain
    d = xhat.shape[-1]
    dx = inv / d * (d * dxhat - dxhat.sum(-1, keepdims=True)
                    - xhat * (dxhat * xhat).sum(-1, keepdims=True))  # fmt: skip
    lead = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(lead), dy.sum(lead)


def make_layer_norm(eps_fwd=1e-5, eps_primal=1e-5, eps_bwd=1e-5, two_pass=True):
    """Layer norm over the last axis, Exercise 3's rule without Bessel's factor."""

    def forward(x, gain, bias, eps):
        xc = x.astype(jnp.promote_types(x.dtype, jnp.float32)) if two_pass else x
        mean = xc.mean(-1, keepdims=True)
        if two_pass:
            var = jnp.square(xc - mean).mean(-1, keepdims=True)
        else:  # one pass in the input dtype: E[x^2] - E[x]^2
            var = jnp.square(x).mean(-1, keepdims=True) - jnp.square(mean)
        inv = lax.rsqrt(var + eps)
        xhat = (xc - mean) * inv
        return (gain * xhat + bias).astype(x.dtype), xhat, var

    @jax.custom_vjp
    def layer_norm(x, gain, bias):
        return forward(x, gain, bias, eps_primal)[0]

    def fwd(x, gain, bias):
        y, xhat, var = forward(x, gain, bias, eps_fwd)
        return y, (xhat, lax.rsqrt(var + eps_bwd), gain)

    def bwd(res, dy):
        dx, dgain, dbias = _ln_bwd(res, dy.astype(res[0].dtype))
        gain = res[2]
        return dx.astype(dy.dtype), dgain.astype(gain.dtype), dbias.astype(gain.dtype)

    layer_norm.defvjp(fwd, bwd)
    return layer_norm


def controls() -> list[Case]:
    """Right rules: check_vjp with defaults passes every one."""
    x, w = X, jnp.asarray(RNG.standard_normal((5, 7)) / 2, jnp.float32)
    y7 = jnp.asarray(RNG.integers(0, 7, 6), jnp.int32)
    return [
        Case("softplus", make_softplus(), softplus_ref, (X[0],), {}, None),
        Case("layer_norm", make_layer_norm(), layer_norm_ref, (X, GAIN, BIAS), {}, None),
        Case(
            "cross_entropy", ops.cross_entropy, ops.cross_entropy_reference, (LOGITS, LABELS),
            {"keyword_variants": [{"where": MASK}]}, None,
        ),
        Case(
            "batch_norm", ops.batch_norm, ops.batch_norm_reference, (X, GAIN, BIAS),
            {"keyword_variants": [{"unbiased": False}]}, None,
        ),
        Case(
            "linear_cross_entropy",
            lambda x, w, y: ops.linear_cross_entropy(x, w, y, chunk_size=3),
            lambda x, w, y: ops.cross_entropy_reference(x @ w, y),
            (x, w, y7), {}, None,
        ),
    ]  # fmt: skip


# ------------------------------------------------------------------------- wrong rules


def wrong_second_argument() -> Case:
    # jax#13048: the custom_vjp tutorial's f(x, y) = sin(x) * y returned -sin(x) * g for y;
    # "only differentiated with respect to the first variable", so nothing noticed.
    @jax.custom_vjp
    def sin_times(x, y):
        return jnp.sin(x) * y

    def fwd(x, y):
        return sin_times(x, y), (jnp.cos(x), jnp.sin(x), y)

    def bwd(res, g):
        cos_x, sin_x, y = res
        return cos_x * g * y, -sin_x * g

    sin_times.defvjp(fwd, bwd)
    return Case("second_argument_sign", sin_times, sin_times_ref, (X[0], X[1]), {}, "all_args")


def wrong_primal_drifted() -> Case:
    # jax#3148, lucidrains/flash-attention-jax#7: f and fwd are two copies of the forward
    # pass and only fwd's is differentiated; here eps was edited in one copy only.
    f = make_layer_norm(eps_primal=1e-2)
    return Case("primal_drifted_from_fwd", f, layer_norm_ref, (X, GAIN, BIAS), {}, "primal")


def wrong_global_residual() -> Case:
    # Common mistake (JAX sharp bits: pure functions; jax#2912 leaked tracers): fwd keeps the
    # residual in Python state instead of returning it; right while one call is alive.
    saved: dict[str, Any] = {}

    @jax.custom_vjp
    def softplus(x):
        return softplus_ref(x)

    def fwd(x):
        saved["x"] = x
        return softplus(x), None

    def bwd(_, g):
        return (g * jax.nn.sigmoid(saved["x"]),)

    softplus.defvjp(fwd, bwd)
    return Case("residual_in_python_state", softplus, softplus_ref, (X,), {}, "two_calls")


def wrong_shape_keyed_cache() -> Case:
    # Common mistake: memoising the softmax per input shape "to save recomputation": a second
    # input of the same shape gets the first one's probabilities.
    cache: dict[tuple[int, ...], Any] = {}

    @jax.custom_vjp
    def ce(logits, labels):
        return cross_entropy_ref(logits, labels)

    def fwd(logits, labels):
        cache.setdefault(logits.shape, jax.nn.softmax(logits))
        return ce(logits, labels), (logits, labels)

    def bwd(res, g):
        logits, labels = res
        p = cache[logits.shape]
        return (p - jax.nn.one_hot(labels, p.shape[1], dtype=p.dtype)) * g[:, None], None

    ce.defvjp(fwd, bwd)
    return Case("cache_keyed_on_shape", ce, cross_entropy_ref, (LOGITS, LABELS), {}, "two_calls")


def wrong_symbolic_zero() -> Case:
    # jax PR #15088 (custom_vjp symbolic_zeros=True): the cotangent of an unused output is a
    # SymbolicZero, not an array; a rule written for two used outputs adds them anyway.
    @jax.custom_vjp
    def normalize_and_mean(x):
        mean = x.mean(0)
        return x - mean, mean

    def fwd(x):
        return normalize_and_mean(x.value), x.value.shape[0]

    def bwd(n, cts):
        dy, dmean = cts
        if isinstance(dy, SymbolicZero):  # the author thought of dy only
            dy = jnp.zeros(dy.shape, dy.dtype)
        return (dy - dy.mean(0) + dmean / n,)

    normalize_and_mean.defvjp(fwd, bwd, symbolic_zeros=True)

    def ref(x):
        return x - x.mean(0), x.mean(0)

    return Case("symbolic_zero_cotangent", normalize_and_mean, ref, (X,), {}, "each_output")


def wrong_squeezed_rows() -> Case:
    # Common mistake: jnp.squeeze without axis= drops every size-1 axis; per-row statistics
    # of a batch of one row lose their row axis and the rule indexes a scalar.
    @jax.custom_vjp
    def ce(logits, labels):
        return cross_entropy_ref(logits, labels)

    def fwd(logits, labels):
        lse = jnp.squeeze(jax.nn.logsumexp(logits, axis=1, keepdims=True))
        return ce(logits, labels), (logits, labels, lse)

    def bwd(res, g):
        logits, labels, lse = res
        p = jnp.exp(logits - lse[:, None])
        return (p - jax.nn.one_hot(labels, p.shape[1], dtype=p.dtype)) * g[:, None], None

    ce.defvjp(fwd, bwd)
    return Case("squeezed_row_statistics", ce, cross_entropy_ref, (LOGITS, LABELS), {}, "one_row")


def wrong_exp_overflow() -> Case:
    # Common mistake: softmax as exp(z) / sum(exp(z)) without subtracting the row max (the
    # lecture's logit_maxes; optax and jax.nn.softmax subtract it): inf / inf at large logits.
    @jax.custom_vjp
    def ce(logits, labels):
        return cross_entropy_ref(logits, labels)

    def bwd(res, g):
        logits, labels = res
        e = jnp.exp(logits)
        p = e / e.sum(1, keepdims=True)
        return (p - jax.nn.one_hot(labels, p.shape[1], dtype=p.dtype)) * g[:, None], None

    ce.defvjp(lambda z, y: (ce(z, y), (z, y)), bwd)
    return Case("softmax_without_max", ce, cross_entropy_ref, (LOGITS, LABELS), {}, "scaled")


def wrong_eps_missing_in_bwd() -> Case:
    # Common mistake: eps added in the forward pass but not in the backward rule's
    # 1/sqrt(var): 1/0 for a constant (e.g. all-zero) feature row.
    f = make_layer_norm(eps_bwd=0.0)
    return Case("eps_missing_in_backward", f, layer_norm_ref, (X, GAIN, BIAS), {}, "scaled")


def wrong_mask_ignored() -> Case:
    # Common mistake (optax's where=, torch's ignore_index): masked rows get loss 0 forward,
    # but the rule's gradient still flows into them.
    @jax.custom_vjp
    def ce(logits, labels, where):
        return cross_entropy_ref(logits, labels, where)

    def bwd(res, g):
        logits, labels = res
        p = jax.nn.softmax(logits)
        return (p - jax.nn.one_hot(labels, p.shape[1], dtype=p.dtype)) * g[:, None], None, None

    ce.defvjp(lambda z, y, w: (ce(z, y, w), (z, y)), bwd)

    def f(logits, labels, where=None):
        return ce(logits, labels, jnp.ones(labels.shape, bool) if where is None else where)

    options = {"keyword_variants": [{"where": MASK}]}
    return Case(
        "mask_ignored_in_backward", f, cross_entropy_ref, (LOGITS, LABELS), options, "keywords"
    )


def wrong_axis_ignored() -> Case:
    # Common mistake: an axis= option honoured forward, the rule's sums hard-coded to -1.
    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def log_softmax(z, axis):
        return jax.nn.log_softmax(z, axis=axis)

    def fwd(z, axis):
        out = log_softmax(z, axis)
        return out, out

    def bwd(axis, out, g):
        return (g - jnp.exp(out) * g.sum(-1, keepdims=True),)

    log_softmax.defvjp(fwd, bwd)

    def f(z, axis=-1):
        return log_softmax(z, axis)

    options = {"keyword_variants": [{"axis": 0}]}
    return Case("axis_ignored_in_backward", f, log_softmax_ref, (LOGITS,), options, "keywords")


def wrong_float32_cotangent() -> Case:
    # jax PR #23779 (custom_vjp keeps a cotangent whose dtype differs from the primal's) and
    # jax#27144: a rule computing in float32 returns float32 cotangents for bfloat16 inputs.
    @jax.custom_vjp
    def softplus(x):
        return softplus_ref(x)

    def fwd(x):
        return softplus(x), x.astype(jnp.float32)

    softplus.defvjp(fwd, lambda x32, g: (g.astype(jnp.float32) * jax.nn.sigmoid(x32),))
    return Case("float32_cotangent_for_16_bit", softplus, softplus_ref, (X,), {}, "low_precision")


def wrong_one_pass_variance() -> Case:
    # Common mistake (flax's BatchNorm computes statistics in float32 for this): variance as
    # E[x^2] - E[x]^2 in the input dtype cancels catastrophically in bfloat16.
    f = make_layer_norm(two_pass=False)
    x = X + 6.0  # activations with an offset: E[x^2] ~ 37, var ~ 1
    return Case("one_pass_variance_16_bit", f, layer_norm_ref, (x, GAIN, BIAS), {}, "low_precision")


def wrong_stop_gradient_residual() -> Case:
    # jax#16049 (higher-order AD goes through fwd and bwd): a residual wrapped in
    # stop_gradient "because it is only used backward" zeroes the second derivative.
    f = make_softplus(save=lax.stop_gradient)
    return Case("stop_gradient_on_residual", f, softplus_ref, (X,), {}, "second_order")


def wrong_nested_rule() -> Case:
    # jax#21220 (nested custom_vjps): the rule calls another custom_vjp op (a sigmoid) whose
    # own rule is wrong; only differentiating the rule itself reaches it.
    @jax.custom_vjp
    def sigmoid(x):
        return jax.nn.sigmoid(x)

    sigmoid.defvjp(lambda x: (sigmoid(x), sigmoid(x)), lambda s, g: (g * s * (1 + s),))
    f = make_softplus(sigmoid=sigmoid)
    return Case("wrong_rule_inside_the_rule", f, softplus_ref, (X,), {}, "second_order")


def wrong_nondiff_array() -> Case:
    # jax#20889, jax#3808 and the custom-derivatives tutorial: integer labels passed through
    # nondiff_argnums; fine while they are constants, an error once they are traced.
    @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
    def ce(logits, labels):
        return cross_entropy_ref(logits, labels)

    def bwd(labels, logits, g):
        p = jax.nn.softmax(logits)
        return ((p - jax.nn.one_hot(labels, p.shape[1], dtype=p.dtype)) * g[:, None],)

    ce.defvjp(lambda z, y: (ce(z, y), z), bwd)
    return Case("labels_in_nondiff_argnums", ce, cross_entropy_ref, (LOGITS, LABELS), {}, "vmap")


WRONG: tuple[Callable[[], Case], ...] = (
    wrong_second_argument,
    wrong_primal_drifted,
    wrong_global_residual,
    wrong_shape_keyed_cache,
    wrong_symbolic_zero,
    wrong_squeezed_rows,
    wrong_exp_overflow,
    wrong_eps_missing_in_bwd,
    wrong_mask_ignored,
    wrong_axis_ignored,
    wrong_float32_cotangent,
    wrong_one_pass_variance,
    wrong_stop_gradient_residual,
    wrong_nested_rule,
    wrong_nondiff_array,
)


# --------------------------------------------------- shard_map rules (several devices)


def _bn_ref(x, gain, bias):
    return ops.batch_norm_reference(x, gain, bias)


def make_synced_batch_norm(psum_bwd=True, extra_psum=False, local_n=False):
    """Batch norm over the rows of all devices (``axis_name``), Exercise 3's rule."""

    def total(a, axis_name):
        s = a.sum(0, keepdims=True)
        return s if axis_name is None else lax.psum(s, axis_name)

    def count(x, axis_name):
        return x.shape[0] if local_n or axis_name is None else x.shape[0] * lax.axis_size(axis_name)

    def stats(x, axis_name):
        n = count(x, axis_name)
        mean = total(x, axis_name) / n
        var = total(jnp.square(x - mean), axis_name) / (n - 1)
        return mean, lax.rsqrt(var + 1e-5)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def bn(x, gain, bias, axis_name):
        mean, inv = stats(x, axis_name)
        return gain * (x - mean) * inv + bias

    def fwd(x, gain, bias, axis_name):
        mean, inv = stats(x, axis_name)
        xhat = (x - mean) * inv
        return gain * xhat + bias, (xhat, inv, gain)

    def bwd(axis_name, res, dy):
        xhat, inv, gain = res
        n = count(dy, axis_name)
        sum_ = functools.partial(total, axis_name=axis_name if psum_bwd else None)
        s1, s2 = sum_(dy), sum_(dy * xhat)
        dx = gain * inv / n * (n * dy - s1 - n / (n - 1) * xhat * s2)
        dgain, dbias = (dy * xhat).sum(0, keepdims=True), dy.sum(0, keepdims=True)
        if axis_name is not None and extra_psum:  # shard_map's transpose sums them already
            dgain, dbias = lax.psum(dgain, axis_name), lax.psum(dbias, axis_name)
        return dx, dgain, dbias

    bn.defvjp(fwd, bwd)

    def batch_norm(x, gain, bias, axis_name=None):
        # Under shard_map(check_vma=True) a replicated gain must be cast to vary like x, or
        # the rule's per-device dgain does not type-check; the cast's transpose is the psum.
        gain, bias = varying_like(x, gain), varying_like(x, bias)
        return bn(x, gain, bias, axis_name)

    return batch_norm


def shard_cases(n_rows: int = 8) -> list[Case]:
    """Synchronised batch norm under shard_map: one right rule, three wrong ones."""
    from jax.sharding import PartitionSpec as P

    x = jnp.asarray(RNG.standard_normal((n_rows, 3)) * 2 + 1, jnp.float32)
    gain = jnp.asarray(1.0 + 0.1 * RNG.standard_normal((1, 3)), jnp.float32)
    bias = jnp.asarray(0.1 * RNG.standard_normal((1, 3)), jnp.float32)
    options = {"shard_specs": ((P("batch"), P(), P()), P("batch"))}
    ours = functools.partial(ops.batch_norm)  # axis_name= passes through
    return [
        Case("batch_norm (ours)", ours, _bn_ref, (x, gain, bias), options, None),
        Case("synced_batch_norm", make_synced_batch_norm(), _bn_ref, (x, gain, bias), options,
             None),
        # Common mistake (flax BatchNorm's axis_name): the rule's sums stay local to a device.
        Case(
            "missing_psum_in_backward", make_synced_batch_norm(psum_bwd=False), _bn_ref,
            (x, gain, bias), options, "shard_map",
        ),
        # jax#19175 / PR #19174: an extra psum in a custom_vjp bwd under shard_map.
        Case(
            "extra_psum_in_backward", make_synced_batch_norm(extra_psum=True), _bn_ref,
            (x, gain, bias), options, "shard_map",
        ),
        # Common mistake: the mean over the local shard's rows, the sums over all devices.
        Case(
            "mean_over_local_shard", make_synced_batch_norm(local_n=True), _bn_ref,
            (x, gain, bias), options, "shard_map",
        ),
    ]  # fmt: skip
