"""Reliability and security end to end through the CLI (a cross-cutting suite): bad input,
non-finite losses, faults and hostile files, each checked across the commands it reaches.

Every expected failure must end the CLI with exit status 2 and exactly one stderr line
``error: ...`` naming the file or option and the problem; Ctrl-C ends it with 130 after
a checkpoint; a crash at any moment leaves a loadable checkpoint; and a checkpoint file
is data, never code, for every command that reads one. Most CLI calls run in-process through
:func:`jaxninja.cli.main` (the same code ``python -m jaxninja`` runs, minus the interpreter
start); the fault tests and a few smoke checks use real subprocesses.

One module's own rules live with that module's tests: the run directory's (lock, ownership,
resume checks, damaged loss history) in test_rundir.py, checkpoint loading (zip bombs, no
unpickling) in test_checkpoint.py, the ops' bad inputs in test_ops.py. Signals and processes
are test_faults.py; every option's boundary values, test_fuzz.py.
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    FAULT,
    Proc,
    assert_same_run,
    npz_arrays,
    one_error_line,
    progress,
    refused,
    run_cli,
    set_array,
    with_arrays,
    with_meta,
)

from jaxninja.lecture.data import Vocab
from jaxninja.training import checkpoint

REPO = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).parent / "scripts" / "train_with_fault.py"
TINY = ["--steps", "50", "--n-hidden", "16", "--chunk-steps", "50"]  # runs that must fail
# Runs that must work: 2 chunks of 1 step (a one-step scan compiles in half the time).
WORKING = ["--steps", "2", "--n-hidden", "16", "--chunk-steps", "1"]


pytestmark = pytest.mark.usefixtures("reuse_compiled_chunks")


# ----------------------------------------------------------------- bad data files


def _write(path: Path, content: bytes | None) -> Path:
    if content is not None:
        path.write_bytes(content)
    return path


BAD_DATA = {
    "missing": (None, "no such file"),
    "empty": (b"", "file is empty"),
    "blank-lines": (b"\n  \n\r\n\t\n", "file has no words (only blank lines)"),
    "not-utf8": (b"emma\nol\xffvia\n", "line 2 is not valid UTF-8 (byte 0xff)"),
    "latin1": (b"emma\nJos\xe9\n", "line 2 is not valid UTF-8 (byte 0xe9)"),
    "single-word": (b"emma\n", "the training split is empty (the file needs more words)"),
    "dot-in-word": (
        b"emma\nst.john\n",
        "line 2: word 'st.john' contains '.', which is reserved as the start/end token",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file_exit_2_one_line(case, tmp_path, capsys):
    content, problem = BAD_DATA[case]
    data = _write(tmp_path / "words.txt", content)
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "train", "--data", data, "--out", out, *TINY)
    assert rc == 2
    assert one_error_line(err) == f"error: {data}: {problem}"
    assert not out.exists(), "a failed start must not create the run directory"


def test_data_file_is_a_directory(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--data", tmp_path, "--out", tmp_path / "o", *TINY)
    assert rc == 2
    assert one_error_line(err) == f"error: {tmp_path}: not a file (it is a directory)"


def _samples(stdout: str, n: int) -> list[str]:
    """The ``n`` sampled names printed last by ``jaxninja train``."""
    lines = stdout.splitlines()
    assert len(lines) >= n
    return lines[len(lines) - n :]


def test_very_long_words_train(tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), 500)) for _ in range(12)]
    data = tmp_path / "long.txt"
    data.write_text("\n".join(words))
    rc, out, err = run_cli(
        capsys, "train", "--data", data, "--out", tmp_path / "r", *WORKING, "--samples", "0"
    )
    assert (rc, err) == (0, "")
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert {"train_loss", "val_loss", "test_loss"} <= metrics.keys()
    assert checkpoint.load(tmp_path / "r").vocab.itos == tuple(".abcdefgh")


def test_mixed_case_and_non_ascii_kept_in_vocabulary(tmp_path, capsys):
    words = ["Zoë", "José", "Émile", "Øyvind", "anna", "MARIA", "Łukasz", "Ñandú", "mia",
             "Chloé", "bjørn", "ava", "Sören", "İlkay", "emma", "ZOË"]  # fmt: skip
    data = tmp_path / "intl.txt"
    data.write_text("\n".join(words), encoding="utf-8")
    n = 40
    rc, out, err = run_cli(
        capsys, "train", "--data", data, "--out", tmp_path / "r", *WORKING, "--samples", n
    )
    assert (rc, err) == (0, "")
    vocab = checkpoint.load(tmp_path / "r").vocab
    assert vocab == Vocab.from_words(words)
    assert {"Z", "ë", "É", "Ø", "Ł", "Ñ", "ú", "ø", "ö", "İ", "M"} <= set(vocab.itos)
    samples = _samples(out, n)
    allowed = set(vocab.itos) - {"."}
    assert all(set(s) <= allowed for s in samples), samples
    assert any(s for s in samples)


def test_windows_line_endings_and_a_tiny_dataset(tmp_path, capsys):
    """CRLF is a line ending, not a character; 3 words leave the val split empty and its
    metric is omitted (the run still works)."""
    data = tmp_path / "crlf.txt"
    data.write_bytes(b"emma\r\nolivia\r\nava\r\n")
    rc, _, err = run_cli(
        capsys, "train", "--data", data, "--out", tmp_path / "r", *WORKING, "--samples", "0"
    )
    assert (rc, err) == (0, "")
    assert checkpoint.load(tmp_path / "r").vocab == Vocab.from_words(["emma", "olivia", "ava"])
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "train_loss" in metrics and "test_loss" in metrics
    assert "val_loss" not in metrics
    rc, out, err = run_cli(capsys, "eval", "--out", tmp_path / "r", "--data", data)
    assert rc == 0 and err == ""
    assert [line.split()[0] for line in out.splitlines()] == ["train", "test"]


def test_cli_subprocess_bad_data_file(tmp_path):
    """The real ``python -m jaxninja``: exit 2, one line, no traceback."""
    missing = tmp_path / "nope.txt"
    p = subprocess.run(
        [sys.executable, "-m", "jaxninja", "train", "--data", str(missing),
         "--out", str(tmp_path / "o"), *TINY],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 2
    assert one_error_line(p.stderr) == f"error: {missing}: no such file"


# ----------------------------------------------------------------- bad arguments

LR = "a number between 1.18e-38 and 3.4e+38 (float32)"  # what lr must be
POSITIVE = "an integer in 1..2147483647"
BAD_ARGS = {  # the flag names a non-number; the config field a number out of range
    "steps-0": (["--steps", "0"], f"steps must be {POSITIVE}, got 0"),
    "steps-neg": (["--steps", "-5"], f"steps must be {POSITIVE}, got -5"),
    "steps-text": (
        ["--steps", "ten"],
        "jaxninja train: argument --steps: invalid int value: 'ten'",
    ),
    "steps-float": (
        ["--steps", "1.5"],
        "jaxninja train: argument --steps: invalid int value: '1.5'",
    ),
    "n-hidden-0": (["--n-hidden", "0"], f"n_hidden must be {POSITIVE}, got 0"),
    "n-embd-neg": (["--n-embd", "-3"], f"n_embd must be {POSITIVE}, got -3"),
    "block-size-0": (["--block-size", "0"], f"block_size must be {POSITIVE}, got 0"),
    "chunk-steps-0": (["--chunk-steps", "0"], f"chunk_steps must be {POSITIVE}, got 0"),
    "steps-2**31": (["--steps", str(2**31)], f"steps must be {POSITIVE}, got 2147483648"),
    "batch-size-0": (
        ["--batch-size", "0"],
        "batch_size must be an integer in 2..2147483647 (batch norm divides by n-1), got 0",
    ),
    "lr-nan": (["--lr", "nan"], f"lr must be {LR}, got nan"),
    "lr-neg": (["--lr", "-0.1"], f"lr must be {LR}, got -0.1"),
    "lr-zero": (["--lr", "0"], f"lr must be {LR}, got 0.0"),
    "lr-inf": (["--lr", "inf"], f"lr must be {LR}, got inf"),
    "lr-text": (["--lr", "fast"], "jaxninja train: argument --lr: invalid float value: 'fast'"),
    "seed-neg": (["--seed", "-1"], "seed must be an integer in 0..2147483647, got -1"),
    "samples-neg": (["--samples", "-1"], "num_samples must be an integer in 0..100000, got -1"),
    "devices-0": (["--devices", "0"], f"devices must be {POSITIVE}, got 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS))
def test_bad_arguments_exit_2_one_line(case, words_file, tmp_path, capsys):
    extra, problem = BAD_ARGS[case]
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "train", "--data", words_file, "--out", out, *TINY, *extra)
    assert rc == 2
    assert one_error_line(err) == f"error: {problem}"
    assert not out.exists()


def test_batch_size_1_is_refused(words_file, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, err = run_cli(
        capsys, "train", "--data", words_file, "--out", out, *TINY, "--batch-size", "1"
    )
    assert rc == 2
    assert one_error_line(err) == (
        "error: batch_size must be an integer in 2..2147483647 (batch norm divides by n-1), got 1"
    )
    assert not out.exists()


def test_cli_subprocess_bad_argument(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "jaxninja", "train", "--out", str(tmp_path / "o"), "--lr", "nan"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert p.returncode == 2
    assert one_error_line(p.stderr) == (f"error: lr must be {LR}, got nan")


# -------------------------------------------------------------- non-finite losses


def test_non_finite_loss_stops_at_its_chunk_and_keeps_last_good_checkpoint(
    words_file, tmp_path, capsys
):
    out = tmp_path / "r"
    rc, stdout, err = run_cli(
        capsys, "train", "--data", words_file, "--out", out,
        "--steps", "6", "--n-hidden", "16", "--chunk-steps", "1", "--lr", "1e30",
    )  # fmt: skip
    assert rc == 2
    # Step 0 (initial params) is finite; its update with lr=1e30 makes step 1's loss NaN.
    assert one_error_line(err) == (
        f"error: loss became non-finite at step 1; stopped, "
        f"the last good checkpoint (step 1) is kept in {out}"
    )
    assert "      0/      6:" in stdout
    ckpt = checkpoint.load(out)  # loadable: every array finite, shapes checked
    assert int(ckpt.state.step) == 1 and ckpt.bn_stats is None
    losses = np.load(out / "losses.npy")
    assert np.isfinite(losses[0]) and np.isnan(losses[1:]).all()
    assert not (out / "metrics.json").exists()
    # sample/eval refuse the unfinished run with one line, too.
    rc, _, err = run_cli(capsys, "sample", "--out", out)
    assert rc == 2
    assert one_error_line(err) == (
        f"error: {out}: training has not finished (step 1 of 6); finish it with --resume first"
    )


# ------------------------------------------------------------------------- faults


def _helper(mode: str, arg: str, words_file: Path, out: Path) -> Proc:
    """``jaxninja train`` with ``tests/scripts/train_with_fault.py MODE ARG``'s fault injected."""
    args = ["train", "--data", words_file, "--out", out, *FAULT]
    return Proc(args, prefix=(HELPER, mode, arg, "--"))


def test_sigkill_mid_checkpoint_write_keeps_previous_checkpoint(
    words_file, tmp_path, capsys, fault_reference
):
    out = tmp_path / "r"
    proc = _helper("stall-save", "3", words_file, out)  # step 300's write stalls
    try:
        proc.wait_for("out", lambda line: line.strip() == "STALLED")
        partial = list(out.glob(".checkpoint.*.tmp"))
        assert len(partial) == 1 and partial[0].stat().st_size > 0
        before = (out / checkpoint.FILENAME).read_bytes()
    finally:
        proc.p.send_signal(signal.SIGKILL)
    rc, _, _ = proc.finish(60)
    assert rc == -signal.SIGKILL
    # The previous checkpoint is untouched and loads; the half-written temp file is never
    # taken for a checkpoint (it is not even a valid archive).
    assert (out / checkpoint.FILENAME).read_bytes() == before
    assert int(checkpoint.load(out).state.step) == 200
    assert [p.name for p in out.glob("*.npz")] == [checkpoint.FILENAME]
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(partial[0])

    rc, _, err = run_cli(capsys, "train", "--data", words_file, "--out", out, *FAULT, "--resume")
    assert (rc, err) == (0, "")
    assert_same_run(out, fault_reference)


def test_sigint_saves_a_checkpoint_exits_130_and_resume_matches(
    words_file, tmp_path, capsys, fault_reference
):
    out = tmp_path / "r"
    proc = _helper("slow-save", "0.15", words_file, out)  # 40 chunks: >= 6 s
    proc.wait_for("out", progress)
    proc.p.send_signal(signal.SIGINT)
    rc, _, stderr = proc.finish(60)
    assert rc == 130, stderr
    ckpt = checkpoint.load(out)
    step = int(ckpt.state.step)
    assert 100 <= step < 4000 and step % 100 == 0  # a chunk boundary
    assert ckpt.bn_stats is None
    assert stderr == (
        "SIGINT: saving after the current chunk (send it again to stop now)\n"
        f"SIGINT: stopped at step {step}; checkpoint saved in {out}. "
        f"Continue with the same command plus --resume\n"
    )
    assert not list(out.glob(".checkpoint.*.tmp"))

    rc, _, err = run_cli(capsys, "train", "--data", words_file, "--out", out, *FAULT, "--resume")
    assert (rc, err) == (0, "")
    assert_same_run(out, fault_reference)


# --------------------------------------------------------------- hostile checkpoints


def _config(**changes):
    return with_meta(lambda meta: meta["config"].update(changes))


def _drop(name):
    return with_arrays(lambda a: a.pop(name))


def _bytes(fn):
    def mutate(path: Path) -> None:
        path.write_bytes(fn(path.read_bytes()))

    return mutate


def _npy(path: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))


def _huge_header(path: Path) -> None:
    """A member whose .npy header claims 10**12 floats (a 3.6 TiB allocation)."""
    arrays = npz_arrays(path)
    with zipfile.ZipFile(path, "w") as z:
        for k, v in arrays.items():
            with z.open(k + ".npy", "w") as f:
                if k == "state.params['C']":
                    header = {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
                    np.lib.format.write_array_header_1_0(f, header)
                    f.write(b"\0" * 64)
                else:
                    np.lib.format.write_array(f, v)


def _rezip(method: int, damage=None):
    """The same arrays zipped with ``method``; ``damage(bytes) -> bytes`` then applies to the
    whole archive (its members' offsets are found by name)."""

    def mutate(path: Path) -> None:
        arrays = npz_arrays(path)
        with zipfile.ZipFile(path, "w", method) as z:
            for k, v in arrays.items():
                with z.open(k + ".npy", "w") as f:
                    np.lib.format.write_array(f, v)
        if damage is not None:
            path.write_bytes(damage(path.read_bytes()))

    return mutate


def _corrupt_member(b: bytes) -> bytes:
    """Flip 16 bytes inside the compressed data of the first member (meta or an array)."""
    start = b.index(b".npy") + 4 + 8
    return b[:start] + bytes(x ^ 0x55 for x in b[start : start + 16]) + b[start + 16 :]


def _method_99(b: bytes) -> bytes:
    """Every member's compression method (local and central headers) set to 99."""
    b = bytearray(b)
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = b.find(signature)
        while at >= 0:
            b[at + offset : at + offset + 2] = (99).to_bytes(2, "little")
            at = b.find(signature, at + 4)
    return bytes(b)


C = "state.params['C']"
HOSTILE = {
    "config-lr-400-digits": (_config(lr=10**400), f"bad metadata (lr must be {LR}, got 1000000000"),
    "config-n-hidden-400-digits": (
        _config(n_hidden=10**400),
        "bad metadata (n_hidden must be an integer in 1..2147483647, got 1000000000",
    ),
    "deflate-corrupt": (
        _rezip(zipfile.ZIP_DEFLATED, _corrupt_member),
        "unreadable checkpoint (Error -3 while decompressing data",
    ),
    "lzma-corrupt": (_rezip(zipfile.ZIP_LZMA, _corrupt_member), "unreadable checkpoint ("),
    "unknown-compression-method": (
        _rezip(zipfile.ZIP_STORED, _method_99),
        "unreadable checkpoint (",
    ),
    "missing-array": (_drop("state.params['W2']"), "missing array \"state.params['W2']\""),
    "missing-meta": (_drop("meta"), "bad metadata ('meta')"),
    "wrong-shape": (
        set_array(C, lambda a: a[:-1]),
        f'array "{C}" has shape (26, 10) dtype float32, expected (27, 10) float32',
    ),
    "wrong-dtype": (
        set_array(C, lambda a: a.astype(np.float64)),
        f'array "{C}" has shape (27, 10) dtype float64, expected (27, 10) float32',
    ),
    "non-finite": (
        set_array(C, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a)),
        f'array "{C}" holds non-finite values',
    ),
    "extra-array": (
        with_arrays(lambda a: a.__setitem__("evil", np.zeros(2))),
        "unexpected arrays ['evil']",
    ),
    "step-out-of-range": (set_array("state.step", lambda a: np.int32(99)), "step 99 outside 0..2"),
    "step-negative": (set_array("state.step", lambda a: np.int32(-1)), "step -1 outside 0..2"),
    "unknown-format": (
        with_meta(lambda m: m.update(format="other-2")),
        "unknown format 'other-2'",
    ),
    "config-unknown-field": (
        _config(evil=1),
        "bad metadata (unknown config field(s): evil)",
    ),
    "config-negative-n-hidden": (
        _config(n_hidden=-16),
        f"bad metadata (n_hidden must be {POSITIVE}, got -16)",
    ),
    "config-n-hidden-string": (
        _config(n_hidden="16"),
        f"bad metadata (n_hidden must be {POSITIVE}, got '16')",
    ),
    "config-lr-string": (
        _config(lr="0.1"),
        f"bad metadata (lr must be {LR}, got '0.1')",
    ),
    "config-running-stats-string": (
        _config(running_stats="yes"),
        "bad metadata (running_stats must be true or false, got 'yes')",
    ),
    "config-not-an-object": (
        with_meta(lambda m: m.update(config=None)),
        "bad metadata (config must be a JSON object, got NoneType)",
    ),
    "config-inconsistent-with-arrays": (
        _config(n_hidden=32),
        "array \"state.params['W1']\" has shape (30, 16) dtype float32, expected (30, 32) float32",
    ),
    "vocab-inconsistent-with-arrays": (
        with_meta(lambda m: m.update(vocab=[".", "a", "b"])),
        f'array "{C}" has shape (27, 10) dtype float32, expected (3, 10) float32',
    ),
    "vocab-not-characters": (
        with_meta(lambda m: m.update(vocab=[".", "ab"])),
        "bad metadata (vocabulary entry 1 must be a single character, got 'ab')",
    ),
    "meta-not-json": (
        with_arrays(lambda a: a.__setitem__("meta", np.frombuffer(b"{oops", np.uint8))),
        "bad metadata (Expecting property name enclosed in double quotes",
    ),
    "meta-deeply-nested": (
        with_arrays(lambda a: a.__setitem__("meta", np.frombuffer(b"[" * 100_000, np.uint8))),
        "bad metadata (maximum recursion depth exceeded",
    ),
    "truncated": (_bytes(lambda b: b[: len(b) // 2]), "unreadable checkpoint (File is not a zip"),
    "truncated-tail": (_bytes(lambda b: b[:-1]), "unreadable checkpoint (File is not a zip"),
    "flipped-byte": (
        _bytes(lambda b: b[:200] + bytes([b[200] ^ 0xFF]) + b[201:]),
        "unreadable checkpoint (",
    ),
    "empty": (_bytes(lambda b: b""), "unreadable checkpoint ("),
    "garbage": (_bytes(lambda b: b"\x80\x04garbage" * 100), "unreadable checkpoint ("),
    "bare-npy": (_npy, "unreadable checkpoint (a single .npy array, not an .npz archive)"),
    "huge-header": (_huge_header, "unreadable checkpoint ("),  # MemoryError, caught
    "negative-bn-var": (set_array("bn_stats/var", lambda a: -a), "'bn_stats/var' holds variances"),
    "zero-bn-var": (set_array("bn_stats/var", lambda a: 0 * a), "'bn_stats/var' holds variances"),
    "zero-running-var": (
        set_array("state.bn_running['var']", lambda a: a * 0),
        "\"state.bn_running['var']\" holds variances that are not > 0",
    ),
    "nan-bn-mean": (
        set_array("bn_stats/mean", lambda a: a * np.nan),
        "'bn_stats/mean' holds non-finite",
    ),
    "inf-bn-var": (
        set_array("bn_stats/var", lambda a: a * np.inf),
        "'bn_stats/var' holds non-finite",
    ),
    "esc-in-vocab": (
        with_meta(lambda m: m["vocab"].__setitem__(2, "\x1b")),
        "bad metadata (vocabulary entry 2 is the control character U+001B)",
    ),
    "nul-in-vocab": (with_meta(lambda m: m["vocab"].__setitem__(4, "\x00")), "U+0000"),
    "missing-config-field": (
        with_meta(lambda m: m["config"].pop("lr")),
        "bad metadata (missing config field(s): lr)",
    ),
    "missing-data-hash": (
        with_meta(lambda m: m.pop("data_sha256")),
        "bad metadata (missing field(s): data_sha256)",
    ),
    "bad-data-hash": (
        with_meta(lambda m: m.update(data_sha256="xyz")),
        "bad metadata (data_sha256 must be null or 64 hex digits, got 'xyz')",
    ),
    "junk-config-keys": (
        _config(**{f"k{i}": i for i in range(200_000)}),
        "bad metadata (unknown config field(s): k0, k1, k10, k100, k1000 ... (200000 in all))",
    ),
    "junk-meta-keys": (
        with_meta(lambda m: m.update({f"\x1b{i}": i for i in range(200_000)})),
        "bad metadata (unknown field(s): '\\x1b0', '\\x1b1', '\\x1b10'",
    ),
    "junk-arrays": (
        with_arrays(lambda a: a.update({f"j{i}": np.zeros(1) for i in range(50)})),
        "unexpected arrays ['j0', 'j1', 'j10', 'j11', 'j12'] ... (50 in all)",
    ),
    "object-array": (
        with_arrays(lambda a: a.__setitem__("evil", np.array([{}], dtype=object))),
        "unreadable checkpoint (it holds pickled Python objects, which are never loaded)",
    ),
    "raw-pickle": (
        _bytes(lambda b: pickle.dumps({"a": 1})),
        "unreadable checkpoint (it holds pickled Python objects, which are never loaded)",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_checkpoint_refused_everywhere(case, run_copy, words_file, capsys):
    mutate, problem = HOSTILE[case]
    path = run_copy / checkpoint.FILENAME
    mutate(path)
    msg = refused(run_copy)  # "<path>: ..." in one short line, no control character
    assert problem in msg, msg
    # The same one line from every command that reads a checkpoint.
    for argv in (
        ["sample", "--out", run_copy],
        ["eval", "--out", run_copy, "--data", words_file],
        ["train", "--data", words_file, "--out", run_copy, *TINY, "--resume"],
    ):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 2, argv
        assert one_error_line(err) == f"error: {msg}", argv


# -------------------------------------------------------------------- diverging runs


def test_a_diverging_run_saves_nothing_non_finite(words_file, tmp_path, capsys):
    """lr=1e16 keeps every parameter finite (so no chunk stops it) while its calibrated
    statistics overflow: the run stops before its statistics or metrics are written."""
    out = tmp_path / "r"
    argv = ["train", "--data", words_file, "--out", out, "--lr", "1e16", "--steps", "20"]
    argv += ["--chunk-steps", "10", "--n-hidden", "8", "--samples", "0"]
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 2 and "train " not in stdout
    line = one_error_line(err)
    assert line.startswith("error: the run diverged (non-finite after training: batch-norm")
    assert f"the checkpoint of step 20 (without statistics) is kept in {out}" in line
    assert not (out / "metrics.json").exists()
    ckpt = checkpoint.load(out)  # every array in it finite (load checks)
    assert int(ckpt.state.step) == 20 and ckpt.bn_stats is None
    rc, _, err = run_cli(capsys, *argv, "--resume")  # resuming ends the same way
    assert rc == 2 and one_error_line(err) == line
