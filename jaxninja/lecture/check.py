"""``jaxninja check``: every hand-written gradient against ``jax.grad``, in one table: the
lecture's ``cmp`` rows for Exercises 1-4, all ``jax.jit``-compiled (README, "Why not 26/26
bit-exact", says why not every float32 row is)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja.lecture import model, ninja
from jaxninja.lecture.data import load_splits
from jaxninja.lecture.ninja import Comparison, compare

TOLERANCES: Mapping[str, float] = {"float32": 1e-6, "float64": 1e-12}
"""Max abs difference per row (gradients are 1e-3 to 1e-1): float32's is ~30x the largest
measured (3.0e-8, seeds 0-19, H = 64 and 200), far below a wrong formula's (~3%)."""

SECTION_EX1 = "Exercise 1: manual backprop through the atomized forward pass vs jax.grad"
SECTION_FUSED = "Exercises 2-3: fused backward rules vs jax.grad"
SECTION_EX4 = "Exercise 4: manual_grads vs jax.grad(model.loss)"

_autodiff = jax.jit(jax.grad(model.loss))  # one wrapper, so that repeated checks reuse it


class CheckReport(NamedTuple):
    """The result of :func:`run_check`: its settings, and ``rows``, ``{section title:
    (Comparison, ...)}`` in table order (26 Exercise-1 rows, 2 fused, 7 ``manual_grads``)."""

    dtype: str
    n_hidden: int
    seed: int
    batch_size: int
    tolerance: float
    rows: Mapping[str, tuple[Comparison, ...]]
    jitted: bool = True

    @property
    def all_rows(self) -> tuple[Comparison, ...]:
        return tuple(row for rows in self.rows.values() for row in rows)

    @property
    def failures(self) -> tuple[Comparison, ...]:
        """The rows whose maxdiff exceeds the tolerance (or is NaN)."""
        return tuple(r for r in self.all_rows if not r.maxdiff <= self.tolerance)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def n_exact(self) -> int:
        """How many of the Exercise-1 rows are bit-for-bit equal to ``jax.grad``'s."""
        return sum(r.exact for r in self.rows[SECTION_EX1])

    def summary(self) -> str:
        """One line, e.g. ``float32: 11/26 Exercise-1 rows bit-exact; all 35 rows within 1e-06``."""
        ex1, bad, tol = self.rows[SECTION_EX1], self.failures, f"{self.tolerance:.0e}"
        head = f"{self.dtype}: {self.n_exact}/{len(ex1)} Exercise-1 rows bit-exact"
        if not bad:
            return f"{head}; all {len(self.all_rows)} rows within {tol}"
        names = ", ".join(r.name for r in bad)
        return f"{head}; {len(bad)} of {len(self.all_rows)} rows exceed {tol}: {names}"

    def format(self) -> str:
        """The lecture-style table: a title, each section's header and rows, the summary."""
        lines = [
            f"jaxninja check: {self.dtype}, n_hidden={self.n_hidden}, "
            f"batch of {self.batch_size} from the training split, seed {self.seed}, "
            f"{'jit-compiled' if self.jitted else 'eager'}"
        ]
        for title, rows in self.rows.items():
            lines += ["", title, *map(str, rows)]
        return "\n".join([*lines, "", self.summary()])


def training_batch(data: Any, seed: int, batch_size: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``(vocab_size, X, Y)``: ``batch_size`` training examples drawn with replacement."""
    splits = load_splits(data)
    Xtr, Ytr = splits.data["train"]
    ix = np.random.default_rng(seed).integers(0, len(Ytr), size=batch_size)
    return splits.vocab.size, Xtr[ix], Ytr[ix]


def run_check(
    dtype: Any = "float32",
    n_hidden: int = 64,
    seed: int = 42,
    batch_size: int = 32,
    data: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Compare every hand-written gradient with ``jax.grad`` on one training batch: ``seed``
    seeds the parameters and the batch (``batch_size >= 2`` rows drawn with replacement),
    float64 turns on ``jax_enable_x64`` for this call only. On a made-up word list:

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = pathlib.Path(tmp, "names.txt")
    ...     _ = path.write_text("\\n".join(["emma", "olivia", "ava", "isabella", "sophia"] * 20))
    ...     report = run_check("float64", n_hidden=16, data=path)
    >>> report.ok, report.n_exact >= 11, [len(rows) for rows in report.rows.values()]
    (True, True, [26, 2, 7])
    """
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in TOLERANCES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (Bessel's correction), got {batch_size}")
    vocab_size, Xn, Yn = training_batch(data, seed, batch_size)

    with jax.enable_x64(name == "float64"):
        X, Y = jnp.asarray(Xn), jnp.asarray(Yn)
        # eager: exactly model.init_params' parameters (jit may round the scaling otherwise)
        params = model.init_params(
            jax.random.key(seed), vocab_size, n_hidden=n_hidden, dtype=jnp.dtype(name)
        )
        acts = jax.jit(ninja.forward_atomized)(params, X, Y)
        manual = jax.jit(ninja.backward_atomized)(params, acts, X, Y)
        ref = jax.jit(ninja.reference_grads)(params, X, Y)
        dlogits = jax.jit(ninja.cross_entropy_backward)(acts["logits"], Y)
        bn_args = (ref["hpreact"], params["bngain"], acts["bnvar_inv"], acts["bnraw"])
        dhprebn = jax.jit(ninja.batch_norm_backward)(*bn_args)
        grads, auto = jax.jit(ninja.manual_grads)(params, X, Y)[1], _autodiff(params, X, Y)

    rows = {
        SECTION_EX1: tuple(compare(g, manual[g], ref[g]) for g in ninja.GRADIENTS),
        SECTION_FUSED: (
            compare("logits (fused)", dlogits, ref["logits"]),
            compare("hprebn (fused)", dhprebn, ref["hprebn"]),
        ),
        SECTION_EX4: tuple(compare(k, grads[k], auto[k]) for k in model.PARAM_NAMES),
    }
    return CheckReport(name, n_hidden, seed, batch_size, TOLERANCES[name], rows)
