"""Tests for jaxninja.lecture.sample: names sampled from a trained model (conftest's
``trained``: the vocabulary, ``max_len``, determinism for a key, temperature against the
model's likelihood), any positive finite temperature, bad sizes refused."""

from __future__ import annotations

import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import VOCAB, greedy_name, numpy_logits

from jaxninja.errors import JaxninjaError
from jaxninja.lecture import sample
from jaxninja.lecture.data import (
    DataError,
    Vocab,
    load_splits,
    load_words,
)
from jaxninja.training.train import TrainConfig, init_state

# --------------------------------------------------------------------------- sampling temperature


@pytest.fixture(scope="module")
def tiny_model():
    """Untrained lecture-shaped parameters with calibrated statistics (no training needed)."""
    state = init_state(TrainConfig(n_hidden=16), 5)
    stats = {"mean": jnp.zeros((1, 16)), "var": jnp.ones((1, 16))}
    return state.params, stats


@pytest.mark.parametrize("t", [1e-300, 5e-324, 1e-45, 1e-30])
def test_tiny_temperature_is_exact_greedy_decoding(tiny_model, t: float) -> None:
    params, stats = tiny_model
    names = sample.sample_names(
        params, stats, VOCAB, jax.random.key(0), 6, max_len=8, temperature=t
    )
    assert names == [greedy_name(params, stats, VOCAB, 8)] * 6


def test_tempered_choice_samples_softmax_of_logits_over_t() -> None:
    z = jnp.array([0.0, 1.0, 2.0, -1.0])
    n = 40_000
    for t in (0.5, 1.0, 3.0):
        draws = sample.tempered_choice(jax.random.key(1), jnp.broadcast_to(z, (n, 4)), t)
        freq = np.bincount(np.asarray(draws), minlength=4) / n
        want = np.exp(np.asarray(z) / t) / np.exp(np.asarray(z) / t).sum()
        assert np.abs(freq - want).max() < 0.01, (t, freq, want)
    for t in (1e30, 1e300):  # T -> infinity: uniform
        draws = sample.tempered_choice(jax.random.key(2), jnp.broadcast_to(z, (n, 4)), t)
        freq = np.bincount(np.asarray(draws), minlength=4) / n
        assert np.abs(freq - 0.25).max() < 0.01, (t, freq)


def test_tempered_choice_is_the_gumbel_max_of_logits_over_t() -> None:
    """Same noise, same draws as argmax(z / T + g), computed in float64, for T < 1 and T > 1."""
    key = jax.random.key(3)
    z = jax.random.normal(jax.random.key(4), (2000, 27)) * 3
    g = np.asarray(jax.random.gumbel(key, z.shape, z.dtype), np.float64)
    for t in (0.05, 0.7, 1.0, 4.0):
        want = np.argmax(np.asarray(z, np.float64) / t + g, axis=-1)
        got = np.asarray(sample.tempered_choice(key, z, t))
        assert (got == want).mean() > 0.999, t


@pytest.mark.parametrize("t", [0.0, -1.0, -1e-300, math.nan, math.inf, -math.inf, True, "1"])
def test_bad_temperatures_are_refused(tiny_model, t) -> None:
    params, stats = tiny_model
    with pytest.raises(JaxninjaError, match="temperature must be a positive finite number"):
        sample.sample_names(params, stats, VOCAB, jax.random.key(0), 2, temperature=t)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"num_samples": 0}, "num_samples must be an integer in 1..100000, got 0"),
        ({"num_samples": 100_001}, "num_samples must be an integer in 1..100000, got 100001"),
        ({"num_samples": 2.0}, "num_samples must be an integer in 1..100000, got 2.0"),
        ({"max_len": 0}, "max_len must be an integer in 1..1000, got 0"),
        ({"max_len": 1001}, "max_len must be an integer in 1..1000, got 1001"),
    ],
)
def test_bad_sizes_are_refused(tiny_model, kw, message) -> None:
    """The caps (``MAX_SAMPLES``, ``MAX_LEN``) bound the ids drawn; refused before any work."""
    params, stats = tiny_model
    with pytest.raises(JaxninjaError, match=re.escape(message)):
        sample.sample_names(params, stats, VOCAB, jax.random.key(0), **{"num_samples": 2, **kw})


def test_control_characters_in_a_path_are_escaped(tmp_path: Path) -> None:
    p = tmp_path / "evil\x1b[2J\u202e.txt"
    with pytest.raises(DataError) as exc:
        load_words(p)
    assert str(exc.value) == f"{tmp_path}/evil\\x1b[2J\\u202e.txt: no such file"
    p.write_text("emma\n")
    with pytest.raises(DataError, match=r"evil\\x1b\[2J\\u202e\.txt: the training split is empty"):
        load_splits(p)


def test_a_huge_hostile_vocabulary_is_refused_quickly_and_briefly() -> None:
    itos = (".", *(chr(0x4E00 + i % 20_000) for i in range(200_000)))
    with pytest.raises(ValueError, match="vocabulary has 20000 duplicate entries") as exc:
        Vocab(itos)
    assert len(str(exc.value)) < 100


# ------------------------------------------------------------- sampling a trained model


N_SAMPLES = 100  # one sample count (and two max_len) for all tests: fewer compilations


def test_samples_use_the_vocabulary(trained, splits):
    params, bn_stats, _ = trained
    names = sample.sample_names(params, bn_stats, splits.vocab, jax.random.key(0), N_SAMPLES)
    assert len(names) == N_SAMPLES
    letters = set(splits.vocab.itos[1:])
    for name in names:
        assert "." not in name and set(name) <= letters, name
    assert sum(map(len, names)) / len(names) > 3  # mostly real names, not empty strings


def test_samples_respect_max_len(trained, splits):
    params, bn_stats, _ = trained
    names = sample.sample_names(
        params, bn_stats, splits.vocab, jax.random.key(1), N_SAMPLES, max_len=4
    )
    assert max(map(len, names)) == 4  # capped, and the cap is reached
    assert min(map(len, names)) < 4  # some names end by drawing '.'
    ids = np.asarray(
        sample.sample_ids(
            params,
            bn_stats,
            jax.random.key(1),
            num_samples=N_SAMPLES,
            block_size=3,
            max_len=4,
            temperature=1.0,
        )
    )
    assert ids.shape == (N_SAMPLES, 4)
    for row in ids:  # everything after a row's '.' is '.'
        zeros = np.flatnonzero(row == 0)
        if len(zeros):
            assert np.all(row[zeros[0] :] == 0)
    assert [splits.vocab.decode(row).split(".")[0] for row in ids] == names


def test_samples_are_deterministic_for_a_key(trained, splits):
    params, bn_stats, _ = trained
    a = sample.sample_names(params, bn_stats, splits.vocab, jax.random.key(7), N_SAMPLES)
    b = sample.sample_names(params, bn_stats, splits.vocab, jax.random.key(7), N_SAMPLES)
    c = sample.sample_names(params, bn_stats, splits.vocab, jax.random.key(8), N_SAMPLES)
    assert a == b
    assert a != c


def mean_nll(params, bn_stats, vocab, names: list[str]) -> float:
    """Mean negative log-likelihood per symbol (the terminating '.' included) at T=1."""
    total, count = 0.0, 0
    for name in names:
        context = [0, 0, 0]
        for ix in [*vocab.encode(name), 0]:
            logits = numpy_logits(params, bn_stats, context)
            total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[ix]
            count += 1
            context = context[1:] + [ix]
    return total / count


def test_temperature(trained, splits):
    params, bn_stats, vocab = *trained[:2], splits.vocab
    key = jax.random.key(3)

    def draw(temperature):
        return sample.sample_names(params, bn_stats, vocab, key, N_SAMPLES, temperature=temperature)

    greedy = greedy_name(params, bn_stats, vocab)
    assert draw(1e-3) == [greedy] * N_SAMPLES  # T -> 0 is argmax decoding
    warm, hot = draw(1.0), draw(5.0)
    assert len(set(warm)) > 0.8 * N_SAMPLES
    # T = 1 samples the model, so its names cost about the model's loss (~2.4 nats);
    # T >> 1 flattens the distribution towards uniform (log 27 = 3.3 nats)
    nll_warm = mean_nll(params, bn_stats, vocab, warm)
    nll_hot = mean_nll(params, bn_stats, vocab, hot)
    assert nll_warm < 2.7 and nll_hot > nll_warm + 0.8, (nll_warm, nll_hot)
    with pytest.raises(ValueError, match="temperature"):
        sample.sample_names(params, bn_stats, vocab, key, 5, temperature=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        sample.sample_names(params, bn_stats, vocab, key, 0)
