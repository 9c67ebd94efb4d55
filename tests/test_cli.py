"""Tests for the ``jaxninja`` command (jaxninja.cli: train / sample / eval / check, and
``--config FILE`` / ``--resume`` building the run's config from the saved one, a file and
the flags).

The real entry point (``python -m jaxninja``) runs in subprocesses where it matters
(a training run, the exact stderr of a failing process, ``check``);
the many error paths run in-process through :func:`jaxninja.cli.main`, which is faster.
The dataset comes from conftest.py's ``names_file`` fixture ($JAXNINJA_DATA); a missing
file is an error, never a skip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import NO_BN, one_error_line, run_cli

from jaxninja.training import checkpoint, metrics

REPO = Path(__file__).resolve().parents[1]
RUN_STEPS = 2000
# the lecture's progress line, f"{i:7d}/{n:7d}: {loss:.4f}"
PROGRESS = re.compile(r" *(\d+)/ *(\d+): (\d+\.\d{4})")
SPLIT_LINE = re.compile(r"(train|val|test) +(\d+\.\d{4})")


def python(*args: str, data: Path | None = None, timeout: float = 300):
    """Run ``python *args`` from the repo root; returns the CompletedProcess (text)."""
    env = dict(os.environ)
    if data is not None:
        env["JAXNINJA_DATA"] = str(data)
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_usage_error(rc: int, err: str, *needles: str) -> None:
    """Exit status 2 and exactly one stderr line, ``error: ...``, naming the problem."""
    assert rc == 2, err
    line = one_error_line(err)
    for needle in needles:
        assert needle in line, (needle, err)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, names_file):
    """``python -m jaxninja train`` of a small model, 2,000 steps in chunks of 1,000:
    ``(run dir, stdout lines)``."""
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = python(
        "-m", "jaxninja", "train", "--data", str(names_file), "--out", str(out),
        "--steps", str(RUN_STEPS), "--chunk-steps", "1000", "--n-hidden", "32",
        "--running-stats", "--samples", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    return out, proc.stdout.splitlines()


# -------------------------------------------------------------------------- train


def test_train_prints_the_lecture_progress_lines(trained_run):
    out, lines = trained_run
    assert lines[0] == f"run directory: {out}"
    progress = [ln for ln in lines if PROGRESS.fullmatch(ln)]
    assert len(progress) == 2
    assert re.fullmatch(r"      0/   2000: 3\.\d{4}", progress[0]), progress[0]
    losses = np.load(out / "losses.npy")
    assert losses.shape == (RUN_STEPS,) and np.all(np.isfinite(losses))
    assert progress == [f"{i:7d}/{RUN_STEPS:7d}: {losses[i]:.4f}" for i in (0, 1000)]


def test_train_writes_metrics_plot_and_samples(trained_run):
    out, lines = trained_run
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "train_loss",
        "val_loss",
        "test_loss",
        "steps",
        "backend",
        "seconds",
        "compile_seconds",
        "steps_per_second",
    ):
        assert key in metrics, key
    assert metrics["steps"] == RUN_STEPS and metrics["backend"] == "custom_vjp"
    assert metrics["config"]["n_hidden"] == 32 and metrics["config"]["running_stats"]
    assert 0 < metrics["compile_seconds"] < metrics["seconds"]
    assert metrics["steps_per_second"] > 0
    for split in ("train", "val", "test"):
        assert 1.5 < metrics[f"{split}_loss"] < 2.8
        # --running-stats also reports the losses with the running averages, close by
        assert abs(metrics[f"{split}_loss_running_stats"] - metrics[f"{split}_loss"]) < 0.05
        # and the summary lines print the same numbers
        assert f"{split:5s} {metrics[f'{split}_loss']:.4f}" in lines
    png = out / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"loss curve: {png}" in lines
    samples = lines[lines.index(f"loss curve: {png}") + 1 :]
    assert len(samples) == 3 and all(re.fullmatch(r"[a-z]*", s) for s in samples), samples
    assert (out / "checkpoint.npz").is_file()


# ------------------------------------------------------------------ sample / eval


def test_sample_prints_n_names(trained_run, capsys):
    out, _ = trained_run
    rc, stdout, err = run_cli(capsys, "sample", "--out", out, "-n", "5")
    assert rc == 0 and err == ""
    names = stdout.splitlines()
    assert len(names) == 5
    assert all(re.fullmatch(r"[a-z]+", n) for n in names), names
    # deterministic for a seed; another seed gives other names
    assert run_cli(capsys, "sample", "--out", out, "-n", "5")[1] == stdout
    assert run_cli(capsys, "sample", "--out", out, "-n", "5", "--seed", "1")[1] != stdout
    rc, stdout, _ = run_cli(capsys, "sample", "--out", out, "-n", "5", "--max-len", "3")
    assert rc == 0 and max(map(len, stdout.splitlines())) <= 3


def test_eval_prints_the_metrics_losses(trained_run, capsys, names_file):
    out, _ = trained_run
    rc, stdout, err = run_cli(capsys, "eval", "--out", out, "--data", names_file)
    assert rc == 0 and err == ""
    got = {m[1]: float(m[2]) for m in map(SPLIT_LINE.fullmatch, stdout.splitlines()) if m}
    assert len(stdout.splitlines()) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert got == {s: metrics[f"{s}_loss"] for s in ("train", "val", "test")}


# -------------------------------------------------------------------- error paths


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--steps", "-1"], ["steps must be an integer in 1..", "got -1"]),
        (["--steps", "0"], ["steps must be an integer in 1..", "got 0"]),
        (["--steps", "ten"], ["argument --steps", "invalid int value", "'ten'"]),
        (["--batch-size", "1"], ["batch_size", "got 1"]),
        (["--backend", "tensorflow"], ["--backend", "tensorflow"]),
        (["--lr", "nan"], ["lr must be", "got nan"]),
        (["--lr", "-1"], ["lr must be", "got -1.0"]),
        (["--lr", "inf"], ["lr must be", "got inf"]),
    ],
    ids=[
        "steps=-1",
        "steps=0",
        "steps=ten",
        "batch-size=1",
        "backend",
        "lr=nan",
        "lr=-1",
        "lr=inf",
    ],
)
def test_bad_train_arguments(capsys, tmp_path, names_file, args, needles):
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--data", names_file, "--out", out, *args)
    assert_usage_error(rc, err, *needles)
    assert not out.exists()


def test_missing_and_empty_data_files(capsys, tmp_path):
    missing = tmp_path / "nope.txt"
    rc, _, err = run_cli(capsys, "train", "--data", missing, "--out", tmp_path / "a")
    assert_usage_error(rc, err, str(missing), "no such file")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc, _, err = run_cli(capsys, "train", "--data", empty, "--out", tmp_path / "b")
    assert_usage_error(rc, err, str(empty), "empty")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_errors(capsys, tmp_path, names_file, trained_run):
    out, _ = trained_run
    before = (out / "checkpoint.npz").read_bytes()
    missing = tmp_path / "never-trained"
    rc, _, err = run_cli(capsys, "train", "--data", names_file, "--out", missing, "--resume")
    assert_usage_error(rc, err, str(missing), "nothing to resume")
    # a run with another config cannot be continued: the error names the field
    rc, _, err = run_cli(
        capsys, "train", "--data", names_file, "--out", out, "--resume",
        "--steps", str(RUN_STEPS), "--chunk-steps", "1000", "--n-hidden", "64", "--running-stats",
    )  # fmt: skip
    assert_usage_error(rc, err, "different config", "n_hidden=32", "64")
    # nor silently replaced
    rc, _, err = run_cli(
        capsys,
        "train",
        "--data",
        names_file,
        "--out",
        out,
        "--steps",
        str(RUN_STEPS),
        "--n-hidden",
        "32",
    )
    assert_usage_error(rc, err, str(out), "--resume", "--overwrite")
    assert (out / "checkpoint.npz").read_bytes() == before  # untouched


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_sample_and_eval_need_a_checkpoint(capsys, tmp_path, command):
    rc, _, err = run_cli(capsys, command, "--out", tmp_path)
    assert_usage_error(rc, err, str(tmp_path), "no checkpoint")
    rc, _, err = run_cli(capsys, command, "--out", tmp_path / "nowhere")
    assert_usage_error(rc, err, "no checkpoint")


def test_errors_from_a_real_process(tmp_path):
    """The process itself: exit 2 and one stderr line, nothing else (no traceback, no
    JAX warning), both for an argparse error and for one raised after JAX is loaded."""
    proc = python("-m", "jaxninja", "train", "--steps", "ten")
    assert proc.stdout == ""
    assert_usage_error(proc.returncode, proc.stderr, "--steps", "'ten'")
    missing = tmp_path / "nope.txt"
    proc = python("-m", "jaxninja", "train", "--data", str(missing), "--out", str(tmp_path / "r"))
    assert_usage_error(proc.returncode, proc.stderr, str(missing))


# -------------------------------------------------------------------------- check


def test_check_float64(names_file):
    proc = python("-m", "jaxninja", "check", "--dtype", "float64", data=names_file)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------ --config and --resume


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("c.json", '{"n_hidden": 8, "optimizer": "adam", "steps": 3}'),
        ("c.toml", 'n_hidden = 8\noptimizer = "adam"\nsteps = 3\n'),
    ],
)
def test_config_file(capsys, tmp_path, names_file, name, text):
    path = tmp_path / name
    path.write_text(text)
    out = tmp_path / "run"
    argv = ["train", "--data", names_file, "--out", out, "--config", path, "--samples", "0"]
    rc, _, err = run_cli(capsys, *argv, "--steps", "4", "--chunk-steps", "2")
    assert rc == 0, err
    cfg = checkpoint.load(out).config
    assert (cfg.n_hidden, cfg.optimizer, cfg.steps) == (8, "adam", 4)  # the flag wins


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('{"n_hiden": 8}', ["n_hiden", "unknown"]),
        ('{"n_hidden": "8"}', ["n_hidden", "'8'"]),
        ('{"n_hidden": 8,}', ["not valid JSON", "line 1"]),
        ("[1, 2]", ["object"]),
        ('{"optimizer": "sgdd"}', ["optimizer", "sgdd"]),
    ],
)
def test_bad_config_files_are_one_line(capsys, tmp_path, names_file, text, needles):
    path = tmp_path / "bad.json"
    path.write_text(text)
    rc, _, err = run_cli(
        capsys, "train", "--data", names_file, "--out", tmp_path / "r", "--config", path
    )
    line = one_error_line(err)
    assert rc == 2
    for needle in [str(path), *needles]:
        assert needle in line, (needle, line)
    assert not (tmp_path / "r").exists()


def test_bad_toml_names_the_line(capsys, tmp_path, names_file):
    path = tmp_path / "bad.toml"
    path.write_text("n_hidden = 8\nsteps = = 3\n")
    rc, _, err = run_cli(capsys, "train", "--data", names_file, "--config", path)
    assert rc == 2 and "line 2" in one_error_line(err) and str(path) in err


def test_resume_reads_the_saved_config(no_bn_run, capsys, tmp_path, names_file):
    """``--resume`` alone continues with the run's own config; a flag that disagrees is
    refused, naming the field."""
    out, _ = no_bn_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    argv = ["train", "--data", names_file, "--out", copy, "--resume", "--samples", "0"]
    rc, _, err = run_cli(capsys, *argv, "--optimizer", "adam")
    assert rc == 2 and "optimizer='sgd' (asked 'adam')" in one_error_line(err)
    rc, _, err = run_cli(capsys, *argv, "--steps", "400")
    assert rc == 0, err
    cfg = checkpoint.load(copy).config
    assert cfg == dataclasses.replace(NO_BN, steps=400)
    assert [r["step"] for r in metrics.read(copy)] == [100, 200, 300, 400]
