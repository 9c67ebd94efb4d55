"""Tests for jaxninja.training.compare (``jaxninja compare``): the table of differing config
fields and losses, the CSV and the plot of two tiny real runs (conftest's ``two_runs``), and
the directories it refuses."""

from __future__ import annotations

import json

from helpers import one_error_line, run_cli


def test_compare_table_and_plot(two_runs, capsys, tmp_path):
    rc, out, err = run_cli(capsys, "compare", *two_runs, "--out", tmp_path / "c")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == (
        "| run | lr | batch_norm | first_loss | train_loss | val_loss | test_loss "
        "| steps_per_second |"
    )
    results = [json.loads((r / "metrics.json").read_text()) for r in two_runs]
    for line, m in zip(lines[2:4], results, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4:7] == [f"{m[k]:.4f}" for k in ("train_loss", "val_loss", "test_loss")]
    csv = (tmp_path / "c" / "compare.csv").read_text().splitlines()
    assert csv[0].startswith("run,lr,batch_norm,") and len(csv) == 3
    assert (tmp_path / "c" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # a directory of the user's is never written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    rc, _, err = run_cli(capsys, "compare", *two_runs, "--out", tmp_path / "mine")
    assert rc == 2 and "other files" in one_error_line(err)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_compare_refuses_a_directory_that_is_no_run(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "compare", tmp_path)
    assert rc == 2 and "no metrics.json" in one_error_line(err)
