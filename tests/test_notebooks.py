"""The lecture's notebooks (a cross-cutting suite over jaxninja.lecture): generated from
experiments/lecture.py and in sync with it, and executed top to bottom: solved, with the blanks,
with the blanks filled (right, and one deliberately wrong). The four runs share a JAX compilation
cache and run two at a time."""

from __future__ import annotations

import copy
import re
from concurrent.futures import ThreadPoolExecutor

import nbformat
import pytest
from helpers import load_experiment

from jaxninja.lecture import model, ninja

build = load_experiment("build_notebooks")

# One line per blank, in the order the blanks appear in the exercise notebook: written here,
# apart from the solved source, each gradient whole in one expression.
ANSWERS = [
    # Exercise 1, the cross-entropy
    ("dlogprobs", "jnp.zeros_like(logprobs).at[jnp.arange(n), Yb].set(-1.0 / n)"),
    ("dprobs", "dlogprobs / probs"),
    ("dcounts_sum_inv", "(counts * dprobs).sum(1, keepdims=True)"),
    ("dcounts_sum", "-dcounts_sum_inv / counts_sum**2"),
    ("dcounts", "counts_sum_inv * dprobs + dcounts_sum"),
    ("dnorm_logits", "counts * dcounts"),
    ("dlogit_maxes", "-dnorm_logits.sum(1, keepdims=True)"),
    ("dlogits", "dnorm_logits + jax.nn.one_hot(logits.argmax(1), vocab_size) * dlogit_maxes"),
    # the second layer and tanh
    ("dh", "dlogits @ W2.T"),
    ("dW2", "h.T @ dlogits"),
    ("db2", "dlogits.sum(0)"),
    ("dhpreact", "(1 - h**2) * dh"),
    # batch norm
    ("dbngain", "(bnraw * dhpreact).sum(0, keepdims=True)"),
    ("dbnraw", "bngain * dhpreact"),
    ("dbnbias", "dhpreact.sum(0, keepdims=True)"),
    ("dbnvar_inv", "(bndiff * dbnraw).sum(0, keepdims=True)"),
    ("dbnvar", "-0.5 * (bnvar + 1e-5) ** -1.5 * dbnvar_inv"),
    ("dbndiff2", "jnp.broadcast_to(dbnvar / (n - 1), bndiff2.shape)"),
    ("dbndiff", "bnvar_inv * dbnraw + 2 * bndiff * dbndiff2"),
    ("dbnmeani", "-dbndiff.sum(0, keepdims=True)"),
    ("dhprebn", "dbndiff + dbnmeani / n"),
    # the first layer and the embedding
    ("dembcat", "dhprebn @ W1.T"),
    ("dW1", "embcat.T @ dhprebn"),
    ("db1", "dhprebn.sum(0)"),
    ("demb", "dembcat.reshape(n, block_size, n_embd)"),
    ("dC", "jnp.zeros_like(C).at[Xb].add(demb)"),
    # Exercises 2 and 3
    ("dlogits", "(jax.nn.softmax(logits, 1) - jax.nn.one_hot(Yb, vocab_size)) / n"),
    ("dhprebn", "bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0)"
     " - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))"),
    # Exercise 4, inside manual_grads(params, X, Y)
    ("dlogits", "(jax.nn.softmax(logits, 1) - jax.nn.one_hot(Y, logits.shape[1])) / n"),
    ("dh", "dlogits @ W2.T"),
    ("dW2", "h.T @ dlogits"),
    ("db2", "dlogits.sum(0)"),
    ("dhpreact", "(1 - h**2) * dh"),
    ("dbngain", "(bnraw * dhpreact).sum(0, keepdims=True)"),
    ("dbnbias", "dhpreact.sum(0, keepdims=True)"),
    ("dhprebn", "bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0)"
     " - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))"),
    ("dembcat", "dhprebn @ W1.T"),
    ("dW1", "embcat.T @ dhprebn"),
    ("db1", "dhprebn.sum(0)"),
    ("dC", "jnp.zeros_like(C).at[X].add(dembcat.reshape(emb.shape))"),
]  # fmt: skip
WRONG = 10  # Exercise 1's db2: the mean where the lecture's rule wants a sum (nothing uses it)
WRONG_ANSWER = "dlogits.mean(0)"
# The rows in order: Exercise 1's 26, the two fused, Exercise 4's 7 parameters.
ROWS = [*ninja.GRADIENTS, "logits (fused)", "hprebn (fused)", *model.PARAM_NAMES]
ROW = re.compile(
    r"^(?P<name>\w+(?: \(fused\))?)\s+\| (?:exact: (?P<exact>True |False) \| approximate: "
    r"(?P<approx>True |False) \| maxdiff: \S+(?:\s+\| (?P<verdict>wrong))?|(?P<todo>not done yet))$"
)


def fill(nb: nbformat.NotebookNode, answers: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """``nb`` with its blanks, in order, replaced by ``answers``."""
    nb = copy.deepcopy(nb)
    todo = iter(answers)
    for cell in nb.cells:
        if build.ANSWER_TAG in cell.metadata.get("tags", []):
            lines = cell.source.splitlines()
            for i, line in enumerate(lines):
                if line.endswith(f" = {build.BLANK}"):
                    name, answer = next(todo)
                    assert line.strip() == f"{name} = {build.BLANK}", (line, name)
                    lines[i] = line.replace(build.BLANK, answer)
            cell.source = "\n".join(lines)
    assert next(todo, None) is None, "more answers than blanks"
    return nb


def stdout(nb: nbformat.NotebookNode) -> str:
    """Everything the notebook printed; asserts that no cell raised."""
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{out.ename}: {out.evalue}\n{cell.source}"
            if out.output_type == "stream" and out.name == "stdout":
                text.append(out.text)
    return "".join(text)


def rows(text: str) -> list[re.Match]:
    found = [m for line in text.splitlines() if (m := ROW.match(line))]
    assert [m["name"] for m in found] == ROWS
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory, monkeypatch_module) -> dict[str, str]:
    """``{variant: stdout}`` of the four executions (each asserted free of errors)."""
    monkeypatch_module.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch_module.delenv("JAXNINJA_FULL_TRAINING", raising=False)
    source = build.read_source()
    exercises = build.variant(source, "exercises")
    wrong = list(ANSWERS)
    wrong[WRONG] = (ANSWERS[WRONG][0], WRONG_ANSWER)
    notebooks = {
        "solved": build.variant(source, "solved"),
        "blank": exercises,
        "filled": fill(exercises, ANSWERS),
        "wrong": fill(exercises, wrong),
    }
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(notebooks, pool.map(build.execute, notebooks.values()), strict=True))
    return {name: stdout(nb) for name, nb in done.items()}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_committed_notebooks_are_in_sync_with_the_source():
    """Edit experiments/lecture.py, then run experiments/build_notebooks.py."""
    assert build.out_of_sync() == []
    assert build.main(["--check"]) == 0


def test_out_of_sync_is_detected(tmp_path, monkeypatch):
    source = build.read_source()
    source.cells[5].source += "\nprint('edited')"
    assert build.out_of_sync(source) == [
        "experiments/lecture_solved.ipynb",
        "experiments/lecture_exercises.ipynb",
    ]


def test_committed_notebooks_carry_their_outputs():
    for which, path in build.NOTEBOOKS.items():
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), which
        text = stdout(nb)
        pngs = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
        assert len(pngs) == (2 if which == "solved" else 1), which  # dlogits; the loss curve
        assert len(rows(text)) == 35 and "train " in text and "val " in text


def test_exercise_notebook_has_a_blank_for_every_answer():
    exercises = build.variant(build.read_source(), "exercises")
    answer_cells = [c for c in exercises.cells if build.ANSWER_TAG in c.metadata.get("tags", [])]
    blanks = [ln.strip() for c in answer_cells for ln in c.source.splitlines() if " = " in ln]
    blanks = [b for b in blanks if b.startswith("d")]
    assert blanks == [f"{name} = {build.BLANK}" for name, _ in ANSWERS]


def test_solved_notebook_every_row_right(runs):
    for m in rows(runs["solved"]):
        assert m["approx"] == "True " and not m["verdict"], m[0]
    assert "not done yet" not in runs["solved"]
    assert re.search(r"^train (\d\.\d{4})$", runs["solved"], re.M)


def test_exercise_notebook_runs_with_its_blanks(runs):
    found = rows(runs["blank"])
    assert all(m["todo"] for m in found)
    assert "dlogits: not done yet" in runs["blank"]
    assert "training with jaxninja's ninja.manual_grads" in runs["blank"]
    assert "hint: " in runs["blank"] and "expected shape (32, 27)" in runs["blank"]


def test_exercise_notebook_filled_with_the_answers(runs):
    found = rows(runs["filled"])
    assert all(m["approx"] == "True " and not m["verdict"] for m in found)
    assert "not done yet" not in runs["filled"]
    assert "training with jaxninja's" not in runs["filled"]  # trained with the learner's


def test_exercise_notebook_one_wrong_answer_one_wrong_row(runs):
    found = rows(runs["wrong"])
    wrong = [i for i, m in enumerate(found) if m["verdict"] == "wrong"]
    assert wrong == [ninja.GRADIENTS.index("b2")]
    assert all(m["approx"] == "True " for i, m in enumerate(found) if i not in wrong)
    assert "hint: b2 is broadcast over the rows" in runs["wrong"]
