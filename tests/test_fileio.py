"""Tests for jaxninja.training.fileio: atomic writes (umask, full disk, real failures)."""

from __future__ import annotations

import errno
import io
import json
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


# ------------------------------------------------------------------ results files, streams


def test_a_results_file_created_during_the_work_is_kept(tmp_path: Path) -> None:
    """``check_results_file`` at the start, the user's file appears, the write refuses."""
    out = tmp_path / "results.json"
    assert fileio.check_results_file(out, "jaxninja sweep") == {}
    out.write_text("the user's\n")
    with pytest.raises(fileio.WriteError, match="exists and is not a jaxninja sweep results"):
        fileio.write_results_file(out, "jaxninja sweep", {"members": []})
    assert out.read_text() == "the user's\n" and _listing(tmp_path) == ["results.json"]


def test_a_file_appearing_at_the_last_instant_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's file appears after the write-time check, before the results land."""
    out = tmp_path / "new.json"
    check = fileio.check_results_file

    def check_then_race(path, tool):
        previous = check(path, tool)
        out.write_text("the user's\n")
        return previous

    monkeypatch.setattr(fileio, "check_results_file", check_then_race)
    with pytest.raises(fileio.WriteError, match="a file appeared there meanwhile; kept"):
        fileio.write_results_file(out, "t", {"a": 1})
    assert out.read_text() == "the user's\n" and _listing(tmp_path) == ["new.json"]
    monkeypatch.undo()
    fileio.write_results_file(tmp_path / "ok.json", "t", {"a": 1})  # new: linked
    fileio.write_results_file(tmp_path / "ok.json", "t", {"a": 2})  # ours: replaced
    assert '"a": 2' in (tmp_path / "ok.json").read_text()


def test_safe_stream_escapes_controls_and_survives_a_failed_write(tmp_path: Path) -> None:
    r, w = os.pipe()
    try:
        stream = fileio.SafeStream(open(w, "w", encoding="ascii", closefd=False), w)
        stream.write("runs/\x1b[2J é \u200c\n")
        stream.flush()
        assert os.read(r, 100) == b"runs/\\x1b[2J \\xe9 \\u200c\n"
        os.close(r)  # the reader leaves
        r = -1
        stream.write("more\n")
        stream.flush()
        assert stream.failed is not None and stream.failed.errno == errno.EPIPE
        stream.write("and more\n")  # ignored
        stream.flush()
        assert os.readlink(f"/proc/self/fd/{w}") == os.devnull
    finally:
        os.close(w)
        if r >= 0:
            os.close(r)


def test_results_files_are_valid_json_whatever_the_numbers(tmp_path: Path) -> None:
    """A diverged sweep member's NaN loss is ``null``, never ``NaN`` (not JSON)."""
    out = tmp_path / "r.json"
    results = {"members": [{"train_loss": float("nan"), "last": np.float32(np.inf)}, {"a": 1.5}]}
    fileio.write_results_file(out, "t", results)

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in a results file")

    got = json.loads(out.read_text(), parse_constant=refuse)
    assert got["members"] == [{"train_loss": None, "last": None}, {"a": 1.5}]
