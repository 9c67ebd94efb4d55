"""Tests for ``jaxninja compare`` and ``jaxninja diagnose`` (jaxninja.training.compare,
jaxninja.training.diagnose) on two tiny real runs (H=8, 200 steps), the numbers checked
against numpy."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import one_error_line, run_cli

from jaxninja.lecture import model
from jaxninja.training import diagnose, job, metrics
from jaxninja.training.train import TrainConfig

CFG = TrainConfig(n_hidden=8, steps=200, chunk_steps=100, eval_every=100)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, names_file):
    """Two finished runs that differ in batch norm and lr: ``[bn, no_bn]``."""
    root = tmp_path_factory.mktemp("runs")
    quiet = dict(log=lambda line: None, num_samples=0)
    job.train_run(CFG, root / "bn", names_file, **quiet)
    no_bn = TrainConfig(**{**CFG.to_dict(), "batch_norm": False, "lr": 0.05})
    job.train_run(no_bn, root / "no_bn", names_file, **quiet)
    return [root / "bn", root / "no_bn"]


def test_compare_table_and_plot(runs, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "compare", *runs, "--out", tmp_path / "c")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        "| run | lr | batch_norm | first_loss | train_loss | val_loss | test_loss "
        "| steps_per_second |"
    )
    results = [json.loads((r / "metrics.json").read_text()) for r in runs]
    for line, m in zip(lines[2:4], results, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4:7] == [f"{m[k]:.4f}" for k in ("train_loss", "val_loss", "test_loss")]
    csv = (tmp_path / "c" / "compare.csv").read_text().splitlines()
    assert csv[0].startswith("run,lr,batch_norm,") and len(csv) == 3
    assert (tmp_path / "c" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # a directory of the user's is never written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    rc, _, err = run_cli(capsys, "compare", *runs, "--out", tmp_path / "mine")
    assert rc == 2 and "other files" in one_error_line(err)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_compare_refuses_a_directory_that_is_no_run(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "compare", tmp_path)
    assert rc == 2 and "no metrics.json" in one_error_line(err)


def numpy_hidden(params, bn_stats, X) -> np.ndarray:
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h = p["C"][np.asarray(X)].reshape(len(X), -1) @ p["W1"] + p["b1"]
    if "bngain" in p:
        mean, var = (np.asarray(bn_stats[k], np.float64) for k in ("mean", "var"))
        h = p["bngain"] * (h - mean) / np.sqrt(var + 1e-5) + p["bnbias"]
    return np.tanh(h)


@pytest.mark.parametrize("which", [0, 1], ids=["bn", "no_bn"])
def test_diagnose_numbers_match_numpy(runs, splits, which):
    run = runs[which]
    report = diagnose.diagnose(run)
    ckpt = job.load_run(run)
    X = splits.data["train"][0][: diagnose.N_EXAMPLES]
    h = numpy_hidden(ckpt.state.params, ckpt.bn_stats, X)
    sat = np.abs(h) > diagnose.SATURATED
    assert report["hidden"]["saturated_fraction"] == pytest.approx(sat.mean(), abs=2e-3)
    assert report["hidden"]["dead_units"] == int(sat.all(0).sum())
    # gradient:data on the first batch-size rows, by jax.grad of the plain loss
    n = ckpt.config.batch_size
    Xb, Yb = (jnp.asarray(a[:n]) for a in splits.data["train"])
    grads = jax.grad(model.loss)(ckpt.state.params, Xb, Yb)
    for k, g in grads.items():
        want = float(np.std(g) / np.std(ckpt.state.params[k]))
        assert report["grad_ratio"][k] == pytest.approx(want, rel=1e-3), k
    assert report["update_ratio_last"] == metrics.read(run)[-1]["update_ratio"]


def test_dead_units_are_counted():
    h = np.array([[0.99, 0.2, -0.999], [-0.98, 0.1, -0.999], [0.991, 0.97, -0.98]])
    assert diagnose.summarize(h)["dead_units"] == 2  # units 0 and 2; unit 1 never saturates
    assert diagnose.summarize(h)["saturated_fraction"] == pytest.approx(6 / 9)


def test_diagnose_cli_writes_the_pictures(runs, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "diagnose", "--out", runs[0], "--to", tmp_path / "d")
    assert rc == 0, err
    assert "dead units:" in out and "tanh saturated" in out
    for name in diagnose.FILES:
        assert (tmp_path / "d" / name).stat().st_size > 0, name
    assert (tmp_path / "d" / "activations.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert saved["hidden"]["dead_units"] >= 0 and set(saved["grad_ratio"]) >= {"W1", "W2"}


def test_diagnose_needs_a_finished_run(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "diagnose", "--out", tmp_path)
    assert rc == 2 and "no checkpoint" in one_error_line(err)
