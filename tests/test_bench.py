"""jaxninja bench: a smoke test of the benchmark's plumbing and bench.json. No timing is
asserted anywhere (timings on a shared machine are noise); only structure."""

from __future__ import annotations

import importlib.util
import json

import pytest

from jaxninja import bench, cli
from jaxninja.train import BACKENDS, ConfigError

SUMMARY_KEYS = {"median", "min", "max", "spread", "n"}


def test_bench_writes_bench_json(tmp_path, names_file, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--settings", "16x8", "--steps", "20", "--repeats", "2",
            "--members", "1,2", "--no-torch", "--out", str(out),
            "--data", str(names_file)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result) >= {"machine", "versions", "options", "rows", "summary", "table"}
    assert result["machine"]["peak"]["gflops"] > 0
    rows = result["rows"]
    assert [r["row"] for r in rows] == [*BACKENDS, "sweep M=1", "sweep M=2"]
    for r in rows:
        assert r["setting"] == "16x8" and r["flops_per_step"] > 0
        assert set(r["us_per_step"]) == SUMMARY_KEYS and r["us_per_step"]["n"] == 2
        assert r["us_per_step"]["median"] > 0 and r["cpu_us_per_step"]["median"] >= 0
        assert r["compile_s"] > 0
    assert rows[-1]["members"] == 2 and rows[-1]["model_steps_per_s"] > 0
    assert "16x8 custom_vjp/autodiff" in result["summary"]
    # the markdown table: header, rule, one line per row; printed as well
    table = result["table"].splitlines()
    assert any(ln.startswith("| setting | row |") for ln in table)
    assert sum(ln.startswith("| 16x8 |") for ln in table) == len(rows)
    assert "| 16x8 | custom_vjp |" in printed


def test_bench_torch_rows_follow_torch_availability(tmp_path, names_file):
    """With torch installed (``pip install torch==2.13.0``), the three PyTorch baselines
    train the very same model; without it the bench says so and has no torch rows.
    Either way the result is asserted: nothing is skipped."""
    lines: list[str] = []
    result = bench.run_bench([(16, 8)], backends=["custom_vjp"], repeats=1, steps=10,
                             torch_steps=3, members=(), data_path=names_file, out=None,
                             log=lines.append)  # fmt: skip
    names = [r["row"] for r in result["rows"]]
    if importlib.util.find_spec("torch") is None:
        assert names == ["custom_vjp"] and result["versions"]["torch"] is None
        assert any("no PyTorch rows" in line for line in lines)
        return
    assert names == ["custom_vjp", "torch lecture_loop", "torch vectorised_dc", "torch autograd"]
    losses = {r["final_loss"] for r in result["rows"] if r["kind"] == "torch"}
    assert len(losses) == 1  # the three baselines train the very same model
    assert any("speedup of custom_vjp over loss.backward()" in k for k in result["summary"])


@pytest.mark.parametrize("text", ["200", "200x", "0x32", "200x1", "axb"])
def test_bad_settings(text):
    with pytest.raises(ConfigError, match="setting"):
        bench.parse_settings(text)


def test_parse_settings():
    assert bench.parse_settings("200x32, 1024X256") == [(200, 32), (1024, 256)]
