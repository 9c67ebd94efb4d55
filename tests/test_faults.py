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
import functools
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line, run_cli

from jaxninja import checkpoint, cli, train

REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0
# 40 chunks of 100 steps, each with its checkpoint: the run lasts past a signal
FAULT = ["--steps", "4000", "--n-hidden", "16", "--chunk-steps", "100", "--samples", "0"]
# one chunk of many steps: seconds inside a single compiled call
LONG = ["--steps", "300000", "--n-hidden", "16", "--chunk-steps", "300000", "--samples", "0"]


@pytest.fixture(scope="module", autouse=True)
def _compile_once():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "make_train_chunk", functools.cache(train.make_train_chunk))
        yield


@pytest.fixture(scope="module")
def words(names_file, tmp_path_factory) -> Path:
    all_words = names_file.read_text().split()
    words = all_words[:200] + [next(w for w in all_words if c in w) for c in "qxzjuvwy"]
    p = tmp_path_factory.mktemp("data") / "words.txt"
    p.write_text("\n".join(words) + "\n")
    return p


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def reference(words, tmp_path_factory) -> tuple[dict, np.ndarray]:
    """Final parameters and loss history of an uninterrupted FAULT run (in-process)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(["train", "--data", str(words), "--out", str(out), *FAULT]) == 0
    return params_of(out), np.load(out / "losses.npy")


def params_of(run: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in checkpoint.load(run).state.params.items()}


def assert_same_run(run: Path, reference) -> None:
    params, losses = reference
    got = params_of(run)
    assert got.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(got[k], params[k], err_msg=k)
    np.testing.assert_array_equal(np.load(run / "losses.npy"), losses)


class Proc:
    """``python -m jaxninja ARGS`` with its stdout/stderr lines collected by threads."""

    def __init__(self, args, cache: Path, cwd: Path = REPO):
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        }
        cmd = [sys.executable, "-m", "jaxninja", *map(str, args)]
        self.p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
        )
        self.lines: dict[str, queue.Queue] = {"out": queue.Queue(), "err": queue.Queue()}
        self.seen: dict[str, list[str]] = {"out": [], "err": []}
        for name, stream in (("out", self.p.stdout), ("err", self.p.stderr)):
            threading.Thread(target=self._pump, args=(stream, name), daemon=True).start()

    def _pump(self, stream, name: str) -> None:
        for line in stream:
            self.lines[name].put(line)
        self.lines[name].put(None)

    def wait_for(self, name: str, pred, timeout: float = 120) -> str:
        """The first new line of stdout/stderr (``name``) for which ``pred`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines[name].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.p.kill()
                pytest.fail(f"never got the line; {name} so far: {self.seen[name]}")
            self.seen[name].append(line)
            if pred(line):
                return line

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        """Exit status and the rest of stdout and stderr (all of it, seen or not)."""
        try:
            rc = self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
        for name in ("out", "err"):
            while (line := self.lines[name].get(timeout=30)) is not None:
                self.seen[name].append(line)
        return rc, "".join(self.seen["out"]), "".join(self.seen["err"])


def progress(line: str) -> bool:
    return line.strip().startswith("0/")


# --------------------------------------------------------------------------- tests


def test_sigterm_saves_exits_143_and_resume_is_bit_exact(words, tmp_path, cache, reference, capsys):
    out = tmp_path / "run"
    proc = Proc(["train", "--data", words, "--out", out, *FAULT], cache)
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
    rc, _, err = run_cli(capsys, "train", "--data", words, "--out", out, *FAULT, "--resume")
    assert (rc, err) == (0, "")
    assert_same_run(out, reference)


def test_second_sigint_stops_during_a_long_chunk(words, tmp_path, cache):
    out = tmp_path / "run"
    proc = Proc(["train", "--data", words, "--out", out, *LONG], cache)
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


def test_second_process_on_a_run_in_use_is_refused(words, tmp_path, cache, reference, capsys):
    out = tmp_path / "run"
    first = Proc(["train", "--data", words, "--out", out, *FAULT], cache)
    first.wait_for("out", lambda line: line.strip().startswith("100/"))  # 1 checkpoint
    # The second process is this one (it gets there in milliseconds, while the first
    # still runs); --overwrite must not delete the files of the run holding the lock.
    for extra in (["--resume"], ["--overwrite"]):
        rc, _, err = run_cli(capsys, "train", "--data", words, "--out", out, *FAULT, *extra)
        assert rc == 2
        assert one_error_line(err) == (
            f"error: {out} is in use by another jaxninja process; wait for it to finish "
            f"or choose another --out"
        )
    rc, _, err = first.finish()
    assert (rc, err) == (0, "")
    assert_same_run(out, reference)


def test_two_default_runs_started_at_once_get_two_directories(words, tmp_path, cache):
    tiny = ["--steps", "2", "--chunk-steps", "1", "--n-hidden", "4", "--samples", "0"]
    procs = [Proc(["train", "--data", words, *tiny], cache, cwd=tmp_path) for _ in range(2)]
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
    words, tmp_path, cache, reference, capsys, monkeypatch
):
    disk = tmp_path / "disk"
    out = disk / "run"
    if _mount_tmpfs(disk, "1m"):
        try:
            proc = Proc(["train", "--data", words, "--out", out, *FAULT], cache)
            proc.wait_for("out", lambda line: line.strip().startswith("100/"))  # 1 saved
            filler = _fill(disk)
            rc, _, err = proc.finish()
            kept = _assert_failed_cleanly(rc, err, out)
            filler.unlink()
            copy = tmp_path / "resumed"  # resume a copy, off the small disk
            shutil.copytree(out, copy)
        finally:
            subprocess.run(["umount", "-l", str(disk)], check=True)
    else:  # no mounting here: file system calls say ENOSPC from the second checkpoint on
        rc, err = _simulated_full_disk(out, words, capsys, monkeypatch)
        kept = _assert_failed_cleanly(rc, err, out)
        copy = out
    assert (copy / checkpoint.FILENAME).read_bytes() == kept
    rc, _, err = run_cli(capsys, "train", "--data", words, "--out", copy, *FAULT, "--resume")
    assert (rc, err) == (0, "")
    assert_same_run(copy, reference)


def _assert_failed_cleanly(rc: int, err: str, out: Path) -> bytes:
    """One ``cannot write ...: No space left on device`` line, exit 2, a checkpoint
    that loads (at a chunk boundary) and no temporary file: returns the checkpoint."""
    assert rc == 2, err
    line = one_error_line(err)
    assert line.startswith(f"error: cannot write {out}/") and line.endswith(
        ": No space left on device"
    ), line
    step = int(checkpoint.load(out).state.step)
    assert 0 < step < 4000 and step % 100 == 0
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
