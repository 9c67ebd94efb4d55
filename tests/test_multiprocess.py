"""Multi-process data-parallel training: real ``jaxninja train`` processes on 127.0.0.1 (a
cross-cutting suite: the CLI, jaxninja.training.parallel, job and rundir across processes).

Every job is started the way a cluster launcher would start it: one ``python -m jaxninja
train`` per process with ``--coordinator 127.0.0.1:PORT --num-processes N --process-id I``
(a free port per job), CPU devices forced per process with ``XLA_FLAGS``, gloo
collectives between processes. The jobs run side by side in two phases (training from
scratch, then the resumes), once per module; each test reads its part of their results.

Process 1 of every job gets an ``--out`` of its own that must never be created: only
process 0 touches the run directory, the others get its state over the network.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import one_error_line, run_cli

from jaxninja.errors import JaxninjaError
from jaxninja.training import checkpoint, parallel
from jaxninja.training.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240  # per phase; a hang fails the test instead of stalling CI
STEPS, HALF, CHUNK = 200, 100, 50
HEARTBEAT = 10
# A process that cannot join ends this soon after its job started (JAX's import and start
# included, on a loaded 2-core machine), not after the 300 s connection timeout.
SOON = 200
# options that define a job, given to process 1 with another value than process 0's
# (each real job costs two JAX processes; test_check_same_options covers every option)
DIFFER = {"--seed": "7", "--steps": str(STEPS + CHUNK)}  # a silent other model; a deadlock
CONFIG = ["--n-hidden", "32", "--batch-size", "32", "--chunk-steps", str(CHUNK)]
CONFIG += ["--samples", "0", "--heartbeat-timeout", str(HEARTBEAT)]

# float32, 200 steps: 2x2, 1x4 and 1x1 add the same numbers in other orders. Measured:
# params, calibrated statistics and per-step losses within 9.5e-7 (README).
TOL32 = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """``processes`` x ``devices`` ``jaxninja train`` processes writing run ``out``; process
    ``i`` also gets the options ``own[i]``."""

    def __init__(
        self,
        tmp: Path,
        out: str,
        processes: int,
        devices: int,
        steps: int,
        *more,
        own=None,
        killed: bool = False,
    ):
        self.out, self.processes, self.started = tmp / out, processes, time.monotonic()
        self.never = [tmp / f"{out}-process{i}-never" for i in range(1, processes)]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        env["JAXNINJA_DATA"] = str(tmp.parent / "names.txt")
        if killed:  # the session's compilation cache (conftest) must get no half-written entry
            env.pop("JAX_COMPILATION_CACHE_DIR", None)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        port = _free_port()
        self.procs = []
        for i in range(processes):
            argv = ["train", *CONFIG, "--steps", str(steps), *more]
            argv += ["--out", str(self.out if i == 0 else self.never[i - 1])]
            if processes > 1:
                argv += ["--coordinator", f"127.0.0.1:{port}"]
                argv += ["--num-processes", str(processes), "--process-id", str(i)]
            argv += (own or {}).get(i, [])  # this process's own options (the last one wins)
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "jaxninja", *argv],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )

    def wait(self) -> list[tuple[int, str, str]]:
        """``(exit status, stdout, stderr)`` of each process."""
        results = []
        for proc in self.procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            results.append((proc.returncode, out, err))
        return results

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _first_to_end(job: Job) -> dict:
    """The first process of ``job`` to end (within TIMEOUT): its index, exit status, output
    and the seconds since the job was started; the others (left waiting for a process that will
    never join) are then killed."""
    while not any(p.poll() is not None for p in job.procs):
        assert time.monotonic() - job.started < TIMEOUT, "no process ended"
        time.sleep(0.1)
    seconds = time.monotonic() - job.started  # an upper bound: it may be seen late
    i = next(i for i, p in enumerate(job.procs) if p.poll() is not None)
    out, err = job.procs[i].communicate(timeout=TIMEOUT)
    job.kill()
    return {"process": i, "rc": job.procs[i].returncode, "out": out, "err": err, "seconds": seconds}


def _wait_for_checkpoint(job: Job) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (job.out / checkpoint.FILENAME).exists():
        assert time.monotonic() < deadline, "the job wrote no checkpoint"
        assert job.procs[0].poll() is None, job.procs[0].communicate()
        time.sleep(0.1)


def _signal_process_1(jobs: dict[str, tuple[Job, int]]) -> dict[str, dict]:
    """For each job: wait for its first checkpoint, send its process 1 the signal
    (SIGKILL: dead; SIGSTOP: hung, its connections open; SIGTERM: a scheduler's notice),
    then time how long process 0 goes on, and collect every process's output."""
    sent = {}
    for name, (job, signum) in jobs.items():
        _wait_for_checkpoint(job)
        time.sleep(0.5)  # well inside the next chunks: process 0 is in a collective
        job.procs[1].send_signal(signum)
        sent[name] = time.monotonic()
    res = {}
    for name, (job, _) in jobs.items():
        out, err = job.procs[0].communicate(timeout=TIMEOUT)
        seconds = time.monotonic() - sent[name]
        if jobs[name][1] == signal.SIGSTOP:
            job.procs[1].kill()  # a stopped process never ends by itself
        rest = [(p.wait(TIMEOUT), *p.communicate()) for p in job.procs[1:]]
        res[name] = {"rc": job.procs[0].returncode, "out": out, "err": err}
        res[name] |= {"seconds": seconds, "all": [(res[name]["rc"], out, err), *rest]}
    return res


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, names_file):
    """Phase 1: 2x2, 1x4, 1x1 for STEPS; 2x1 and 1x2 for HALF; 1x2 for STEPS; a long 2x2
    job whose process 1 is killed. Phase 2: the halves resumed with the other process
    count; the killed job resumed for one chunk as one process."""
    tmp = tmp_path_factory.mktemp("multiprocess") / "runs"
    tmp.mkdir()
    (tmp.parent / "names.txt").write_bytes(names_file.read_bytes())
    started: list[Job] = []

    def start(*args, **kw) -> Job:
        started.append(Job(tmp, *args, **kw))
        return started[-1]

    try:
        phase1 = {
            "2x2": start("2x2", 2, 2, STEPS),
            "1x4": start("1x4", 1, 4, STEPS),
            "1x1": start("1x1", 1, 1, STEPS),
            "1x2": start("1x2", 1, 2, STEPS),
            "2x1-half": start("2x1-then-1x2", 2, 1, HALF),
            "1x2-half": start("1x2-then-2x1", 1, 2, HALF),
            "bad-devices": start("bad-devices", 2, 2, STEPS, "--devices", "2"),
        }
        disagree = {  # one process given another option: every process stops at once
            f"differ{flag}": start(f"differ{flag}", 2, 1, STEPS, own={1: [flag, value]})
            for flag, value in DIFFER.items()
        }
        duplicate_0 = start("duplicate-0", 2, 1, STEPS, own={1: ["--process-id", "0"]}, killed=True)
        duplicate_1 = start("duplicate-1", 3, 1, STEPS, own={2: ["--process-id", "1"]}, killed=True)
        killed = start("killed", 2, 1, 100 * STEPS, killed=True)
        hung = start("hung", 2, 1, 100 * STEPS, killed=True)
        stopped = start("sigterm", 2, 1, 100 * STEPS, killed=True)
        # first: their ends are timed (the killed, hung and stopped jobs run on meanwhile)
        res = {"duplicate-0": _first_to_end(duplicate_0), "duplicate-1": _first_to_end(duplicate_1)}
        res |= _signal_process_1(
            {
                "killed": (killed, signal.SIGKILL),
                "hung": (hung, signal.SIGSTOP),
                "sigterm": (stopped, signal.SIGTERM),
            }
        )
        res["sigterm-step"] = int(checkpoint.load(stopped.out).state.step)
        res |= {name: job.wait() for name, job in disagree.items()}
        res |= {name: job.wait() for name, job in phase1.items()}
        saved = int(checkpoint.load(killed.out).state.step)
        phase2 = {
            "then-1x2": start("2x1-then-1x2", 1, 2, STEPS, "--resume"),
            "then-2x1": start("1x2-then-2x1", 2, 1, STEPS, "--resume"),
            "killed-resumed": start("killed", 1, 1, saved + CHUNK, "--resume"),
        }
        res |= {name: job.wait() for name, job in phase2.items()}
        res["killed"]["saved"] = saved
        return res, {job.out.name: job for job in started}
    finally:
        for job in started:
            job.kill()


def _ok(results: list[tuple[int, str, str]]) -> None:
    for i, (rc, _out, err) in enumerate(results):
        assert rc == 0, f"process {i} exit {rc}:\n{err[-3000:]}"


def _run(job: Job) -> dict[str, np.ndarray]:
    """Every array a run leaves: the checkpoint's (state, calibrated statistics), losses."""
    ckpt = checkpoint.load(job.out)
    arrays = {f"state{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(ckpt.state))}
    arrays |= {f"bn_{k}": np.asarray(v) for k, v in (ckpt.bn_stats or {}).items()}
    arrays["losses"] = np.load(job.out / "losses.npy")
    assert "bn_mean" in arrays and np.isfinite(arrays["losses"]).all()
    return arrays


def _maxdiff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


def test_processes_x_devices_train_the_same_model(jobs):
    """2 processes x 2 devices == 1 x 4 == 1 x 1 within float32 rounding."""
    res, by_dir = jobs
    for name in ("2x2", "1x4", "1x1"):
        _ok(res[name])
    runs = {name: _run(by_dir[name]) for name in ("2x2", "1x4", "1x1")}
    losses = runs["1x1"]["losses"]
    assert losses[-50:].mean() < losses[:50].mean() - 0.3  # it trained
    for other in ("1x4", "1x1"):
        diff = _maxdiff(runs["2x2"], runs[other])
        print(f"2x2 vs {other}: max abs diff {diff:.2g} (params, statistics, losses)")
        assert diff <= TOL32, (other, diff)
    metrics = {n: json.loads((by_dir[n].out / "metrics.json").read_text()) for n in runs}
    assert (metrics["2x2"]["processes"], metrics["2x2"]["devices"]) == (2, 4)
    assert (metrics["1x4"]["processes"], metrics["1x4"]["devices"]) == (1, 4)
    for split in ("train_loss", "val_loss", "test_loss"):
        values = [m[split] for m in metrics.values()]
        assert max(values) - min(values) <= 1e-4 + 1e-6, (split, values)  # 4 decimals


# gloo's connection message, "[Gloo] Rank 1 is connected to 3 peer ranks. Expected number
# of connected peer ranks is : 3", in the pieces its C++ stream writes
GLOO_WORDS = (
    "Expected number of connected peer ranks is :",
    "[Gloo] Rank",
    "is connected to",
    "peer ranks.",
)


def _without_gloo(text: str) -> str:
    """``text`` less gloo's messages: its threads write them piece by piece, so two can
    interleave mid-line (seen in CI: "...ranks is : 3" then "2 is connected to ..."). Its
    words, numbers and whitespace go; anything left was printed by someone else."""
    for words in GLOO_WORDS:
        text = text.replace(words, "")
    return re.sub(r"[\d\s]", "", text)


def test_only_process_0_prints_and_writes(jobs):
    res, by_dir = jobs
    for name in ("2x2", "2x1-then-1x2", "1x2-then-2x1", "killed"):
        for never in by_dir[name].never:
            assert not never.exists(), f"{never} was created by a process other than 0"
    for name in ("2x2", "2x1-half", "then-2x1"):
        _ok(res[name])
        (_, out0, _), (_, out1, err1) = res[name]
        assert "train " in out0 and "run directory:" in out0
        assert _without_gloo(out1) == "" and err1 == "", (name, out1, err1)
    files = sorted(p.name for p in by_dir["2x2"].out.iterdir())
    assert {"checkpoint.npz", "losses.npy", "metrics.json"} <= set(files)


def test_resume_with_another_process_count_is_exact(jobs):
    """2 processes x 1 device for HALF steps, then 1 x 2 (and the other way round) ==
    1 x 2 for all STEPS, bit for bit: the checkpoint carries the whole state, and with two
    devices every reduction adds the same two numbers."""
    res, by_dir = jobs
    for name in ("1x2", "2x1-half", "1x2-half", "then-1x2", "then-2x1"):
        _ok(res[name])
    straight = _run(by_dir["1x2"])
    for run, resume in (("2x1-then-1x2", "then-1x2"), ("1x2-then-2x1", "then-2x1")):
        assert f"{HALF:7d}/{STEPS:7d}" in res[resume][0][1]  # it went on from HALF
        assert _maxdiff(_run(by_dir[run]), straight) == 0.0, run


def test_killed_process_stops_the_job_with_one_error_line(jobs):
    res, by_dir = jobs
    killed = res["killed"]
    assert killed["rc"] != 0
    line = one_error_line(killed["err"])
    print(f"survivor stopped {killed['seconds']:.1f} s after the kill (heartbeat {HEARTBEAT} s)")
    print(f"exit {killed['rc']}: {line}")
    # the survivor learns it from a failed collective (gloo: connection reset; exit 2) or
    # from the heartbeats (JAX aborts it; the stderr filter leaves one line)
    assert "--resume" in line, line
    assert "JAX's distributed runtime ended this process" in line or "collective with" in line
    assert killed["seconds"] < HEARTBEAT + 20
    assert "Traceback" not in killed["out"]
    # the last checkpoint is valid and --resume continues it, here as one process
    assert killed["saved"] > 0 and killed["saved"] % CHUNK == 0
    _ok(res["killed-resumed"])
    assert int(checkpoint.load(by_dir["killed"].out).state.step) == killed["saved"] + CHUNK


def test_hung_process_stops_the_job_after_the_heartbeat_timeout(jobs):
    """A stopped (SIGSTOP) process keeps its connections: no collective fails, JAX's
    heartbeat check ends the survivor (a fatal C++ log the stderr guard makes one line)."""
    res, _ = jobs
    hung = res["hung"]
    line = one_error_line(hung["err"])
    print(f"hung: survivor stopped {hung['seconds']:.1f} s after SIGSTOP; exit {hung['rc']}")
    assert hung["rc"] == -signal.SIGABRT
    assert line == (
        f"error: JAX's distributed runtime ended this process: another process of the job "
        f"died, hung (no heartbeat for {HEARTBEAT} s) or became unreachable; {parallel.RESTART}"
    )
    assert hung["seconds"] < HEARTBEAT + 20


def test_a_job_trains_on_all_devices(jobs):
    """``--devices 2`` in a job of 2 processes x 2 devices: a one-line error, nothing
    written (the other process may report process 0's exit instead)."""
    res, by_dir = jobs
    (rc0, _, err0), (rc1, _, _) = res["bad-devices"]
    assert rc0 == 2 and rc1 != 0
    assert "--devices 2: a job of 2 processes trains on all 4" in one_error_line(err0)
    assert not by_dir["bad-devices"].out.exists()


def test_sigterm_to_one_process_stops_all_after_the_same_chunk(jobs):
    res, _ = jobs
    step = res["sigterm-step"]
    assert 0 < step < 100 * STEPS and step % CHUNK == 0
    for rc, _out, err in res["sigterm"]["all"]:
        assert rc == 128 + signal.SIGTERM, err
        assert f"SIGTERM: stopped at step {step}; checkpoint saved" in err, err
        assert "Traceback" not in err


# -------------------------------------------------------------- in this process


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--coordinator", "127.0.0.1:1234"], "go together; missing --num-processes, --process-id"),
        (["--num-processes", "2", "--process-id", "0"], "missing --coordinator"),
        (["--coordinator", "host", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--coordinator", "h:99999", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "in 0..1"),
    ],
)
def test_bad_job_flags_are_one_line_errors(capsys, tmp_path, argv, message):
    rc, out, err = run_cli(capsys, "train", "--steps", "1", "--out", tmp_path / "run", *argv)
    assert rc == 2
    assert message in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_launched_job_detection():
    assert not parallel.launched_job({})
    assert parallel.launched_job({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    slurm = {"SLURM_STEP_NODELIST": "node[1-2]", "SLURM_STEP_NUM_TASKS": "2"}
    assert parallel.launched_job(slurm)
    assert not parallel.launched_job({**slurm, "SLURM_STEP_NUM_TASKS": "1"})  # sbatch -n1
    assert parallel.initialize(environ={}) == 1  # nothing to join: one process


def test_processes_that_disagree_on_an_option_all_stop_at_once(jobs):
    """Each process of a job given one option with another value: every process ends
    with exit 2 and the one line naming the option and both values, before any step."""
    res, by_dir = jobs
    for flag, value in DIFFER.items():
        ours = {"--seed": 42, "--steps": STEPS}[flag]
        theirs = type(ours)(value)
        expected = (
            f"error: process 1 has {flag} {theirs!r} but process 0 has {ours!r}; every "
            f"process of a job needs the same options"
        )
        for i, (rc, _, err) in enumerate(res[f"differ{flag}"]):
            assert rc == 2 and one_error_line(err) == expected, (flag, i, err)
        assert not (by_dir[f"differ{flag}"].out / checkpoint.FILENAME).exists()


def test_two_processes_with_id_0_the_second_is_refused_at_once(jobs):
    end = jobs[0]["duplicate-0"]
    print(f"duplicate --process-id 0: refused after {end['seconds']:.1f} s")
    assert end["rc"] == 2 and end["seconds"] < SOON
    line = one_error_line(end["err"])
    assert line.startswith("error: --coordinator 127.0.0.1:") and "cannot listen on port" in line
    assert "--process-id 0" in line


def test_two_processes_with_id_1_the_superseded_one_says_why(jobs):
    """JAX's coordinator takes the later registration of an id and ends the earlier
    process from C++ (abort): its guard says why in one line, within seconds."""
    end = jobs[0]["duplicate-1"]
    print(f"duplicate --process-id 1: the superseded process ended after {end['seconds']:.1f} s")
    assert end["process"] in (1, 2) and end["rc"] == -signal.SIGABRT, end
    line = one_error_line(end["err"])
    assert line.startswith("error: cannot join the job at 127.0.0.1:") and "--process-id?" in line
    assert end["seconds"] < SOON


def test_a_port_in_use_is_one_line_before_jax_logs(tmp_path):
    """Process 0 on a port another program listens on: one ``error:`` line, no C++ log."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        argv = ["train", "--steps", "1", "--out", tmp_path / "run"]
        argv += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0"]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        p = subprocess.run([sys.executable, "-m", "jaxninja", *map(str, argv)], env=env,
                           capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)  # fmt: skip
    assert p.returncode == 2 and p.stdout == ""
    assert f"process 0 cannot listen on port {port} (Address already in use" in one_error_line(
        p.stderr
    )
    assert not (tmp_path / "run").exists()


def test_check_same_options_names_the_option_and_both_values(monkeypatch):
    """Every option of ``job_options`` is compared (a fake gather of two processes)."""
    ours = parallel.job_options(TrainConfig(), resume=False, overwrite=False, other_data=False,
                                devices=None)  # fmt: skip
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for name, value in ours.items():
        theirs = {**ours, name: "other" if value is None else not value if value is False else 7}
        rows = [json.dumps(o, sort_keys=True).encode().ljust(parallel.MAX_OPTIONS_BYTES)
                for o in (ours, theirs)]  # fmt: skip
        gathered = np.stack([np.frombuffer(r, np.uint8) for r in rows])
        monkeypatch.setattr(parallel, "_everyone", lambda x, g=gathered: g)
        with pytest.raises(JaxninjaError) as e:
            parallel.check_same_options(ours)
        assert str(e.value).startswith(f"process 1 has {name} {theirs[name]!r} but process 0 ")
    monkeypatch.setattr(parallel, "_everyone", lambda x: np.stack([x, x]))
    parallel.check_same_options(ours)  # the same: nothing to say


JAX_FATAL_LOG = """\
E1127 00:12:16.741077   15282 coordination_service.cc:1549] [1293] Use error polling to \
propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy \
(stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error.
E1127 00:12:16.742084   15293 coordination_service_agent.cc:289] Polled an error.
F1127 00:12:16.742200   15293 client.h:80] Terminating process because the JAX distributed \
service detected fatal errors. This most likely indicates that another task died.
*** Check failure stack trace: ***
    @     0x7f7edea40634  absl::log_internal::LogMessage::SendToLog()
"""
# The same events in a log format JAX might adopt one day: the guard reads no words.
OTHER_FORMAT = """\
{"level": "error", "msg": "task 1 unhealthy"}
{"level": "fatal", "msg": "shutting down"}
"""
ENDED = parallel.Ended("node7:8476", HEARTBEAT, started=100.0)


@pytest.mark.parametrize("log", [JAX_FATAL_LOG, OTHER_FORMAT, "x\n"], ids=["jax", "other", "x"])
def test_the_stderr_guard_decides_by_what_the_process_told_never_by_the_words(log):
    lines = ["W1127 00:12:10.1 7 x.cc:1] a warning\n", None, *log.splitlines(keepends=True)]
    outcomes = {}
    for told, now in [
        (b"j", 105.0),  # joined, then aborted: the job ended it
        (b"", 105.0),  # never joined, ended early: its registration was refused
        (b"", 100.0 + parallel.CONNECT_TIMEOUT),  # never joined: the coordinator never answered
        (b"jq", 105.0),  # an error: line said why: C++'s echo dropped
        (b"je", 105.0),  # a clean end: everything shown
    ]:
        out: list[str] = []
        message = parallel.filter_stderr(
            lines, out.append, lambda t=told: t, ENDED, lambda n=now: n
        )
        assert out[0] == lines[0]  # shown once a pause followed it
        outcomes[told, now] = (message, out[1:])
    joined, refused, timeout, quiet, clean = outcomes.values()
    assert joined[0] == ENDED.message(True, 0) and joined[1] == [f"error: {joined[0]}\n"]
    assert joined[0].startswith("JAX's distributed runtime ended this process: another process")
    assert refused[0].startswith("cannot join the job at node7:8476: its coordinator ended this")
    assert timeout[0].startswith("cannot join the job: the coordinator at node7:8476 did not")
    assert quiet == (None, [])
    assert clean == (None, log.splitlines(keepends=True))
