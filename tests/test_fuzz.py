"""Table-driven fuzz of the ``jaxninja`` command (a cross-cutting suite): every option of every
command, with boundary and hostile values and every kind of path.

Each case is one in-process call of :func:`jaxninja.cli.main` (the code ``python -m
jaxninja`` runs) with a tiny, valid base command line plus ONE fuzzed ``--option=value``
(the last occurrence wins in argparse). Whatever the value, the promise is:

* exit status 0 or 2 (``check`` may also say 1: a gradient row out of tolerance);
* no ``Traceback`` on stdout or stderr, and for exit 2 at most 3 stderr lines, one of them
  ``error: ...``;
* nothing of the user's changed: every file, directory, FIFO, device node and symlink the
  test created (and the shared data file and finished run) has the same type, mode,
  mtime, size and bytes afterwards. The only exception is the ``--out`` of a command that
  writes (``train``, ``sweep``, ``bench``): a run directory may gain the tool's own file
  names, and a new results file may appear when the command succeeded; an existing file
  of the user's is never replaced.

Values that pass validation run for real, so they must neither hang nor allocate huge
memory (a run is 2 steps of a 4-unit model: compiling is most of its time, and every
compiled chunk is reused across cases). ``test_every_option_is_fuzzed`` fails when a
command gains an option this table does not cover.

Further families keep the same promise: each command's stdout broken (EPIPE), full
(ENOSPC, EIO), ASCII-only or closed; special files (directory, FIFO, symlinks) under each
name of a run directory, for train (plain, ``--overwrite``, ``--resume``), sample and
eval; every option that defines a multi-process job holding another value on process 1
(a simulated gather); each member of a checkpoint damaged (corrupted deflate, LZMA and
bzip2 streams, an unknown compression method, truncated, a ``../`` or duplicate name).
The numbers of cases are printed by ``python -m pytest tests/test_fuzz.py -q -s -k
count`` (docs/reliability.md).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import one_error_line, run_cli

from jaxninja.errors import JaxninjaError
from jaxninja.training import parallel, rundir, sweep, train

ROOT = os.geteuid() == 0
BIG, I64 = str(10**30), str(2**63)
# numbers at and past every boundary, non-numbers, a unicode digit (int("٣") == 3),
# unicode text, empty and blank
VALUES = ["0", "-1", BIG, I64, "nan", "inf", "-inf", "1e-300", "1.5", "ten", "٣", "ünïcødé",
          "", " "]  # fmt: skip
LISTS = [*VALUES, ",", "0,0", "1,-1", "4x2x2", "0x0", f"{BIG}x2"]  # comma lists, HxB settings
FLAG = ["", "=yes"]  # a store_true flag alone, and with a value it does not take
PATHS = ["missing", "file", "dir", "foreign-run", "fifo", "dev-zero", "dev-null",
         "symlink-loop", "dangling-symlink", "unreadable", "read-only-dir", "under-file",
         "unwritable-parent", "unicode", "empty"]  # fmt: skip

NUM, TEXT, IN, OUT = "number", "text", "input path", "output path"
CONFIG = {"--data": IN, "--steps": NUM, "--batch-size": NUM, "--n-embd": NUM,
          "--n-hidden": NUM, "--block-size": NUM, "--lr-decay-step": NUM, "--backend": TEXT,
          "--chunk-steps": NUM}  # fmt: skip
# issue 23's experiment switches
CONFIG |= {"--config": IN, "--lr-decay": NUM, "--schedule": TEXT, "--warmup": NUM,
           "--optimizer": TEXT, "--no-batch-norm": FLAG[0], "--init": TEXT, "--w2-scale": NUM,
           "--b2-scale": NUM, "--eval-every": NUM}  # fmt: skip
OPTIONS: dict[str, dict[str, str]] = {
    "train": {**CONFIG, "--out": OUT, "--lr": NUM, "--seed": NUM, "--running-stats": FLAG[0],
              "--devices": NUM, "--coordinator": TEXT, "--num-processes": NUM,
              "--process-id": NUM, "--heartbeat-timeout": NUM, "--resume": FLAG[0],
              "--overwrite": FLAG[0], "--other-data": FLAG[0], "--samples": NUM},
    "sample": {"--out": IN, "--num": NUM, "--seed": NUM, "--temperature": NUM,
               "--max-len": NUM},
    "eval": {"--out": IN, "--data": IN, "--other-data": FLAG[0]},
    "check": {"--dtype": TEXT, "--n-hidden": NUM, "--seed": NUM, "--data": IN, "--solution": IN},
    "sweep": {**CONFIG, "--lr": NUM, "--seed": NUM, "--grid": TEXT, "--strategy": TEXT,
              "--out": OUT},
    "compare": {"--out": OUT},
    "diagnose": {"--out": IN, "--to": OUT, "--data": IN, "--other-data": FLAG[0]},
    "bench": {"--quick": FLAG[0], "--out": OUT, "--repeats": NUM, "--settings": TEXT,
              "--steps": NUM, "--torch-steps": NUM, "--members": TEXT, "--no-torch": FLAG[0],
              "--data": IN, "--ops": FLAG[0]},
}  # fmt: skip
TINY = ["--steps=2", "--chunk-steps=1", "--n-hidden=4"]
BASE = {  # a valid, tiny command line for each command ({w}: words file, {r}: finished run)
    "train": ["--data={w}", "--out={new}", *TINY, "--samples=0"],
    "sample": ["--out={r}", "--num=2", "--max-len=4"],
    "eval": ["--out={r}", "--data={w}"],
    "check": ["--n-hidden=4", "--data={w}"],
    "sweep": ["--data={w}", "--out={new}", *TINY],
    "compare": ["{r}"],
    "diagnose": ["--out={r}", "--data={w}", "--to={new}"],
    "bench": [
        "--quick",
        "--no-torch",
        "--members=",
        "--settings=4x2",
        "--repeats=1",
        "--steps=1",
        "--out=",
        "--data={w}",
    ],  # fmt: skip
}
WRITES = {"train", "sweep", "bench", "compare", "diagnose"}  # commands whose --out is written
NEW_DIR = {"sweep", "compare", "diagnose"}  # their --out (diagnose: --to) is a new directory
OUT_FLAG = {"diagnose": "--to="}  # where a command writes, if not --out
RUN_FILES = {*rundir.FILES, rundir.LOCK}  # the only names the tool may add to a run dir


def _values(kind: str) -> list[str]:
    return {NUM: VALUES, TEXT: LISTS, IN: PATHS, OUT: PATHS}.get(kind, FLAG)


CASES = [
    (cmd, opt, value)
    for cmd, options in OPTIONS.items()
    for opt, kind in options.items()
    for value in _values(kind)
]
# A few combinations a single option cannot reach.
COMBOS = {
    "overwrite-foreign-run": ("train", ["--out={foreign-run}", "--overwrite"]),
    "resume-foreign-run": ("train", ["--out={foreign-run}", "--resume"]),
    "resume-finished-run-copy": ("train", ["--out={run-copy}", "--resume"]),
    "resume-other-data": ("train", ["--out={run-copy}", "--resume", "--data={file}"]),
    "eval-other-data": ("eval", ["--data={file}", "--other-data"]),
    "sample-huge-product": ("sample", ["--num=100000", "--max-len=100000"]),
    "job-flags-incomplete": ("train", ["--coordinator=localhost:1", "--num-processes=2"]),
}


def _case_id(case: tuple[str, str, str]) -> str:
    cmd, opt, value = case
    return f"{cmd}{opt}={ascii(value)[1:-1]}"


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _compile_once():
    """Each (config, n) chunk is compiled once in this process, whatever case asks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "make_train_chunk", functools.cache(train.make_train_chunk))
        mp.setattr(sweep, "make_sweep_chunk", functools.cache(sweep.make_sweep_chunk))
        yield


@pytest.fixture(scope="module")
def shared(names_file, tmp_path_factory) -> dict[str, Path]:
    """A small words file (all 27 characters) and a finished tiny run trained on it."""
    root = tmp_path_factory.mktemp("shared")
    words = names_file.read_text().split()[:80]
    words += [next(w for w in names_file.read_text().split() if c in w) for c in "qxzjuvwy"]
    w = root / "words.txt"
    w.write_text("\n".join(words) + "\n")
    run = root / "run"
    rc = run_main("train", f"--data={w}", f"--out={run}", *TINY, "--samples=0")
    assert rc == 0
    return {"root": root, "w": w, "r": run}


def run_main(*argv: str) -> int:
    from jaxninja import cli

    try:
        return cli.main(list(argv))
    except SystemExit as e:
        return int(e.code or 0)


@pytest.fixture(scope="module")
def read_only(tmp_path_factory) -> Iterator[Path]:
    """A read-only directory holding one user file. For root, who may write anywhere,
    a read-only tmpfs where mounting is allowed; else (or failing that) mode 0o555."""
    d = tmp_path_factory.mktemp("ro") / "readonly"
    d.mkdir()
    mounted = ROOT and _mount(d)
    (d / "keep.txt").write_text("the user's\n")
    d.chmod(0o555)
    if mounted and not _mount(d, "remount,ro"):
        subprocess.run(["umount", str(d)], check=True)
        mounted = False
    yield d
    if mounted:
        subprocess.run(["umount", str(d)], check=True)
    d.chmod(0o755)


def _mount(d: Path, options: str = "size=1m") -> bool:
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def make_user_files(user: Path, ro: Path) -> dict[str, str]:
    """Every path kind, made fresh for one case; returns ``kind -> path`` (as passed)."""
    user.mkdir(exist_ok=True)  # a test may have put its own things there first
    (user / "notes.txt").write_text("the user's notes\n")  # one "word": no training split
    (user / "docs").mkdir()
    (user / "docs" / "a.txt").write_text("keep me\n")
    results = user / "results"  # a directory of the user's with the tool's file names
    results.mkdir()
    for name in ("metrics.json", "losses.npy", "loss.png"):
        (results / name).write_text(f"the user's own {name}\n")
    os.mkfifo(user / "pipe")
    devices = {"dev-zero": "/dev/zero", "dev-null": "/dev/null"}
    if ROOT:  # copies of the device nodes: a bug that replaced one harms nothing here
        for kind, minor in (("dev-zero", 5), ("dev-null", 3)):
            node = user / kind
            os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
            devices[kind] = str(node)
    (user / "loop").symlink_to("loop")
    (user / "dangling").symlink_to("nowhere")
    secret = user / "secret.txt"
    secret.write_text("secret\n")
    secret.chmod(0)  # root still reads it: then it is just another file of the user's
    return {
        "missing": str(user / "missing"),
        "file": str(user / "notes.txt"),
        "dir": str(user / "docs"),
        "foreign-run": str(results),
        "fifo": str(user / "pipe"),
        **devices,
        "symlink-loop": str(user / "loop"),
        "dangling-symlink": str(user / "dangling"),
        "unreadable": str(secret),
        "read-only-dir": str(ro),
        "under-file": str(user / "notes.txt" / "sub"),
        "unwritable-parent": str(ro / "new"),
        "unicode": str(user / "ünï cødé 名前"),
        "empty": "",
    }


def snapshot(root: Path) -> dict[str, tuple]:
    """``path -> (mode, mtime, size, what it holds)`` for everything under ``root``
    (symlinks are not followed; FIFOs and devices are never opened)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for p in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            st = os.lstat(p)
            held: object = None
            if stat.S_ISREG(st.st_mode):
                try:
                    held = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                except PermissionError:
                    held = "unreadable"
            elif stat.S_ISDIR(st.st_mode):
                held = tuple(sorted(os.listdir(p)))
            elif stat.S_ISLNK(st.st_mode):
                held = os.readlink(p)
            out[p] = (st.st_mode, st.st_mtime_ns, st.st_size, held)
    return out


# -------------------------------------------------------------------------- checks


def assert_nothing_of_the_users_changed(before, after, cmd, argv, rc) -> None:
    """Compare snapshots; only the tool's own writes to a written ``--out`` may differ."""
    flag = OUT_FLAG.get(cmd, "--out=")
    outs = [a.split("=", 1)[1] for a in argv if a.startswith(flag)]
    target = os.path.abspath(outs[-1]) if outs and cmd in WRITES and outs[-1] else None
    changed = [
        f"{p}: {before.get(p)} -> {after.get(p)}"
        for p in sorted(before.keys() | after.keys())
        if before.get(p) != after.get(p)
        and not _allowed(p, before, after, cmd, target, _replaces(argv), rc)
    ]
    assert not changed, f"{cmd} {' '.join(argv)} (exit {rc}) changed " + "; ".join(changed)


def _replaces(argv: list[str]) -> bool:
    """Whether the run directory's own files may be rewritten: ``--overwrite``, or
    ``--resume`` (a jaxninja run, which it continues and finishes again)."""
    return "--overwrite" in argv or "--resume" in argv


def _allowed(p, before, after, cmd, target, overwrite: bool, rc: int) -> bool:
    """Whether the change of ``p`` is the tool's own business: files of the run directory
    ``target`` (new ones; old ones only with ``--overwrite``; the lock), the run
    directory itself, a new results file of a successful sweep/bench, and the parent
    of a new ``target`` gaining just that entry."""
    if target is None:
        return False
    parent, name = os.path.split(os.path.abspath(p))
    if cmd in NEW_DIR and target not in before and os.path.abspath(p).startswith(target + os.sep):
        return rc == 0  # inside the new directory a successful sweep or compare made
    if cmd == "train" and parent == target and name in RUN_FILES:
        return p not in before or overwrite or name == rundir.LOCK
    if os.path.abspath(p) == target:
        is_dir = p in after and stat.S_ISDIR(after[p][0])
        return (cmd == "train" and is_dir) or (p not in before and rc == 0)
    if p in before and p in after and stat.S_ISDIR(before[p][0]):
        gained = set(after[p][3]) - set(before[p][3])
        lost = set(before[p][3]) - set(after[p][3])
        new_target = os.path.dirname(target) == os.path.abspath(p) and target not in before
        return new_target and not lost and gained <= {os.path.basename(target)}
    return False


def check_case(cmd, extra, capsys, tmp_path, shared, read_only, monkeypatch):
    user = tmp_path / "user"
    paths = make_user_files(user, read_only)
    run_copy = tmp_path / "run-copy"
    if any("{run-copy}" in a for a in extra):
        shutil.copytree(shared["r"], run_copy)
    fill = {**paths, "w": str(shared["w"]), "r": str(shared["r"]), "new": str(tmp_path / "new"),
            "run-copy": str(run_copy)}  # fmt: skip
    argv = [cmd, *(a.format(**fill) for a in BASE[cmd]), *(a.format(**fill) for a in extra)]
    roots = (user, read_only, shared["root"])
    before = {k: v for root in roots for k, v in snapshot(root).items()}
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # default outputs (runs/, bench.json) land here
    rc, out, err = run_cli(capsys, *argv)
    assert rc in ((0, 1, 2) if cmd == "check" else (0, 2)), (rc, err)
    assert "Traceback" not in out + err, err
    if rc == 2:
        lines = err.splitlines()
        assert 1 <= len(lines) <= 3 and any(ln.startswith("error: ") for ln in lines), err
    after = {k: v for root in roots for k, v in snapshot(root).items()}
    assert_nothing_of_the_users_changed(before, after, cmd, argv[1:], rc)
    return rc, out, err


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fuzz_option(case, capsys, tmp_path, shared, read_only, monkeypatch):
    cmd, opt, value = case
    kind = OPTIONS[cmd][opt]
    if kind in (IN, OUT):
        extra = [f"{opt}={{{value}}}"]
    elif kind == FLAG[0]:
        extra = [opt + value]
    else:
        extra = [f"{opt}={value}"]
    check_case(cmd, extra, capsys, tmp_path, shared, read_only, monkeypatch)


@pytest.mark.parametrize("name", sorted(COMBOS))
def test_fuzz_combination(name, capsys, tmp_path, shared, read_only, monkeypatch):
    cmd, extra = COMBOS[name]
    check_case(cmd, extra, capsys, tmp_path, shared, read_only, monkeypatch)


def test_every_option_is_fuzzed(capsys):
    """The table covers every long option ``--help`` lists, for every command."""
    for cmd, options in OPTIONS.items():
        rc, usage, _ = run_cli(capsys, cmd, "--help")
        assert rc == 0
        listed = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", usage)) - {"--help"}
        assert listed == set(options), (cmd, listed ^ set(options))


def test_count(capsys):
    """The figures the docs quote: cases tried, by family (``-s`` shows them)."""
    families = {
        "option cases": len(CASES),
        "combinations": len(COMBOS),
        "stdout streams": len(STREAMS) * len(STREAM_COMMANDS),
        "run-file kinds": len(RUN_FILES) * len(RUN_FILE_KINDS) * len(RUN_FILE_CALLS),
        "options across processes": len(JOB_CASES),
        "damaged zip members": len(ZIP_DAMAGE) * ZIP_MEMBERS,
    }
    n = sum(families.values())
    with capsys.disabled():
        print("\nfuzz: " + " + ".join(f"{v} {k}" for k, v in families.items()) + f" = {n} cases")
    assert n >= 300


# ----------------------------------------------- round three: streams, run files, jobs, zips

# The command's stdout as a closed or broken stream, or one that cannot encode its text.
STREAMS = {
    "broken-pipe": errno.EPIPE,  # | head -1: the output ends, the work goes on, exit 0
    "full": errno.ENOSPC,  # > /dev/full: exit 2, one error line
    "io-error": errno.EIO,  # a terminal gone: as full
    "ascii": None,  # PYTHONIOENCODING=ascii: escaped
    "closed": "closed",  # started with fd 1 closed: Python's sys.stdout is None
}


# Every command's output goes through the same cli.main stream; check and bench (seconds
# of compiling each) add time, not cases.
STREAM_COMMANDS = ["train", "sample", "eval", "sweep"]


class _Failing(io.TextIOBase):
    """A stdout whose writes fail with ``errno`` once ``after`` characters were taken."""

    def __init__(self, code: int, after: int = 0) -> None:
        self.code, self.left = code, after

    def write(self, text: str) -> int:
        self.left -= len(text)
        if self.left < 0:
            raise OSError(self.code, os.strerror(self.code))
        return len(text)


@pytest.mark.parametrize("stream", sorted(STREAMS))
@pytest.mark.parametrize("cmd", STREAM_COMMANDS)
def test_fuzz_stdout(cmd, stream, capsys, tmp_path, shared, monkeypatch):
    fill = {"w": str(shared["w"]), "r": str(shared["r"]), "new": str(tmp_path / "new")}
    argv = [cmd, *(a.format(**fill) for a in BASE[cmd])]
    monkeypatch.chdir(tmp_path)
    code = STREAMS[stream]
    ascii_out = None
    fake: object = None  # "closed"
    if isinstance(code, int):
        fake = _Failing(code)
    elif code is None:
        fake = ascii_out = io.TextIOWrapper(io.BytesIO(), "ascii")  # strict, like Python's
    capsys.readouterr()
    with monkeypatch.context() as mp:
        mp.setattr(sys, "stdout", fake)
        rc = run_main(*argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code in (errno.ENOSPC, errno.EIO):
        assert rc == 2 and err.startswith("error: cannot write to stdout ("), err
        assert len(err.splitlines()) == 1
    else:
        assert (rc, err) == (0, ""), err
    if ascii_out is not None:
        ascii_out.flush()
        assert ascii_out.buffer.getvalue().isascii()


# Special files under the names a run directory holds (checkpoint.npz a FIFO, the lock a
# symlink to a user's file, ...): refused with one line or used without touching them.
RUN_FILE_KINDS = ["dir", "fifo", "symlink-to-user-file", "dangling-symlink"]
RUN_FILE_CALLS = {
    "train": ["--out={run}"],
    "train-overwrite": ["--out={run}", "--overwrite"],
    "train-resume": ["--out={run}", "--resume"],
    "sample": ["--out={run}"],
    "eval": ["--out={run}"],
}


@pytest.mark.parametrize("call", sorted(RUN_FILE_CALLS))
@pytest.mark.parametrize("kind", RUN_FILE_KINDS)
@pytest.mark.parametrize("name", sorted(RUN_FILES))
def test_fuzz_run_file(name, kind, call, capsys, tmp_path, shared, read_only, monkeypatch):
    run = tmp_path / "user" / "run"
    run.parent.mkdir()
    shutil.copytree(shared["r"], run)  # a finished run of the user's, one name replaced
    (run / name).unlink(missing_ok=True)
    mine = tmp_path / "user" / "mine.txt"
    mine.write_text("the user's\n")
    {"dir": lambda p: p.mkdir(), "fifo": os.mkfifo,
     "symlink-to-user-file": lambda p: p.symlink_to(mine),
     "dangling-symlink": lambda p: p.symlink_to("nowhere")}[kind](run / name)  # fmt: skip
    cmd = call.split("-")[0]
    extra = [a.replace("{run}", str(run)) for a in RUN_FILE_CALLS[call]]
    # the base line's --out is a new directory: the last --out (this run) wins
    rc, _, err = check_case(cmd, extra, capsys, tmp_path, shared, read_only, monkeypatch)
    assert mine.read_text() == "the user's\n"
    if kind in ("dir", "fifo") and cmd == "train":
        assert rc == 2 and f"{run / name} is not a regular file" in err, err


def _job_values(value: object) -> list[object]:
    """Values a disagreeing process may hold for an option that has ``value``."""
    return [None, True, 0, -1, 10**30, 1.5, "", "\x1b[2J", "ünï", [value], str(value)]


JOB_OPTIONS = parallel.job_options(
    train.TrainConfig(), resume=False, overwrite=False, other_data=False, devices=None
)
JOB_CASES = [(name, v) for name, value in JOB_OPTIONS.items() for v in _job_values(value)]


@pytest.mark.parametrize("case", JOB_CASES, ids=[f"{n}={v!r}" for n, v in JOB_CASES])
def test_fuzz_options_across_processes(case, monkeypatch):
    """Process 1 of a (simulated) two-process job holds another value of one option:
    every process stops with one short, printable line naming it; the same value passes."""
    name, value = case
    theirs = {**JOB_OPTIONS, name: value}

    def gather(row):
        other = json.dumps(theirs, sort_keys=True, default=str).encode()
        return np.stack([row, np.frombuffer(other.ljust(len(row)), np.uint8)])

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(parallel, "_everyone", gather)
    if json.loads(json.dumps(value)) == JOB_OPTIONS[name]:
        parallel.check_same_options(JOB_OPTIONS)
        return
    with pytest.raises(JaxninjaError) as e:
        parallel.check_same_options(JOB_OPTIONS)
    msg = str(e.value)
    assert msg.startswith(f"process 1 has {name} ") and msg.isprintable() and len(msg) < 300


ZIP_METHODS = {
    "deflate": zipfile.ZIP_DEFLATED,
    "lzma": zipfile.ZIP_LZMA,
    "bzip2": zipfile.ZIP_BZIP2,
}


def _zip_damage(member: int, how: str):
    """Damage of checkpoint member ``member`` (its index in the archive): ``how``."""

    def mutate(raw: bytes) -> bytes:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            infos, blobs = z.infolist(), [z.read(i) for i in z.infolist()]
        out = io.BytesIO()
        method = ZIP_METHODS.get(how.split("-")[0], zipfile.ZIP_STORED)
        with zipfile.ZipFile(out, "w", method) as z:
            for i, (info, blob) in enumerate(zip(infos, blobs, strict=True)):
                name = {"dotdot": "../" + info.filename, "duplicate": infos[0].filename}
                z.writestr(name.get(how, info.filename) if i == member else info.filename, blob)
        data = bytearray(out.getvalue())
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as z:
            info = z.infolist()[member]
        start = info.header_offset + 30 + len(info.filename.encode())
        if how.endswith("-corrupt"):
            for j in range(start + 2, min(start + 18, start + info.compress_size)):
                data[j] ^= 0x5A
        elif how == "method-99":
            data[info.header_offset + 8 : info.header_offset + 10] = (99).to_bytes(2, "little")
        elif how == "truncated":
            del data[start + info.compress_size // 2 : start + info.compress_size]
        return bytes(data)

    return mutate


ZIP_MEMBERS = 12  # a finished run's checkpoint: meta, 9 state arrays, 2 statistics
ZIP_DAMAGE = ["deflate-corrupt", "lzma-corrupt", "bzip2-corrupt", "method-99", "truncated",
              "dotdot", "duplicate"]  # fmt: skip


@pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")  # the "duplicate" damage
@pytest.mark.parametrize("how", ZIP_DAMAGE)
@pytest.mark.parametrize("member", range(ZIP_MEMBERS))
def test_fuzz_checkpoint_zip_member(member, how, shared, tmp_path, capsys):
    """Each member of a finished run's checkpoint damaged one way: ``sample`` refuses it
    with one line (or, where nothing that matters changed, samples)."""
    run = tmp_path / "run"
    shutil.copytree(shared["r"], run)
    path = run / "checkpoint.npz"
    raw = path.read_bytes()
    if member >= len(zipfile.ZipFile(io.BytesIO(raw)).infolist()):
        pytest.fail(f"the checkpoint has fewer than {member + 1} members: shrink the range")
    path.write_bytes(_zip_damage(member, how)(raw))
    rc, out, err = run_cli(capsys, "sample", f"--out={run}", "--num=2")
    assert "Traceback" not in out + err
    assert rc in (0, 2) and (rc == 0 or one_error_line(err).startswith(f"error: {path}: "))
