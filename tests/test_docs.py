"""The docs site builds in strict mode (a cross-cutting suite): a broken link, a missing page in the
nav or a docstring mkdocstrings cannot render fails the build (its ``>>>`` examples run in
``tests/test_doctests.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strict(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "api" / "ops" / "index.html").is_file()
    ops_page = (tmp_path / "api" / "ops" / "index.html").read_text()
    for name in ("cross_entropy", "linear_cross_entropy", "batch_norm", "running_average"):
        assert f'id="jaxninja.ops.{name}"' in ops_page, name
