"""Writing files so that a crash never leaves a half-written one in place."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from jaxninja.errors import JaxninjaError
from jaxninja.lecture.data import is_control


class WriteError(JaxninjaError):
    """``cannot write PATH: REASON`` (full disk, read-only directory, ...); nothing is left."""


def keep_standard_fds() -> None:
    """Open ``/dev/null`` on any of descriptors 0, 1, 2 that is closed, so that no file
    this process opens becomes its stdin, stdout or stderr (C++ code logs to fd 2).

    Examples:
      >>> keep_standard_fds()  # all three open: nothing to do
    """
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: fd itself
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def terminal_safe(text: str) -> str:
    r"""``text`` with control characters but newline and tab escaped (``\x1b``), so that
    a path or word holding ESC & co. never drives the terminal.

    Examples:
      >>> terminal_safe("runs/\x1b[2Jx\n")
      'runs/\\x1b[2Jx\n'
    """
    if text.isprintable():  # the common case, fast
        return text
    return "".join(c if c in "\n\t" or not is_control(c) else ascii(c)[1:-1] for c in text)


def _fileno(stream: Any) -> int | None:
    """``stream``'s descriptor, if it has one (a test's capture has none)."""
    try:
        return int(stream.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None


class SafeStream(io.TextIOBase):
    r"""A standard stream for the command's own output: control characters escaped
    (``terminal_safe``), characters the encoding lacks written as ``\u....``, and
    a write that fails (a reader gone, a full disk) ends the output, never the command:
    ``failed`` keeps the error and its descriptor then points to ``/dev/null``. ``fd``:
    the descriptor to write to when ``stream`` is ``None`` (Python started with it closed)."""

    def __init__(self, stream: TextIO | None, fd: int) -> None:
        if stream is None:  # keep_standard_fds reopened fd on /dev/null
            stream = open(fd, "w", closefd=False)  # noqa: SIM115 (lives as long as sys.stdout)
        with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[attr-defined]
        self.stream, self.fd = stream, _fileno(stream)
        self.failed: OSError | None = None

    def write(self, text: str) -> int:
        if self.failed is None:
            try:
                self.stream.write(terminal_safe(text))
            except OSError as e:
                self._fail(e)
        return len(text)

    def flush(self) -> None:
        if self.failed is None:
            try:
                self.stream.flush()
            except OSError as e:
                self._fail(e)

    def _fail(self, error: OSError) -> None:
        self.failed = error
        if self.fd is not None:  # what is left in the buffer goes nowhere
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.fd)
            os.close(null)

    def retarget(self, fd: int) -> None:
        """Write to descriptor ``fd`` from now on (same encoding), e.g. a copy of the
        real stderr once fd 2 is redirected."""
        self.flush()
        encoding = self.stream.encoding
        self.stream = open(fd, "w", encoding=encoding, errors="backslashreplace", closefd=False)  # noqa: SIM115
        self.fd = fd

    def isatty(self) -> bool:
        return self.failed is None and self.stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding


def check_results_file(out: str | os.PathLike[str], tool: str) -> dict[str, Any]:
    """Check, before any work and touching nothing, that results file ``out`` can be
    written: new, or a regular file holding ``{"tool": tool, ...}`` (never a link, FIFO,
    device, directory or file of the user's). Return what it holds (``{}``: nothing).

    Examples:
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     check_results_file(Path(tmp, "new.json"), "jaxninja sweep")
      {}
    """
    path = Path(out)
    if not str(path).isprintable():  # the message must stay one line on the terminal
        raise WriteError(f"--out {str(path)!r}: not a printable file name")
    if path.is_symlink():  # the rename would replace the link, not its target
        raise WriteError(f"--out {path}: a symbolic link; give the file's real path")
    if os.path.lexists(path) and not path.is_file():
        raise WriteError(f"--out {path}: not a regular file")
    if not path.parent.is_dir():
        raise WriteError(f"--out {path}: {path.parent} is not a directory")
    previous: Any = {}
    if path.exists():
        try:  # a regular file: opening it cannot block
            previous = json.loads(path.read_bytes()) if path.stat().st_size < 64 << 20 else None
        except (OSError, ValueError):
            previous = None
        if not (isinstance(previous, dict) and previous.get("tool") == tool):
            raise WriteError(f"--out {path}: exists and is not a {tool} results file")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise WriteError(f"--out {path}: cannot write in {path.parent}")
    return previous


def write_results_file(out: str | os.PathLike[str], tool: str, results: dict[str, Any]) -> None:
    """Write ``{"tool": tool, **results}`` to ``out`` as JSON (``json_safe``: valid
    whatever the numbers), atomically, after the work:
    ``check_results_file`` checked ``out`` before it and checks it again now (a file may
    have appeared meanwhile); a new file is linked into place, never replacing one that
    appears in the last instant."""
    previous = check_results_file(out, tool)
    text = json.dumps(json_safe({"tool": tool, **results}), indent=2, allow_nan=False)
    write_atomic(out, lambda f: f.write(text), "w", replace=bool(previous))


def json_safe(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and non-finite floats (a diverged
    member's loss) as ``None``: NaN and Infinity are not JSON.

    Examples:
      >>> json_safe({"loss": float("nan"), "rows": [np.float32(1.5), np.int64(2)]})
      {'loss': None, 'rows': [1.5, 2]}
    """
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def current_umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it, so it is set back).

    Examples:
      >>> 0 <= current_umask() <= 0o777
      True
    """
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(
    path: str | os.PathLike[str],
    write: Callable[[Any], None],
    mode: str = "wb",
    *,
    replace: bool = True,
) -> None:
    """Write ``path`` so that it is always the old file or the whole new one: ``write(f)``
    into a temporary file beside it (removed on failure) with a plain ``open``'s permissions,
    fsync, rename (``replace=False``: a hard link, which fails if ``path`` exists). An
    ``OSError`` becomes a ``WriteError`` naming ``path``.

    Examples:
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     write_atomic(Path(tmp, "a.txt"), lambda f: f.write("done"), "w")
      ...     Path(tmp, "a.txt").read_text(), os.listdir(tmp)
      ('done', ['a.txt'])
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            tmp = None
        else:
            os.link(tmp, path)  # tmp is removed below
        with contextlib.suppress(OSError):  # the rename is durable where a directory fsyncs
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
    except FileExistsError:
        raise WriteError(f"cannot write {path}: a file appeared there meanwhile; kept") from None
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
