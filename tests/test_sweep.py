"""Tests for jaxninja.training.sweep: grids over config fields; members equal separate runs, vmapped
or one after another, and are real run directories."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxninja import cli
from jaxninja.training import compare, job, metrics, sweep, train
from jaxninja.training.train import ConfigError, TrainConfig

H, STEPS = 32, 300
SMALL = TrainConfig(n_hidden=H, steps=STEPS, chunk_steps=STEPS, lr_decay_step=200)


@pytest.mark.parametrize("backend", ["custom_vjp", "manual"])
def test_vmapped_sweep_equals_separate_runs(train_xy, backend):
    """3 members (different seeds and lrs) trained in one vmapped program end where each
    member trained alone ends (float32 rounding of the batched kernels aside), through
    the lr decay at step 200 inside the chunk."""
    Xtr, Ytr = train_xy
    cfg = dataclasses.replace(SMALL, backend=backend)
    grid = [(1, 0.1), (2, 0.1), (3, 0.05)]
    states = sweep.init_states(cfg, [s for s, _ in grid], 27)
    fn = sweep.make_sweep_chunk(cfg, STEPS)
    states, losses = fn(states, jnp.asarray([s for s, _ in grid]),
                        jnp.asarray([lr for _, lr in grid], jnp.float32), Xtr, Ytr)  # fmt: skip
    assert losses.shape == (3, STEPS)
    for m, (seed, lr) in enumerate(grid):
        c = dataclasses.replace(cfg, seed=seed, lr=lr)
        alone, alone_losses = train.make_train_chunk(c, STEPS)(train.init_state(c, 27), Xtr, Ytr)
        assert int(states.step[m]) == int(alone.step) == STEPS
        np.testing.assert_allclose(losses[m], alone_losses, rtol=1e-5, atol=1e-5)
        for k in alone.params:
            np.testing.assert_allclose(states.params[k][m], alone.params[k], rtol=1e-5,
                                       atol=1e-5, err_msg=f"member {m}: {k}")  # fmt: skip
        # the schedule counter advanced per member as well
        np.testing.assert_array_equal(
            jax.tree.leaves(states.opt_state)[0][m], jax.tree.leaves(alone.opt_state)[0]
        )
    # the members really differ (different seeds and lrs)
    assert not np.allclose(states.params["W1"][0], states.params["W1"][1])


def test_sweep_chunks_compose(train_xy):
    """Two chunks of 150 equal one of 300: each member's batches depend on (seed, step)."""
    Xtr, Ytr = train_xy
    seeds, lrs = jnp.asarray([5, 6]), jnp.asarray([0.1, 0.1], jnp.float32)
    one, l_one = sweep.make_sweep_chunk(SMALL, 300)(sweep.init_states(SMALL, [5, 6], 27),
                                                    seeds, lrs, Xtr, Ytr)  # fmt: skip
    half = sweep.make_sweep_chunk(SMALL, 150)
    two, l_a = half(sweep.init_states(SMALL, [5, 6], 27), seeds, lrs, Xtr, Ytr)
    two, l_b = half(two, seeds, lrs, Xtr, Ytr)
    np.testing.assert_allclose(np.concatenate([l_a, l_b], 1), l_one, rtol=1e-6, atol=1e-6)
    for k in one.params:
        np.testing.assert_allclose(two.params[k], one.params[k], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, names_file):
    """The same 4-member grid (2 seeds x 2 lrs, H=16, 200 steps) swept both ways:
    ``{strategy: (dir, result)}``."""
    root = tmp_path_factory.mktemp("sweeps")
    cfg = TrainConfig(n_hidden=16, steps=200, chunk_steps=100, eval_every=100)
    grid = {"seed": [1, 2], "lr": [0.1, 0.05]}
    out = {}
    for how in ("vmap", "sequential"):
        result = sweep.sweep_run(cfg, grid, root / how, names_file, strategy=how, log=_quiet)
        out[how] = (root / how, result)
    return out


def _quiet(line: str) -> None:
    pass


def test_sweep_members_equal_separate_runs(swept, tmp_path, names_file):
    """Every member of both strategies equals ``train`` of its config to 4 decimals, and
    is a real run directory (eval recomputes its numbers)."""
    alone = job.train_run(
        TrainConfig(n_hidden=16, steps=200, chunk_steps=100, eval_every=100, seed=2, lr=0.05),
        tmp_path / "alone", names_file, log=_quiet, num_samples=0,
    )  # fmt: skip
    for how, (root, result) in swept.items():
        rows = result["members"]
        assert [(r["seed"], r["lr"]) for r in rows] == [(1, 0.1), (1, 0.05), (2, 0.1), (2, 0.05)]
        member = root / rows[3]["run"]
        for k in ("train_loss", "val_loss", "test_loss"):
            assert abs(rows[3][k] - alone[k]) <= 1e-4, (how, k)
        assert job.eval_run(member, names_file) == {
            s: rows[3][f"{s}_loss"] for s in ("train", "val", "test")
        }
        assert job.load_run(member).config.lr == 0.05  # its own config, not the base's
        assert [r["step"] for r in metrics.read(member)] == [100, 200]
        assert rows[0]["val_loss"] != rows[1]["val_loss"]  # members differ
    a, b = (swept[h][1]["members"] for h in ("vmap", "sequential"))
    for ra, rb in zip(a, b, strict=True):
        assert abs(ra["val_loss"] - rb["val_loss"]) <= 1e-4


def test_sweep_writes_its_table_and_plot(swept):
    root, result = swept["sequential"]
    csv = (root / "results.csv").read_text().splitlines()
    assert csv[0] == "run,seed,lr,first_loss,train_loss,val_loss,test_loss,steps_per_second"
    assert len(csv) == 5
    md = (root / "results.md").read_text().splitlines()
    assert md[0].startswith("| run | seed | lr |") and len(md) == 6
    assert (root / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((root / "sweep.json").read_text())["strategy"] == "sequential"
    rows = compare.compare([root / r["run"] for r in result["members"][:2]])
    assert [list(r)[:2] for r in rows] == [["run", "lr"]] * 2  # only lr differs


def test_shape_changing_fields_form_groups():
    cfg = TrainConfig(steps=10)
    grid = sweep.members(cfg, {"n_hidden": [8, 16], "seed": [1, 2], "init": ["kaiming", "randn"]})
    parts = sweep.groups(grid)
    assert [len(g) for g in parts] == [4, 4]
    assert {m.config.n_hidden for m in parts[0]} == {8}


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        (["n_hiden=8,16"], "unknown config field 'n_hiden'"),
        (["n_hidden=8,x"], "n_hidden: 'x' is not an integer"),
        (["lr=0.1,fast"], "lr: 'fast' is not a number"),
        (["batch_norm=maybe"], "batch_norm: 'maybe' is not true or false"),
        (["n_hidden="], "empty value list"),
        (["n_hidden=8,,16"], "empty value list"),
        (["n_hidden"], "KEY=V1,V2"),
        (["seed=1", "seed=2"], "given twice"),
    ],
)
def test_bad_grids_are_clear_errors(specs, match):
    with pytest.raises(ConfigError, match=match):
        sweep.parse_grid(specs)


def test_bad_members_are_clear_errors():
    with pytest.raises(ConfigError, match="member 1_lr=-0.1: lr must be"):
        sweep.members(TrainConfig(), {"lr": [0.1, -0.1]})
    with pytest.raises(ConfigError, match="repeats"):
        sweep.members(TrainConfig(), {"seed": [3, 3]})
    with pytest.raises(ConfigError, match="625 members, more than the 256"):
        sweep.members(
            TrainConfig(), {k: list(range(1, 6)) for k in ("seed", "n_hidden", "n_embd", "steps")}
        )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid", "seed=1,x"], "--grid seed"),
        (["--grid", "lr=-0.1"], "lr must be"),
        (["--grid", "colour=red"], "unknown config field"),
        (["--grid", "seed=3,3"], "repeats"),
    ],
)
def test_cli_bad_arguments(argv, message, capsys, names_file, tmp_path):
    argv = [
        "sweep",
        *argv,
        "--steps",
        "10",
        "--data",
        str(names_file),
        "--out",
        str(tmp_path / "s"),
    ]
    assert cli.main(argv) == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "s").exists()
