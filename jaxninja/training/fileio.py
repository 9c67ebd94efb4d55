"""Writing files so that a crash never leaves a half-written one in place."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxninja.errors import JaxninjaError


class WriteError(JaxninjaError):
    """``cannot write PATH: REASON`` (full disk, read-only directory, ...); nothing is left."""


def check_results_file(out: str | os.PathLike[str], tool: str) -> dict[str, Any]:
    """Check, before any work and touching nothing, that results file ``out`` can be
    written: new, or a regular file holding ``{"tool": tool, ...}`` (never a link, FIFO,
    device, directory or file of the user's). Return what it holds (``{}``: nothing).

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
    """Write ``{"tool": tool, **results}`` to ``out`` as JSON, atomically (after the work;
    :func:`check_results_file` checked ``out`` before it)."""
    text = json.dumps({"tool": tool, **results}, indent=2, default=float)
    write_atomic(out, lambda f: f.write(text), "w")


def current_umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it, so it is set back).

    >>> 0 <= current_umask() <= 0o777
    True
    """
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(
    path: str | os.PathLike[str], write: Callable[[Any], None], mode: str = "wb"
) -> None:
    """Write ``path`` so that it is always the old file or the whole new one: ``write(f)``
    into a temporary file beside it (removed on failure) with a plain ``open``'s permissions,
    fsync, rename. An ``OSError`` becomes a :class:`WriteError` naming ``path``.

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
        os.replace(tmp, path)
        tmp = None
        with contextlib.suppress(OSError):  # the rename is durable where a directory fsyncs
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
