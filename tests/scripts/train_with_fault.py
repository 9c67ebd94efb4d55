"""Run ``jaxninja`` (the real CLI entry point) in a subprocess with one fault injected.

Used by ``tests/test_reliability.py``; not a test module itself::

    python tests/scripts/train_with_fault.py MODE ARG -- train --data F --out D ...

Modes:

``stall-save K``
    The K-th checkpoint write (1-based) writes the first half of the archive's bytes
    to the temporary file, flushes and fsyncs them, prints ``STALLED`` on stdout and
    then sleeps, so the test can SIGKILL the process in the middle of the write.
``slow-save SECONDS``
    Every checkpoint write is followed by a pause, so a run of many tiny chunks lasts
    long enough for the test to deliver SIGINT between chunks.
"""

from __future__ import annotations

import io
import os
import sys
import time

import numpy as np


def _on_kth_savez(k: int, fail) -> None:
    """np.savez as usual, except its ``k``-th call: ``fail(file, data)`` with the bytes the
    archive would have held."""
    real_savez = np.savez
    calls = [0]

    def savez(file, *args, **kwds):
        calls[0] += 1
        if calls[0] != k:
            return real_savez(file, *args, **kwds)
        buf = io.BytesIO()
        real_savez(buf, *args, **kwds)
        fail(file, buf.getvalue())

    np.savez = savez


def _stall_save(k: int) -> None:
    def stall(file, data):
        file.write(data[: len(data) // 2])
        file.flush()
        os.fsync(file.fileno())
        print("STALLED", flush=True)
        time.sleep(120)  # the test kills us long before this ends
        raise SystemExit("stall-save: not killed")

    _on_kth_savez(k, stall)


def _slow_save(seconds: float) -> None:
    from jaxninja.training import checkpoint

    real_save = checkpoint.save

    def save(*args, **kwds):
        path = real_save(*args, **kwds)
        time.sleep(seconds)
        return path

    checkpoint.save = save


def main(argv: list[str]) -> int:
    mode, arg, sep, *cli_args = argv
    assert sep == "--", argv
    if mode == "stall-save":
        _stall_save(int(arg))
    elif mode == "slow-save":
        _slow_save(float(arg))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    from jaxninja.cli import main as cli_main

    return cli_main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
