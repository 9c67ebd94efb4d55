"""Tests for jaxninja.training.diagnose (``jaxninja diagnose``): hidden-layer saturation,
dead units and gradient:data ratios of two tiny real runs (conftest's ``two_runs``: H=8,
200 steps), the numbers checked against numpy."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import one_error_line, run_cli

from jaxninja.lecture import model
from jaxninja.training import diagnose, job, metrics


def numpy_hidden(params, bn_stats, X) -> np.ndarray:
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h = p["C"][np.asarray(X)].reshape(len(X), -1) @ p["W1"] + p["b1"]
    if "bngain" in p:
        mean, var = (np.asarray(bn_stats[k], np.float64) for k in ("mean", "var"))
        h = p["bngain"] * (h - mean) / np.sqrt(var + 1e-5) + p["bnbias"]
    return np.tanh(h)


@pytest.mark.parametrize("which", [0, 1], ids=["bn", "no_bn"])
def test_diagnose_numbers_match_numpy(two_runs, splits, which):
    run = two_runs[which]
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


def test_diagnose_cli_writes_the_pictures(two_runs, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "diagnose", "--out", two_runs[0], "--to", tmp_path / "d")
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
