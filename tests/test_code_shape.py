"""The package's shape rules that no linter checks (a cross-cutting suite): no function longer than
60 lines of code (docstring, comments and blank lines not counted). ruff checks complexity (C901 <=
10)."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxninja"
MAX_CODE_LINES = 60


def code_lines(source: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of ``node`` holding code: not blank, not only a comment, not its docstring."""
    lines = source.splitlines()[node.lineno - 1 : node.end_lineno]
    text = "\n".join(lines)
    kept = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in (
            tokenize.COMMENT,
            tokenize.NL,
            tokenize.NEWLINE,
            tokenize.INDENT,
            tokenize.DEDENT,
            tokenize.ENDMARKER,
        ):
            kept.update(range(tok.start[0], tok.end[0] + 1))
    doc = node.body[0] if node.body else None
    if isinstance(doc, ast.Expr) and isinstance(getattr(doc, "value", None), ast.Constant):
        first = doc.lineno - node.lineno + 1
        last = doc.end_lineno - node.lineno + 1 if doc.end_lineno else first
        kept -= set(range(first, last + 1))
    return len(kept)


def functions() -> list[tuple[str, int]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                found.append((where, code_lines(source, node)))
    return found


def test_the_counter_counts_code_only() -> None:
    source = 'def f(x):\n    """Doc.\n\n    More."""\n    # a comment\n\n    y = x\n    return y\n'
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.FunctionDef)
    assert code_lines(source, node) == 3


@pytest.mark.parametrize("limit", [MAX_CODE_LINES])
def test_no_function_is_longer_than_the_limit(limit: int) -> None:
    found = functions()
    assert len(found) > 100, "the walk found too few functions to be the package"
    long = [f"{where}: {n} lines" for where, n in found if n > limit]
    assert not long, "functions over the limit:\n" + "\n".join(long)
