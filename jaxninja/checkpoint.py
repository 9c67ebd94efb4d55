"""Checkpoints: one ``.npz`` file per run, written atomically, read without pickle.

The file holds every array of the :class:`~jaxninja.train.TrainState` (params, optimizer
state leaves, step, batch-norm running averages), the calibrated batch-norm statistics
when there are any, and a JSON ``meta`` entry with the config and the vocabulary. It is
written to a temporary file in the same directory, flushed to disk and renamed over the
old one, so a run killed at any moment leaves either the old or the new checkpoint.
Loading uses ``allow_pickle=False`` and checks every array's shape and dtype against
what the stored config implies: a tampered or truncated file is refused, never run.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja import fileio
from jaxninja.data import Vocab
from jaxninja.model import BNStats
from jaxninja.train import ConfigError, TrainConfig, TrainState, init_state

FILENAME = "checkpoint.npz"
FORMAT = "jaxninja-checkpoint-1"
# Refuse archives that would unpack to more than this (a zip bomb); the lecture's model
# is ~50 kB, so this leaves room for networks thousands of times larger.
MAX_BYTES = 256 << 20


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or inconsistent; the message names it."""


class Checkpoint(NamedTuple):
    config: TrainConfig
    vocab: Vocab
    state: TrainState
    bn_stats: BNStats | None  # calibrated statistics, once training has finished


def _flatten(state: TrainState, bn_stats: BNStats | None) -> dict[str, np.ndarray]:
    arrays = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        arrays["state" + jax.tree_util.keystr(path)] = np.asarray(leaf)
    for k, v in (bn_stats or {}).items():
        arrays[f"bn_stats/{k}"] = np.asarray(v)
    return arrays


def save(
    run_dir: str | os.PathLike[str],
    config: TrainConfig,
    vocab: Vocab,
    state: TrainState,
    bn_stats: BNStats | None = None,
) -> Path:
    """Write ``run_dir/checkpoint.npz`` atomically (temp file, fsync, rename)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "config": config.to_dict(), "vocab": list(vocab.itos)}
    arrays: dict[str, Any] = _flatten(state, bn_stats)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    dest = run_dir / FILENAME
    fileio.write_atomic(dest, lambda f: np.savez(f, **arrays))
    return dest


def load(run_dir: str | os.PathLike[str], dtype: Any = jnp.float32) -> Checkpoint:
    """Read and validate ``run_dir/checkpoint.npz``; raise :class:`CheckpointError`."""
    path = Path(run_dir) / FILENAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (is {run_dir} a training run?)")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with npz:
            archive: Any = npz.zip  # numpy's stubs declare it Optional
            size = sum(info.file_size for info in archive.infolist())
            if size > MAX_BYTES:
                raise ValueError(f"unpacks to {size} bytes, over the {MAX_BYTES}-byte limit")
            stored = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, MemoryError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e})") from None
    try:
        meta = json.loads(bytes(stored.pop("meta")).decode())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}")
        config = TrainConfig.from_dict(meta["config"])
        vocab = Vocab.from_json(json.dumps(meta["vocab"]))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError, ConfigError) as e:
        raise CheckpointError(f"{path}: bad metadata ({e})") from None

    # The expected structure, shapes and dtypes come from the config, never the file.
    template = jax.eval_shape(lambda: init_state(config, vocab.size, dtype))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    values = []
    for key_path, spec in leaves:
        name = "state" + jax.tree_util.keystr(key_path)
        values.append(_take(path, stored, name, spec.shape, spec.dtype))
    state = jax.tree_util.tree_unflatten(treedef, values)
    bn_stats = None
    if "bn_stats/mean" in stored or "bn_stats/var" in stored:
        stat = template.bn_running["mean"]
        bn_stats = {
            k: _take(path, stored, f"bn_stats/{k}", stat.shape, stat.dtype) for k in ("mean", "var")
        }
    if stored:
        raise CheckpointError(f"{path}: unexpected arrays {sorted(stored)}")
    if not 0 <= int(state.step) <= config.steps:
        raise CheckpointError(f"{path}: step {int(state.step)} outside 0..{config.steps}")
    return Checkpoint(config, vocab, state, bn_stats)


def _take(path: Path, stored: dict[str, np.ndarray], name: str, shape, dtype) -> jax.Array:
    if name not in stored:
        raise CheckpointError(f"{path}: missing array {name!r}")
    a = stored.pop(name)
    if a.shape != tuple(shape) or a.dtype != dtype:
        raise CheckpointError(
            f"{path}: array {name!r} has shape {a.shape} dtype {a.dtype}, "
            f"expected {tuple(shape)} {np.dtype(dtype)}"
        )
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise CheckpointError(f"{path}: array {name!r} holds non-finite values")
    return jnp.asarray(a)
