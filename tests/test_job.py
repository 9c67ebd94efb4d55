"""Tests for jaxninja.training.job: a training run on disk (``train_run``, ``load_run``,
``eval_run``): resuming equals an uninterrupted run bit for bit, a run without batch norm
evaluates and resumes with the right numbers (also in a fresh process), and non-finite
parameters never reach a checkpoint.

The run without batch norm is conftest's session-scoped ``no_bn_run`` (test_metrics.py and
test_cli.py read it too). Bad input and faults end to end through the CLI are
tests/test_reliability.py and tests/test_faults.py; the run directory's own rules (lock,
ownership, resume checks) are tests/test_rundir.py.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import NO_BN, PROGRESS, assert_trees_equal

from jaxninja.training import checkpoint, job, metrics
from jaxninja.training.job import RunError, train_run
from jaxninja.training.train import TrainConfig

H = 32  # a small hidden layer for the short runs


def test_resume_equals_uninterrupted(tmp_path, names_file):
    """steps=200 into A, then resume A to 400; straight 400 into B: identical bit for bit
    (params, optimizer state, step, losses.npy, metrics). The chunk boundaries (100) are
    the same in both and a multiple of the scan unroll, so the result is exact."""
    cfg = TrainConfig(n_hidden=H, steps=400, chunk_steps=100)
    a, b = tmp_path / "a", tmp_path / "b"
    logs: dict[str, list[str]] = {"a1": [], "a2": [], "b": []}
    m_a1 = job.train_run(
        dataclasses.replace(cfg, steps=200), a, names_file, log=logs["a1"].append, num_samples=2
    )
    assert m_a1["steps"] == 200 and checkpoint.load(a).bn_stats is not None
    m_a = job.train_run(cfg, a, names_file, resume=True, log=logs["a2"].append, num_samples=2)
    m_b = job.train_run(cfg, b, names_file, log=logs["b"].append, num_samples=2)

    ck_a, ck_b = checkpoint.load(a), checkpoint.load(b)
    assert int(ck_a.state.step) == 400
    assert ck_a.config == ck_b.config == cfg
    assert_trees_equal(ck_a.state, ck_b.state)
    assert_trees_equal(ck_a.bn_stats, ck_b.bn_stats)
    losses_a, losses_b = np.load(a / "losses.npy"), np.load(b / "losses.npy")
    assert losses_a.shape == (400,) and np.all(np.isfinite(losses_a))
    assert np.array_equal(losses_a, losses_b)
    for k in ("train_loss", "val_loss", "test_loss"):
        assert m_a[k] == m_b[k]
    assert m_a["steps_this_run"] == 200 and m_b["steps_this_run"] == 400
    progress = {
        k: [PROGRESS.fullmatch(ln).groups() for ln in v if PROGRESS.fullmatch(ln)]
        for k, v in logs.items()
    }
    # (step, total, loss): the resumed run goes on from step 200 with the straight run's losses
    assert [(s, n) for s, n, _ in progress["b"]] == [(s, "400") for s in ("0", "100", "200", "300")]
    assert progress["a2"] == progress["b"][2:]
    assert [(s, loss) for s, _, loss in progress["a1"]] == [
        (s, loss) for s, _, loss in progress["b"][:2]
    ]
    metrics = json.loads((a / "metrics.json").read_text())
    assert metrics["train_loss"] == m_a["train_loss"]


# ----------------------------------------------------------------- batch norm off


def numpy_loss(params, X, Y, bn_stats=None) -> float:
    """Mean cross-entropy of the network, written in numpy (float64), either variant."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h = p["C"][np.asarray(X)].reshape(len(X), -1) @ p["W1"] + p["b1"]
    if "bngain" in p:
        mean, var = (np.asarray(bn_stats[k], np.float64) for k in ("mean", "var"))
        h = p["bngain"] * (h - mean) / np.sqrt(var + 1e-5) + p["bnbias"]
    logits = np.tanh(h) @ p["W2"] + p["b2"]
    m = logits.max(1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    return float(-logp[np.arange(len(Y)), np.asarray(Y)].mean())


def cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m jaxninja *args`` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "jaxninja", *args], capture_output=True, text=True, timeout=300
    )


def test_run_without_batch_norm_evaluates_with_the_right_numbers(no_bn_run, splits):
    out, m = no_bn_run
    ckpt = job.load_run(out)
    assert ckpt.bn_stats == {} and ckpt.config == NO_BN
    assert "bngain" not in ckpt.state.params
    for split in ("train", "val", "test"):
        X, Y = splits.data[split]
        assert abs(m[f"{split}_loss"] - numpy_loss(ckpt.state.params, X, Y)) < 1e-4, split
    assert m["val_loss"] < 3.0  # it trained (about 2.6 after 300 steps)


def test_run_without_batch_norm_in_a_fresh_process(no_bn_run, names_file):
    """eval and sample of a checkpoint without batch norm, in a new process."""
    out, m = no_bn_run
    proc = cli("eval", "--out", str(out), "--data", str(names_file))
    assert proc.returncode == 0, proc.stderr
    got = {ln.split()[0]: float(ln.split()[1]) for ln in proc.stdout.splitlines()}
    assert got == {s: m[f"{s}_loss"] for s in ("train", "val", "test")}
    proc = cli("sample", "--out", str(out), "-n", "5")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 5


def test_resume_without_batch_norm_equals_uninterrupted(no_bn_run, tmp_path, names_file):
    out, m = no_bn_run
    half = tmp_path / "half"
    quiet = dict(log=lambda line: None, num_samples=0)
    job.train_run(dataclasses.replace(NO_BN, steps=200), half, names_file, **quiet)
    resumed = job.train_run(NO_BN, half, names_file, resume=True, **quiet)
    for k in ("train_loss", "val_loss", "test_loss"):
        assert resumed[k] == m[k], k
    assert np.array_equal(np.load(half / "losses.npy"), np.load(out / "losses.npy"))
    # the evaluations: one per 100 steps, the same whether resumed or not
    assert metrics.read(half) == metrics.read(out)


# ------------------------------------------------------------------------- non-finite


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_non_finite_parameters_never_reach_a_checkpoint(words_file, tmp_path):
    """lr=3e38 is finite in float32; the first update makes the parameters huge while the
    loss it reports (of the step's old parameters) is still finite. Only states whose
    every array is finite are saved (a bug found earlier saved non-finite parameters as
    the "last good checkpoint", which checkpoint.load then refused)."""
    out = tmp_path / "r"
    cfg = TrainConfig(n_hidden=16, steps=3, chunk_steps=1, lr=3e38)
    with pytest.raises(RunError) as e:
        train_run(cfg, out, words_file, log=lambda s: None)
    assert str(e.value).startswith("loss became non-finite at step 1; stopped, the last good")
    kept = checkpoint.load(out)  # loads: every array in it is finite (load checks)
    assert int(kept.state.step) == 1
