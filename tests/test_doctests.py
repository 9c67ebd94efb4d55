"""Every example in every jaxninja docstring runs and gives what it says (a cross-cutting
suite over every module and the docs' Markdown).

One test per module (``doctest.testmod`` on each module that ``pkgutil.walk_packages``
finds in the package, subpackages included), plus a check that the public modules have
examples. Examples
must be self-contained: small in-memory data or the bundled names.txt, no network.

The ``>>>`` examples of the README and of the docs site's pages run too.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import jaxninja

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(jaxninja.__path__, "jaxninja."))
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md"))]
DOCS = [p for p in PAGES if ">>> " in (REPO / p).read_text()]
WITH_EXAMPLES = (
    "jaxninja.ops._cross_entropy",
    "jaxninja.ops._linear_cross_entropy",
    "jaxninja.ops._batch_norm",
    "jaxninja.testing._checks",
    "jaxninja.lecture.model",
    "jaxninja.lecture.data",
    "jaxninja.lecture.ninja",
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def run_module_doctests(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    return doctest.testmod(module, optionflags=FLAGS, verbose=False, report=True)


@pytest.mark.parametrize("name", MODULES)
def test_module_doctests(name: str) -> None:
    failed, attempted = run_module_doctests(name)
    print(f"{name}: {attempted} examples, {failed} failed")
    assert failed == 0, f"{failed} of {attempted} doctest examples failed in {name}"


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
        module = importlib.import_module(name)
        counts[name] = sum(len(t.examples) for t in finder.find(module))
    with capsys.disabled():
        print(f"\ndoctest examples per module: {counts} (total {sum(counts.values())})")
    for name in WITH_EXAMPLES:
        assert counts[name] > 0, f"{name} has no docstring examples"
