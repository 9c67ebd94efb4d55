"""One ``error:`` line instead of JAX's fatal "another task died" log.

:func:`jaxninja.parallel.initialize` pipes stderr through ``python -m jaxninja.stderr_filter
ADDRESS SECONDS`` (standard library only): JAX ends a job's processes from C++ (a log, a
stack trace, ``abort()``), which Python cannot catch. The rest passes unchanged.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import signal
import sys
from collections.abc import Callable, Iterable
from typing import Any

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
    """Copy ``lines`` to ``write``, but JAX's fatal log becomes one ``error:`` line; return
    whether it came (then the rest was not read).

    A C++ log line (``E1127 00:06:08.504 10919 file.cc:12] ...``) and what follows it are
    held until a ``None`` (a pause: JAX writes a fatal block at once) or the end, then
    written unchanged unless fatal. ``coordinator`` and ``timeout`` (seconds to join) go
    into the message of a process that never joined.

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
        if not chunk:  # the end; a last line without a newline, if any
            yield buffer.decode(errors="replace") or None
            return
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        yield from (line.decode(errors="replace") + "\n" for line in complete)


if __name__ == "__main__":  # until EOF: the process whose stderr this is has ended
    for signum in (signal.SIGINT, signal.SIGTERM):  # they are for that process, not this
        signal.signal(signum, signal.SIG_IGN)
    # stderr is line-buffered (Python >= 3.9): each line is out at once
    if filter_stderr(_stdin_lines(), sys.stderr.write, sys.argv[1], int(sys.argv[2])):
        for _ in _stdin_lines():  # the stack trace: drained, not shown
            pass
