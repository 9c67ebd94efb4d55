"""Helpers shared by several test modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from jaxninja import cli

REPO = Path(__file__).resolve().parents[1]


def load_experiment(name: str) -> ModuleType:
    """Import ``experiments/<name>.py`` by path (``experiments`` is not a package)."""
    path = REPO / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_experiments_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_cli(capsys, *argv: object) -> tuple[int, str, str]:
    """``jaxninja ARGV`` in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    """The single ``error: ...`` line of ``err`` (asserting there is exactly one line)."""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), f"expected one stderr line, got {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]
