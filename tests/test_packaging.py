"""The wheel a user installs: what it holds (names.txt, py.typed, the license; no tests or
experiments), and a user's typed code checked by ``mypy --strict`` against it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USER_CODE = Path(__file__).parent / "typing" / "user_code.py"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    (found,) = out.glob("jaxninja-*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel unpacked by pip into a folder of its own (no dependencies: those are ours)."""
    target = tmp_path_factory.mktemp("site")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target)]
    subprocess.run([*cmd, str(wheel)], check=True, capture_output=True, timeout=600)
    return target


def test_the_wheel_holds_the_data_the_marker_and_the_license(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        packaged = zf.read("jaxninja/names.txt")
    assert "jaxninja/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    repo_copy = (REPO / "jaxninja" / "names.txt").read_bytes()
    assert hashlib.sha256(packaged).hexdigest() == hashlib.sha256(repo_copy).hexdigest()
    assert len(packaged.splitlines()) == 32033


def test_the_wheel_holds_no_tests_experiments_or_docs(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        top = {n.split("/")[0] for n in zf.namelist()}
    assert top == {"jaxninja", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}


def _mypy_strict(source: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mypy --strict`` on ``source`` as a user would run it: outside the repo (no project
    config), the package found where pip put it (PEP 561: typed only with ``py.typed``)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    cmd = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(source)]
    cmd += ["--python-executable", sys.executable, "--cache-dir", os.devnull]
    return subprocess.run(cmd, cwd=site, env=env, capture_output=True, text=True, timeout=600)


def test_a_user_s_typed_code_checks_clean_under_mypy_strict(installed: Path) -> None:
    proc = _mypy_strict(USER_CODE, installed)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_sees_our_types_not_any(installed: Path, tmp_path: Path) -> None:
    """The control: a wrong use of an op's result is an error, so the types reach mypy."""
    wrong = tmp_path / "wrong_user_code.py"
    wrong.write_text(
        USER_CODE.read_text() + "\n\nWRONG: int = mean_loss(jnp.zeros(3), jnp.zeros(3))\n"
    )
    proc = _mypy_strict(wrong, installed)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'Incompatible types in assignment (expression has type "Array"' in proc.stdout
