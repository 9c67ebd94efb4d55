"""The ``jaxninja`` command: train, sample, eval, check, bench, sweep (README "What you can run").

An expected failure (bad arguments, data or checkpoint; a run directory in use) exits 2 with one
``error: ...`` line on stderr; Ctrl-C or SIGTERM in training save a checkpoint, exit 130 / 143.
Numbers are parsed here (``int``, ``float``) and checked once, by the function that takes them
(``jaxninja.limits``'s rules).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxninja import bench
from jaxninja.errors import JaxninjaError
from jaxninja.lecture import check, model, sample
from jaxninja.limits import check_int
from jaxninja.training import (
    checkpoint,
    compare,
    diagnose,
    fileio,
    job,
    parallel,
    rundir,
    sweep,
    train,
)
from jaxninja.training.train import BACKENDS, OPTIMIZERS, SCHEDULES, ConfigError, TrainConfig

USAGE_ERROR = 2
REQUIRED = ...  # an option's default: none, it must be given
OFF = object()  # an option's kind: ``--no-FIELD`` sets a default-on config field to False
GRID = object()  # an option's kind: repeatable text (``--grid``)
RUNS = object()  # an option's kind: one or more positional directories
CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(USAGE_ERROR)


def _add_options(p: Any, options: Sequence[tuple[str, Any, Any, str]]) -> None:
    """Add ``(flags, kind, default, help)`` options to parser or group ``p``: ``kind`` is a
    type, a tuple of choices, or ``bool`` for an on/off switch; help shows any default."""
    for flags, kind, default, text in options:
        if kind is RUNS:
            p.add_argument(flags, nargs="+", help=text)
            continue
        if kind is GRID:
            p.add_argument(flags, action="append", help=text)
            continue
        if kind is OFF:  # a config field that is on by default: --no-FIELD, None if not given
            dest = flags.removeprefix("--no-").replace("-", "_")
            p.add_argument(flags, dest=dest, action="store_const", const=False, help=text)
            continue
        if kind is bool:
            dest = flags.split()[-1].removeprefix("--").replace("-", "_")
            field = dest in CONFIG_FIELDS  # None if not given, so that --resume keeps its own
            switch: dict[str, Any] = {"action": "store_const", "const": True}
            p.add_argument(
                *flags.split(), help=text, **(switch if field else {"action": "store_true"})
            )
            continue
        if default not in (None, REQUIRED):
            text += " (default: %(default)s)"
        how: dict[str, Any] = {"choices": kind} if isinstance(kind, tuple) else {"type": kind}
        p.add_argument(
            *flags.split(), default=default, required=default is REQUIRED, help=text, **how
        )


def _pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def _numbers(text: str, kind: type, flag: str) -> list[Any]:
    """``"1,2,3"`` -> ``[1, 2, 3]``, or a ``ConfigError`` naming ``flag``."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except (ValueError, OverflowError):
        raise ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields given on the command line (options default to None)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _config(args: argparse.Namespace) -> TrainConfig:
    """The validated ``TrainConfig`` of ``args``: the defaults, overridden by the saved
    config (``--resume``), by ``--config FILE``, then by the flags given. With ``--resume``
    a given value that differs from the saved one is refused later, by the resume itself."""
    fields: dict[str, Any] = {}
    saved = None if args.out is None else os.path.join(args.out, checkpoint.FILENAME)
    if getattr(args, "resume", False) and saved is not None and os.path.isfile(saved):
        fields.update(checkpoint.load_config(args.out).to_dict())  # JAX untouched: a job
    if getattr(args, "config", None) is not None:
        fields.update(train.read_config_file(args.config))
    fields.update(_given(args))
    try:
        cfg = TrainConfig(**fields).validate()
    except TypeError as e:  # a field of the wrong kind from a file: validate names it
        raise ConfigError(str(e)) from None
    return cfg


def _train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    job_options = _pick(args, "coordinator", "num_processes", "process_id", "heartbeat_timeout")
    parallel.initialize(**job_options)  # alone: no-op
    # the pid makes two runs started in the same second two directories
    out = args.out or os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    if parallel.is_main():
        print(f"run directory: {out}", flush=True)
    flags = _pick(args, "resume", "overwrite", "other_data", "devices")
    job.train_run(cfg, out, args.data, num_samples=args.samples, **flags)
    return 0


def _sample(args: argparse.Namespace) -> int:
    check_int("--seed", args.seed, 0)  # a number of the CLI's own: sample_names takes a key
    ckpt = job.load_run(args.out)
    assert ckpt.bn_stats is not None  # load_run raises for a run without them
    key = jax.random.key(args.seed)
    how = _pick(args, "max_len", "temperature")
    names = sample.sample_names(ckpt.state.params, ckpt.bn_stats, ckpt.vocab, key, args.num, **how)
    print("\n".join(names))
    return 0


def _eval(args: argparse.Namespace) -> int:
    for split, value in job.eval_run(args.out, args.data, other_data=args.other_data).items():
        print(f"{split:5s} {value:.4f}")
    return 0


def _check(args: argparse.Namespace) -> int:
    solution = check.load_solution(args.solution) if args.solution else None
    report = check.run_check(**_pick(args, "dtype", "n_hidden", "seed", "data"), solution=solution)
    print(report.format())
    return 0 if report.ok else 1


def _sweep(args: argparse.Namespace) -> int:
    grid = sweep.parse_grid(args.grid or [])
    cfg = _config(args)
    rundir.check_memory(cfg, 0)  # before any data is read: a lower bound (train: train_run's)
    sweep.sweep_run(cfg, grid, args.out, args.data, strategy=args.strategy)
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    if args.to == "":
        raise JaxninjaError("--to: empty path; leave it out for RUN/diagnose")
    to = os.path.join(args.out, diagnose.SUBDIR) if args.to is None else args.to
    report = diagnose.diagnose(args.out, to, args.data, other_data=args.other_data)
    hidden = report["hidden"]
    print(f"tanh saturated (|h| > {diagnose.SATURATED}): {100 * hidden['saturated_fraction']:.1f}%")
    print(f"dead units: {hidden['dead_units']}")
    for name, ratio in report["grad_ratio"].items():
        print(f"grad:data {name:6s} {ratio:.3g}")
    for path in report["files"]:
        print(f"written: {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    rows = compare.compare(args.runs, args.out)
    print(compare.to_markdown(rows), end="")
    if args.out:
        print(f"written: {os.path.join(args.out, 'compare.{md,csv,png}')}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.ops:
        bench.run_ops_bench(quick=args.quick, repeats=args.repeats, out=args.out or None)
        return 0
    how = _pick(args, "repeats", "steps", "torch_steps", "quick")
    how.update(
        members=_numbers(args.members, int, "--members"),
        use_torch=not args.no_torch,
        data_path=args.data,
    )
    bench.run_bench(bench.parse_settings(args.settings), out=args.out or None, **how)
    return 0


_D = TrainConfig()
DATA = ("--data", str, None, "text file, one word per line (default: bundled names.txt)")
# fmt: off
CONFIG = [  # the TrainConfig options train and sweep share; None: not given (see _config)
    DATA,
    ("--config", str, None, "JSON or TOML file of config fields (flags override it)"),
    ("--steps", int, None, f"training steps (default: {_D.steps})"),
    ("--batch-size", int, None, f"batch size (default: {_D.batch_size})"),
    ("--n-embd", int, None, f"embedding size (default: {_D.n_embd})"),
    ("--n-hidden", int, None, f"hidden units (default: {_D.n_hidden})"),
    ("--block-size", int, None, f"context (default: {_D.block_size})"),
    ("--lr-decay-step", int, None,
     f"step schedule: lr x lr_decay from this step (default: {_D.lr_decay_step})"),
    ("--lr-decay", float, None,
     f"step: the factor; cosine: the final lr over the first (default: {_D.lr_decay})"),
    ("--schedule", tuple(SCHEDULES), None, f"learning-rate schedule (default: {_D.schedule})"),
    ("--warmup", int, None, "linear learning-rate warmup over this many steps"),
    ("--optimizer", tuple(OPTIMIZERS), None, f"optax optimizer (default: {_D.optimizer})"),
    ("--no-batch-norm", OFF, None, "the network without batch norm (Part 3's, before it)"),
    ("--init", tuple(model.INITS), None,
     f"W1's scale: kaiming (5/3)/sqrt(fan_in) or randn 1 (default: {_D.init})"),
    ("--w2-scale", float, None, f"W2 = randn x this (default: {_D.w2_scale}; Part 3: 0.01)"),
    ("--b2-scale", float, None, f"b2 = randn x this (default: {_D.b2_scale}; Part 3: 0)"),
    ("--backend", tuple(BACKENDS), None,
     "; ".join(f"{name}: {b.about}" for name, b in BACKENDS.items())
     + f" (default: {_D.backend})"),
    ("--chunk-steps", int, None,
     f"steps per compiled chunk: progress line and checkpoint (default: {_D.chunk_steps})"),
    ("--eval-every", int, None,
     "every N steps: validation loss, lr, gradient norm and update:data ratios into "
     "DIR/metrics.jsonl (default: 0, none)"),
]
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, list]] = {
    # name: (handler, help, [(flags, kind, default, help), ...] as _add_options takes)
    "train": (_train, "train the Exercise-4 MLP on a word list", [
        *CONFIG,
        ("--out", str, None, "run directory (default: runs/<timestamp>-<pid>)"),
        ("--lr", float, None, f"learning rate (default: {_D.lr})"),
        ("--seed", int, None, f"init and batch-order seed (default: {_D.seed})"),
        ("--running-stats", bool, None,
         "also track batch-norm running averages and report their losses"),
        ("--devices", int, None, "split batches over this many devices (default: all)"),
        ("--resume", bool, None,
         "continue the run in --out with its saved config (flags given must agree)"),
        ("--overwrite", bool, None, "replace what is in --out"),
        ("--other-data", bool, None, "resume although --data is not the run's training file"),
        ("--samples", int, 10, "names printed at end"),
    ]),
    "sample": (_sample, "sample names from a trained run", [
        ("--out", str, REQUIRED, "run directory"),
        ("-n --num", int, 20, "how many names"),
        ("--seed", int, 0, "sampling seed"),
        ("--temperature", float, 1.0, "softmax temperature (tiny: exact greedy decoding)"),
        ("--max-len", int, 32, "longest name"),
    ]),
    "eval": (_eval, "train/val/test loss of a trained run", [
        ("--out", str, REQUIRED, "run directory"),
        ("--data", str, None, "the run's word list (default: bundled names.txt)"),
        ("--other-data", bool, None, "evaluate on a data file the run was not trained on"),
    ]),
    "check": (_check, "the lecture's gradient-check table (Exercises 1-4)", [
        ("--dtype", ("float32", "float64"), "float32", "dtype"),
        ("--n-hidden", int, 64, "hidden units"),
        ("--seed", int, 42, "init and batch seed"),
        DATA,
        ("--solution", str, None, "grade the functions this Python file defines instead "
         "(any of " + ", ".join(check.FUNCTIONS) + ", as in jaxninja.lecture.ninja)"),
    ]),
    "bench": (_bench, "time the training step: backends, PyTorch, sweeps", [
        ("--ops", bool, None, "time the ops (cross_entropy, batch_norm, linear_cross_entropy) "
         "against optax/flax and autodiff instead of the training step"),
        ("--quick", bool, None, "tiny run: a smoke test, no measurement"),
        ("--out", str, "bench.json", "JSON results file ('' for none)"),
        ("--repeats", int, 5, "timed chunks per row"),
        ("--settings", str, "200x32,1024x256", "HxB list (hidden x batch)"),
        ("--steps", int, None, "JAX steps per timed chunk"),
        ("--torch-steps", int, None, "PyTorch steps per repeat"),
        ("--members", str, "1,8,32", "sweep sizes M ('' for none)"),
        ("--no-torch", bool, None, "skip the PyTorch rows"),
        DATA,
    ]),
    "sweep": (_sweep, "train a grid over any config fields; each member a run directory", [
        *CONFIG,
        ("--lr", float, None, f"learning rate (default: {_D.lr})"),
        ("--seed", int, None, f"init and batch-order seed (default: {_D.seed})"),
        ("--grid", GRID, None, "KEY=V1,V2,...: a config field and its values (repeatable; "
         "e.g. --grid n_hidden=64,128 --grid seed=1,2)"),
        ("--strategy", sweep.STRATEGIES, "auto",
         "vmap: one program trains a group's members at once; sequential: one after another, "
         "one compiled chunk; auto: sequential on CPU, vmap elsewhere"),
        ("--out", str, REQUIRED, "the sweep's directory (new): member runs, results.{csv,md}, "
         "curves.png, sweep.json"),
    ]),
    "diagnose": (_diagnose, "the series' diagnostics of a trained run: saturation, ratios", [
        ("--out", str, REQUIRED, "run directory"),
        ("--to", str, None, "where the pictures go (default: RUN/diagnose)"),
        ("--data", str, None, "the run's word list (default: bundled names.txt)"),
        ("--other-data", bool, None, "use a data file the run was not trained on"),
    ]),
    "compare": (_compare, "runs side by side: differing config fields, losses, curves", [
        ("runs", RUNS, None, "run directories (of train or of a sweep's members)"),
        ("--out", str, None, "also write compare.md, compare.csv and compare.png here"),
    ]),
}
JOB = [  # train's multi-process job (README "Many machines"): all of the first three, or none
    ("--coordinator", str, None, "address of process 0 (HOST:PORT)"),
    ("--num-processes", int, None, "processes in the job"),
    ("--process-id", int, None, "this process: 0..N-1"),
    ("--heartbeat-timeout", int, parallel.HEARTBEAT_TIMEOUT,
     "seconds after which a silent process ends the job"),
]
# fmt: on


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command in ``COMMANDS``."""
    p = _Parser(prog="jaxninja", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (handler, about, options) in COMMANDS.items():
        command = sub.add_parser(name, help=about)
        _add_options(command, options)
        command.set_defaults(func=handler)
        if name == "train":
            job_group = command.add_argument_group(
                "multi-process job (jaxninja.training.parallel.initialize)"
            )
            _add_options(job_group, JOB)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jaxninja ARGV``; return the exit status. The output goes through
    ``jaxninja.training.fileio.SafeStream``: a reader that leaves (``| head``) ends the
    output, not the work; another failure to write it (``> /dev/full``) is an error."""
    fileio.keep_standard_fds()
    out, err = fileio.SafeStream(sys.stdout, 1), fileio.SafeStream(sys.stderr, 2)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = _run(argv)
        if rc == 0 and out.failed is not None and out.failed.errno != errno.EPIPE:
            reason = out.failed.strerror or out.failed
            print(f"error: cannot write to stdout ({reason}); the output is lost", file=err)
            rc = USAGE_ERROR
    return rc


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except rundir.Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return parallel.leave_job(130)
    except JaxninjaError as e:
        message: str | None = str(e)
    except MemoryError:
        message = "out of memory; try smaller sizes (--n-hidden, --batch-size, -n, --max-len)"
    except Exception as e:  # only allocation failures and lost processes are expected here
        message = parallel.lost_process(e)
        if "RESOURCE_EXHAUSTED" in str(e):
            message = "out of device memory; try smaller sizes (--n-hidden, --batch-size, -n)"
        if message is None:
            raise
    print(f"error: {message}", file=sys.stderr)
    return parallel.leave_job(USAGE_ERROR)  # a job's other processes must not wait for this one
