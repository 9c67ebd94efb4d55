"""One ``error:`` line instead of JAX's fatal "another task died" log.

When a process of a multi-process job dies or hangs, JAX's distributed runtime ends every
other process from a C++ thread: a few ``E``/``F`` log lines and a C++ stack trace on
stderr, then ``abort()``. Python cannot catch that, so :func:`jaxninja.parallel.initialize`
routes the process's stderr (fd 2) through ``python -m jaxninja.stderr_filter ADDRESS
SECONDS``, a small process (standard library only) that copies everything else unchanged
and prints one ``error:`` line for that log (:func:`filter_stderr`). The process still
ends by ``SIGABRT`` (a non-zero exit).
"""

from __future__ import annotations

import itertools
import os
import re
import select
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any, TextIO

_LOG_LINE = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")
_FATAL = "Terminating process because the JAX distributed service detected fatal errors"

RESTART = (
    "the job stops (the cause is in that process's output); the run's last checkpoint is "
    "intact: restart every process with --resume"
)


def _message(block: str, coordinator: str, timeout: int) -> str:
    """The one line for JAX's fatal log ``block``: what happened, in a few words."""
    if "RegisterTask" in block:  # never joined: nothing was trained, nothing to resume
        return (
            f"cannot join the job: the coordinator at {coordinator} did not answer within "
            f"{timeout} s (process 0 must be running and reachable at that address)"
        )
    dead = re.search(r"stopped sending heartbeats\):\s*\n([\d, ]+)", block)
    if dead:
        what = f"process {dead.group(1).strip()} stopped sending heartbeats"
    elif "Socket closed" in block or "failed to connect" in block.lower():
        what = "the connection to process 0 (the coordinator) was lost"
    else:
        what = "another process of the job died or became unreachable"
    return f"{what}; {RESTART}"


def filter_stderr(
    lines: Iterable[str | None],
    write: Callable[[str], Any],
    coordinator: str = "process 0",
    timeout: int = 300,
) -> bool:
    """Copy ``lines`` to ``write``, but turn JAX's fatal "another task died" log (C++ log
    lines, continuation lines and a stack trace) into one ``error:`` line.

    C++ log lines (``E1127 00:06:08.504 10919 file.cc:12] ...``) and what follows them are
    held back until a ``None`` (a pause in the stream: JAX writes its error lines, the
    fatal one and its details at once) or the end; a held block without the fatal line
    is written unchanged. Returns whether it was fatal (then the rest was not read).
    ``coordinator`` and ``timeout`` (seconds to join) go into the message of a process
    that never joined.

    >>> out = []
    >>> filter_stderr(["W1127 00:00:00.1 7 a.cc:1] hi", None, "ok"], out.append), out
    (False, ['W1127 00:00:00.1 7 a.cc:1] hi', 'ok'])
    """
    held: list[str] = []
    fatal = False
    for line in itertools.chain(lines, [None]):
        if line is None:  # a pause: the block is complete
            if fatal:
                write(f"error: {_message(''.join(held), coordinator, timeout)}\n")
                return True
            for h in held:
                write(h)
            held = []
        elif held or _LOG_LINE.match(line):
            held.append(line)
            fatal = fatal or _FATAL in line
        else:
            write(line)
    return False


def _stdin_lines(pause: float = 0.5) -> Iterable[str | None]:
    """This process's stdin as lines, with ``None`` after each ``pause`` seconds of quiet."""
    fd, buffer = sys.stdin.fileno(), b""
    while True:
        if not select.select([fd], [], [], pause)[0]:
            yield None
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            if buffer:
                yield buffer.decode(errors="replace")
            return
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.decode(errors="replace") + "\n"


def _run_filter(out: TextIO, coordinator: str, timeout: int) -> None:
    """``python -m jaxninja.stderr_filter ADDRESS SECONDS``: stdin -> ``out`` until EOF
    (the process whose stderr it is has ended). Signals are for that process, not this."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    if filter_stderr(_stdin_lines(), write, coordinator, timeout):
        for _ in _stdin_lines():  # the stack trace: drained, not shown
            pass


if __name__ == "__main__":
    _run_filter(sys.stderr, sys.argv[1], int(sys.argv[2]))
