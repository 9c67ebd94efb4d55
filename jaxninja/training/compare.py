"""Runs side by side (``jaxninja compare DIR...``, and a sweep's results table): the config
fields that differ, the train/val/test losses and speed of each run, and one plot of their
curves (the validation loss of ``metrics.jsonl`` where recorded, else the smoothed training
loss of ``losses.npy``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxninja.errors import JaxninjaError
from jaxninja.training import fileio, metrics

SPLITS = ("train_loss", "val_loss", "test_loss")


class RunSummary(NamedTuple):
    """What ``load_run_summary`` reads from a finished run directory."""

    path: Path
    config: dict[str, Any]
    results: dict[str, Any]  # metrics.json
    evaluations: list[dict[str, Any]]  # metrics.jsonl ([] if none)
    losses: np.ndarray  # losses.npy (empty if missing)


def load_run_summary(run_dir: str | os.PathLike[str]) -> RunSummary:
    """Read a finished run's ``metrics.json``, ``metrics.jsonl`` and ``losses.npy``.

    Raises:
        JaxninjaError: no ``metrics.json`` (not a finished run) or an unreadable one.
    """
    path = Path(run_dir)
    try:
        results = json.loads((path / "metrics.json").read_text())
    except FileNotFoundError:
        raise JaxninjaError(f"{path}: no metrics.json (not a finished jaxninja run)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise JaxninjaError(f"{path / 'metrics.json'}: unreadable ({e})") from None
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        raise JaxninjaError(f"{path / 'metrics.json'}: not a jaxninja run's metrics")
    try:
        losses = np.load(path / "losses.npy", mmap_mode="r", allow_pickle=False).reshape(-1)
        losses = np.asarray(losses, np.float32)
    except (OSError, ValueError, EOFError):
        losses = np.zeros(0, np.float32)
    return RunSummary(path, results["config"], results, metrics.read(path), losses)


def differing_fields(runs: list[RunSummary]) -> list[str]:
    """The config fields whose values are not all equal, in the config's order.

    Examples:
        >>> a = RunSummary(Path("a"), {"lr": 0.1, "seed": 1}, {}, [], np.zeros(0))
        >>> differing_fields([a, a._replace(config={"lr": 0.2, "seed": 1})])
        ['lr']
    """
    names: list[str] = []
    for run in runs:
        names += [k for k in run.config if k not in names]
    return [k for k in names if len({json.dumps(r.config.get(k)) for r in runs}) > 1]


def table(runs: list[RunSummary], names: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per run: ``run`` (its directory's name), the differing fields (or
    ``names``), the loss of the first step (Part 3's check of the initialisation), the
    split losses and the training speed."""
    fields = differing_fields(runs) if names is None else names
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.path.name}
        row.update({k: run.config.get(k) for k in fields})
        row["first_loss"] = round(float(run.losses[0]), 4) if len(run.losses) else None
        row.update({k: run.results.get(k) for k in SPLITS})
        row["steps_per_second"] = run.results.get("steps_per_second")
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """``rows`` as a markdown table (floats to 4 decimals).

    Examples:
        >>> print(to_markdown([{"run": "a", "val_loss": 2.11}]), end="")
        | run | val_loss |
        |---|---:|
        | a | 2.1100 |
    """
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |"]
    lines.append("|" + "|".join("---" if k == "run" else "---:" for k in keys) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(k, row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _cell(key: str, value: Any) -> str:
    if isinstance(value, float) and key.endswith("_loss"):
        return f"{value:.4f}"
    return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def to_csv(rows: list[dict[str, Any]]) -> str:
    """``rows`` as CSV text with a header line."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_curves(runs: list[RunSummary], path: Path) -> bool:
    """One figure of every run's curve: validation loss of ``metrics.jsonl`` if every run
    has one, else log10 of the training loss averaged over windows; ``False`` without
    matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(7, 4.5), layout="tight")
    ax = fig.subplots()
    use_val = all(run.evaluations for run in runs)
    for run in runs:
        if use_val:
            points = metrics.curves(run.evaluations)
            ax.plot(points["step"], points["val_loss"], "o-", ms=3, label=run.path.name)
            continue
        done = run.losses[np.isfinite(run.losses)]
        window = max(1, min(1000, len(done) // 20))
        curve = np.log10(done[: len(done) // window * window]).reshape(-1, window).mean(1)
        ax.plot(np.arange(len(curve)) * window, curve, label=run.path.name)
    ylabel = "val loss" if use_val else "log10 train loss (windowed mean)"
    ax.set(xlabel="step", ylabel=ylabel)
    ax.legend(fontsize="small")
    fileio.write_atomic(path, lambda f: fig.savefig(f, format="png"))
    return True


def compare(
    run_dirs: list[str | os.PathLike[str]], out: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Compare finished runs: the table of ``table``; with ``out``, also write
    ``out/compare.md``, ``out/compare.csv`` and ``out/compare.png``.

    Raises:
        JaxninjaError: fewer than one run, or a directory that is not a finished run.
    """
    if not run_dirs:
        raise JaxninjaError("compare needs at least one run directory")
    runs = [load_run_summary(d) for d in run_dirs]
    rows = table(runs)
    if out is not None:
        check_own_dir(Path(out), {f"compare.{ext}" for ext in ("md", "csv", "png")})
        write_tables(rows, Path(out), "compare")
        plot_curves(runs, Path(out) / "compare.png")
    return rows


def check_own_dir(out: Path, own: set[str]) -> None:
    """Raise ``JaxninjaError`` unless ``out`` is new or a directory holding only
    files named in ``own`` (what the tool writes there: never touch a user's files)."""
    if not (out.exists() or out.is_symlink()):
        return
    try:
        ours = not out.is_symlink() and out.is_dir() and set(os.listdir(out)) <= own
    except OSError:
        ours = False
    if not ours:
        raise JaxninjaError(f"--out {out}: exists and holds other files; choose a new directory")


def write_tables(rows: list[dict[str, Any]], out: Path, stem: str) -> None:
    """Write ``rows`` to ``out/STEM.md`` and ``out/STEM.csv``."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fileio.WriteError(f"cannot create {out}: {e.strerror or e}") from None
    markdown = to_markdown(rows)
    text = to_csv(rows)
    fileio.write_atomic(out / f"{stem}.md", lambda f: f.write(markdown), "w")
    fileio.write_atomic(out / f"{stem}.csv", lambda f: f.write(text), "w")
