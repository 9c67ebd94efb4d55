"""Tests for jaxninja.training.metrics: evaluation during training (``metrics.jsonl``: one
line per evaluation, the update:data ratio), and what a run records about where it ran.

The evaluated run is conftest's session-scoped ``no_bn_run`` (test_job.py and test_cli.py
read it too).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxninja.training import metrics, train
from jaxninja.training.train import TrainConfig

H = 16


def test_metrics_jsonl_has_one_line_per_evaluation(no_bn_run):
    out, m = no_bn_run
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [100, 200, 300]
    assert records[-1]["val_loss"] == m["val_loss"]  # the last evaluation is the final one
    losses = np.load(out / "losses.npy")
    assert records[0]["train_loss"] == round(float(losses[:100].mean()), 4)
    for r in records:
        assert r["lr"] == pytest.approx(0.1)
        assert r["grad_norm"] > 0
        assert sorted(r["update_ratio"]) == ["C", "W1", "W2", "b1", "b2"]
        assert all(1e-5 < v < 1 for v in r["update_ratio"].values()), r
    for key in ("jax_version", "jaxlib_version", "jaxninja_version", "device", "started"):
        assert m[key], key
    assert m["jax_version"] == jax.__version__


def test_update_ratio_is_the_sgd_step(splits):
    """For SGD the update is -lr * grad: update_ratio = lr * grad_ratio exactly."""
    cfg = TrainConfig(n_hidden=H)
    state = train.init_state(cfg, 27)
    X, Y = (jnp.asarray(a[:32]) for a in splits.data["train"])
    stats = metrics.step_stats(cfg, state, X, Y)
    for k in state.params:
        ratio = float(stats["update_ratio"][k]) / float(stats["grad_ratio"][k])
        assert ratio == pytest.approx(0.1, rel=1e-5), k
