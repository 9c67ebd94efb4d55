"""Tests for jaxninja.training.checkpoint: round trips, tampered or hostile files refused."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import jax
import numpy as np
from helpers import CFG, SHA, VOCAB, refused

from jaxninja.errors import JaxninjaError
from jaxninja.training import checkpoint

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
