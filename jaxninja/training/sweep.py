"""Train many models at once: ``M`` members, differing in seed and/or learning rate, in one
``jax.vmap``-ed program. Member ``m`` computes the same run as ``jaxninja train --seed s_m
--lr lr_m`` (up to float32 rounding of the batched kernels).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from jaxninja.lecture import data, model
from jaxninja.training import fileio, job, train
from jaxninja.training.train import ConfigError, TrainConfig, TrainState

Array = jax.Array
TOOL = "jaxninja sweep"  # what a results file says it is


def members(
    seeds: Sequence[int] | None, lrs: Sequence[float] | None, cfg: TrainConfig
) -> list[tuple[int, float]]:
    """The ``(seed, lr)`` of each member: the grid of ``seeds x lrs`` (either defaults to
    the config's single value). Raises :class:`ConfigError` for bad values."""
    seeds = [cfg.seed] if seeds is None else list(seeds)
    lrs = [cfg.lr] if lrs is None else list(lrs)
    if not seeds:
        raise ConfigError("a sweep needs at least one seed")
    if not lrs:
        raise ConfigError("a sweep needs at least one learning rate")
    grid = [(s, lr) for s in seeds for lr in lrs]
    for s, lr in grid:  # each member must be a valid training config of its own
        dataclasses.replace(cfg, seed=s, lr=lr).validate()
    if len(set(grid)) != len(grid):
        raise ConfigError("the sweep repeats a (seed, lr) member; remove the duplicates")
    return grid


def init_states(cfg: TrainConfig, seeds: Sequence[int], vocab_size: int) -> TrainState:
    """The members' initial states stacked along a leading axis of size ``len(seeds)``;
    member ``m`` is exactly ``train.init_state(cfg with seed=seeds[m])``."""
    states = [train.init_state(dataclasses.replace(cfg, seed=int(s)), vocab_size) for s in seeds]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def make_sweep_chunk(cfg: TrainConfig, n_steps: int) -> jax.stages.Wrapped:
    """A jitted ``(states, seeds[M], lrs[M], Xtr, Ytr) -> (states, losses[M, n_steps])``:
    :func:`jaxninja.training.train.make_train_chunk` vmapped over members. ``cfg.seed`` and
    ``cfg.lr`` are unused (each member brings its own); the states are donated."""
    chunk = train.make_train_chunk(cfg, n_steps)

    def member_chunk(state: TrainState, seed: Array, lr: Array, Xtr: Array, Ytr: Array):
        return chunk(state, Xtr, Ytr, seed, lr)

    return jax.jit(jax.vmap(member_chunk, in_axes=(0, 0, 0, None, None)), donate_argnums=0)


def sweep_run(
    cfg: TrainConfig,
    seeds: Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
    data_path: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the ``seeds x lrs`` grid of ``cfg`` in one vmapped program; return (and write
    to ``out`` as JSON, checked writable first) ``{"members": [{"seed", "lr", "train_loss",
    "val_loss", ...}, ...], "seconds", "compile_seconds", "model_steps_per_second", "config"}``
    with batch norm calibrated per member on the training set."""
    t_start = time.perf_counter()
    grid = members(seeds, lrs, cfg)  # validates cfg with every member's seed and lr
    if out is not None:
        fileio.check_results_file(out, TOOL)
    splits = data.load_splits(data_path, block_size=cfg.block_size)
    Xtr, Ytr = (jnp.asarray(a) for a in splits.data["train"])
    seed_col, lr_col = zip(*grid, strict=True)
    m_seeds, m_lrs = jnp.asarray(seed_col, jnp.int32), jnp.asarray(lr_col, jnp.float32)
    states = init_states(cfg, seed_col, splits.vocab.size)
    log(
        f"sweep: {len(grid)} members x {cfg.steps} steps (H={cfg.n_hidden}, "
        f"batch {cfg.batch_size}, backend {cfg.backend})"
    )
    compile_s = run_s = 0.0
    make, steps = partial(make_sweep_chunk, cfg), dict(steps=cfg.steps, chunk_steps=cfg.chunk_steps)
    for chunk in train.run_chunks(make, states, m_seeds, m_lrs, Xtr, Ytr, start=0, **steps):
        states, last = chunk.state, chunk.losses[:, -1]
        compile_s, run_s = compile_s + chunk.compile_seconds, run_s + chunk.run_seconds
        log(f"{chunk.step:7d}/{cfg.steps:7d}: " + " ".join(f"{v:.4f}" for v in last))
    log("| member | seed | lr | train | val |")
    log("|---:|---:|---:|---:|---:|")
    rows = []
    for i, (seed, lr) in enumerate(grid):
        losses = _evaluate(states.params, i, Xtr, splits.data)
        rows.append({"seed": seed, "lr": lr, **losses, "last_batch_loss": round(float(last[i]), 4)})
        tr, va = (losses.get(f"{k}_loss", float("nan")) for k in ("train", "val"))
        log(f"| {i} | {seed} | {lr:g} | {tr:.4f} | {va:.4f} |")
    result = {
        "members": rows,
        "seconds": round(time.perf_counter() - t_start, 3),
        "compile_seconds": round(compile_s, 3),
        "model_steps_per_second": round(len(grid) * cfg.steps / run_s, 1) if run_s else None,
        "config": cfg.to_dict(),
    }
    if out is not None:
        fileio.write_results_file(out, TOOL, result)
    return result


def _evaluate(params: model.Params, i: int, Xtr: Array, splits: dict) -> dict[str, float]:
    """Member ``i``'s ``{"train_loss", "val_loss"}`` (non-empty splits), batch norm
    calibrated on ``Xtr``."""
    p = jax.tree.map(lambda a: a[i], params)
    two = {k: splits[k] for k in ("train", "val")}
    losses = job.split_losses_of(p, train.calibrate_bn(p, Xtr), two)
    return {f"{k}_loss": v for k, v in losses.items()}
