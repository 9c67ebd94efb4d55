"""Sweeps: a grid over any ``jaxninja.training.train.TrainConfig`` fields
(``jaxninja sweep --grid KEY=V1,V2 ... --out DIR``), each member a real run directory
under ``DIR`` that ``sample``, ``eval`` and ``compare`` accept, plus a results table
(``results.csv``, ``results.md``) and one plot of every member's curve (``curves.png``).

Members whose configs differ only in ``jaxninja.training.train.PROGRAM_FREE`` fields
(seed, lr, the initialisation) share one compiled program; other fields form groups. A
group runs either ``vmap``-ed (one program trains all its members at once) or
``sequential`` (one member after another, the same compiled chunk reused, seed and lr as
arguments); ``auto`` picks ``sequential`` on CPU, where it measured faster per step (see
docs/experiments.md), and ``vmap`` on accelerators. Member ``m`` computes the same run as
``jaxninja train`` with its config (up to float32 rounding of the batched kernels).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja.lecture import data
from jaxninja.training import compare, fileio, job, metrics, rundir, train
from jaxninja.training.train import ConfigError, TrainConfig, TrainState

Array = jax.Array
TOOL = "jaxninja sweep"  # what a results file says it is
MAX_MEMBERS = 256  # a grid this large is a typo (and 256 run directories)
STRATEGIES = ("auto", "vmap", "sequential")
_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


class Member(NamedTuple):
    """One point of the grid: its run directory's name and its config."""

    name: str
    config: TrainConfig


def parse_grid(specs: Sequence[str]) -> dict[str, list[Any]]:
    """``["n_hidden=64,128", "lr=0.1,0.05"]`` -> ``{"n_hidden": [64, 128], "lr": [...]}``,
    each value converted to its field's type (``-`` may stand for ``_`` in a key).

    Raises:
        ConfigError: no ``=``, an unknown field, a repeated key, an empty list, a value
            that is not of the field's type.

    Examples:
        >>> parse_grid(["n-hidden=64,128", "batch_norm=true,false"])
        {'n_hidden': [64, 128], 'batch_norm': [True, False]}
    """
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"--grid {spec!r}: expected KEY=V1,V2,...")
        if key not in types:
            raise ConfigError(f"--grid: unknown config field {key!r}; fields: {', '.join(types)}")
        if key in grid:
            raise ConfigError(f"--grid: {key} is given twice; list all its values once")
        values = [v.strip() for v in text.split(",")]
        if not text.strip() or not all(values):
            raise ConfigError(f"--grid {key}: empty value list {text!r}; give V1,V2,...")
        grid[key] = [_convert(key, str(types[key]), v) for v in values]
    return grid


def _convert(key: str, kind: str, text: str) -> Any:
    """``text`` as a value of a field of type ``kind`` (``int``, ``float``, ``bool``, ``str``)."""
    try:
        if kind == "bool":
            return _BOOLS[text.lower()]
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except (KeyError, ValueError, OverflowError):
        raise ConfigError(f"--grid {key}: {text!r} is not {_A.get(kind, kind)}") from None
    return text


_A = {"int": "an integer", "float": "a number", "bool": "true or false"}


def members(cfg: TrainConfig, grid: dict[str, list[Any]]) -> list[Member]:
    """The grid's members: ``cfg`` with every combination of the grid's values, in the
    grid's order (the last key varies fastest), each validated.

    Raises:
        ConfigError: a member that is not a valid config (naming the member), a repeated
            member, or more than ``MAX_MEMBERS``.

    Examples:
        >>> [m.name for m in members(TrainConfig(), {"seed": [1, 2], "lr": [0.1]})]
        ['0_seed=1_lr=0.1', '1_seed=2_lr=0.1']
    """
    count = int(np.prod([len(v) for v in grid.values()])) if grid else 1
    if count > MAX_MEMBERS:
        raise ConfigError(
            f"--grid makes {count} members, more than the {MAX_MEMBERS} a sweep runs; "
            f"split it into several sweeps"
        )
    out: list[Member] = []
    width = len(str(count - 1))
    for i, values in enumerate(itertools.product(*grid.values())):
        change = dict(zip(grid, values, strict=True))
        name = f"{i:0{width}d}" + "".join(f"_{k}={v}" for k, v in change.items())
        try:
            out.append(Member(name, dataclasses.replace(cfg, **change).validate()))
        except ConfigError as e:
            raise ConfigError(f"--grid member {name}: {e}") from None
    if len({m.config for m in out}) != len(out):
        raise ConfigError("--grid repeats a member; remove the duplicate values")
    return out


def groups(grid_members: list[Member]) -> list[list[Member]]:
    """The members split by ``jaxninja.training.train.program_config``: each group
    shares one compiled program."""
    by_program: dict[TrainConfig, list[Member]] = {}
    for m in grid_members:
        by_program.setdefault(train.program_config(m.config), []).append(m)
    return list(by_program.values())


def pick_strategy(strategy: str = "auto", platform: str | None = None) -> str:
    """``vmap`` or ``sequential``: ``auto`` is ``sequential`` on CPU, ``vmap`` elsewhere.

    Examples:
        >>> pick_strategy("auto", "cpu"), pick_strategy("auto", "gpu")
        ('sequential', 'vmap')
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if strategy != "auto":
        return strategy
    platform = platform or jax.devices()[0].platform
    return "sequential" if platform == "cpu" else "vmap"


def init_states(
    cfg: TrainConfig, seeds: Sequence[int], vocab_size: int, configs: Sequence[TrainConfig] = ()
) -> TrainState:
    """The members' initial states stacked along a leading axis of size ``len(seeds)``;
    member ``m`` is exactly ``train.init_state(configs[m])``, by default ``cfg`` with
    ``seed=seeds[m]``."""
    configs = configs or [dataclasses.replace(cfg, seed=int(s)) for s in seeds]
    states = [train.init_state(c, vocab_size) for c in configs]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def make_sweep_chunk(cfg: TrainConfig, n_steps: int) -> jax.stages.Wrapped:
    """A jitted ``(states, seeds[M], lrs[M], Xtr, Ytr) -> (states, losses[M, n_steps])``:
    ``jaxninja.training.train.make_train_chunk`` vmapped over members. ``cfg.seed`` and
    ``cfg.lr`` are unused (each member brings its own); the states are donated."""
    chunk = train.make_train_chunk(cfg, n_steps)

    def member_chunk(state: TrainState, seed: Array, lr: Array, Xtr: Array, Ytr: Array):
        return chunk(state, Xtr, Ytr, seed, lr)

    return jax.jit(jax.vmap(member_chunk, in_axes=(0, 0, 0, None, None)), donate_argnums=0)


def sweep_run(
    cfg: TrainConfig,
    grid: dict[str, list[Any]],
    out: str | os.PathLike[str],
    data_path: str | os.PathLike[str] | None = None,
    *,
    strategy: str = "auto",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every member of ``grid`` over ``cfg`` into ``out/<member>/`` and write the
    results table and plot.

    Args:
        cfg: the base config; ``grid`` (from ``parse_grid``) overrides its fields.
        grid: field -> values.
        out: the sweep's directory; it must not exist yet.
        data_path: the word list (default: the bundled names.txt).
        strategy: ``auto``, ``vmap`` or ``sequential`` (``pick_strategy``).
        log: where progress lines go.

    Returns:
        ``{"members": rows of the results table, "strategy", "seconds",
        "compile_seconds", "model_steps_per_second"}``, also written to ``out/sweep.json``.

    Raises:
        JaxninjaError: a bad grid, an existing ``out``, a data or write problem.
    """
    t_start = time.perf_counter()
    how = pick_strategy(strategy)
    grid_members = members(cfg, grid)
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise rundir.RunError(f"{out} already exists; a sweep writes a new directory (--out)")
    splits = data.load_splits(data_path, block_size=max(m.config.block_size for m in grid_members))
    for m in grid_members:
        rundir.check_memory(m.config, len(splits.data["train"][1]), splits.vocab.size)
    log(f"sweep: {len(grid_members)} members, {how}, into {out}")
    timings = [_run_group(group, out, data_path, how, log) for group in groups(grid_members)]
    runs = [compare.load_run_summary(out / m.name) for m in grid_members]
    rows = compare.table(runs, list(grid))
    compare.write_tables(rows, out, "results")
    compare.plot_curves(runs, out / "curves.png")
    log(compare.to_markdown(rows).rstrip())
    run_s = sum(t.run_seconds for t in timings)
    model_steps = sum(m.config.steps for m in grid_members)
    result = {
        "members": rows,
        "strategy": how,
        "seconds": round(time.perf_counter() - t_start, 3),
        "compile_seconds": round(sum(t.compile_seconds for t in timings), 3),
        "run_seconds": round(run_s, 3),
        "model_steps_per_second": round(model_steps / run_s, 1) if run_s else None,
    }
    fileio.write_results_file(out / "sweep.json", TOOL, result)
    return result


def _run_group(
    group: list[Member], out: Path, data_path: Any, how: str, log: Callable[[str], None]
) -> job.Timing:
    """Train one group of members (one compiled program) into their run directories."""
    if how == "sequential" or len(group) == 1:
        return _run_sequential(group, out, data_path, log)
    return _run_vmapped(group, out, data_path, log)


def _run_sequential(
    group: list[Member], out: Path, data_path: Any, log: Callable[[str], None]
) -> job.Timing:
    """One member after another through ``job.train_run``, one compiled chunk shared."""
    compiled: dict[int, Any] = {}
    compile_s = 0.0
    run_s = 0.0
    for m in group:
        log(f"member {m.name}")
        result = job.train_run(
            m.config, out / m.name, data_path, log=log, num_samples=0, devices=1,
            compiled=compiled,
        )  # fmt: skip
        compile_s += result["compile_seconds"]
        run_s += result["steps_this_run"] / result["steps_per_second"]
    return job.Timing(compile_s, run_s, 0)


def _run_vmapped(
    group: list[Member], out: Path, data_path: Any, log: Callable[[str], None]
) -> job.Timing:
    """All members of ``group`` in one vmapped program; then each member's run directory
    is finished as ``job.train_run`` finishes its own."""
    t_start = time.perf_counter()
    cfg = train.program_config(group[0].config)
    configs = [m.config for m in group]
    splits = data.load_splits(data_path, block_size=cfg.block_size)
    Xtr, Ytr = (jnp.asarray(a) for a in splits.data["train"])
    seeds = jnp.asarray([c.seed for c in configs], jnp.int32)
    lrs = jnp.asarray([c.lr for c in configs], jnp.float32)
    states = init_states(cfg, [c.seed for c in configs], splits.vocab.size, configs)
    environment = metrics.environment()
    runs = [
        job.Run(c, out / m.name, splits, None, {"signum": 0}, log,
                np.full(c.steps, np.nan, np.float32), environment, t_start, 0)
        for m, c in zip(group, configs, strict=True)
    ]  # fmt: skip
    compile_s = 0.0
    run_s = 0.0
    make = partial(make_sweep_chunk, cfg)
    steps: dict[str, Any] = dict(
        start=0, steps=cfg.steps, chunk_steps=cfg.chunk_steps, eval_every=cfg.eval_every
    )
    with ExitStack() as stack:
        for run in runs:
            stack.enter_context(rundir.claim(run.out, resume=False, overwrite=False))
        for chunk in train.run_chunks(make, states, seeds, lrs, Xtr, Ytr, **steps):
            states = chunk.state
            compile_s += chunk.compile_seconds
            run_s += chunk.run_seconds
            first = chunk.step - chunk.losses.shape[1]
            for i, run in enumerate(runs):
                run.losses[first : chunk.step] = chunk.losses[i]
                if cfg.eval_every and chunk.step % cfg.eval_every == 0:
                    job.evaluate_now(run, _member(states, i))
            last = " ".join(f"{v:.4f}" for v in chunk.losses[:, -1])
            log(f"{chunk.step:7d}/{cfg.steps:7d}: {last}")
        timing = job.Timing(compile_s, run_s, 0)
        for i, run in enumerate(runs):
            fileio.write_atomic(run.out / "losses.npy", partial(_save, run.losses))
            job.finish(run, _member(states, i), timing)
    return timing


def _save(losses: np.ndarray, f: Any) -> None:
    np.save(f, losses)


def _member(states: TrainState, i: int) -> TrainState:
    """Member ``i`` of stacked states."""
    return jax.tree.map(lambda a: a[i], states)
