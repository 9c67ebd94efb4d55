"""Writing files so that a crash never leaves a half-written one in place."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` so that it is always either the old file or the whole new one:
    ``write(f)`` into a temporary file beside it, flush and fsync, then rename. If
    ``write`` raises (a failed download, a failed check), the temporary file is removed
    and ``path`` is untouched.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = Path(tmp, "a.txt")
    ...     write_atomic(p, lambda f: f.write("done"), "w")
    ...     p.read_text(), sorted(q.name for q in Path(tmp).iterdir())
    ('done', ['a.txt'])
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
