"""A user's typed code against the public API: `mypy --strict` must pass on it (test_packaging)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxninja.ops import batch_norm, cross_entropy, linear_cross_entropy
from jaxninja.testing import assert_vjp_matches


def mean_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return cross_entropy(logits, labels).mean()


def fused_loss(x: jax.Array, w: jax.Array, labels: jax.Array) -> jax.Array:
    return linear_cross_entropy(x, w, labels).mean()


def normalised(x: jax.Array, gain: jax.Array, bias: jax.Array) -> jax.Array:
    return batch_norm(x, gain, bias, axis=0)


def check() -> float:
    logits = jnp.zeros((2, 3))
    labels = jnp.zeros((2,), jnp.int32)
    return assert_vjp_matches(mean_loss, mean_loss, logits, labels, argnums=0)
