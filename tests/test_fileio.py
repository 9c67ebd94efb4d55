"""Tests for jaxninja.training.fileio: atomic writes (umask, full disk, real failures)."""

from __future__ import annotations

import errno
import io
import os
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import CFG, SHA, VOCAB

from jaxninja.errors import JaxninjaError
from jaxninja.training import checkpoint, fileio
from jaxninja.training.train import init_state

# --------------------------------------------------------------------------- atomic writes


def _listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_write_atomic_follows_the_umask(tmp_path: Path) -> None:
    before = os.umask(0o077)
    try:
        fileio.write_atomic(tmp_path / "private.txt", lambda f: f.write("x"), "w")
        os.umask(0o022)
        fileio.write_atomic(tmp_path / "shared.txt", lambda f: f.write("x"), "w")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "private.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "shared.txt").stat().st_mode) == 0o644
    assert fileio.current_umask() == before


def test_full_disk_while_writing_a_checkpoint(
    saved: Path, monkeypatch: pytest.MonkeyPatch, ckpt_state
) -> None:
    """ENOSPC in the middle of the archive: one-line error, old checkpoint intact, no temp file."""
    old = (saved / checkpoint.FILENAME).read_bytes()
    real_savez = np.savez

    def savez_then_full(f, **arrays):
        buf = io.BytesIO()
        real_savez(buf, **arrays)
        f.write(buf.getvalue()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", savez_then_full)
    with pytest.raises(fileio.WriteError) as exc:
        checkpoint.save(saved, CFG, VOCAB, ckpt_state[0], data_sha256=SHA)
    dest = saved / checkpoint.FILENAME
    assert str(exc.value) == f"cannot write {dest}: No space left on device"
    assert isinstance(exc.value, JaxninjaError)
    assert dest.read_bytes() == old and _listing(saved) == [checkpoint.FILENAME]


@pytest.mark.parametrize(
    ("where", "err"),
    [
        ("fsync", errno.ENOSPC),
        ("mkstemp", errno.EROFS),
        ("mkstemp", errno.EACCES),
        ("replace", errno.EXDEV),
    ],
)
def test_write_errors_become_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where, err
) -> None:
    dest = tmp_path / "metrics.json"
    dest.write_text("old")

    def fail(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    target = {"fsync": (os, "fsync"), "mkstemp": (tempfile, "mkstemp"), "replace": (os, "replace")}
    monkeypatch.setattr(*target[where], fail)
    with pytest.raises(fileio.WriteError) as exc:
        fileio.write_atomic(dest, lambda f: f.write("new"), "w")
    assert str(exc.value) == f"cannot write {dest}: {os.strerror(err)}"
    monkeypatch.undo()
    assert dest.read_text() == "old" and _listing(tmp_path) == ["metrics.json"]


def test_write_atomic_real_failures(tmp_path: Path) -> None:
    with pytest.raises(fileio.WriteError, match="No such file or directory"):
        fileio.write_atomic(tmp_path / "missing" / "a.txt", lambda f: f.write(b"x"))
    (tmp_path / "file").write_text("")
    with pytest.raises(fileio.WriteError, match="Not a directory"):
        fileio.write_atomic(tmp_path / "file" / "a.txt", lambda f: f.write(b"x"))
    with pytest.raises(fileio.WriteError, match=r"cannot create .*file"):
        checkpoint.save(tmp_path / "file" / "run", CFG, VOCAB, init_state(CFG, VOCAB.size))


@pytest.mark.parametrize("exc", [ValueError("bad"), KeyboardInterrupt()])
def test_write_atomic_other_errors_pass_through_and_clean_up(tmp_path: Path, exc) -> None:
    def write(f):
        f.write(b"partial")
        raise exc

    with pytest.raises(type(exc)):
        fileio.write_atomic(tmp_path / "a.bin", write)
    assert _listing(tmp_path) == []
