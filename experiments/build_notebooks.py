"""Build the lecture's two notebooks from their one source, ``experiments/lecture.py``.

``lecture.py`` is a jupytext percent-format script (it also runs as a plain script) and
the solved notebook. ``lecture_exercises.ipynb`` is the same with every answer left blank:
in the cells tagged ``answer``, the last assignment to each gradient ``d<name>`` becomes
``d<name> = ...  # TODO`` and the earlier ones go. Cells tagged ``solved-only`` or
``exercise-only`` appear in one notebook only. Both are written executed, outputs included,
so that a code host shows them without running them::

    python experiments/build_notebooks.py          # both notebooks, the short training
    python experiments/build_notebooks.py --full   # with the lecture's full training
    python experiments/build_notebooks.py --check  # exit 1 if a notebook is out of sync

``tests/test_notebooks.py`` runs ``--check``'s comparison, and executes both notebooks.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

from jaxninja.lecture import ninja

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "lecture.py"
NOTEBOOKS = {"solved": HERE / "lecture_solved.ipynb", "exercises": HERE / "lecture_exercises.ipynb"}
ANSWER_TAG = "answer"
ONLY_TAGS = {"solved": "exercise-only", "exercises": "solved-only"}  # the tag each drops
ANSWERS = frozenset("d" + name for name in ninja.GRADIENTS)  # dlogprobs ... dC
BLANK = "...  # TODO"


def read_source(path: Path = SOURCE) -> nbformat.NotebookNode:
    """The source script as a notebook (no outputs)."""
    return jupytext.read(path)


def _answer_spans(code: str) -> dict[str, list[tuple[int, int, int]]]:
    """``{name: [(first line, last line, column), ...]}`` of every assignment to an answer
    (1-based lines, in order), at any depth (inside a function too)."""
    spans: dict[str, list[tuple[int, int, int]]] = {}
    for node in ast.walk(ast.parse(code)):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if isinstance(target, ast.Name) and target.id in ANSWERS:
            end = node.end_lineno or node.lineno
            spans.setdefault(target.id, []).append((node.lineno, end, node.col_offset))
    return {name: sorted(s) for name, s in spans.items()}


def blank_answers(code: str) -> str:
    """``code`` with each answer's last assignment replaced by a blank, earlier ones gone.

    >>> print(blank_answers("# y = 2 * x\\ndx = 2\\ndx = dx + (\\n    1)\\nz = 3"))
    # y = 2 * x
    dx = ...  # TODO
    z = 3
    """
    lines = code.splitlines()
    replaced: dict[int, str] = {}
    dropped: set[int] = set()
    for name, spans in _answer_spans(code).items():
        *earlier, (first, last, column) = spans
        for a, b, _ in earlier:
            dropped.update(range(a - 1, b))
        replaced[first - 1] = " " * column + f"{name} = {BLANK}"
        dropped.update(range(first, last))
    kept = (replaced.get(i, line) for i, line in enumerate(lines) if i not in dropped)
    return "\n".join(kept)


def variant(source: nbformat.NotebookNode, which: str) -> nbformat.NotebookNode:
    """The ``"solved"`` or ``"exercises"`` notebook of ``source`` (not executed)."""
    nb = copy.deepcopy(source)
    nb.cells = [c for c in nb.cells if ONLY_TAGS[which] not in c.metadata.get("tags", [])]
    if which == "exercises":
        for cell in nb.cells:
            if ANSWER_TAG in cell.metadata.get("tags", []):
                cell.source = blank_answers(cell.source)
    for cell in nb.cells:
        cell.metadata.pop("lines_to_next_cell", None)  # jupytext's layout hint
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> nbformat.NotebookNode:
    """Run ``nb`` top to bottom in a fresh ``python3`` kernel, in this directory; the
    kernel inherits this process's environment (``JAXNINJA_FULL_TRAINING``, ``PYTHONPATH``)."""
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no timestamps: a rebuild changes only what changed
        resources={"metadata": {"path": str(HERE)}},
    )
    client.execute()
    return nb


def cell_sources(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """``[(cell type, source), ...]``: what must agree between a notebook and its source."""
    return [(c.cell_type, c.source) for c in nb.cells]


def out_of_sync(source: nbformat.NotebookNode | None = None) -> list[str]:
    """The committed notebooks whose cells differ from what ``source`` generates."""
    source = source if source is not None else read_source()
    stale = []
    for which, path in NOTEBOOKS.items():
        committed = nbformat.read(path, as_version=4) if path.exists() else None
        if committed is None or cell_sources(committed) != cell_sources(variant(source, which)):
            stale.append(str(path.relative_to(HERE.parent)))
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the lecture's full training")
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        stale = out_of_sync()
        for path in stale:
            print(f"{path} is out of sync with experiments/lecture.py: run {__file__}")
        return 1 if stale else 0
    if args.full:
        os.environ["JAXNINJA_FULL_TRAINING"] = "1"
    source = read_source()
    for which, path in NOTEBOOKS.items():
        nbformat.write(execute(variant(source, which)), path)
        print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
