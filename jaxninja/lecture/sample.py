"""Sampling names from a trained model: jitted, batched, with ``jax.random``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxninja.lecture import model
from jaxninja.lecture.data import Vocab
from jaxninja.limits import check_int, check_positive

MAX_SAMPLES = 100_000  # sample_names: at most 1e8 ids in all; more is a typo
MAX_LEN = 1_000


def tempered_choice(key: jax.Array, logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
    r"""One draw per row from ``softmax(logits / T)`` (int32, ``logits.shape[:-1]``), exact for
    every positive finite ``T``: with Gumbel noise :math:`g`, :math:`\arg\max_i (z_i / T + g_i)
    = \arg\max_i (z_i + T g_i)`, computed on the left for :math:`T \ge 1` and on the right for
    :math:`T < 1`, so neither overflows; ``1e-300`` rounds :math:`T g` to 0: greedy decoding.

    Examples:
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
    key: jax.Array,
    *,
    num_samples: int,
    block_size: int,
    max_len: int = 32,
    temperature: float | jax.Array = 1.0,
) -> jax.Array:
    """``(num_samples, max_len)`` int32 ids drawn in parallel from the all-``.`` context
    with ``tempered_choice`` until ``.`` (id 0; all 0 after it) or ``max_len``. Batch
    norm uses ``bn_stats`` (eval mode), so rows are independent."""

    def step(context: jax.Array, key_t: jax.Array) -> tuple[jax.Array, jax.Array]:
        ix = tempered_choice(key_t, model.forward(params, context, bn_stats), temperature)
        return jnp.concatenate([context[:, 1:], ix[:, None]], axis=1), ix

    context = jnp.zeros((num_samples, block_size), jnp.int32)
    _, ids = jax.lax.scan(step, context, jax.random.split(key, max_len))
    ended = jnp.cumsum(ids.T == 0, axis=1) > 0  # at or after the first '.'
    return jnp.where(ended, 0, ids.T)


def sample_names(
    params: model.Params,
    bn_stats: model.BNStats,
    vocab: Vocab,
    key: jax.Array,
    num_samples: int = 20,
    *,
    max_len: int = 32,
    temperature: float = 1.0,
) -> list[str]:
    """``num_samples`` names (without the final ``.``), each at most ``max_len`` characters.

    Args:
        params: the trained parameters.
        bn_stats: the batch-norm statistics (eval mode).
        vocab: the vocabulary that decodes the ids.
        key: the sampling key.
        num_samples: how many names, ``1..MAX_SAMPLES`` (a bound on time and memory: the
            ids drawn are ``num_samples x max_len``).
        max_len: the longest name, ``1..MAX_LEN``.
        temperature: any positive finite number (``1e-300``: greedy decoding).

    Raises:
        ConfigError: a number of the wrong kind or out of range, naming it.
    """
    check_int("num_samples", num_samples, 1, MAX_SAMPLES)
    check_int("max_len", max_len, 1, MAX_LEN)
    check_positive("temperature", temperature)
    block_size = params["W1"].shape[0] // params["C"].shape[1]
    ids = sample_ids(
        params,
        bn_stats,
        key,
        num_samples=num_samples,
        block_size=block_size,
        max_len=max_len,
        temperature=temperature,
    )
    return [vocab.decode(int(i) for i in row).split(".")[0] for row in jax.device_get(ids)]
