"""The ``jaxninja`` command.

Commands:
  train   train the Exercise-4 MLP on a word list (default: the bundled names.txt)
  sample  sample names from a trained run
  eval    train/val/test loss of a trained run
  check   the lecture's gradient-check table (Exercises 1-4)
  bench   time the training step (backends, PyTorch, sweeps) or the ops (``bench --ops``)
  sweep   train many seeds/learning rates in one vmapped program

Every expected failure (bad arguments, bad data, a bad checkpoint, a run directory in use)
ends with exit status 2 and one line ``error: ...`` on stderr naming the problem, never a
traceback. Ctrl-C or SIGTERM during training save a checkpoint and exit 130 / 143.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxninja import rundir
from jaxninja.errors import JaxninjaError
from jaxninja.parallel import HEARTBEAT_TIMEOUT, leave_job, lost_process
from jaxninja.train import BACKENDS, FLOAT32_TINY, INT32_MAX, ConfigError, TrainConfig

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(USAGE_ERROR)


def _number(kind: type, what: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse ``type``: a finite number of ``kind`` for which ``ok`` holds."""

    def parse(s: str) -> Any:
        try:
            v = kind(s)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}")
        return v

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v > 0)
_non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)
_seed = _number(int, f"an integer in 0..{INT32_MAX}", lambda v: 0 <= v <= INT32_MAX)
_positive_float = _number(
    float, f"a finite number >= {FLOAT32_TINY:.3g} (float32)", lambda v: v >= FLOAT32_TINY
)
_temperature = _number(float, "a positive finite number", lambda v: v > 0)


def _int_in(low: int, high: int) -> Callable[[str], Any]:
    """An argparse ``type``: an integer in ``low..high`` (a bound on time and memory)."""
    return _number(int, f"an integer in {low}..{high}", lambda v: low <= v <= high)


# sample -n x --max-len: at most 1e8 int32 ids (400 MB); larger asks are typos
MAX_NAMES, MAX_LEN = 100_000, 1_000


def _numbers(text: str, kind: type, flag: str) -> list[Any]:
    """``"1,2,3"`` -> ``[1, 2, 3]``, or a :class:`ConfigError` naming ``flag``."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except (ValueError, OverflowError):
        raise ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """The :class:`TrainConfig` options ``train`` and ``sweep`` share, and ``--data``."""
    d = TrainConfig()
    p.add_argument("--data", help="text file, one word per line (default: bundled names.txt)")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="training steps")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="batch size")
    p.add_argument("--n-embd", type=_positive_int, default=d.n_embd, help="embedding size")
    p.add_argument("--n-hidden", type=_positive_int, default=d.n_hidden, help="hidden units")
    p.add_argument("--block-size", type=_positive_int, default=d.block_size, help="context")
    p.add_argument(
        "--lr-decay-step",
        type=_non_negative_int,
        default=d.lr_decay_step,
        help="learning rate x0.1 from this step on",
    )
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default=d.backend,
        help="; ".join(f"{name}: {b.about}" for name, b in BACKENDS.items()),
    )
    p.add_argument(
        "--chunk-steps",
        type=_positive_int,
        default=d.chunk_steps,
        help="steps per compiled chunk (progress line and checkpoint)",
    )


def _config(args: argparse.Namespace, **more: Any) -> TrainConfig:
    """The validated config of :func:`_add_config_args`'s options (plus ``more``)."""
    names = ("n_embd", "n_hidden", "block_size", "batch_size", "steps", "lr_decay_step")
    fields = {name: getattr(args, name) for name in names}
    cfg = TrainConfig(**fields, backend=args.backend, chunk_steps=args.chunk_steps, **more)
    rundir.check_memory(cfg.validate(), 0)  # before any data is read: a lower bound
    return cfg


def _train(args: argparse.Namespace) -> int:
    from jaxninja import parallel
    from jaxninja.run import train_run

    cfg = _config(args, lr=args.lr, seed=args.seed, running_stats=args.running_stats).validate()
    job = (args.coordinator, args.num_processes, args.process_id)
    parallel.initialize(*job, heartbeat_timeout=args.heartbeat_timeout)  # alone: no-op
    # the pid makes two runs started in the same second two directories
    out = args.out or str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    if parallel.is_main():
        print(f"run directory: {out}", flush=True)
    train_run(
        cfg,
        out,
        args.data,
        resume=args.resume,
        overwrite=args.overwrite,
        other_data=args.other_data,
        num_samples=args.samples,
        devices=args.devices,
    )
    return 0


def _add_train(sub: Any) -> None:
    d = TrainConfig()
    t = sub.add_parser("train", help="train the Exercise-4 MLP on a word list")
    _add_config_args(t)
    t.add_argument("--out", help="run directory (default: runs/<timestamp>-<pid>)")
    t.add_argument("--lr", type=_positive_float, default=d.lr, help="learning rate")
    t.add_argument("--seed", type=_seed, default=d.seed, help="init and batch-order seed")
    t.add_argument(
        "--running-stats",
        action="store_true",
        help="also track batch-norm running averages and report their losses",
    )
    t.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="split each batch over this many devices (default: all)",
    )
    _add_job_args(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace what is in --out")
    t.add_argument(
        "--other-data",
        action="store_true",
        help="resume although --data differs from the file the run was trained on",
    )
    t.add_argument("--samples", type=_int_in(0, MAX_NAMES), default=10, help="names printed at end")
    t.set_defaults(func=_train)


def _add_job_args(t: argparse.ArgumentParser) -> None:
    """A multi-process job (README "Many machines"): all three flags, or none of them for
    a single process or the job a launcher (srun, mpirun) started."""
    g = t.add_argument_group("multi-process job (jaxninja.parallel.initialize)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=_positive_int, help="processes in the job")
    g.add_argument("--process-id", type=_non_negative_int, help="this process: 0..N-1")
    g.add_argument(
        "--heartbeat-timeout",
        type=_positive_int,
        default=HEARTBEAT_TIMEOUT,
        help="seconds after which a silent process ends the job",
    )


def _sample(args: argparse.Namespace) -> int:
    import jax

    from jaxninja.run import load_run
    from jaxninja.sample import sample_names

    ckpt = load_run(args.out)
    assert ckpt.bn_stats is not None  # load_run raises for a run without them
    names = sample_names(
        ckpt.state.params,
        ckpt.bn_stats,
        ckpt.vocab,
        jax.random.key(args.seed),
        args.num,
        max_len=args.max_len,
        temperature=args.temperature,
    )
    print("\n".join(names))
    return 0


def _add_sample(sub: Any) -> None:
    s = sub.add_parser("sample", help="sample names from a trained run")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("-n", "--num", type=_int_in(1, MAX_NAMES), default=20, help="how many names")
    s.add_argument("--seed", type=_seed, default=0, help="sampling seed")
    s.add_argument(
        "--temperature",
        type=_temperature,
        default=1.0,
        help="softmax temperature; tiny values are exact greedy decoding",
    )
    s.add_argument("--max-len", type=_int_in(1, MAX_LEN), default=32, help="longest name")
    s.set_defaults(func=_sample)


def _eval(args: argparse.Namespace) -> int:
    from jaxninja.run import eval_run

    for split, value in eval_run(args.out, args.data, other_data=args.other_data).items():
        print(f"{split:5s} {value:.4f}")
    return 0


def _add_eval(sub: Any) -> None:
    e = sub.add_parser("eval", help="train/val/test loss of a trained run")
    e.add_argument("--out", required=True, help="run directory")
    e.add_argument("--data", help="the run's word list (default: bundled names.txt)")
    e.add_argument(
        "--other-data",
        action="store_true",
        help="evaluate on a data file the run was not trained on",
    )
    e.set_defaults(func=_eval)


def _check(args: argparse.Namespace) -> int:
    from jaxninja.check import run_check

    report = run_check(dtype=args.dtype, n_hidden=args.n_hidden, seed=args.seed, data=args.data)
    print(report.format())
    return 0 if report.ok else 1


def _add_check(sub: Any) -> None:
    c = sub.add_parser("check", help="the lecture's gradient-check table (Exercises 1-4)")
    c.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="dtype")
    c.add_argument("--n-hidden", type=_int_in(1, 100_000), default=64, help="hidden units")
    c.add_argument("--seed", type=_seed, default=42, help="init and batch seed")
    c.add_argument("--data", help="text file, one word per line (default: bundled names.txt)")
    c.set_defaults(func=_check)


def _sweep(args: argparse.Namespace) -> int:
    from jaxninja.sweep import sweep_run

    cfg = _config(args).validate()
    seeds, lrs = _numbers(args.seeds, int, "--seeds"), _numbers(args.lrs, float, "--lrs")
    sweep_run(cfg, seeds, lrs, args.data, out=args.out)
    return 0


def _add_sweep(sub: Any) -> None:
    d = TrainConfig()
    w = sub.add_parser("sweep", help="train many seeds/learning rates in one vmapped program")
    _add_config_args(w)
    w.add_argument("--seeds", default=str(d.seed), help="comma-separated seeds")
    w.add_argument("--lrs", default=str(d.lr), help="comma-separated learning rates")
    w.add_argument("--out", help="write the results as JSON to this file")
    w.set_defaults(func=_sweep)


def _bench(args: argparse.Namespace) -> int:
    from jaxninja.bench import parse_settings, run_bench, run_ops_bench

    if args.ops:
        run_ops_bench(quick=args.quick, repeats=args.repeats, out=args.out or None)
        return 0
    members = _numbers(args.members, int, "--members")
    if any(not 1 <= m <= 1024 for m in members):
        raise ConfigError(f"--members: sizes must be in 1..1024, got {args.members!r}")
    run_bench(
        parse_settings(args.settings),
        repeats=args.repeats,
        steps=args.steps,
        torch_steps=args.torch_steps,
        members=members,
        use_torch=not args.no_torch,
        quick=args.quick,
        data_path=args.data,
        out=args.out or None,
    )
    return 0


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="time the training step: backends, PyTorch, sweeps")
    b.add_argument(
        "--ops",
        action="store_true",
        help="time the ops (cross_entropy, batch_norm, linear_cross_entropy) against "
        "optax/flax and autodiff instead of the training step",
    )
    b.add_argument("--quick", action="store_true", help="tiny run: a smoke test, no measurement")
    b.add_argument("--out", default="bench.json", help="JSON results file ('' for none)")
    b.add_argument("--repeats", type=_int_in(1, 1000), default=5, help="timed chunks per row")
    b.add_argument("--settings", default="200x32,1024x256", help="HxB list (hidden x batch)")
    b.add_argument("--steps", type=_int_in(1, 100_000), help="JAX steps per timed chunk")
    b.add_argument("--torch-steps", type=_int_in(1, 100_000), help="PyTorch steps per repeat")
    b.add_argument("--members", default="1,8,32", help="sweep sizes M ('' for none)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    b.add_argument("--data", help="text file, one word per line (default: bundled names.txt)")
    b.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jaxninja",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_add_train, _add_sample, _add_eval, _add_check, _add_bench, _add_sweep):
        add(sub)
    return p


def _resource_error(e: BaseException) -> str | None:
    """The one-line message of an allocation failure, or ``None`` for other errors."""
    if isinstance(e, MemoryError):
        return "out of memory; try smaller sizes (--n-hidden, --batch-size, -n, --max-len)"
    if "RESOURCE_EXHAUSTED" in str(e):
        return "out of device memory; try smaller sizes (--n-hidden, --batch-size, -n)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxninja.run import Interrupted

    try:
        return args.func(args)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except JaxninjaError as e:
        print(f"error: {e}", file=sys.stderr)
        return leave_job(USAGE_ERROR)  # a job's other processes must not wait for this one
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return leave_job(130)
    except Exception as e:  # only allocation failures (and lost processes) are expected here
        message = _resource_error(e) or lost_process(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return leave_job(USAGE_ERROR)


if __name__ == "__main__":
    sys.exit(main())
