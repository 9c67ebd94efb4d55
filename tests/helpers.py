"""Helpers shared by several test modules."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import jax
import numpy as np
import pytest

from jaxninja import cli
from jaxninja.lecture.data import Vocab, is_control
from jaxninja.training import checkpoint, train
from jaxninja.training.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def load_experiment(name: str) -> ModuleType:
    """Import ``experiments/<name>.py`` by path (``experiments`` is not a package)."""
    path = REPO / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_experiments_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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


# ------------------------------------------------------------- runs interrupted by faults

# 40 chunks of 100 steps, each with its checkpoint: a run that lasts past a signal. Every
# run compared with the uninterrupted reference (conftest's ``fault_reference``) uses it.
FAULT = ["--steps", "4000", "--n-hidden", "16", "--chunk-steps", "100", "--samples", "0"]


def params_of(run: Path) -> dict[str, np.ndarray]:
    """The parameters stored in ``run``'s checkpoint, as numpy arrays."""
    return {k: np.asarray(v) for k, v in checkpoint.load(run).state.params.items()}


def assert_same_run(run: Path, reference: tuple[dict, np.ndarray]) -> None:
    """``run`` ends with the reference's parameters and loss history, bit for bit."""
    # Measured: a resumed run is bitwise identical to an uninterrupted one (the batch of
    # step s comes from fold_in(key, s) and every chunk runs the same executable).
    params, losses = reference
    got = params_of(run)
    assert got.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(got[k], params[k], err_msg=k)
    np.testing.assert_array_equal(np.load(run / "losses.npy"), losses)


def progress(line: str) -> bool:
    """The first progress line of ``jaxninja train`` (step 0)."""
    return line.strip().startswith("0/")


class Proc:
    """``python PREFIX ARGS`` (by default ``python -m jaxninja ARGS``) with its stdout and
    stderr lines collected by threads (the session's compilation cache comes with the
    environment: tests/conftest.py)."""

    def __init__(self, args, cwd: Path = REPO, prefix=("-m", "jaxninja")):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, *map(str, prefix), *map(str, args)]
        self.p = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
        )
        self.lines: dict[str, queue.Queue] = {"out": queue.Queue(), "err": queue.Queue()}
        self.seen: dict[str, list[str]] = {"out": [], "err": []}
        for name, stream in (("out", self.p.stdout), ("err", self.p.stderr)):
            threading.Thread(target=self._pump, args=(stream, name), daemon=True).start()

    def _pump(self, stream, name: str) -> None:
        for line in stream:
            self.lines[name].put(line)
        self.lines[name].put(None)

    def wait_for(self, name: str, pred, timeout: float = 120) -> str:
        """The first new line of stdout/stderr (``name``) for which ``pred`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines[name].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.p.kill()
                pytest.fail(f"never got the line; {name} so far: {self.seen[name]}")
            self.seen[name].append(line)
            if pred(line):
                return line

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        """Exit status and the rest of stdout and stderr (all of it, seen or not)."""
        try:
            rc = self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
        for name in ("out", "err"):
            while (line := self.lines[name].get(timeout=30)) is not None:
                self.seen[name].append(line)
        return rc, "".join(self.seen["out"]), "".join(self.seen["err"])


# ------------------------------------------------------------------ tampered checkpoints


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz archive ``path``."""
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def rewrite_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def with_arrays(fn):
    """A mutation of a checkpoint file that applies ``fn`` to its dict of arrays."""

    def mutate(path: Path) -> None:
        arrays = npz_arrays(path)
        fn(arrays)
        rewrite_npz(path, arrays)

    return mutate


def with_meta(edit):
    """A mutation that applies ``edit`` to the decoded JSON ``meta`` entry."""

    def change(arrays: dict[str, np.ndarray]) -> None:
        meta = json.loads(bytes(arrays["meta"]))
        edit(meta)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)

    return with_arrays(change)


def set_array(name: str, value):
    """A mutation that replaces array ``name`` by ``value(old)``."""
    return with_arrays(lambda a: a.__setitem__(name, value(a[name])))


def refused(run: Path) -> str:
    """``checkpoint.load(run)``'s one short line (no control character, no numpy advice)."""
    with pytest.raises(checkpoint.CheckpointError) as exc:
        checkpoint.load(run)
    msg = str(exc.value)
    assert msg.startswith(f"{run / checkpoint.FILENAME}: "), msg
    assert "\n" not in msg and len(msg) < len(str(run)) + 250, msg
    assert "allow_pickle" not in msg and not any(is_control(c) for c in msg), msg
    return msg


# ------------------------------------------------------------------------------ sampling


def numpy_logits(params, bn_stats, context: list[int]) -> np.ndarray:
    """Eval-mode logits for one context, in float64 numpy."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mean, var = (np.asarray(bn_stats[k], np.float64) for k in ("mean", "var"))
    hprebn = p["C"][context].reshape(1, -1) @ p["W1"] + p["b1"]
    h = np.tanh(p["bngain"] * (hprebn - mean) / np.sqrt(var + 1e-5) + p["bnbias"])
    return (h @ p["W2"] + p["b2"])[0]


def greedy_name(params, bn_stats, vocab, max_len: int = 32) -> str:
    """Argmax decoding, one character at a time."""
    context, out = [0, 0, 0], []
    for _ in range(max_len):
        ix = int(np.argmax(numpy_logits(params, bn_stats, context)))
        if ix == 0:
            break
        out.append(vocab.itos[ix])
        context = context[1:] + [ix]
    return "".join(out)


# A small run's pieces, for the checkpoint, atomic-write and sampling tests.
CFG = TrainConfig(n_hidden=8, steps=4, chunk_steps=2)
VOCAB = Vocab(tuple(".abcd"))
SHA = hashlib.sha256(b"some data file").hexdigest()


# ---------------------------------------------------------------------- short training runs

# The lecture's progress line, f"{i:7d}/{n:7d}: {loss:.4f}".
PROGRESS = re.compile(r" *(\d+)/ *(\d+): (\d+\.\d{4})")
# The small model of conftest's ``trajectories`` / ``trained`` (test_train.py, test_sample.py,
# test_checkpoint.py): a small hidden layer, 300 steps per trajectory.
TRAJ_STEPS = 300  # steps of the backend / chunking / determinism trajectories
SMALL = TrainConfig(n_hidden=32, steps=TRAJ_STEPS)
# conftest's ``no_bn_run``: 300 steps without batch norm, evaluated every 100 steps.
NO_BN = TrainConfig(n_hidden=16, steps=300, chunk_steps=200, batch_norm=False, eval_every=100)
# conftest's ``two_runs`` (test_compare.py, test_diagnose.py): tiny runs with metrics.jsonl.
TWO_RUNS = TrainConfig(n_hidden=8, steps=200, chunk_steps=100, eval_every=100)


def host(tree):
    """A numpy *copy* of a pytree (train chunks donate their input buffers)."""
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def run_chunks(cfg: TrainConfig, chunks, Xtr, Ytr, vocab_size: int = 27, fns=None):
    """Train ``cfg`` from its initial state through chunks of the given sizes.

    Returns ``(state, losses)`` as numpy; ``fns`` caches compiled chunk functions by size.
    """
    fns = {} if fns is None else fns
    state = train.init_state(cfg, vocab_size)
    losses = []
    for n in chunks:
        if n not in fns:
            fns[n] = train.make_train_chunk(cfg, n)
        state, chunk_losses = fns[n](state, Xtr, Ytr)
        losses.append(np.asarray(chunk_losses))
    return host(state), np.concatenate(losses)


def assert_trees_equal(a, b) -> None:
    """Bitwise equality of two pytrees of arrays, leaf by leaf, with the leaf named."""
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), (
            f"{jax.tree_util.keystr(path)}: max |diff| {np.max(np.abs(x - y))}"
        )
