"""Tests for the experiment switches of TrainConfig (batch norm off, init, output-layer
scales, optimizer, schedule, warmup), evaluation during training (``metrics.jsonl``),
``--config FILE`` and ``--resume`` with the saved config.

Real runs are short (a few hundred steps of a 16-unit model) and shared through
module-scoped fixtures; numbers are checked against an independent numpy forward pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import one_error_line, run_cli

from jaxninja.lecture import model
from jaxninja.training import checkpoint, job, metrics, train
from jaxninja.training.train import ConfigError, TrainConfig

H = 16
NO_BN = TrainConfig(n_hidden=H, steps=300, chunk_steps=200, batch_norm=False, eval_every=100)
REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def no_bn_run(tmp_path_factory, names_file):
    """A 300-step run without batch norm, evaluated every 100 steps: ``(dir, metrics)``."""
    out = tmp_path_factory.mktemp("nobn") / "run"
    m = job.train_run(NO_BN, out, names_file, log=lambda line: None, num_samples=0)
    return out, m


# ----------------------------------------------------------------- batch norm off


def test_no_batch_norm_params_and_state():
    state = train.init_state(NO_BN, 27)
    assert sorted(state.params) == ["C", "W1", "W2", "b1", "b2"]
    assert state.bn_running == {}
    bn = train.init_state(dataclasses.replace(NO_BN, batch_norm=True), 27).params
    for k in state.params:  # the same key gives the same values, with or without batch norm
        assert np.array_equal(state.params[k], bn[k]), k


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


def test_manual_backend_refuses_no_batch_norm(capsys, tmp_path, names_file):
    with pytest.raises(ConfigError, match="manual"):
        dataclasses.replace(NO_BN, backend="manual").validate()
    rc, _, err = run_cli(
        capsys, "train", "--data", names_file, "--out", tmp_path / "r", "--no-batch-norm",
        "--backend", "manual",
    )  # fmt: skip
    assert rc == 2 and "manual" in one_error_line(err)
    assert not (tmp_path / "r").exists()


def test_backends_agree_without_batch_norm(train_xy):
    """custom_vjp and autodiff train the same network without batch norm."""
    cfg = dataclasses.replace(NO_BN, steps=50)
    runs = {}
    for backend in ("custom_vjp", "autodiff"):
        c = dataclasses.replace(cfg, backend=backend)
        runs[backend] = train.make_train_chunk(c, 50)(train.init_state(c, 27), *train_xy)
    (a, la), (b, lb) = runs["custom_vjp"], runs["autodiff"]
    np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-6)
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=1e-5, atol=2e-6, err_msg=k)


@pytest.fixture(scope="module")
def train_xy(splits):
    X, Y = splits.data["train"]
    return jnp.asarray(X), jnp.asarray(Y)


# --------------------------------------------------------------- init and scales


def test_init_switches_set_the_scales(splits):
    fan_in = 30
    randn = train.init_params(TrainConfig(n_hidden=2000, init="randn"), 27)
    kaiming = train.init_params(TrainConfig(n_hidden=2000), 27)
    assert abs(float(jnp.std(randn["W1"])) - 1.0) < 0.02
    assert abs(float(jnp.std(kaiming["W1"])) - (5 / 3) / fan_in**0.5) < 0.01
    fixed = train.init_params(TrainConfig(n_hidden=200, w2_scale=0.01, b2_scale=0.0), 27)
    assert np.all(np.asarray(fixed["b2"]) == 0)
    assert abs(float(jnp.std(fixed["W2"])) - 0.01) < 0.001
    # Part 3's fix: the first loss is about -log(1/27) = 3.2958
    X, Y = (jnp.asarray(a[:5000]) for a in splits.data["train"])
    first = float(model.loss(fixed, X, Y))
    assert abs(first - np.log(27)) < 0.01, first
    bad = train.init_params(TrainConfig(n_hidden=200, w2_scale=1.0, b2_scale=1.0), 27)
    assert float(model.loss(bad, X, Y)) > 10  # Part 3's "27" start: confidently wrong


# --------------------------------------------------------- optimizer and schedule


def lrs_of(cfg: TrainConfig, steps) -> list[float]:
    schedule = train.make_schedule(cfg)
    return [float(schedule(s)) for s in steps]


def test_schedules():
    np.testing.assert_allclose(
        lrs_of(TrainConfig(steps=100, schedule="cosine", lr_decay=0.1), [0, 50, 100]),
        [0.1, 0.055, 0.01],
        rtol=1e-5,
    )
    assert lrs_of(TrainConfig(schedule="constant"), [0, 150_000]) == pytest.approx([0.1, 0.1])
    warm = TrainConfig(warmup=10, lr_decay_step=20)
    np.testing.assert_allclose(lrs_of(warm, [0, 4, 9, 19, 20]), [0.01, 0.05, 0.1, 0.1, 0.01])


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_optimizer_switch_is_optax(name):
    """The chunk's update is optax's optimizer on the schedule, replayed by hand."""
    cfg = TrainConfig(optimizer=name, lr=1e-3, schedule="constant")
    params = {"w": jnp.arange(3.0)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    ours = train.make_optimizer(cfg)
    ref = getattr(optax, name)(1e-3)
    u1, _ = ours.update(grads, ours.init(params), params)
    u2, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_array_equal(u1["w"], u2["w"])


def test_every_combination_checkpoint_loads(tmp_path, splits):
    """Every combination of the switches saves and loads (structure from the config)."""
    combos = itertools.product(
        (True, False), model.INITS, train.OPTIMIZERS, train.SCHEDULES, (0, 5)
    )
    for bn, init, opt, schedule, warmup in combos:
        cfg = TrainConfig(
            n_hidden=4, steps=10, batch_norm=bn, init=init, optimizer=opt,
            schedule=schedule, warmup=warmup, running_stats=bn,
        ).validate()  # fmt: skip
        state = train.init_state(cfg, splits.vocab.size)
        checkpoint.save(tmp_path, cfg, splits.vocab, state)
        ckpt = checkpoint.load(tmp_path)
        assert ckpt.config == cfg
        assert jax.tree.structure(ckpt.state) == jax.tree.structure(state), cfg


def test_old_checkpoint_loads_with_the_defaults(tmp_path, splits):
    """A checkpoint written before the switches existed (its config lacks them) loads:
    it was trained with their defaults, which reproduce the earlier code bit for bit."""
    cfg = TrainConfig(n_hidden=4, steps=10)
    checkpoint.save(tmp_path, cfg, splits.vocab, train.init_state(cfg, 27))
    path = tmp_path / checkpoint.FILENAME
    with np.load(path) as z:
        arrays = dict(z)
    meta = json.loads(bytes(arrays["meta"]).decode())
    for name in train.ADDED_FIELDS:
        del meta["config"][name]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(path, **arrays)
    assert checkpoint.load(tmp_path).config == cfg


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"optimizer": "rmsprop"}, "optimizer"),
        ({"schedule": "linear"}, "schedule"),
        ({"init": "xavier"}, "init"),
        ({"w2_scale": -0.1}, "w2_scale"),
        ({"b2_scale": float("nan")}, "b2_scale"),
        ({"warmup": -1}, "warmup"),
        ({"eval_every": 1.5}, "eval_every"),
        ({"batch_norm": "no"}, "batch_norm"),
        ({"batch_norm": False, "running_stats": True}, "running_stats"),
    ],
)
def test_bad_switches_name_the_field(change, needle):
    with pytest.raises(ConfigError, match=needle):
        dataclasses.replace(TrainConfig(), **change).validate()


# -------------------------------------------------- metrics.jsonl and metrics.json


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
