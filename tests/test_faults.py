"""Faults injected into real ``python -m jaxninja train`` processes (a cross-cutting suite:
signals, processes, full disks and broken streams, across the run directory, checkpoints and
the CLI's output).

* SIGTERM (what ``kill``, Slurm, ``timeout`` and ``docker stop`` send) mid-run: a
  checkpoint at a chunk boundary, a message, exit 143, and ``--resume`` ends with the
  parameters and loss history of an uninterrupted run, bit for bit.
* Two SIGINTs during one long chunk: the second stops the process while the chunk is
  still running (nothing half-written is left behind).
* A second process on a run directory in use (even with ``--overwrite``): one-line
  error, exit 2, and the first run finishes exactly as if alone.
* Two runs started at once without ``--out``: two different run directories.
* Closed and broken streams: a reader that leaves (``| head -1``), ``> /dev/full``, an
  ASCII-only stdout with non-ASCII names and ESC in ``--out``, fds 0-2 closed at start.
* A full disk mid-run (a 1 MiB tmpfs where mounting is allowed, else an in-process
  ``ENOSPC`` from the file system calls): one-line error, exit 2, the previous
  checkpoint intact, and ``--resume`` (with space again) matches the uninterrupted run.

The subprocesses share the session's persistent compilation cache (tests/conftest.py), so
each chunk shape is compiled about once; the reference run is in-process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FAULT, Proc, assert_same_run, one_error_line, progress, run_cli

from jaxninja.training import checkpoint, rundir

ROOT = os.geteuid() == 0
# one chunk of many steps: seconds inside a single compiled call
LONG = ["--steps", "300000", "--n-hidden", "16", "--chunk-steps", "300000", "--samples", "0"]

pytestmark = pytest.mark.usefixtures("reuse_compiled_chunks")


# --------------------------------------------------------------------------- tests


def test_sigterm_saves_exits_143_and_resume_is_bit_exact(
    words_file, tmp_path, fault_reference, capsys
):
    out = tmp_path / "run"
    proc = Proc(["train", "--data", words_file, "--out", out, *FAULT])
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


def test_second_sigint_stops_during_a_long_chunk(words_file, tmp_path):
    out = tmp_path / "run"
    proc = Proc(["train", "--data", words_file, "--out", out, *LONG])
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


def test_second_process_on_a_run_in_use_is_refused(words_file, tmp_path, fault_reference, capsys):
    out = tmp_path / "run"
    first = Proc(["train", "--data", words_file, "--out", out, *FAULT])
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


def test_two_default_runs_started_at_once_get_two_directories(words_file, tmp_path):
    tiny = ["--steps", "2", "--chunk-steps", "1", "--n-hidden", "4", "--samples", "0"]
    procs = [Proc(["train", "--data", words_file, *tiny], cwd=tmp_path) for _ in range(2)]
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
    words_file, tmp_path, fault_reference, capsys, monkeypatch
):
    disk = tmp_path / "disk"
    out = disk / "run"
    if _mount_tmpfs(disk, "1m"):
        try:
            proc = Proc(["train", "--data", words_file, "--out", out, *FAULT])
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


# ------------------------------------------------------------ closed and broken streams

# the tiny run of test_two_default_runs...: its compiled chunks serve (the cache is shared)
TINY = ["--steps", "2", "--chunk-steps", "1", "--n-hidden", "4", "--samples", "0"]
# A stand-in for JAX's C++ logging, which writes to descriptor 2 whatever it is: a line
# written there at every checkpoint.
LOGS_TO_FD_2 = """
import os, sys
from jaxninja import cli
from jaxninja.training import checkpoint, rundir
save = checkpoint.save
def logged_save(*args, **kwargs):
    os.write(2, b"E0000 00:00:00 1 x.cc:1] a C++ log line\\n")
    return save(*args, **kwargs)
checkpoint.save = logged_save
sys.exit(cli.main(sys.argv[1:]))
"""


def _popen(args, env=(), prefix=(sys.executable,), **how) -> subprocess.Popen:
    """``PREFIX -m jaxninja ARGS`` (``PREFIX -c ...`` for a ``-c`` script; ``PREFIX``: this
    Python) with the session's compilation cache; ``how`` as for ``Popen``."""
    full_env = {**os.environ, **dict(env)}
    module = [] if args[0] == "-c" else ["-m", "jaxninja"]
    cmd = [*prefix, *module, *map(str, args)]
    return subprocess.Popen(cmd, env=full_env, text=True, **how)


def test_a_reader_that_leaves_ends_the_output_not_the_run(words_file, tmp_path):
    """``jaxninja train | head -1``: the run goes on to its end, silently, exit 0."""
    out = tmp_path / "run"
    p = _popen(["train", "--data", words_file, "--out", out, *TINY],
               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None and p.stdout.readline().startswith("run directory:")
    p.stdout.close()  # before the first progress line: every later write meets EPIPE
    assert p.wait(120) == 0
    assert p.stderr is not None and p.stderr.read() == ""
    assert int(checkpoint.load(out).state.step) == 2
    assert "train_loss" in json.loads((out / "metrics.json").read_text())


def test_a_full_stdout_is_one_error_line(words_file, tmp_path):
    """``jaxninja train > /dev/full``: the run is complete, and the lost output an error.
    /dev/full is Linux's (CI's OS): its absence is a failure, never a skip."""
    assert os.path.exists("/dev/full"), "this test needs Linux's /dev/full"
    out = tmp_path / "run"
    with open("/dev/full", "w") as full:
        p = _popen(["train", "--data", words_file, "--out", out, *TINY],
                   stdout=full, stderr=subprocess.PIPE)  # fmt: skip
        _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert one_error_line(err) == (
        "error: cannot write to stdout (No space left on device); the output is lost"
    )
    assert int(checkpoint.load(out).state.step) == 2 and (out / "metrics.json").exists()


def test_an_ascii_stdout_and_non_ascii_names(words_file, tmp_path):
    """``PYTHONIOENCODING=ascii`` with names, a run directory and an error holding
    non-ASCII characters and ESC: escaped, never a traceback."""
    words = tmp_path / "noms.txt"  # 27 symbols, as words_file: its compiled chunks serve
    words.write_text(words_file.read_text().translate(str.maketrans("qxz", "é名ک")))
    out = tmp_path / "rün\x1b[31m"
    p = _popen(["train", "--data", words, "--out", out, *TINY, "--samples", "3"],
               env={"PYTHONIOENCODING": "ascii"}, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE)  # fmt: skip
    stdout, err = p.communicate(timeout=120)
    assert (p.returncode, err) == (0, ""), err
    assert stdout.startswith("run directory: " + ascii(str(out))[1:-1] + "\n"), stdout
    assert stdout.isascii() and "\x1b" not in stdout and len(stdout.splitlines()) == 10
    p = _popen(["eval", "--out", out], env={"PYTHONIOENCODING": "ascii"},
               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    _, err = p.communicate(timeout=120)
    line = one_error_line(err)  # the run's vocabulary is its own data file's
    assert p.returncode == 2 and line.endswith(
        "n\\x1b[31m holds a run trained on a different vocabulary"
    )


def test_closed_standard_descriptors_are_never_reused(words_file, tmp_path):
    """Started with fds 0-2 closed: what is written to fd 2 (C++ logs) never reaches a
    file of the run (the lock would be the first file opened)."""
    out = tmp_path / "run"
    argv = ["-c", LOGS_TO_FD_2, "train", "--data", words_file, "--out", out, *TINY]
    closing = ["sh", "-c", 'exec "$@" 0<&- 1>&- 2>&-', "sh", sys.executable]  # exec: no fork
    p = _popen(argv, prefix=closing)
    assert p.wait(120) == 0
    assert (out / rundir.LOCK).read_bytes() == b""
    assert int(checkpoint.load(out).state.step) == 2
