"""Tests for jaxninja.training.rundir: what makes a run directory safe. A run directory is
claimed only when free (``--resume`` / ``--overwrite``, a missing run, a run with another
config), never through a symbolic link or over a directory of the user's; the loss history
is secondary to the checkpoint; every file follows the umask; a non-finite end is never
written; a signal after the last chunk lets the run finish.

Most runs go through the CLI in-process (:func:`jaxninja.cli.main`) on conftest's tiny
``words_file``; ``run_copy`` is a copy of conftest's session-scoped ``base_run``. A second
*process* on a run in use is tests/test_faults.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers import one_error_line, run_cli

from jaxninja.training import checkpoint, rundir
from jaxninja.training.job import RunError, train_run
from jaxninja.training.train import TrainConfig

TINY = ["--steps", "50", "--n-hidden", "16", "--chunk-steps", "50"]  # runs that must fail
# Runs that must work: 2 chunks of 1 step (a one-step scan compiles in half the time).
WORKING = ["--steps", "2", "--n-hidden", "16", "--chunk-steps", "1"]

pytestmark = pytest.mark.usefixtures("reuse_compiled_chunks")


def test_resume_with_another_config_refused(run_copy, words_file, capsys):
    before = (run_copy / checkpoint.FILENAME).read_bytes()
    rc, _, err = run_cli(
        capsys, "train", "--data", words_file, "--out", run_copy, "--resume",
        "--steps", "2", "--n-hidden", "32", "--chunk-steps", "1",
    )  # fmt: skip
    assert rc == 2
    assert one_error_line(err) == (
        f"error: {run_copy} holds a run with a different config: n_hidden=16 (asked 32)"
    )
    assert (run_copy / checkpoint.FILENAME).read_bytes() == before


def test_existing_run_without_resume_or_overwrite_refused(run_copy, words_file, capsys):
    rc, _, err = run_cli(capsys, "train", "--data", words_file, "--out", run_copy, *TINY)
    assert rc == 2
    assert one_error_line(err).startswith(f"error: {run_copy} already holds a run; pass --resume")


def test_resume_of_a_missing_run(words_file, tmp_path, capsys):
    out = tmp_path / "never"
    rc, _, err = run_cli(capsys, "train", "--data", words_file, "--out", out, *TINY, "--resume")
    assert rc == 2
    assert one_error_line(err) == f"error: {out}: nothing to resume (no checkpoint.npz)"
    assert not out.exists()


def _huge_npy(path: Path) -> None:
    """An .npy header claiming 10**12 floats (4 TB) over a few bytes of data."""
    with open(path, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 64)


DAMAGED_LOSSES = {
    "garbage": lambda p: p.write_bytes(b"\x93NUMPY garbage"),
    "empty": lambda p: p.write_bytes(b""),
    "strings": lambda p: np.save(p, np.array(["nan", "x"])),
    "structured": lambda p: np.save(p, np.zeros(2, dtype=[("a", "f4"), ("b", "i4")])),
    "pickled-objects": lambda p: np.save(p, np.array([{"a": 1}], dtype=object)),
    "huge-header": _huge_npy,
}


@pytest.mark.parametrize("case", sorted(DAMAGED_LOSSES))
def test_damaged_loss_history_never_blocks_a_resume(case, run_copy, words_file, capsys):
    """The checkpoint is the truth; the loss history is secondary: a damaged
    ``losses.npy`` costs the history (one warning line), never the run."""
    DAMAGED_LOSSES[case](run_copy / "losses.npy")
    rc, out, err = run_cli(
        capsys, "train", "--data", words_file, "--out", run_copy, "--resume",
        "--steps", "3", "--n-hidden", "16", "--chunk-steps", "1", "--samples", "0",
    )  # fmt: skip
    assert (rc, err) == (0, ""), err
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "the loss history restarts here" in warnings[0], out
    assert int(checkpoint.load(run_copy).state.step) == 3
    losses = np.load(run_copy / "losses.npy")
    assert losses.shape == (3,) and np.isnan(losses[:2]).all() and np.isfinite(losses[2])


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_run_files_follow_the_umask(umask, words_file, tmp_path, capsys):
    """Every file and directory a run creates has the mode a plain ``open``/``mkdir``
    would give it under the user's umask (``mkstemp`` alone would make files 0o600)."""
    out = tmp_path / "a" / "run"
    old = os.umask(umask)
    try:
        rc, _, err = run_cli(
            capsys, "train", "--data", words_file, "--out", out, *WORKING, "--samples", "0"
        )
    finally:
        os.umask(old)
    assert (rc, err) == (0, "")
    made = [out.parent, out, *out.iterdir()]
    assert {p.name for p in made} >= {
        "checkpoint.npz",
        "losses.npy",
        "metrics.json",
        ".jaxninja.lock",
    }
    for p in made:
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


def test_metrics_are_never_written_with_nan(tmp_path):
    """The last guard: even a NaN that slipped past the checks is not JSON."""
    with pytest.raises(RunError, match=r"non-finite after training: val_loss\)"):
        rundir.check_finite_end(tmp_path, 1, {"var": np.ones(2)}, {"val_loss": float("nan")})
    with pytest.raises(RunError, match=r"batch-norm var \(not > 0\)"):
        rundir.check_finite_end(tmp_path, 1, {"var": np.zeros(2)}, {"val_loss": 1.0})


@pytest.mark.parametrize("name", [*rundir.FILES, rundir.LOCK])
@pytest.mark.parametrize("flag", ["--overwrite", "--resume", None])
def test_a_run_file_that_is_a_directory_is_never_touched(name, flag, run_copy, words_file, capsys):
    (run_copy / name).unlink(missing_ok=True)
    (run_copy / name).mkdir()
    (run_copy / name / "mine.txt").write_text("the user's\n")
    argv = ["train", "--data", words_file, "--out", run_copy, *WORKING, *([flag] if flag else [])]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    assert one_error_line(err) == (
        f"error: {run_copy / name} is not a regular file (jaxninja never removes it); move "
        f"it away or choose another --out"
    )
    assert (run_copy / name / "mine.txt").read_text() == "the user's\n"


def test_the_lock_is_never_opened_through_a_symlink(words_file, tmp_path, capsys):
    out, mine = tmp_path / "run", tmp_path / "mine.txt"
    out.mkdir()
    mine.write_text("the user's\n")
    (out / rundir.LOCK).symlink_to(mine)
    rc, _, err = run_cli(capsys, "train", "--data", words_file, "--out", out, *WORKING)
    assert rc == 2
    assert one_error_line(err) == (
        f"error: {out / rundir.LOCK} is a symbolic link; remove it or choose another --out"
    )
    assert mine.read_text() == "the user's\n" and sorted(os.listdir(out)) == [rundir.LOCK]


def test_sigterm_in_the_final_phase_says_the_run_finishes(words_file, tmp_path, capsys):
    """A SIGTERM after the last chunk (here: while the split losses are printed) says
    what happens: the run finishes its files and exits 0."""

    def log(line: str) -> None:
        if line.startswith("train "):
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by the run

    out = tmp_path / "r"
    cfg = TrainConfig(n_hidden=16, steps=2, chunk_steps=1)
    capsys.readouterr()
    metrics = train_run(cfg, out, words_file, log=log, num_samples=0)
    err = capsys.readouterr().err
    assert err == f"SIGTERM: {rundir.FINISHING} (send it again to stop now)\n"
    assert metrics["steps"] == 2 and (out / "metrics.json").exists()
    assert checkpoint.load(out).bn_stats is not None
