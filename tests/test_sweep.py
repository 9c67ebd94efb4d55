"""jaxninja.training.sweep: M models in one vmapped program equal M separate runs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxninja import cli
from jaxninja.training import sweep, train
from jaxninja.training.train import ConfigError, TrainConfig

H, STEPS = 32, 300
SMALL = TrainConfig(n_hidden=H, steps=STEPS, chunk_steps=STEPS, lr_decay_step=200)


@pytest.fixture(scope="module")
def train_xy(splits):
    X, Y = splits.data["train"]
    return jnp.asarray(X), jnp.asarray(Y)


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


def test_sweep_run_reports_every_member(names_file):
    cfg = TrainConfig(n_hidden=16, steps=200, chunk_steps=100)
    lines: list[str] = []
    result = sweep.sweep_run(cfg, [1, 2], [0.1, 0.2], names_file, log=lines.append)
    assert [(r["seed"], r["lr"]) for r in result["members"]] == [
        (1, 0.1), (1, 0.2), (2, 0.1), (2, 0.2)
    ]  # fmt: skip
    for r in result["members"]:
        assert 2.0 < r["train_loss"] < 3.3 and 2.0 < r["val_loss"] < 3.3, r
    assert result["model_steps_per_second"] > 0
    assert any(ln.startswith("| member |") for ln in lines)


@pytest.mark.parametrize(
    ("seeds", "lrs", "match"),
    [
        ([], None, "at least one seed"),
        (None, [], "at least one learning rate"),
        ([-1], None, "non-negative"),
        ([1.5], None, "non-negative integer"),
        (None, [0.0], "positive finite"),
        (None, [float("nan")], "positive finite"),
        (None, [True], "positive finite"),
        ([1, 1], [0.1], "repeats"),
    ],
)
def test_bad_members_are_clear_errors(seeds, lrs, match):
    with pytest.raises(ConfigError, match=match):
        sweep.members(seeds, lrs, TrainConfig())


def test_members_grid_defaults_to_the_config():
    assert sweep.members(None, None, TrainConfig(seed=7, lr=0.3)) == [(7, 0.3)]
    assert sweep.members([1, 2], [0.1], TrainConfig()) == [(1, 0.1), (2, 0.1)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sweep", "--seeds", "1,x"], "--seeds"),
        (["sweep", "--lrs", "-0.1"], "positive finite"),
        (["sweep", "--seeds", "3,3"], "repeats"),
    ],
)
def test_cli_bad_arguments(argv, message, capsys, names_file):
    assert cli.main([*argv, "--steps", "10", "--data", str(names_file)]) == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
