r"""Sampling names from a trained model: jitted, batched, with ``jax.random``.

Temperature without dividing by it. Drawing from :math:`\mathrm{softmax}(z / T)` is the
Gumbel-max trick :math:`\arg\max_i (z_i / T + g_i)` with :math:`g_i` i.i.d. standard
Gumbel noise, and since :math:`T > 0` scaling by :math:`T` keeps the argmax:

.. math::
    \arg\max_i \,(z_i / T + g_i) \;=\; \arg\max_i \,(z_i + T g_i).

For :math:`T < 1` the right-hand form is computed, for :math:`T \ge 1` the left: neither
overflows, so every positive finite temperature is handled exactly. A temperature too
small for float32 (``1e-300``) rounds :math:`T g` to 0, which is :math:`T \to 0`'s exact
limit, greedy (argmax) decoding; a huge one rounds :math:`z / T` to 0, uniform sampling.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp

from jaxninja import model
from jaxninja.data import Vocab
from jaxninja.errors import JaxninjaError

Array = jax.Array


def tempered_choice(key: Array, logits: Array, temperature: float | Array) -> Array:
    """One draw per row from ``softmax(logits / temperature)`` (int32, ``logits.shape[:-1]``),
    computed without dividing by small temperatures (see the module docstring).

    >>> z = jnp.array([[0.0, 2.0, 1.0]])
    >>> int(tempered_choice(jax.random.key(0), z, 1e-30)[0])  # T -> 0: the argmax
    1
    """
    g = jax.random.gumbel(key, logits.shape, logits.dtype)
    if isinstance(temperature, (int, float)):  # beyond the dtype's max it acts as inf anyway
        temperature = min(temperature, float(jnp.finfo(logits.dtype).max))
    t = jnp.asarray(temperature, logits.dtype)
    scores = jnp.where(t >= 1, logits / jnp.maximum(t, 1) + g, logits + jnp.minimum(t, 1) * g)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_samples", "block_size", "max_len"))
def sample_ids(
    params: model.Params,
    bn_stats: model.BNStats,
    key: Array,
    *,
    num_samples: int,
    block_size: int,
    max_len: int = 32,
    temperature: float | Array = 1.0,
) -> Array:
    """``(num_samples, max_len)`` int32 ids drawn in parallel from the all-``.`` context
    with :func:`tempered_choice` until ``.`` (id 0; all 0 after it) or ``max_len``. Batch
    norm uses ``bn_stats`` (eval mode), so rows are independent."""

    def step(carry, key_t):
        context, done = carry
        logits = model.forward(params, context, bn_stats)
        ix = jnp.where(done, 0, tempered_choice(key_t, logits, temperature))
        context = jnp.concatenate([context[:, 1:], ix[:, None]], axis=1)
        return (context, done | (ix == 0)), ix

    context = jnp.zeros((num_samples, block_size), jnp.int32)
    done = jnp.zeros((num_samples,), bool)
    _, ids = jax.lax.scan(step, (context, done), jax.random.split(key, max_len))
    return ids.T


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or operator.index(value) < 1:
        raise JaxninjaError(f"{name} must be a positive integer, got {value!r}")
    return operator.index(value)


def sample_names(
    params: model.Params,
    bn_stats: model.BNStats,
    vocab: Vocab,
    key: Array,
    num_samples: int = 20,
    *,
    max_len: int = 32,
    temperature: float = 1.0,
) -> list[str]:
    """``num_samples`` names (without the final ``.``); ``temperature`` is any positive
    finite number (``1e-300``: greedy), anything else raises :class:`JaxninjaError`."""
    n = _positive_int("num_samples", num_samples)
    length = _positive_int("max_len", max_len)
    t = temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise JaxninjaError(f"temperature must be a positive finite number, got {t!r}")
    block_size = params["W1"].shape[0] // params["C"].shape[1]
    ids = sample_ids(
        params, bn_stats, key, num_samples=n, block_size=block_size, max_len=length, temperature=t
    )
    return [vocab.decode(int(i) for i in row).split(".")[0] for row in jax.device_get(ids)]
