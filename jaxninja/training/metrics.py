"""Evaluation during training (``--eval-every N``): one JSON object per evaluation in
``DIR/metrics.jsonl``, and what a run records about where it ran.

Each line holds ``step`` (updates done), ``train_loss`` (mean training-batch loss of the steps
since the previous evaluation), ``val_loss`` (eval mode, batch norm calibrated on the training
set as at the end; ``val_loss_running_stats`` too with ``running_stats``), ``lr`` (of the
latest update), ``grad_norm`` (global L2 norm of the gradient on the next step's batch) and
``update_ratio`` (per parameter: ``std(update) / std(param)`` of the update the optimizer would
make next, the lecture series' update:data ratio; about ``1e-3`` is healthy).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxninja
from jaxninja.training import fileio, train
from jaxninja.training.train import TrainConfig, TrainState

Array = jax.Array
FILENAME = "metrics.jsonl"


def environment() -> dict[str, Any]:
    """Where and when a run ran: jax, jaxlib and jaxninja versions, the device, the start
    time (UTC, ISO 8601), for ``metrics.json``.

    Examples:
        >>> sorted(environment())
        ['device', 'jax_version', 'jaxlib_version', 'jaxninja_version', 'platform', 'started']
    """
    try:
        jaxlib_version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:  # a source build of jax
        jaxlib_version = "unknown"
    device = jax.devices()[0]
    return {
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib_version,
        "jaxninja_version": jaxninja.__version__,
        "device": device.device_kind,
        "platform": device.platform,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _std_ratio(update: Array, param: Array) -> Array:
    return jnp.std(update) / jnp.maximum(jnp.std(param), jnp.finfo(param.dtype).tiny)


def step_stats(
    cfg: TrainConfig, state: TrainState, Xb: Array, Yb: Array, lr: Any = None
) -> dict[str, Any]:
    """The gradient norm and update:data ratios of ``state`` on the batch ``(Xb, Yb)``.

    Args:
        cfg: the run's config (backend, optimizer and schedule).
        state: the training state after ``state.step`` updates (not modified).
        Xb: a training batch's contexts, ``(batch_size, block_size)``.
        Yb: its targets, ``(batch_size,)``.
        lr: the learning rate (default ``cfg.lr``; traced: one compilation for many).

    Returns:
        ``{"grad_norm": float, "grad_ratio": {name: float}, "update_ratio": {name: float}}``:
        ``grad_ratio`` is ``std(grad) / std(param)`` per parameter.
    """
    (_, _), grads = train.BACKENDS[cfg.backend].grad(state.params, Xb, Yb)
    updates, _ = train.make_optimizer(cfg, lr).update(grads, state.opt_state, state.params)
    return {
        "grad_norm": jnp.sqrt(
            sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in jax.tree.leaves(grads))
        ),
        "grad_ratio": jax.tree.map(_std_ratio, grads, state.params),
        "update_ratio": jax.tree.map(_std_ratio, updates, state.params),
    }


_step_stats = jax.jit(step_stats, static_argnums=0)


def evaluation(
    cfg: TrainConfig, state: TrainState, Xtr: Array, Ytr: Array, val: tuple[Array, Array]
) -> dict[str, Any]:
    """One line of ``metrics.jsonl`` but ``train_loss``: ``step``, ``val_loss`` (and
    ``val_loss_running_stats``), ``lr``, ``grad_norm``, ``update_ratio``."""
    step = int(state.step)
    bn_stats = train.calibrate_bn(state.params, Xtr)
    record: dict[str, Any] = {"step": step}
    if len(val[1]):
        record["val_loss"] = round(float(train.evaluate(state.params, bn_stats, *val)), 4)
        if cfg.running_stats:
            running = train.evaluate(state.params, state.bn_running, *val)
            record["val_loss_running_stats"] = round(float(running), 4)
    record["lr"] = float(train.make_schedule(cfg)(max(step - 1, 0)))
    idx = train.batch_indices(cfg, jnp.asarray([step]), Xtr.shape[0])[0]
    lr = jnp.asarray(cfg.lr, jnp.float32)
    stats = jax.device_get(_step_stats(train.program_config(cfg), state, Xtr[idx], Ytr[idx], lr))
    record["grad_norm"] = float(stats["grad_norm"])
    record["update_ratio"] = {k: float(v) for k, v in stats["update_ratio"].items()}
    return record


def append(out: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``out/metrics.jsonl`` as one line (rewritten atomically)."""
    lines = read(out)
    lines.append(record)
    write(out, lines)


def write(out: Path, records: list[dict[str, Any]]) -> None:
    """Replace ``out/metrics.jsonl`` with ``records``, one JSON object a line, atomically."""
    text = "".join(json.dumps(r) + "\n" for r in records)
    fileio.write_atomic(out / FILENAME, lambda f: f.write(text), "w")


def read(out: str | os.PathLike[str], upto: int | None = None) -> list[dict[str, Any]]:
    """The records of ``out/metrics.jsonl`` (``[]`` if there is none), those of steps up to
    ``upto`` if given; lines that are not JSON objects with an int ``step`` are skipped (a
    damaged file costs the curve, never the run)."""
    try:
        text = (Path(out) / FILENAME).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            if upto is None or record["step"] <= upto:
                records.append(record)
    return records


def curves(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """``{"step", "train_loss", "val_loss"}`` arrays of ``records`` (NaN where missing).

    Examples:
        >>> curves([{"step": 5, "train_loss": 2.5, "val_loss": 2.6}])["val_loss"]
        array([2.6])
    """
    return {
        key: np.array([r.get(key, np.nan) for r in records], np.float64)
        for key in ("step", "train_loss", "val_loss")
    }
