"""Tests for jaxninja.bench (``jaxninja bench``): smoke tests of the benchmarks' plumbing and
bench.json. No timing is asserted anywhere (timings on a shared machine are noise); only structure,
finiteness and the refusal of an output that cannot be written."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
from helpers import REPO, one_error_line, run_cli

from jaxninja import bench
from jaxninja.errors import JaxninjaError
from jaxninja.training.train import BACKENDS, ConfigError

SUMMARY_KEYS = {"median", "min", "max", "spread", "n"}


def strict_json(text: str):
    """``json.loads`` that refuses NaN and Infinity (not JSON, though Python writes them)."""

    def refuse(name: str):
        raise ValueError(f"{name} in bench.json")

    return json.loads(text, parse_constant=refuse)


def test_bench_writes_bench_json(tmp_path, names_file, capsys):
    out = tmp_path / "bench.json"
    rc, printed, _ = run_cli(
        capsys,
        "bench",
        "--quick",
        "--settings",
        "16x8",
        "--steps",
        "20",
        "--repeats",
        "2",
        "--members",
        "1,2",
        "--no-torch",
        "--out",
        out,
        "--data",
        names_file,
    )
    assert rc == 0
    result = strict_json(out.read_text())
    assert set(result) >= {"tool", "machine", "versions", "options", "rows", "summary", "table"}
    assert result["machine"]["peak"]["gflops"] > 0
    assert result["options"]["vocab_size"] == 27  # read from names.txt
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


def test_bench_torch_rows_follow_torch_availability(names_file):
    """With torch installed (``pip install 'jaxninja[bench]'``), the three PyTorch
    baselines train the very same model; without it the bench says so and has no torch
    rows. Either way the result is asserted: nothing is skipped."""
    lines: list[str] = []
    result = bench.run_bench(
        [(16, 8)],
        backends=["custom_vjp"],
        repeats=1,
        steps=10,
        torch_steps=3,
        members=(),
        data_path=names_file,
        out=None,
        log=lines.append,
    )
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


# ------------------------------------------------------------------------- bench ops

OPS_IMPLS = {
    "cross_entropy": ["jaxninja", "optax", "reference"],
    "batch_norm": ["jaxninja", "flax", "reference"],  # flax: a test extra, always in CI
    "linear_cross_entropy": ["linear_cross_entropy", "unfused", "optax"],
    "linear_cross_entropy vocab-parallel": ["linear_cross_entropy", "unfused"],
    "linear_cross_entropy options": ["linear_cross_entropy", "unfused"],
}


def test_cli_bench_ops_quick_rows_and_json(tmp_path, capsys, monkeypatch):
    """``jaxninja bench --ops --quick`` (one run): every op has rows with every
    implementation, finite positive times, a temp size in bytes and the ratios; the tables
    are printed; bench.json is strict JSON and keeps the training rows."""
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"tool": bench.TOOL, "rows": ["training rows"]}))
    results: list[dict] = []
    real_run = bench.run_ops_bench

    def run_and_keep(**kwargs):
        results.append(real_run(**kwargs))
        return results[-1]

    monkeypatch.setattr(bench, "run_ops_bench", run_and_keep)
    rc, printed, err = run_cli(capsys, "bench", "--ops", "--quick", "--out", out)
    assert rc == 0, err
    [result] = results
    saved = strict_json(out.read_text())
    assert saved["rows"] == ["training rows"]  # the other benchmark's part is kept
    assert saved["ops"]["rows"] == strict_json(json.dumps(result["rows"]))
    rows = saved["ops"]["rows"]
    assert {r["op"] for r in rows} == set(OPS_IMPLS)
    for r in rows:
        assert list(r["impls"]) == OPS_IMPLS[r["op"]] and r["missing"] == {}
        for stats in r["impls"].values():
            ms = stats["ms"]
            assert set(ms) == SUMMARY_KEYS and ms["n"] == 2
            assert math.isfinite(ms["median"]) and ms["min"] > 0
            assert isinstance(stats["temp_bytes"], int) and stats["temp_bytes"] >= 0
        assert r["ratios"] and all(v is None or math.isfinite(v) for v in r["ratios"].values())
    # one markdown table per op: its title, header and one line per row; printed too
    table = saved["ops"]["table"]
    for op in OPS_IMPLS:
        assert f"`{op}`: grad" in table
    assert sum(ln.startswith("| 64 |") for ln in table.splitlines()) == len(rows)
    assert result["table"] in printed
    assert "| N | V | dtype | jaxninja ms |" in printed


def test_bench_ops_peer_missing_is_a_note(monkeypatch):
    """Without flax the batch-norm row has no peer column and says why; no crash."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flax" else real(name, *a)
    )
    row = bench.measure_case("batch_norm", "float32", {"N": 16, "H": 4}, repeats=1)
    assert list(row["impls"]) == ["jaxninja", "reference"] and "flax" in row["missing"]
    assert "flax not installed" in bench.ops_table([row], "batch_norm")
    assert row["ratios"]["time jaxninja/reference"] > 0


# the ways an --out path can be unwritable; _bad_outs builds one path per kind, in order
BAD_OUT_KINDS = (
    "under a file",
    "a directory",
    "a user's file",
    "missing parent",
    "dangling link",
    "link loop",
)


def _bad_outs(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("the user's notes\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cases = [
        (a_file / "bench.json", "not a directory"),
        (tmp_path / "dir", "not a regular file"),
        (a_file, "not a jaxninja bench results file"),
        (tmp_path / "no" / "bench.json", "not a directory"),
        (tmp_path / "dangling", "symbolic link"),
        (tmp_path / "loop", "symbolic link"),
    ]
    return dict(zip(BAD_OUT_KINDS, cases, strict=True))


@pytest.mark.parametrize("kind", BAD_OUT_KINDS)
@pytest.mark.parametrize("ops", [False, True])
def test_unwritable_out_fails_before_any_work(tmp_path, names_file, kind, ops):
    """The check comes first and touches nothing: no line of progress, one error naming
    the path, the user's file and directory (its mtime) unchanged."""
    out, message = _bad_outs(tmp_path)[kind]
    before = sorted((p.name, p.lstat().st_mtime_ns) for p in tmp_path.iterdir())
    mtime = tmp_path.stat().st_mtime_ns
    lines: list[str] = []
    with pytest.raises(JaxninjaError, match=message) as e:
        if ops:
            bench.run_ops_bench(quick=True, out=out, log=lines.append)
        else:
            bench.run_bench([(16, 8)], quick=True, data_path=names_file, out=out, log=lines.append)
    assert lines == [] and str(out) in str(e.value) and "\n" not in str(e.value)
    assert (tmp_path / "file.txt").read_text() == "the user's notes\n"
    assert sorted((p.name, p.lstat().st_mtime_ns) for p in tmp_path.iterdir()) == before
    assert tmp_path.stat().st_mtime_ns == mtime


def test_unwritable_out_cli_one_line(tmp_path, names_file, capsys):
    out = tmp_path / "file.txt" / "bench.json"
    (tmp_path / "file.txt").write_text("x")
    rc, printed, err = run_cli(capsys, "bench", "--quick", "--out", out, "--data", names_file)
    assert rc == 2 and printed == ""
    assert str(out) in one_error_line(err)


def test_bench_parallel_experiment_runs_sharded(tmp_path, names_file):
    """experiments/bench_parallel.py, one process per device count (1, then 2 forced CPU
    devices): the sharded training chunk compiles and trains on names.txt."""
    env = {**os.environ, "JAXNINJA_DATA": str(names_file)}
    env.pop("XLA_FLAGS", None)
    cmd = [
        sys.executable,
        str(REPO / "experiments" / "bench_parallel.py"),
        "--devices",
        "1",
        "2",
        "--batch-size",
        "64",
        "--n-hidden",
        "16",
        "--steps",
        "5",
        "--repeats",
        "1",
    ]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.splitlines()
    rows = [ln.split() for ln in table if ln.split() and ln.split()[0] in ("1", "2")]
    assert [r[0] for r in rows] == ["1", "2"]
    assert all(float(r[1]) > 0 and math.isfinite(float(r[1])) for r in rows)
