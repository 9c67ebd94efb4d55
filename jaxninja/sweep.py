"""Train many models at once: ``jax.vmap`` over the fused training chunk.

A sweep is ``M`` members that share the architecture, data and schedule shape but differ
in seed (initialisation and minibatch order) and/or learning rate. All members run in
ONE compiled program: :func:`make_sweep_chunk` is :func:`jaxninja.train.make_train_chunk`
vmapped over the train state, the seed (which draws the batches) and the learning rate.
Member ``m`` computes the same run as ``jaxninja train --seed s_m --lr lr_m`` (up to
float32 rounding of the batched kernels).

It pays off where one small model leaves the hardware idle; on the 2-core CPU measured it
does not (``jaxninja bench``: 59-80 us per model-step against ~48 us for one plain run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja import data, fileio, train
from jaxninja.train import ConfigError, TrainConfig, TrainState

Array = jax.Array
TOOL = "jaxninja sweep"  # what a results file says it is
Log = Callable[[str], None]


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


def make_sweep_chunk(cfg: TrainConfig, n_steps: int, unroll: int = 1) -> jax.stages.Wrapped:
    """A jitted ``(states, seeds[M], lrs[M], Xtr, Ytr) -> (states, losses[M, n_steps])``:
    :func:`jaxninja.train.make_train_chunk` vmapped over members. ``cfg.seed`` and
    ``cfg.lr`` are unused (each member brings its own); the states are donated."""

    def member_chunk(state: TrainState, seed: Array, lr: Array, Xtr: Array, Ytr: Array):
        step = train.train_step(cfg, train.make_optimizer(cfg, lr))
        steps = state.step + jnp.arange(n_steps)
        idx = train.batch_indices(cfg, steps, Xtr.shape[0], seed)
        return jax.lax.scan(step, state, (Xtr[idx], Ytr[idx]), unroll=min(unroll, n_steps))

    return jax.jit(jax.vmap(member_chunk, in_axes=(0, 0, 0, None, None)), donate_argnums=0)


@jax.jit
def _evaluate_members(params, Xtr, splits_xy):
    """Per member: calibrate batch norm on ``Xtr``, then the mean loss of every split
    (``lax.map``, one member at a time: the activations of a whole split are large)."""

    def one(p):
        stats = train.calibrate_bn(p, Xtr)
        return [train.evaluate(p, stats, X, Y) for X, Y in splits_xy]

    return jax.lax.map(one, params)


def sweep_run(
    cfg: TrainConfig,
    seeds: Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
    data_path: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Train the ``seeds x lrs`` grid of ``cfg`` in one vmapped program; return (and write
    to ``out`` as JSON, checked writable first) ``{"members": [{"seed", "lr", "train_loss",
    "val_loss", ...}, ...], "seconds", "compile_seconds", "model_steps_per_second", "config"}``
    with batch norm calibrated per member on the training set."""
    t_start = time.perf_counter()
    cfg.validate()
    grid = members(seeds, lrs, cfg)
    if out is not None:
        fileio.check_results_file(out, TOOL)
    splits = data.load_splits(data_path, block_size=cfg.block_size)
    Xtr, Ytr = (jnp.asarray(a) for a in splits.data["train"])
    m_seeds = jnp.asarray([s for s, _ in grid], jnp.int32)
    m_lrs = jnp.asarray([lr for _, lr in grid], jnp.float32)
    states = init_states(cfg, [s for s, _ in grid], splits.vocab.size)
    log(
        f"sweep: {len(grid)} members x {cfg.steps} steps (H={cfg.n_hidden}, "
        f"batch {cfg.batch_size}, backend {cfg.backend})"
    )
    compile_s = run_s = 0.0
    last = np.full(len(grid), np.nan)
    make, steps = partial(make_sweep_chunk, cfg), dict(steps=cfg.steps, chunk_steps=cfg.chunk_steps)
    for chunk in train.run_chunks(make, states, m_seeds, m_lrs, Xtr, Ytr, start=0, **steps):
        states, last = chunk.state, chunk.losses[:, -1]
        compile_s, run_s = compile_s + chunk.compile_seconds, run_s + chunk.run_seconds
        log(f"{chunk.step:7d}/{cfg.steps:7d}: " + " ".join(f"{v:.4f}" for v in last))
    rows = _member_rows(grid, states.params, Xtr, splits.data, last, log)
    result = {
        "members": rows,
        "seconds": round(time.perf_counter() - t_start, 3),
        "compile_seconds": round(compile_s, 3),
        "model_steps_per_second": round(len(grid) * cfg.steps / run_s, 1) if run_s else None,
        "config": cfg.to_dict(),
    }
    if out is not None:
        text = json.dumps({"tool": TOOL, **result}, indent=2)
        fileio.write_atomic(out, lambda f: f.write(text), "w")
    return result


def _member_rows(grid, params, Xtr, splits, last, log: Log) -> list[dict[str, Any]]:
    """Each member's calibrated train/val loss, printed as a table and returned."""
    names = [k for k in ("train", "val") if len(splits[k][1])]
    split_xy = [(jnp.asarray(splits[k][0]), jnp.asarray(splits[k][1])) for k in names]
    evals = np.asarray(_evaluate_members(params, Xtr, split_xy))  # (splits, M)
    rows: list[dict[str, Any]] = []
    log("| member | seed | lr | train | val |")
    log("|---:|---:|---:|---:|---:|")
    for i, (seed, lr) in enumerate(grid):
        losses = {f"{k}_loss": round(float(evals[j][i]), 4) for j, k in enumerate(names)}
        rows.append({"seed": seed, "lr": lr, **losses, "last_batch_loss": round(float(last[i]), 4)})
        tr, va = (losses.get(f"{k}_loss", float("nan")) for k in ("train", "val"))
        log(f"| {i} | {seed} | {lr:g} | {tr:.4f} | {va:.4f} |")
    return rows
