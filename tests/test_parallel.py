"""Tests for jaxninja.training.parallel: data-parallel training and synchronized batch norm
on 4 and 8 forced CPU devices.

The device count of a process is fixed when jax starts, so every multi-device check runs
in a fresh Python process (tests/scripts/data_parallel_cases.py) that sets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before importing jax. The processes
are started together, once per session, and each test reads its part of their output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxninja.errors import JaxninjaError
from jaxninja.training import parallel
from jaxninja.training.train import ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).parent / "scripts" / "data_parallel_cases.py"
TIMEOUT = 300

# Float64 on the same global batch: only the order of additions differs.
TOL64 = 1e-12


def _env(names_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the case script sets its own device count
    env["JAX_PLATFORMS"] = "cpu"
    env["JAXNINJA_DATA"] = str(names_file)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def runs(names_file):
    """Start every multi-device process at once (they overlap on the cores), then wait."""
    env = _env(names_file)
    cli_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    commands = {
        "ops4": ([str(CASES), "ops", "4"], env),
        "ops8": ([str(CASES), "ops", "8"], env),
        "train4": ([str(CASES), "train", "4"], env),
        "cli": (
            ["-m", "jaxninja", "train", "--devices", "3", "--batch-size", "32", "--steps", "1",
             "--out", "/nonexistent/never-written"],
            cli_env,
        ),
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=e,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for name, (args, e) in commands.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=TIMEOUT)
            results[name] = (proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _json(runs, name: str) -> dict:
    rc, out, err = runs[name]
    assert rc == 0, f"{name} failed (exit {rc}):\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("run", ["ops4", "ops8"])
def test_sharded_batch_norm_matches_global_batch(runs, run):
    """Forward y and the VJP (dx, dgain, dbias) equal the one-device op on the global
    batch, float64, unbiased and biased, under shard_map (check_vma on/off) and pmap."""
    res = _json(runs, run)
    assert res["devices"] == int(run[-1])
    cases = {k: v for k, v in res.items() if k.startswith("bn_")}
    expected = {"bn_vma_unbiased", "bn_vma_biased", "bn_novma_unbiased", "bn_pmap_unbiased"}
    assert expected <= set(cases)
    assert "bn_one_row_per_device" in cases and "bn_with_stats" in cases
    for name, diffs in cases.items():
        for what, d in diffs.items():
            assert d <= TOL64, f"{run} {name} {what}: max abs diff {d}"


def test_sharded_model_loss_and_grads(runs):
    res = _json(runs, "ops4")
    for backend in ("model_custom_vjp", "model_autodiff"):
        assert res[backend]["loss"] <= TOL64, res[backend]
        assert res[backend]["grads"] <= TOL64, res[backend]


def test_data_mesh_errors(runs):
    for run in ("ops4", "ops8"):
        res = _json(runs, run)
        assert res["mesh"]["size"] == res["mesh"]["default_size"] == res["devices"]
        assert res["mesh"]["manual_default_is_one_device"]
        errors = res["errors"]
        assert "batch_size 30 does not divide evenly over 4 devices" in errors["uneven"]
        assert "more devices than" in errors["too_many"]
        assert "manual" in errors["manual"]


def test_sharded_training_equals_single_device(runs):
    """50 steps on 4 devices == 50 steps on one device, same batches (float64)."""
    res = _json(runs, "train4")["float64"]
    assert res["first_loss"] > res["last_loss"]  # it trained
    assert res["params"] <= 1e-12 * max(1.0, res["param_scale"]), res
    assert res["losses"] <= 1e-12, res
    assert res["running"] <= 1e-12, res


def test_train_run_with_devices(runs):
    res = _json(runs, "train4")["train_run"]
    assert res["devices"] == 4
    assert res["step"] == 20
    assert 0 < res["train_loss"] < 4


def test_cli_uneven_batch_is_one_line_error(runs):
    rc, out, err = runs["cli"]
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines
    assert "batch_size 32" in lines[0] and "3 devices" in lines[0]
    assert not Path("/nonexistent/never-written").exists()


# ----------------------------------------------------------- in this process (1 device)


def test_one_device_is_todays_path():
    assert parallel.data_mesh(TrainConfig(), 1) is None
    if jax.device_count() == 1:
        assert parallel.data_mesh(TrainConfig(), None) is None


def test_more_devices_than_available_is_config_error():
    with pytest.raises(ConfigError, match="more devices than"):
        parallel.data_mesh(TrainConfig(), jax.device_count() + 1)
    with pytest.raises(ConfigError, match=r"devices must be an integer in 1\.\.2147483647, got 0"):
        parallel.data_mesh(TrainConfig(), 0)


def test_a_second_process_0_on_this_machine_is_refused_before_either_binds_the_port():
    """Two ``--process-id 0`` started at the same moment: the TCP port is still free for
    both (JAX binds it later, and gRPC would let both share it), so the first one's claim
    on the port must be what refuses the second (a CI run saw both pass and wait)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    coordinator = f"127.0.0.1:{port}"
    parallel._check_port_free(coordinator, port)  # the first process 0
    try:
        with pytest.raises(JaxninjaError, match="another process started with --process-id 0"):
            parallel._check_port_free(coordinator, port)  # the second, same machine
    finally:
        parallel._release_claims()
    parallel._check_port_free(coordinator, port)  # released: free again
    parallel._release_claims()
