"""The experiment scripts run top to bottom and print what they promise (a cross-cutting
suite; the lecture's exercises are notebooks now: tests/test_notebooks.py).

Each script runs in its own Python process (see conftest.start_experiments: they start
as soon as these tests are collected), with JAXNINJA_DATA pointing at names.txt.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


@pytest.fixture(scope="module")
def runs(experiment_runs):
    """conftest.experiment_runs: the scripts were started when collection selected these
    tests, each in a fresh Python process with a scratch directory as cwd."""
    return experiment_runs


def run(runs, name) -> tuple[str, Path]:
    code, stdout, out = runs[name]
    assert code == 0, f"{name} exited with {code}:\n{stdout}"
    assert "Traceback" not in stdout, stdout
    return stdout, out


def test_float32_rounding_counts_the_tanh_step(runs):
    """experiments/float32_rounding.py: JAX's transposed tanh rule, jitted (hence with an
    FMA on XLA:CPU), is jax.grad's dhpreact bit for bit; the lecture's formula is not."""
    stdout, _ = run(runs, "float32_rounding")
    counts = {}
    for line in stdout.splitlines():
        m = re.match(r"^(\w+)\s+(\d+) of (\d+) entries differ", line)
        if m:
            counts[m[1]] = (int(m[2]), int(m[3]))
    assert set(counts) == {"lecture", "jax_form", "jax_form_eager", "numpy_fma", "numpy_no_fma"}
    assert {size for _, size in counts.values()} == {32 * 64}
    assert counts["jax_form"][0] == 0
    assert counts["lecture"][0] > 0
