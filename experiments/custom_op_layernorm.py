r"""Worked example: your own op with a hand-written VJP, checked with jaxninja.testing.

Layer norm normalises each row over its *features* (the last axis, ``D`` of them), not
over the batch as batch norm does. Forward, per row, with the biased variance:

.. math::
    \mu = \tfrac1D \textstyle\sum_j x_j,\quad
    \sigma^2 = \tfrac1D \textstyle\sum_j (x_j-\mu)^2,\quad
    \hat x = (x-\mu)(\sigma^2+\epsilon)^{-1/2},\quad y = \gamma\hat x + \beta

Backward, the same derivation as the lecture's Exercise 3 with the sums taken over the
features and ``ddof = 0`` (so the lecture's ``n/(n-1)`` factor becomes 1):

.. math::
    d\hat x = \gamma\,dy,\qquad
    dx = \frac{(\sigma^2+\epsilon)^{-1/2}}{D}\Big(D\,d\hat x - \textstyle\sum_j d\hat x_j
         - \hat x \sum_j d\hat x_j \hat x_j\Big),\qquad
    d\gamma = \textstyle\sum_{\text{rows}} dy\,\hat x,\quad d\beta = \sum_{\text{rows}} dy

Run it (prints the max abs differences)::

    python experiments/custom_op_layernorm.py

and see ``tests/test_testing.py`` for the same checks as tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxninja.testing import assert_vjp_matches, check_finite_differences

Array = jax.Array
EPS = 1e-5


def layer_norm_reference(x: Array, gain: Array, bias: Array) -> Array:
    """Plain-``jnp`` layer norm over the last axis: the autodiff baseline."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return gain * (x - mean) * jax.lax.rsqrt(var + EPS) + bias


@jax.custom_vjp
def layer_norm(x: Array, gain: Array, bias: Array) -> Array:
    """Layer norm over the last axis of ``x`` ``(..., D)``; ``gain``, ``bias`` are ``(D,)``.

    >>> import jax.numpy as jnp
    >>> y = layer_norm(jnp.array([[1.0, 2.0, 3.0]]), jnp.ones(3), jnp.zeros(3))
    >>> [round(float(v), 4) for v in y[0]]
    [-1.2247, 0.0, 1.2247]
    """
    return layer_norm_reference(x, gain, bias)


def _layer_norm_fwd(x, gain, bias):
    mean = x.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + EPS)
    xhat = (x - mean) * rstd
    return gain * xhat + bias, (xhat, rstd, gain)


def _layer_norm_bwd(res, dy):
    xhat, rstd, gain = res
    D = xhat.shape[-1]
    rows = tuple(range(dy.ndim - 1))  # every axis but the features
    dxhat = dy * gain
    dx = (rstd / D) * (
        D * dxhat - dxhat.sum(-1, keepdims=True) - xhat * (dxhat * xhat).sum(-1, keepdims=True)
    )
    return dx, (dy * xhat).sum(rows), dy.sum(rows)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def example_inputs(dtype=jnp.float64, shape=(8, 5), seed=0) -> tuple[Array, Array, Array]:
    """Random ``(x, gain, bias)``; non-trivial gain and bias, so no term can hide."""
    kx, kg, kb = jax.random.split(jax.random.key(seed), 3)
    x = 2.0 * jax.random.normal(kx, shape, dtype) + 0.5
    gain = 1.0 + 0.3 * jax.random.normal(kg, shape[-1:], dtype)
    bias = 0.3 * jax.random.normal(kb, shape[-1:], dtype)
    return x, gain, bias


def check() -> float:
    """Check ``layer_norm``'s VJP both ways in float64; return the max abs VJP diff."""
    with jax.enable_x64(True):
        args = example_inputs(jnp.float64)
        maxdiff = assert_vjp_matches(layer_norm, layer_norm_reference, *args, argnums=(0, 1, 2))
        check_finite_differences(layer_norm, *args, order=2)
    return maxdiff


if __name__ == "__main__":
    print(f"layer_norm float64: VJP matches autodiff, max abs diff {check():.3g}")
    print("layer_norm float64: finite differences (orders 1 and 2) pass")
    x, gain, bias = example_inputs(jnp.float32, shape=(32, 64))
    d32 = assert_vjp_matches(layer_norm, layer_norm_reference, x, gain, bias, argnums=(0, 1, 2))
    print(f"layer_norm float32 (32, 64): VJP matches autodiff, max abs diff {d32:.3g}")
