"""The lecture series' diagnostics of a trained run (``jaxninja diagnose --out DIR``):
activation histograms and tanh saturation of the hidden layer, dead units, gradient:data
ratios per parameter, and the update:data curve recorded in ``metrics.jsonl``
(``--eval-every``).

Definitions (makemore Part 3): a unit is *saturated* on an example when ``|tanh| > 0.97``
(its local gradient ``1 - t^2`` is under 6%); a unit is *dead* when it is saturated on every
example (no gradient ever flows through it). The gradient:data ratio of a parameter is
``std(grad) / std(param)`` on a training batch; the update:data ratio is ``std(update) /
std(param)`` (``log10`` about ``-3`` is the series' rule of thumb).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja.lecture import data, model
from jaxninja.training import compare, fileio, job, metrics, rundir

SATURATED = 0.97  # |tanh| above this: the unit passes under 6% of its gradient
FILES = ("activations.png", "saturation.png", "grad_ratio.png", "update_ratio.png", "diagnose.json")
SUBDIR = "diagnose"  # the default place of the pictures: RUN/diagnose/
N_EXAMPLES = 1000  # training examples the histograms and saturation use


def hidden_activations(params: model.Params, bn_stats: model.BNStats, X: jax.Array) -> dict:
    """``{"hpreact": (n, H), "h": (n, H)}``: the hidden layer before and after tanh in eval
    mode (batch norm, if any, with ``bn_stats``)."""
    hprebn = model.hidden_preactivation(params, X)
    hpreact = hprebn
    if model.has_batch_norm(params):
        gain = params["bngain"]
        normalized = (hprebn - bn_stats["mean"]) / jnp.sqrt(bn_stats["var"] + model.BN_EPS)
        hpreact = gain * normalized + params["bnbias"]
    return {"hpreact": hpreact, "h": jnp.tanh(hpreact)}


def summarize(h: np.ndarray) -> dict[str, Any]:
    """Saturation statistics of tanh outputs ``h`` ``(n, H)``.

    Returns:
        ``saturated_fraction`` (of all values), ``dead_units`` (saturated on every example),
        ``mean``, ``std``.

    Examples:
        >>> s = summarize(np.array([[0.99, 0.1], [-0.995, 0.5]]))
        >>> s["saturated_fraction"], s["dead_units"]
        (0.5, 1)
    """
    saturated = np.abs(h) > SATURATED
    return {
        "saturated_fraction": float(saturated.mean()),
        "dead_units": int(saturated.all(axis=0).sum()),
        "mean": float(h.mean()),
        "std": float(h.std()),
    }


def diagnose(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    data_path: str | os.PathLike[str] | None = None,
    *,
    other_data: bool = False,
) -> dict[str, Any]:
    """Diagnose a finished run; with ``out``, write the pictures and ``diagnose.json``.

    Args:
        run_dir: a finished run directory (of ``train`` or a sweep member).
        out: where to write ``activations.png``, ``saturation.png``, ``grad_ratio.png``,
            ``update_ratio.png`` (if ``metrics.jsonl`` has evaluations) and
            ``diagnose.json``; ``None``: only return the numbers.
        data_path: the run's word list (default: the bundled names.txt).
        other_data: use a data file the run was not trained on.

    Returns:
        ``{"hidden": summarize(h), "hpreact_std", "grad_ratio": {name: float},
        "update_ratio_last": {name: float} or None, "files": [written paths]}``.

    Raises:
        JaxninjaError: not a finished run, a data file that is not the run's, a write error.
    """
    if out is not None:
        compare.check_own_dir(Path(out), set(FILES))
    ckpt = job.load_run(run_dir)
    assert ckpt.bn_stats is not None  # load_run raises otherwise
    splits = data.load_splits(data_path, block_size=ckpt.config.block_size)
    rundir.check_same_run(Path(run_dir), ckpt, splits, other_data)
    X, Y = (jnp.asarray(a[:N_EXAMPLES]) for a in splits.data["train"])
    acts = jax.device_get(hidden_activations(ckpt.state.params, ckpt.bn_stats, X))
    cfg = ckpt.config
    n = min(cfg.batch_size, len(Y))
    stats = jax.device_get(metrics.step_stats(cfg, ckpt.state, X[:n], Y[:n]))
    evaluations = metrics.read(run_dir)
    report: dict[str, Any] = {
        "hidden": summarize(np.asarray(acts["h"])),
        "hpreact_std": float(np.std(acts["hpreact"])),
        "grad_ratio": {k: float(v) for k, v in stats["grad_ratio"].items()},
        "update_ratio_last": evaluations[-1]["update_ratio"] if evaluations else None,
        "files": [],
    }
    if out is not None:
        report["files"] = _write(Path(out), acts, stats, evaluations, report)
    return report


def _write(out: Path, acts: dict, stats: dict, evaluations: list, report: dict) -> list[str]:
    """The pictures and ``diagnose.json`` in ``out``; the paths written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fileio.WriteError(f"cannot create {out}: {e.strerror or e}") from None
    written = []
    Figure = _figure_class()  # noqa: N806
    if Figure is not None:
        pictures = {
            "activations.png": _activations_figure(Figure, acts),
            "saturation.png": _saturation_figure(Figure, np.asarray(acts["h"])),
            "grad_ratio.png": _ratio_figure(Figure, stats),
        }
        if evaluations:
            pictures["update_ratio.png"] = _update_figure(Figure, evaluations)
        for name, fig in pictures.items():
            fileio.write_atomic(out / name, partial(_save_png, fig))
            written.append(str(out / name))
    text = json.dumps({k: v for k, v in report.items() if k != "files"}, indent=2)
    fileio.write_atomic(out / "diagnose.json", lambda f: f.write(text), "w")
    return [*written, str(out / "diagnose.json")]


def _figure_class() -> Any:
    """matplotlib's ``Figure`` (no pyplot: no global state), or ``None`` without it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None  # the numbers are still written
    return Figure


def _save_png(fig: Any, f: Any) -> None:
    fig.savefig(f, format="png")


def _activations_figure(Figure: Any, acts: dict) -> Any:  # noqa: N803
    fig = Figure(figsize=(9, 3.5), layout="tight")
    left, right = fig.subplots(1, 2)
    hpreact = np.asarray(acts["hpreact"]).ravel()
    h = np.asarray(acts["h"]).ravel()
    left.hist(hpreact, bins=50)
    left.set(title=f"hpreact (std {hpreact.std():.2f})", xlabel="value")
    saturated = float((np.abs(h) > SATURATED).mean())
    right.hist(h, bins=50)
    right.set(title=f"tanh output h (saturated {100 * saturated:.1f}%)", xlabel="value")
    return fig


def _saturation_figure(Figure: Any, h: np.ndarray) -> Any:  # noqa: N803
    fig = Figure(figsize=(8, 4), layout="tight")
    ax = fig.subplots()
    shown = np.abs(h[:200]) > SATURATED
    ax.imshow(shown, cmap="gray", interpolation="nearest", aspect="auto")
    dead = int(summarize(h)["dead_units"])
    ax.set(
        title=f"|h| > {SATURATED} (white), 200 examples; dead units: {dead}",
        xlabel="hidden unit",
        ylabel="example",
    )
    return fig


def _ratio_figure(Figure: Any, stats: dict) -> Any:  # noqa: N803
    fig = Figure(figsize=(6, 3.5), layout="tight")
    ax = fig.subplots()
    names = list(stats["grad_ratio"])
    ax.bar(names, [np.log10(float(stats["grad_ratio"][k])) for k in names])
    ax.set(title="gradient:data ratio, std(grad)/std(param)", ylabel="log10")
    return fig


def _update_figure(Figure: Any, evaluations: list) -> Any:  # noqa: N803
    fig = Figure(figsize=(7, 4), layout="tight")
    ax = fig.subplots()
    steps = [r["step"] for r in evaluations]
    for name in evaluations[-1]["update_ratio"]:
        values = [np.log10(r["update_ratio"].get(name, np.nan)) for r in evaluations]
        ax.plot(steps, values, label=name)
    ax.axhline(-3, color="k", ls="--", lw=1)
    ax.set(title="update:data ratio (metrics.jsonl)", xlabel="step", ylabel="log10")
    ax.legend(fontsize="small")
    return fig
