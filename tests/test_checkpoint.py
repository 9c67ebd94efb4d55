"""Tests for jaxninja.training.checkpoint: round trips (every combination of the config
switches, checkpoints older than the switches), tampered or hostile files refused.

That every command refuses a hostile checkpoint with the same one line, end to end through
the CLI, is tests/test_reliability.py's table."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pickle
import stat
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import (
    CFG,
    SHA,
    SMALL,
    VOCAB,
    assert_trees_equal,
    npz_arrays,
    one_error_line,
    refused,
    rewrite_npz,
    run_cli,
)

from jaxninja.errors import JaxninjaError
from jaxninja.lecture import model
from jaxninja.training import checkpoint, train
from jaxninja.training.checkpoint import CheckpointError
from jaxninja.training.train import TrainConfig

# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_records_the_data_hash(saved: Path, ckpt_state) -> None:
    ck = checkpoint.load(saved)
    assert ck.data_sha256 == SHA and ck.config == CFG and ck.vocab == VOCAB
    np.testing.assert_array_equal(ck.bn_stats["var"], ckpt_state[1]["var"])
    for a, b in zip(jax.tree.leaves(ck.state), jax.tree.leaves(ckpt_state[0]), strict=True):
        np.testing.assert_array_equal(a, b)
    checkpoint.save(saved, CFG, VOCAB, ckpt_state[0])  # no hash, no statistics: both None
    ck = checkpoint.load(saved)
    assert ck.data_sha256 is None and ck.bn_stats is None
    assert issubclass(checkpoint.CheckpointError, JaxninjaError)


def test_200000_junk_entries_are_refused_before_reading(saved: Path) -> None:
    with zipfile.ZipFile(saved / checkpoint.FILENAME, "a") as z:
        n = len(z.infolist()) + 200_000
        for i in range(200_000):
            z.writestr(f"junk{i}.npy", b"")
    msg = refused(saved)
    assert f"unreadable checkpoint ({n} entries, over the limit of 1000)" in msg


def test_checkpoint_files_follow_the_umask(tmp_path: Path, ckpt_state) -> None:
    before = os.umask(0o022)
    try:
        for mask, mode in [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664), (0o027, 0o640)]:
            os.umask(mask)
            path = checkpoint.save(tmp_path / f"m{mask:o}", CFG, VOCAB, ckpt_state[0])
            assert stat.S_IMODE(path.stat().st_mode) == mode, (oct(mask), oct(path.stat().st_mode))
            assert checkpoint.load(path.parent).config == CFG
    finally:
        os.umask(before)


def test_checkpoint_round_trip(tmp_path, trajectories, trained, splits):
    state = trajectories["manual"][0]
    cfg = dataclasses.replace(SMALL, backend="manual", running_stats=True, seed=3)
    _, bn_stats, _ = trained
    checkpoint.save(tmp_path, cfg, splits.vocab, state, bn_stats)
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.config == cfg
    assert ckpt.vocab == splits.vocab
    assert_trees_equal(ckpt.state, state)
    assert_trees_equal(ckpt.bn_stats, bn_stats)
    assert not list(tmp_path.glob("*.tmp"))  # the temporary file was renamed away
    # without calibrated statistics (an unfinished run)
    checkpoint.save(tmp_path, cfg, splits.vocab, state)
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.bn_stats is None
    assert_trees_equal(ckpt.state, state)


def test_every_combination_checkpoint_loads(tmp_path, splits):
    """Every combination of the switches saves and loads (structure from the config)."""
    combos = itertools.product(
        (True, False), model.INITS, train.OPTIMIZERS, train.SCHEDULES, (0, 5)
    )
    for bn, init, opt, schedule, warmup in combos:
        cfg = TrainConfig(
            n_hidden=4, steps=10, batch_norm=bn, init=init, optimizer=opt,
            schedule=schedule, warmup=warmup, running_stats=bn,
        ).validate()  # fmt: skip
        state = train.init_state(cfg, splits.vocab.size)
        checkpoint.save(tmp_path, cfg, splits.vocab, state)
        ckpt = checkpoint.load(tmp_path)
        assert ckpt.config == cfg
        assert jax.tree.structure(ckpt.state) == jax.tree.structure(state), cfg


def test_old_checkpoint_loads_with_the_defaults(tmp_path, splits):
    """A checkpoint written before the switches existed (its config lacks them) loads:
    it was trained with their defaults, which reproduce the earlier code bit for bit."""
    cfg = TrainConfig(n_hidden=4, steps=10)
    checkpoint.save(tmp_path, cfg, splits.vocab, train.init_state(cfg, 27))
    path = tmp_path / checkpoint.FILENAME
    with np.load(path) as z:
        arrays = dict(z)
    meta = json.loads(bytes(arrays["meta"]).decode())
    for name in train.ADDED_FIELDS:
        del meta["config"][name]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)
    assert checkpoint.load(tmp_path).config == cfg


# ------------------------------------------------------------------ hostile checkpoints

C = "state.params['C']"


def test_checkpoint_that_would_unpack_huge_is_refused_before_reading(run_copy, monkeypatch):
    """A zip bomb: the declared uncompressed size is checked before anything is read."""
    size = sum(i.file_size for i in zipfile.ZipFile(run_copy / checkpoint.FILENAME).infolist())
    monkeypatch.setattr(checkpoint, "MAX_BYTES", size - 1)
    with pytest.raises(CheckpointError, match=f"unpacks to {size} bytes, over the"):
        checkpoint.load(run_copy)
    monkeypatch.setattr(checkpoint, "MAX_BYTES", size)
    checkpoint.load(run_copy)


class _Payload:
    """Unpickling this creates the file ``marker``: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("where", ["meta", C, "extra", "raw-pickle"])
def test_loading_never_unpickles(where, run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    # The payload is live: plain pickle.loads would run it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    path = run_copy / checkpoint.FILENAME
    evil = np.array([_Payload(marker)], dtype=object)
    if where == "raw-pickle":
        path.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        arrays = npz_arrays(path)
        arrays["evil" if where == "extra" else where] = evil
        rewrite_npz(path, arrays)  # np.savez pickles object arrays
    with pytest.raises(CheckpointError, match="unreadable checkpoint"):
        checkpoint.load(run_copy)
    for argv in (["sample", "--out", run_copy], ["eval", "--out", run_copy]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2
        one_error_line(err)
    assert not marker.exists()
