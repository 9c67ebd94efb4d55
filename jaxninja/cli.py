"""The ``jaxninja`` command: train, sample, eval, check.

Every expected failure (bad arguments, bad data, a bad checkpoint) ends with exit status 2
and one line ``error: ...`` on stderr naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxninja.train import BACKENDS, ConfigError, TrainConfig

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        sys.exit(USAGE_ERROR)


def _number(kind: type, what: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse ``type``: a finite number of ``kind`` for which ``ok`` holds."""

    def parse(s: str) -> Any:
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {s}")
        return v

    return parse


_positive_int = _number(int, "a positive integer", lambda v: v > 0)
_positive_float = _number(float, "a positive finite number", lambda v: v > 0)
_non_negative_int = _number(int, "an integer >= 0", lambda v: v >= 0)


def _numbers(text: str, kind: type, flag: str) -> list[Any]:
    """``"1,2,3"`` -> ``[1, 2, 3]``, or a :class:`ConfigError` naming ``flag``."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def _add_config_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The :class:`TrainConfig` options ``train`` and ``sweep`` share, and ``--data``."""
    p.add_argument("--data", help="text file, one word per line (default: names.txt)")
    p.add_argument("--steps", type=_positive_int, default=d.steps)
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
    p.add_argument("--n-embd", type=_positive_int, default=d.n_embd)
    p.add_argument("--n-hidden", type=_positive_int, default=d.n_hidden)
    p.add_argument("--block-size", type=_positive_int, default=d.block_size)
    p.add_argument("--lr-decay-step", type=_non_negative_int, default=d.lr_decay_step)
    p.add_argument("--backend", choices=BACKENDS, default=d.backend)
    p.add_argument("--chunk-steps", type=_positive_int, default=d.chunk_steps,
                   help="steps per compiled chunk (progress line and checkpoint)")  # fmt: skip


def _config(args: argparse.Namespace, **more: Any) -> TrainConfig:
    """The validated config of :func:`_add_config_args`'s options (plus ``more``)."""
    return TrainConfig(
        n_embd=args.n_embd, n_hidden=args.n_hidden, block_size=args.block_size,
        batch_size=args.batch_size, steps=args.steps, lr_decay_step=args.lr_decay_step,
        backend=args.backend, chunk_steps=args.chunk_steps, **more,
    ).validate()  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = _Parser(prog="jaxninja", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train the Exercise-4 MLP on a word list")
    _add_config_args(t, d)
    t.add_argument("--out", help="run directory (default: runs/<timestamp>)")
    t.add_argument("--lr", type=_positive_float, default=d.lr)
    t.add_argument("--seed", type=_non_negative_int, default=d.seed)
    t.add_argument("--running-stats", action="store_true",
                   help="also track batch-norm running averages and report their losses")  # noqa: E501  # fmt: skip
    t.add_argument("--devices", type=_positive_int, default=None,
                   help="split each batch over this many devices (default: all)")  # fmt: skip
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    t.add_argument("--samples", type=_non_negative_int, default=10, help="names printed at the end")

    s = sub.add_parser("sample", help="sample names from a trained run")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("-n", "--num", type=_positive_int, default=20)
    s.add_argument("--seed", type=_non_negative_int, default=0)
    s.add_argument("--temperature", type=_positive_float, default=1.0)
    s.add_argument("--max-len", type=_positive_int, default=32)

    e = sub.add_parser("eval", help="train/val/test loss of a trained run")
    e.add_argument("--out", required=True, help="run directory")
    e.add_argument("--data", help="the run's word list (default: names.txt)")

    c = sub.add_parser("check", help="the lecture's gradient-check table (Exercises 1-4)")
    c.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    c.add_argument("--n-hidden", type=_positive_int, default=64)
    c.add_argument("--seed", type=_non_negative_int, default=42)
    c.add_argument("--data", help="text file, one word per line (default: names.txt)")

    b = sub.add_parser("bench", help="time the training step: backends, PyTorch, sweeps")
    b.add_argument("--quick", action="store_true", help="tiny run: a smoke test, no measurement")
    b.add_argument("--out", default="bench.json", help="JSON results file ('' for none)")
    b.add_argument("--repeats", type=_positive_int, default=5, help="timed chunks per row")
    b.add_argument("--settings", default="200x32,1024x256", help="HxB list (hidden x batch)")
    b.add_argument("--steps", type=_positive_int, help="JAX steps per timed chunk")
    b.add_argument("--torch-steps", type=_positive_int, help="PyTorch steps per repeat")
    b.add_argument("--members", default="1,8,32", help="sweep sizes M ('' for none)")
    b.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    b.add_argument("--data", help="text file, one word per line (default: names.txt)")

    w = sub.add_parser("sweep", help="train many seeds/learning rates in one vmapped program")
    _add_config_args(w, d)
    w.add_argument("--seeds", default=str(d.seed), help="comma-separated seeds")
    w.add_argument("--lrs", default=str(d.lr), help="comma-separated learning rates")
    w.add_argument("--out", help="write the results as JSON to this file")
    return p


def _train(args: argparse.Namespace) -> int:
    from jaxninja.run import train_run

    cfg = _config(args, lr=args.lr, seed=args.seed, running_stats=args.running_stats)
    out = args.out or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    print(f"run directory: {out}")
    train_run(cfg, out, args.data, resume=args.resume, overwrite=args.overwrite,
              num_samples=args.samples, devices=args.devices)  # fmt: skip
    return 0


def _sample(args: argparse.Namespace) -> int:
    import jax

    from jaxninja.run import load_run
    from jaxninja.sample import sample_names

    ckpt = load_run(args.out)
    assert ckpt.bn_stats is not None  # load_run raises for a run without them
    names = sample_names(
        ckpt.state.params, ckpt.bn_stats, ckpt.vocab, jax.random.key(args.seed), args.num,
        max_len=args.max_len, temperature=args.temperature,
    )  # fmt: skip
    print("\n".join(names))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from jaxninja.run import eval_run

    for split, value in eval_run(args.out, args.data).items():
        print(f"{split:5s} {value:.4f}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from jaxninja.check import run_check

    report = run_check(dtype=args.dtype, n_hidden=args.n_hidden, seed=args.seed, data=args.data)
    print(report.format())
    return 0 if report.ok else 1


def _bench(args: argparse.Namespace) -> int:
    from jaxninja.bench import parse_settings, run_bench

    members = _numbers(args.members, int, "--members")
    if any(m < 1 for m in members):
        raise ConfigError(f"--members: sizes must be >= 1, got {args.members!r}")
    run_bench(parse_settings(args.settings), repeats=args.repeats, steps=args.steps,
              torch_steps=args.torch_steps, members=members, use_torch=not args.no_torch,
              quick=args.quick, data_path=args.data, out=args.out or None)  # fmt: skip
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import json

    from jaxninja.sweep import sweep_run

    cfg = _config(args)
    seeds, lrs = _numbers(args.seeds, int, "--seeds"), _numbers(args.lrs, float, "--lrs")
    result = sweep_run(cfg, seeds, lrs, args.data)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


COMMANDS = {"train": _train, "sample": _sample, "eval": _eval, "check": _check,
            "bench": _bench, "sweep": _sweep}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jaxninja.checkpoint import CheckpointError
    from jaxninja.data import DataError
    from jaxninja.run import Interrupted, RunError

    try:
        return COMMANDS[args.command](args)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except (DataError, ConfigError, CheckpointError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
