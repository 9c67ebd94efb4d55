"""Checkpoints: one ``.npz`` per run (state arrays, calibrated batch-norm statistics if any,
and a JSON ``meta`` entry: format, config, vocabulary, data sha256), written atomically.

Loading trusts nothing in the file: no pickle; entry count, unpacked size and metadata are
checked first; the expected arrays, shapes and dtypes come from the stored config; floats must
be finite and variances positive. A tampered or truncated file is refused with one line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja.errors import JaxninjaError, listing
from jaxninja.lecture.data import Vocab
from jaxninja.lecture.model import BNStats
from jaxninja.training import fileio
from jaxninja.training.train import TrainConfig, TrainState, check_keys, init_state

FILENAME = "checkpoint.npz"
FORMAT = "jaxninja-checkpoint-1"
MAX_BYTES = 256 << 20  # unpacked (a zip bomb): the lecture's model is ~50 kB
MAX_ENTRIES = 1000  # a checkpoint has a dozen arrays
MAX_REASON = 160  # characters of a refusal's reason: the line stays short
VARIANCES = ("state.bn_running['var']", "bn_stats/var")  # batch norm divides by sqrt(var + eps)


class CheckpointError(JaxninjaError):
    """A checkpoint that is missing, unreadable or inconsistent; the message names it."""


class Checkpoint(NamedTuple):
    config: TrainConfig
    vocab: Vocab
    state: TrainState
    bn_stats: BNStats | None  # calibrated statistics once training has finished ({}: no BN)
    data_sha256: str | None  # sha256 of the data file trained on (None: not recorded)


def save(
    run_dir: str | os.PathLike[str],
    config: TrainConfig,
    vocab: Vocab,
    state: TrainState,
    bn_stats: BNStats | None = None,
    *,
    data_sha256: str | None = None,
) -> Path:
    """Write ``run_dir/checkpoint.npz`` atomically; a failed write raises
    ``jaxninja.training.fileio.WriteError`` (``cannot write PATH: REASON``)."""
    path = Path(run_dir) / FILENAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fileio.WriteError(f"cannot create {path.parent}: {e.strerror or e}") from e
    meta = {"format": FORMAT, "config": config.to_dict(), "vocab": list(vocab.itos)}
    text = json.dumps({**meta, "data_sha256": data_sha256}).encode()
    arrays: dict[str, Any] = {"meta": np.frombuffer(text, dtype=np.uint8)}
    for key, leaf in jax.tree_util.tree_leaves_with_path(state):
        arrays["state" + jax.tree_util.keystr(key)] = np.asarray(leaf)
    arrays.update({f"bn_stats/{k}": np.asarray(v) for k, v in (bn_stats or {}).items()})
    fileio.write_atomic(path, lambda f: np.savez(f, **arrays))
    return path


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every entry of the archive, after checking how many there are and their size."""
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with npz:
            archive: Any = npz.zip  # numpy's stubs declare it Optional
            infos = archive.infolist()
            if len(infos) > MAX_ENTRIES:
                raise ValueError(f"{len(infos)} entries, over the limit of {MAX_ENTRIES}")
            size = sum(info.file_size for info in infos)
            if size > MAX_BYTES:
                raise ValueError(f"unpacks to {size} bytes, over the {MAX_BYTES}-byte limit")
            return {k: npz[k] for k in npz.files}
    except Exception as e:  # a hostile archive fails in zipfile, zlib, lzma, numpy...: any way
        reason = _reason(e)
        if "pickle" in reason:  # numpy's words would suggest turning the protection off
            reason = "it holds pickled Python objects, which are never loaded"
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from None


def _reason(error: BaseException) -> str:
    """``error``'s message in one line of at most ``MAX_REASON`` characters (a
    number in the file may have hundreds of digits), or its type's name."""
    reason = " ".join(str(error).split()) or type(error).__name__
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."


def _parse_meta(stored: dict[str, np.ndarray]) -> tuple[TrainConfig, Vocab, str | None]:
    """The config, vocabulary and data hash of ``meta``; ``ValueError`` if any is wrong."""
    meta = json.loads(bytes(stored.pop("meta")).decode())
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown format {meta.get('format')!r:.80}")
    check_keys("", meta, {"format", "config", "vocab", "data_sha256"})
    sha = meta["data_sha256"]
    if sha is not None and not (isinstance(sha, str) and re.fullmatch("[0-9a-f]{64}", sha)):
        raise ValueError(f"data_sha256 must be null or 64 hex digits, got {sha!r:.80}")
    vocab = meta["vocab"]
    if not isinstance(vocab, list):
        raise ValueError(f"vocab must be a list, got {type(vocab).__name__}")
    return TrainConfig.from_dict(meta["config"]), Vocab(tuple(vocab)), sha


def load_config(run_dir: str | os.PathLike[str]) -> TrainConfig:
    """The validated config of ``run_dir/checkpoint.npz``, read without touching JAX (so a
    job's process may call it before it joins the job); raise ``CheckpointError``."""
    return _load_meta(Path(run_dir))[1][0]


def _load_meta(
    run_dir: Path,
) -> tuple[dict[str, np.ndarray], tuple[TrainConfig, Vocab, str | None]]:
    """The archive's arrays (``meta`` removed) and its parsed metadata."""
    path = run_dir / FILENAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (is {run_dir} a training run?)")
    stored = _read_arrays(path)
    try:
        return stored, _parse_meta(stored)
    except Exception as e:  # untrusted JSON: wrong types, huge numbers, deep nesting...
        raise CheckpointError(f"{path}: bad metadata ({_reason(e)})") from None


def load(run_dir: str | os.PathLike[str], dtype: Any = jnp.float32) -> Checkpoint:
    """Read and validate ``run_dir/checkpoint.npz``; raise ``CheckpointError``."""
    path = Path(run_dir) / FILENAME
    stored, (config, vocab, data_sha256) = _load_meta(Path(run_dir))

    # The expected structure, shapes and dtypes come from the config, never the file.
    template = jax.eval_shape(lambda: init_state(config, vocab.size, dtype))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    values = [_take(path, stored, "state" + jax.tree_util.keystr(k), s) for k, s in leaves]
    state = jax.tree_util.tree_unflatten(treedef, values)
    bn_stats = None
    if not config.batch_norm and int(state.step) == config.steps:
        bn_stats = {}  # finished: a network without batch norm has nothing to calibrate
    elif "bn_stats/mean" in stored or "bn_stats/var" in stored:
        stat = template.bn_running["mean"]
        bn_stats = {k: _take(path, stored, f"bn_stats/{k}", stat) for k in ("mean", "var")}
    if stored:
        raise CheckpointError(f"{path}: unexpected arrays {listing(stored, as_list=True)}")
    if not 0 <= int(state.step) <= config.steps:
        raise CheckpointError(f"{path}: step {int(state.step)} outside 0..{config.steps}")
    return Checkpoint(config, vocab, state, bn_stats, data_sha256)


def _take(path: Path, stored: dict[str, np.ndarray], name: str, spec: Any) -> jax.Array:
    """``stored[name]``, removed from ``stored``, once checked against ``spec``."""
    if name not in stored:
        raise CheckpointError(f"{path}: missing array {name!r}")
    a = stored.pop(name)
    if (a.shape, a.dtype) != (tuple(spec.shape), spec.dtype):
        problem = f"has shape {a.shape} dtype {a.dtype}, expected {spec.shape} {spec.dtype}"
    elif a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        problem = "holds non-finite values"
    elif name in VARIANCES and not np.all(a > 0):
        problem = "holds variances that are not > 0"
    else:
        return jnp.asarray(a)
    raise CheckpointError(f"{path}: array {name!r} {problem}")
