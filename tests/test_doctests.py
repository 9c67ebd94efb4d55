"""Every example in every jaxninja docstring runs and gives what it says.

One test per module (``doctest.testmod`` on each module that ``pkgutil.iter_modules``
finds in the package), plus a check that the package has examples at all. Examples
must be self-contained: small in-memory data, no files, no network.

The Markdown docs with ``>>>`` examples (``README.md``, ``docs/*.md``) run too.

``jaxninja.__main__`` is the one module that cannot be imported without running (it
calls the CLI at import time), so its docstrings are collected from its source with
:mod:`ast` and run the same way: nothing is skipped.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import jaxninja

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.iter_modules(jaxninja.__path__))
# The user-facing Markdown docs that hold examples are run the same way.
DOCS = sorted(
    str(p.relative_to(REPO))
    for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    if p.is_file() and ">>> " in p.read_text()
)
RUNS_ON_IMPORT = {"__main__"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _source_doctests(name: str) -> doctest.TestResults:
    """Run the docstring examples of a module without importing (executing) it."""
    path = Path(jaxninja.__path__[0]) / f"{name}.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    parser, runner = doctest.DocTestParser(), doctest.DocTestRunner(optionflags=FLAGS)
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            label = f"jaxninja.{name}" + (
                f".{node.name}" if not isinstance(node, ast.Module) else ""
            )
            test = parser.get_doctest(doc, {}, label, str(path), node_lineno(node))
            runner.run(test)
    return runner.summarize(verbose=False)


def node_lineno(node: ast.AST) -> int:
    return getattr(node, "lineno", 0)


def run_module_doctests(name: str) -> doctest.TestResults:
    if name in RUNS_ON_IMPORT:
        return _source_doctests(name)
    module = importlib.import_module(f"jaxninja.{name}")
    return doctest.testmod(module, optionflags=FLAGS, verbose=False, report=True)


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name: str) -> None:
    failed, attempted = run_module_doctests(name)
    print(f"jaxninja.{name}: {attempted} examples, {failed} failed")
    assert failed == 0, f"{failed} of {attempted} doctest examples failed in jaxninja.{name}"


@pytest.mark.parametrize("doc", DOCS)
def test_markdown_doctests(doc: str) -> None:
    failed, attempted = doctest.testfile(
        str(REPO / doc), module_relative=False, optionflags=FLAGS, verbose=False
    )
    print(f"{doc}: {attempted} examples, {failed} failed")
    assert failed == 0, f"{failed} of {attempted} doctest examples failed in {doc}"


def test_the_package_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    """The public modules document themselves with examples (the count is reported)."""
    finder = doctest.DocTestFinder()
    counts = {}
    for name in MODULES:
        if name in RUNS_ON_IMPORT:
            continue
        module = importlib.import_module(f"jaxninja.{name}")
        counts[name] = sum(len(t.examples) for t in finder.find(module))
    with capsys.disabled():
        print(f"\ndoctest examples per module: {counts} (total {sum(counts.values())})")
    for name in ("ops", "testing", "model", "data", "ninja"):
        if name in counts:
            assert counts[name] > 0, f"jaxninja.{name} has no docstring examples"
