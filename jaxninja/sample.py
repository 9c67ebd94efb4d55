"""Sampling names from a trained model: jitted, batched, with ``jax.random``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxninja import model
from jaxninja.data import Vocab

Array = jax.Array


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
    """Draw ``num_samples`` sequences in parallel, ``(num_samples, max_len)`` int32 ids.

    Each starts from the all-``.`` context and draws from ``softmax(logits / T)`` until
    it draws ``.`` (id 0) or reaches ``max_len`` characters; everything after a row's
    ``.`` is 0. Batch norm uses ``bn_stats`` (eval mode), so rows are independent.
    """

    def step(carry, key_t):
        context, done = carry
        logits = model.forward(params, context, bn_stats)
        ix = jax.random.categorical(key_t, logits / temperature, axis=-1).astype(jnp.int32)
        ix = jnp.where(done, 0, ix)
        context = jnp.concatenate([context[:, 1:], ix[:, None]], axis=1)
        return (context, done | (ix == 0)), ix

    context = jnp.zeros((num_samples, block_size), jnp.int32)
    done = jnp.zeros((num_samples,), bool)
    _, ids = jax.lax.scan(step, (context, done), jax.random.split(key, max_len))
    return ids.T


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
    """``num_samples`` names as strings (without the terminating ``.``)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    block_size = params["W1"].shape[0] // params["C"].shape[1]
    ids = sample_ids(
        params, bn_stats, key, num_samples=num_samples, block_size=block_size,
        max_len=max_len, temperature=temperature,
    )  # fmt: skip
    return [vocab.decode(int(i) for i in row).split(".")[0] for row in jax.device_get(ids)]
