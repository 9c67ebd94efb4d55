"""Helpers shared by the CLI tests: run ``jaxninja`` in-process and read its one error line."""

from __future__ import annotations

from jaxninja import cli


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
