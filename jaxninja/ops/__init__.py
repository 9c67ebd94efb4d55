"""Reusable ops with hand-written VJPs: the fused rules of Exercises 2 and 3.

``cross_entropy``, ``linear_cross_entropy``, ``batch_norm`` and
``batch_norm_with_stats`` are ``jax.custom_vjp`` ops whose backward rules are
differentiable ``jnp`` (``jax.jacrev(jax.grad(f))`` works; ``jax.jvp`` of the op itself
raises ``TypeError``); the rest is plain ``jnp``, the ``*_reference`` functions being the
autodiff baselines. 16-bit inputs are computed in float32 and come back in their dtype
(``linear_cross_entropy``'s losses: in float32).
"""

from jaxninja.ops._batch_norm import (
    batch_norm,
    batch_norm_eval,
    batch_norm_reference,
    batch_norm_with_stats,
    batch_stats,
    running_average,
)
from jaxninja.ops._cross_entropy import LossAndLse, cross_entropy, cross_entropy_reference
from jaxninja.ops._linear_cross_entropy import linear_cross_entropy

__all__ = [
    "LossAndLse",
    "batch_norm",
    "batch_norm_eval",
    "batch_norm_reference",
    "batch_norm_with_stats",
    "batch_stats",
    "cross_entropy",
    "cross_entropy_reference",
    "linear_cross_entropy",
    "running_average",
]
