"""The experiment scripts run top to bottom and print what the lecture prints.

Each script runs in its own Python process (see conftest.start_experiments: they start
as soon as these tests are collected), with JAXNINJA_DATA pointing at names.txt.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxninja.lecture import ninja

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


CMP_ROW = re.compile(
    r"^(?P<name>\S+(?: \(\w+\))?)\s+ \| exact: (?P<exact>True |False) \| "
    r"approximate: (?P<approx>True |False) \| maxdiff: (?P<maxdiff>\S+)$"
)


def cmp_rows(stdout: str) -> list[re.Match]:
    return [m for line in stdout.splitlines() if (m := CMP_ROW.match(line))]


def test_exercise1_prints_two_cmp_tables(runs):
    stdout, _ = run(runs, "exercise1")
    rows = cmp_rows(stdout)
    assert len(rows) == 52  # 26 gradients, float32 then float64
    assert [m["name"] for m in rows] == list(ninja.GRADIENTS) * 2
    assert "exact: True" in stdout
    assert all(m["approx"] == "True " for m in rows)
    assert max(float(m["maxdiff"]) for m in rows[:26]) < 1e-6  # float32
    assert max(float(m["maxdiff"]) for m in rows[26:]) < 1e-12  # float64
    assert "float32 (jit)" in stdout and "float64 (jit)" in stdout
    summaries = re.findall(r"^(\d+)/26 rows exact, all approximate: True", stdout, re.M)
    assert len(summaries) == 2 and all(int(k) >= 1 for k in summaries)
    # the loss column of the lecture's cmp: the loss at init, near -log(1/27)
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", stdout)]
    assert len(losses) == 2 and all(3.0 < x < 4.0 for x in losses)


def test_exercise2_loss_and_dlogits(runs):
    stdout, out = run(runs, "exercise2")
    lines = stdout.splitlines()
    m = re.fullmatch(r"(\d+\.\d+) diff: (\S+)", lines[0])  # the lecture: 3.348... diff: ...
    assert m, lines[0]
    assert 3.0 < float(m[1]) < 4.0 and abs(float(m[2])) < 1e-5
    rows = {r["name"]: r for r in cmp_rows(stdout)}
    assert set(rows) == {"logits", "logits (vjp)"}
    for r in rows.values():
        assert r["approx"] == "True " and float(r["maxdiff"]) < 1e-7

    png = out / "dl.png"
    assert png.is_file() and f"to {png}" in stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[:2] == (400, 400)  # figsize (4, 4) at 100 dpi
    assert float(np.ptp(img[..., :3])) > 0.5  # not a constant image


def test_exercise2_without_matplotlib_skips_only_the_picture(
    monkeypatch, tmp_path, names_file, capsys
):
    """In this process (its compiled programs are already cached), with matplotlib made
    unimportable: the script prints a note and skips only the picture."""
    script = EXPERIMENTS / "exercise2_cross_entropy.py"
    for mod in ("matplotlib", "matplotlib.pyplot"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import matplotlib` -> ImportError
    monkeypatch.setenv("JAXNINJA_DATA", str(names_file))
    monkeypatch.setattr(sys, "argv", [str(script), "--out", str(tmp_path / "dl.png")])
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    stdout = capsys.readouterr().out
    assert "matplotlib is not installed" in stdout
    assert list(tmp_path.iterdir()) == []
    assert re.match(r"\d+\.\d+ diff: ", stdout) and len(cmp_rows(stdout)) == 2


def test_exercise3_batchnorm(runs):
    stdout, _ = run(runs, "exercise3")
    diffs = [float(x) for x in re.findall(r"^max diff.*?: (\S+)$", stdout, re.M)]
    assert len(diffs) == 2 and all(d < 1e-5 for d in diffs)  # lecture: 4.7684e-07
    rows = {r["name"]: r for r in cmp_rows(stdout)}
    assert set(rows) == {"hprebn", "hprebn (vjp)"}
    for r in rows.values():
        assert r["approx"] == "True " and float(r["maxdiff"]) < 1e-7


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
