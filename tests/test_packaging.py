"""The wheel a user installs (a cross-cutting suite): what it holds (names.txt, py.typed, the
license; no tests or experiments), and a user's typed code checked by ``mypy --strict``
against it."""

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


@pytest.fixture(scope="module")
def mypy_output(installed: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``mypy --strict`` as a user would run it, once on two files: the user's typed code and
    a copy with one wrong use of an op's result (the control that the types reach mypy).
    Outside the repo (no project config), the package found where pip put it (PEP 561:
    typed only with ``py.typed``)."""
    work = tmp_path_factory.mktemp("user")
    (work / "user_code.py").write_text(USER_CODE.read_text())
    wrong = USER_CODE.read_text() + "\n\nWRONG: int = mean_loss(jnp.zeros(3), jnp.zeros(3))\n"
    (work / "wrong_user_code.py").write_text(wrong)
    env = {**os.environ, "PYTHONPATH": str(installed)}
    cmd = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "user_code.py"]
    cmd += ["wrong_user_code.py", "--python-executable", sys.executable]
    cmd += ["--cache-dir", os.devnull]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    return proc.stdout + proc.stderr


def test_a_user_s_typed_code_checks_clean_under_mypy_strict(mypy_output: str) -> None:
    assert "Found 1 error in 1 file (checked 2 source files)" in mypy_output, mypy_output
    assert "user_code.py:" not in mypy_output.replace("wrong_user_code.py:", ""), mypy_output


def test_mypy_sees_our_types_not_any(mypy_output: str) -> None:
    """The control: a wrong use of an op's result is an error, so the types reach mypy."""
    expected = 'Incompatible types in assignment (expression has type "Array"'
    assert "wrong_user_code.py:" in mypy_output and expected in mypy_output, mypy_output
