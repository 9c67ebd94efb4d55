"""Tests for jaxninja.lecture.check (``jaxninja check``): the table, its verdicts and exit
status, and ``--solution FILE``."""

from __future__ import annotations

import textwrap

import jax
import numpy as np
import pytest
from helpers import one_error_line, run_cli

from jaxninja.lecture import check, model, ninja


@pytest.fixture(scope="module")
def report32(names_file) -> check.CheckReport:
    return check.run_check("float32", data=names_file)


def test_run_check_float32(report32):
    report = report32
    assert report.ok and report.jitted and report.tolerance == ninja.TOLERANCES["float32"]
    sections = list(report.rows.values())
    assert [len(rows) for rows in sections] == [26, 2, 7]
    assert [r.name for r in sections[0]] == list(ninja.GRADIENTS)
    assert [r.name for r in sections[1]] == ["logits (fused)", "hprebn (fused)"]
    assert [r.name for r in sections[2]] == list(model.PARAM_NAMES)
    # under jit the rows up to b2 are bit-exact (docs/lecture.md, "Why not 26/26 bit-exact")
    assert all(r.verdict == ninja.RIGHT for r in sections[0][:11]) and report.n_exact >= 11
    assert all(r.ok and r.comparison.maxdiff < 1e-7 for r in report.all_rows)
    text = report.format()
    assert text.count(" | exact: ") == 35
    for title in report.rows:
        assert title in text
    n_right = sum(r.verdict == ninja.RIGHT for r in report.all_rows)
    assert text.splitlines()[-1] == (
        f"float32: {report.n_exact}/26 Exercise-1 rows bit-exact; 35 rows: {n_right} right, "
        f"{35 - n_right} approximately right (|diff| <= 1e-06 + 1e-05 * |jax.grad|), 0 wrong"
    )


def test_table_and_exit_status_agree_on_a_wide_model(tmp_path):
    """Issue 22: the pass test was max|diff| <= 1e-6 while the column was allclose's, so a
    right model could show `approximate: False` rows (here C, W1, b1: entries near zero,
    rounding noise of ~1e-7) under a summary that passed them. One test decides both now."""
    words = tmp_path / "words.txt"
    words.write_text("ab\nba\naab\nbba\nab\n")
    report = check.run_check("float32", n_hidden=2000, data=words)
    assert report.ok and not report.failures
    for row in report.all_rows:
        assert row.comparison is not None and row.comparison.approximate, row
        assert row.verdict == (ninja.RIGHT if row.comparison.exact else ninja.APPROXIMATE)
    assert max(r.comparison.maxdiff for r in report.all_rows) > 1e-8  # the old column's atol


def test_check_report_failure_summary():
    good = ninja.grade("a", np.zeros(2), np.zeros(2))
    bad = ninja.grade("W1", np.ones(2), np.zeros(2))
    gone = ninja.grade("C", None, np.zeros(2))
    report = check.CheckReport(
        dtype="float64", n_hidden=4, seed=0, batch_size=2, tolerance=ninja.TOLERANCES["float64"],
        rows={check.SECTION_EX1: (good, bad), check.SECTION_EX4: (good, gone)},
    )  # fmt: skip
    assert not report.ok and report.n_exact == 1 and report.failures == (bad,)
    assert report.summary() == (
        "float64: 1/2 Exercise-1 rows bit-exact; 4 rows: 2 right, 0 approximately right "
        "(|diff| <= 1e-12 + 1e-10 * |jax.grad|), 1 wrong: W1, 1 missing"
    )
    lines = report.format().splitlines()
    i = lines.index(bad.row())
    assert bad.row().endswith("| wrong") and lines[i + 1].startswith("    expected shape (2,)")
    assert "C               | missing" in lines


def test_run_check_rejects_bad_arguments(names_file):
    with pytest.raises(ValueError, match="float32"):
        check.run_check("float16", data=names_file)
    with pytest.raises(ValueError, match="batch_size"):
        check.run_check(batch_size=1, data=names_file)


# ------------------------------------------------------------------- --solution FILE

WRONG_CE = """
import jax

def cross_entropy_backward(logits, Y):
    n = logits.shape[0]
    return (jax.nn.softmax(logits, axis=1) - jax.nn.one_hot(Y, logits.shape[1])) / (n - 1)

def batch_norm_backward(dhpreact, bngain, bnvar_inv, bnraw):
    return ...  # not done yet
"""


def solution(tmp_path, text: str, name: str = "mine.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_solution_copy_of_the_package_gets_the_same_table(capsys, names_file, report32):
    """ninja.py itself as a solution file: every row as in the package's own check."""
    rc, out, err = run_cli(
        capsys, "check", "--data", names_file, "--solution", ninja.__file__
    )  # fmt: skip
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[1] == f"grading {ninja.__file__}"
    assert [ln for ln in lines if " | " in ln] == [r.row() for r in report32.all_rows]


def test_solution_rows_right_wrong_missing(capsys, tmp_path, names_file):
    rc, out, err = run_cli(
        capsys, "check", "--data", names_file, "--solution", solution(tmp_path, WRONG_CE)
    )
    assert rc == 1 and err == ""
    rows = {ln.split(" |")[0].strip(): ln for ln in out.splitlines() if " | " in ln}
    assert rows["logits (fused)"].endswith("| wrong")
    assert "approximate: False" in rows["logits (fused)"]
    assert rows["hprebn (fused)"].endswith("| missing")  # returned ... : not done yet
    assert out.count("| missing") == 26 + 1 + 7 and out.count("| wrong") == 1
    assert "    expected shape (32, 27), yours (32, 27); hint: work out" in out
    assert out.splitlines()[-1].endswith("1 wrong: logits (fused), 34 missing")


def test_solution_that_is_right_exits_0(capsys, tmp_path, names_file):
    path = solution(
        tmp_path,
        """
        import jax

        def cross_entropy_backward(logits, Y):  # other names, same arguments: fine
            return (jax.nn.softmax(logits, 1) - jax.nn.one_hot(Y, logits.shape[1])) / len(Y)
        """,
    )
    rc, out, err = run_cli(capsys, "check", "--data", names_file, "--solution", path)
    assert (rc, err) == (0, "")
    assert out.count("| missing") == 34 and "| wrong" not in out
    assert " | right" in out or " | approximately right" in out


@pytest.mark.parametrize(
    "text, message",
    [
        ("import jax\nimport numpyy\n", "mine.py:2: cannot import it: ModuleNotFoundError: "
         "No module named 'numpyy'"),
        ("def f(:\n    pass\n", "mine.py:1: cannot import it: SyntaxError: invalid syntax"),
        ("def helper():\n    raise RuntimeError('boom\\nsecond line')\n\nhelper()\n",
         "mine.py:2: cannot import it: RuntimeError: boom"),
        ("x = 1\n", "mine.py: defines none of backward_atomized, cross_entropy_backward, "
         "batch_norm_backward, manual_grads"),
        ("\ndef manual_grads(params, X):\n    pass\n", "mine.py:2: manual_grads(params, X) "
         "has another signature than jaxninja's manual_grads(params, X, Y)"),
        ("manual_grads = 3\n", "mine.py: manual_grads is a int, not a function"),
        ("def manual_grads(params, X, Y):\n    return undefined + 1\n",
         "mine.py:2: manual_grads raised NameError: name 'undefined' is not defined"),
        ("def backward_atomized(params, acts, X, Y):\n    return [1, 2]\n",
         "mine.py: backward_atomized returned a list, expected a dict of the 26 gradients"),
    ],
    ids=["import", "syntax", "raises", "none", "signature", "not-callable", "call", "structure"],
)  # fmt: skip
def test_solution_refused_with_one_line(capsys, tmp_path, names_file, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    solution(tmp_path, text)
    rc, out, err = run_cli(capsys, "check", "--data", names_file, "--solution", "mine.py")
    assert rc == 2 and out == ""
    assert one_error_line(err) == f"error: {message}"


def test_solution_missing_file(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "check", "--solution", tmp_path / "nope.py")
    assert rc == 2 and one_error_line(err) == f"error: {tmp_path / 'nope.py'}: no such file"


def test_solution_not_traceable_runs_eagerly(tmp_path, names_file):
    """Python control flow on values cannot be jit-compiled: the function runs eagerly."""
    path = solution(
        tmp_path,
        """
        import jax

        def cross_entropy_backward(logits, Y):
            if float(logits.sum()) > 1e9:  # a concrete value: fails under jit
                raise ValueError("huge")
            return (jax.nn.softmax(logits, 1) - jax.nn.one_hot(Y, logits.shape[1])) / len(Y)
        """,
    )
    report = check.run_check(data=names_file, solution=check.load_solution(path))
    assert report.ok and report.rows[check.SECTION_FUSED][0].ok
    assert jax.config.jax_enable_x64 is False
