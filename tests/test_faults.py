"""Faults injected into real ``python -m jaxninja train`` processes.

* SIGTERM (what ``kill``, Slurm, ``timeout`` and ``docker stop`` send) mid-run: a
  checkpoint at a chunk boundary, a message, exit 143, and ``--resume`` ends with the
  parameters and loss history of an uninterrupted run, bit for bit.
* Two SIGINTs during one long chunk: the second stops the process while the chunk is
  still running (nothing half-written is left behind).
* A second process on a run directory in use (even with ``--overwrite``): one-line
  error, exit 2, and the first run finishes exactly as if alone.
* Two runs started at once without ``--out``: two different run directories.
* A full disk mid-run (a 1 MiB tmpfs where mounting is allowed, else an in-process
  ``ENOSPC`` from the file system calls): one-line error, exit 2, the previous
  checkpoint intact, and ``--resume`` (with space again) matches the uninterrupted run.

The subprocesses share a persistent compilation cache, so each chunk shape is compiled
about once; the reference run is in-process.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import FAULT, Proc, assert_same_run, one_error_line, progress, run_cli

from jaxninja.training import checkpoint

ROOT = os.geteuid() == 0
# one chunk of many steps: seconds inside a single compiled call
LONG = ["--steps", "300000", "--n-hidden", "16", "--chunk-steps", "300000", "--samples", "0"]

pytestmark = pytest.mark.usefixtures("reuse_compiled_chunks")


# --------------------------------------------------------------------------- tests


def test_sigterm_saves_exits_143_and_resume_is_bit_exact(
    words_file, tmp_path, compile_cache, fault_reference, capsys
):
    out = tmp_path / "run"
    proc = Proc(["train", "--data", words_file, "--out", out, *FAULT], compile_cache)
    proc.wait_for("out", progress)
    proc.p.send_signal(signal.SIGTERM)
    rc, _, err = proc.finish()
    assert rc == 143, err
    step = int(checkpoint.load(out).state.step)
    assert 0 < step < 4000 and step % 100 == 0  # a chunk boundary, before the end
    assert err.splitlines() == [
        "SIGTERM: saving after the current chunk (send it again to stop now)",
        f"SIGTERM: stopped at step {step}; checkpoint saved in {out}. "
        f"Continue with the same command plus --resume",
    ]
    assert not list(out.glob(".*.tmp"))
    rc, _, err = run_cli(capsys, "train", "--data", words_file, "--out", out, *FAULT, "--resume")
    assert (rc, err) == (0, "")
    assert_same_run(out, fault_reference)


def test_second_sigint_stops_during_a_long_chunk(words_file, tmp_path, compile_cache):
    out = tmp_path / "run"
    proc = Proc(["train", "--data", words_file, "--out", out, *LONG], compile_cache)
    proc.wait_for("out", lambda line: line.startswith("run directory:"))
    deadline = time.monotonic() + 60
    while not (out / ".jaxninja.lock").exists():  # the run has claimed its directory
        assert time.monotonic() < deadline and proc.p.poll() is None
        time.sleep(0.05)
    time.sleep(2.0)  # inside the one chunk (about 10 s of steps)
    proc.p.send_signal(signal.SIGINT)
    proc.wait_for("err", lambda line: "saving after the current chunk" in line, timeout=30)
    proc.p.send_signal(signal.SIGINT)
    rc, stdout, err = proc.finish(timeout=30)
    assert rc == 130, err
    assert "Traceback" not in err and len(err.splitlines()) <= 3, err
    # stopped inside the chunk: it never finished, so nothing was saved or half-saved
    assert sorted(p.name for p in out.iterdir()) == [".jaxninja.lock"]
    assert "0/ 300000" not in stdout


def test_second_process_on_a_run_in_use_is_refused(
    words_file, tmp_path, compile_cache, fault_reference, capsys
):
    out = tmp_path / "run"
    first = Proc(["train", "--data", words_file, "--out", out, *FAULT], compile_cache)
    first.wait_for("out", lambda line: line.strip().startswith("100/"))  # 1 checkpoint
    # The second process is this one (it gets there in milliseconds, while the first
    # still runs); --overwrite must not delete the files of the run holding the lock.
    for extra in (["--resume"], ["--overwrite"]):
        rc, _, err = run_cli(capsys, "train", "--data", words_file, "--out", out, *FAULT, *extra)
        assert rc == 2
        assert one_error_line(err) == (
            f"error: {out} is in use by another jaxninja process; wait for it to finish "
            f"or choose another --out"
        )
    rc, _, err = first.finish()
    assert (rc, err) == (0, "")
    assert_same_run(out, fault_reference)


def test_two_default_runs_started_at_once_get_two_directories(words_file, tmp_path, compile_cache):
    tiny = ["--steps", "2", "--chunk-steps", "1", "--n-hidden", "4", "--samples", "0"]
    procs = [
        Proc(["train", "--data", words_file, *tiny], compile_cache, cwd=tmp_path) for _ in range(2)
    ]
    results = [p.finish() for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], results
    dirs = [out.splitlines()[0].removeprefix("run directory: ") for _, out, _ in results]
    assert dirs[0] != dirs[1]
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "runs").iterdir()) == sorted(
        Path(d) for d in dirs
    )
    for d in dirs:
        assert int(checkpoint.load(tmp_path / d).state.step) == 2


# ------------------------------------------------------------------------ full disk


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
    return ROOT and subprocess.run(cmd, capture_output=True).returncode == 0


def _fill(directory: Path) -> Path:
    """Write zeros into ``directory`` until the file system is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_full_disk_mid_run_keeps_the_previous_checkpoint(
    words_file, tmp_path, compile_cache, fault_reference, capsys, monkeypatch
):
    disk = tmp_path / "disk"
    out = disk / "run"
    if _mount_tmpfs(disk, "1m"):
        try:
            proc = Proc(["train", "--data", words_file, "--out", out, *FAULT], compile_cache)
            proc.wait_for("out", lambda line: line.strip().startswith("100/"))  # 1 saved
            filler = _fill(disk)
            rc, _, err = proc.finish()
            kept = _assert_failed_cleanly(rc, err, out, words_file)
            filler.unlink()
            copy = tmp_path / "resumed"  # resume a copy, off the small disk
            shutil.copytree(out, copy)
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=True)
    else:  # no mounting here: file system calls say ENOSPC from the second checkpoint on
        rc, err = _simulated_full_disk(out, words_file, capsys, monkeypatch)
        kept = _assert_failed_cleanly(rc, err, out, words_file)
        assert int(checkpoint.load(out).state.step) == 100  # the first chunk's, intact
        copy = out
    assert (copy / checkpoint.FILENAME).read_bytes() == kept
    rc, _, err = run_cli(capsys, "train", "--data", words_file, "--out", copy, *FAULT, "--resume")
    assert (rc, err) == (0, "")
    assert_same_run(copy, fault_reference)


def _assert_failed_cleanly(rc: int, err: str, out: Path, words: Path) -> bytes:
    """One ``cannot write ...: No space left on device`` line, exit 2, a checkpoint
    that loads (at a chunk boundary, recording the hash of the data file it was trained
    on) and no temporary file: returns the checkpoint."""
    assert rc == 2, err
    line = one_error_line(err)
    assert line.startswith(f"error: cannot write {out}/") and line.endswith(
        ": No space left on device"
    ), line
    ck = checkpoint.load(out)
    step = int(ck.state.step)
    assert 0 < step < 4000 and step % 100 == 0
    assert ck.data_sha256 == hashlib.sha256(words.read_bytes()).hexdigest()
    assert not list(out.glob(".*.tmp"))
    return (out / checkpoint.FILENAME).read_bytes()


def _simulated_full_disk(out: Path, words: Path, capsys, monkeypatch) -> tuple[int, str]:
    real_fsync, calls = os.fsync, [0]

    def fsync(fd):
        calls[0] += 1
        if calls[0] > 4:  # the first chunk's checkpoint and loss history: file + directory
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    with monkeypatch.context() as mp:
        mp.setattr(os, "fsync", fsync)
        rc, _, err = run_cli(capsys, "train", "--data", words, "--out", out, *FAULT)
    return rc, err
