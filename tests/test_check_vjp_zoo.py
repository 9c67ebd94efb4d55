"""Tests for jaxninja.testing.check_vjp against the zoo (tests/vjp_zoo.py): it catches every wrong
rule in the setting it is modelled for, where a natural assert_vjp_matches call passes it; right
rules pass.

Each wrong rule runs its one setting (one compilation); the catch with all the defaults,
rule by rule, is measured by experiments/check_vjp_catch_rates.py (docs/testing.md). The
shard_map cases run in a fresh process with 4 forced CPU devices
(tests/scripts/check_vjp_shard_cases.py); our own ops run the whole matrix in
tests/test_ops.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import vjp_zoo

from jaxninja.testing import SETTINGS, assert_vjp_matches, check_vjp

ROOT = Path(__file__).resolve().parent.parent
SHARD_SCRIPT = Path(__file__).parent / "scripts" / "check_vjp_shard_cases.py"
WRONG = {make.__name__: make for make in vjp_zoo.WRONG}


def test_the_zoo_has_a_wrong_rule_for_every_setting_but_its_transforms():
    settings = {make().setting for make in vjp_zoo.WRONG}
    settings |= {c.setting for c in vjp_zoo.shard_cases() if c.setting}
    assert len(vjp_zoo.WRONG) + 3 >= 15
    # jit and checkpoint catch rules of other classes (the catch-rate table shows which)
    assert settings == {
        "all_args", "primal", "two_calls", "each_output", "one_row", "scaled", "keywords",
        "low_precision", "second_order", "vmap", "shard_map",
    }  # fmt: skip


@pytest.mark.parametrize("make", WRONG.values(), ids=WRONG.keys())
def test_wrong_rule_is_caught_in_its_setting_and_missed_by_a_natural_call(make):
    case = make()
    assert_vjp_matches(case.f, case.reference, *case.args)  # right at the natural point
    case = make()  # fresh: some rules keep Python state
    with pytest.raises(AssertionError) as err:
        check_vjp(case.f, case.reference, *case.args, settings=[case.setting], **case.options)
    message = str(err.value)
    assert f"setting '{case.setting}'" in message
    assert message.startswith(f"check_vjp: f={case.f.__name__}")


def test_right_layer_norm_passes_every_default_setting():
    """The other controls: softplus setting by setting in test_check_vjp.py, our own ops
    through the whole matrix in tests/test_ops.py."""
    (case,) = (c for c in vjp_zoo.controls() if c.name == "layer_norm")
    report = check_vjp(case.f, case.reference, *case.args, **case.options)
    assert set(report.checked) | set(report.not_applicable) == set(SETTINGS)
    assert set(report.not_applicable) == {"each_output", "keywords", "shard_map"}


@pytest.fixture(scope="module")
def shard_outcomes() -> dict[str, dict]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the script sets its own device count
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(SHARD_SCRIPT), "4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_shard_map_setting_on_four_devices(shard_outcomes):
    assert set(shard_outcomes) == {c.name for c in vjp_zoo.shard_cases()}
    for name, result in shard_outcomes.items():
        if result["right"]:
            assert result["outcome"] == "passed", (name, result)
        else:
            assert "setting 'shard_map'" in result["outcome"], (name, result)
