"""``jaxninja check``: every hand-written gradient against ``jax.grad``, in one table.

:func:`run_check` draws one training batch, builds the lecture's network and prints the
lecture's ``cmp`` rows for

* Exercise 1: the 26 gradients of :func:`jaxninja.ninja.backward_atomized` against
  :func:`jaxninja.ninja.reference_grads` (``jax.grad`` through zero "taps");
* Exercises 2 and 3: the fused rules :func:`~jaxninja.ninja.cross_entropy_backward` and
  :func:`~jaxninja.ninja.batch_norm_backward` against the same reference (the fused
  batch-norm rule is fed the reference ``dhpreact``, so only that one step is tested);
* Exercise 4: :func:`~jaxninja.ninja.manual_grads` against ``jax.grad(model.loss)``, one
  row per parameter (7 rows).

Every computation is ``jax.jit``-compiled (forward, backward, reference, fused rules,
``manual_grads`` and ``jax.grad``; the parameters come from the eager
``model.init_params``); eager mode rounds differently, see below.
A report is ``ok`` when each of the 35 max abs differences is within the tolerance
(:data:`TOLERANCES`): ``1e-12`` in float64 and ``1e-6`` in float32. The float32 value is
about 30x the largest difference measured (3.0e-8 over seeds 0-19, H = 64 and 200: 40 runs)
and far below what a wrong formula gives (a missing Bessel factor alone is ~3% of a
gradient of size 1e-3 to 1e-1).

In float32 under ``jit`` on XLA:CPU, 11 of the 26 Exercise-1 rows are bit-exact and the
others differ by an ulp or a few: JAX's transposed tanh rule and XLA's fusions round
differently from the lecture's formulas (not an error: float64 agrees to 1e-17).
``experiments/float32_rounding.py`` measures why, step by step.

Example (a tiny made-up word list; the CLI uses names.txt):

>>> import tempfile, pathlib
>>> with tempfile.TemporaryDirectory() as tmp:
...     path = pathlib.Path(tmp, "names.txt")
...     _ = path.write_text("\\n".join(["emma", "olivia", "ava", "isabella", "sophia"] * 20))
...     report = run_check("float64", n_hidden=16, data=path)
>>> report.ok, report.n_exact >= 11, [len(rows) for rows in report.rows.values()]
(True, True, [26, 2, 7])
>>> print(report.format().splitlines()[-1])  # doctest: +ELLIPSIS
float64: .../26 Exercise-1 rows bit-exact; all 35 rows within 1e-12
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja import model, ninja
from jaxninja.data import load_splits
from jaxninja.ninja import Comparison, compare

__all__ = [
    "TOLERANCES",
    "CheckReport",
    "run_check",
]

TOLERANCES: Mapping[str, float] = {"float32": 1e-6, "float64": 1e-12}
"""Max abs difference allowed per row (the gradients are of size 1e-3 to 1e-1)."""

SECTION_EX1 = "Exercise 1: manual backprop through the atomized forward pass vs jax.grad"
SECTION_FUSED = "Exercises 2-3: fused backward rules vs jax.grad"
SECTION_EX4 = "Exercise 4: manual_grads vs jax.grad(model.loss)"

# Module-level jitted functions, so that repeated checks reuse the compiled programs.
_forward = jax.jit(ninja.forward_atomized)
_backward = jax.jit(ninja.backward_atomized)
_reference = jax.jit(ninja.reference_grads)
_ce_backward = jax.jit(ninja.cross_entropy_backward)
_bn_backward = jax.jit(ninja.batch_norm_backward)
_manual = jax.jit(ninja.manual_grads)
_autodiff = jax.jit(jax.grad(model.loss))


@dataclass(frozen=True)
class CheckReport:
    """The result of :func:`run_check`.

    Attributes:
      dtype: ``"float32"`` or ``"float64"``.
      n_hidden, seed, batch_size: the run's settings.
      tolerance: the max abs difference allowed per row.
      rows: ``{section title: (Comparison, ...)}`` in table order: the 26 Exercise-1 rows,
        the 2 fused rows, the 7 ``manual_grads`` rows.
      jitted: every function compared was ``jax.jit``-compiled (always ``True``).
    """

    dtype: str
    n_hidden: int
    seed: int
    batch_size: int
    tolerance: float
    rows: Mapping[str, tuple[Comparison, ...]]
    jitted: bool = True

    @property
    def all_rows(self) -> tuple[Comparison, ...]:
        """Every row of every section, in order."""
        return tuple(row for rows in self.rows.values() for row in rows)

    @property
    def failures(self) -> tuple[Comparison, ...]:
        """The rows whose maxdiff exceeds the tolerance (or is NaN)."""
        return tuple(r for r in self.all_rows if not r.maxdiff <= self.tolerance)

    @property
    def ok(self) -> bool:
        """Every row within the tolerance."""
        return not self.failures

    @property
    def n_exact(self) -> int:
        """How many of the 26 Exercise-1 rows are bit-for-bit equal to ``jax.grad``'s."""
        return sum(r.exact for r in self.rows[SECTION_EX1])

    def summary(self) -> str:
        """One line, e.g. ``float32: 11/26 Exercise-1 rows bit-exact; all 35 rows within 1e-06``."""
        n_ex1 = len(self.rows[SECTION_EX1])
        head = f"{self.dtype}: {self.n_exact}/{n_ex1} Exercise-1 rows bit-exact; "
        n = len(self.all_rows)
        if self.ok:
            return head + f"all {n} rows within {self.tolerance:.0e}"
        bad = ", ".join(r.name for r in self.failures)
        return head + f"{len(self.failures)} of {n} rows exceed {self.tolerance:.0e}: {bad}"

    def format(self) -> str:
        """The lecture-style table: a title, each section's header and rows, the summary."""
        lines = [
            f"jaxninja check: {self.dtype}, n_hidden={self.n_hidden}, "
            f"batch of {self.batch_size} from the training split, seed {self.seed}, "
            f"{'jit-compiled' if self.jitted else 'eager'}"
        ]
        for title, rows in self.rows.items():
            lines += ["", title]
            lines += [str(r) for r in rows]
        lines += ["", self.summary()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _dtype_name(dtype: Any) -> str:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in TOLERANCES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return name


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
    *,
    tolerance: float | None = None,
) -> CheckReport:
    """Compare every hand-written gradient with ``jax.grad`` on one training batch.

    Args:
      dtype: ``"float32"`` or ``"float64"``; float64 turns on ``jax_enable_x64`` for the
        duration of the call only (it is restored afterwards).
      n_hidden: hidden units ``H`` (64 in the lecture's Exercises 1-3).
      seed: seeds both the parameters (``jax.random.key(seed)``) and the batch
        (``numpy.random.default_rng(seed)``, indices drawn with replacement).
      batch_size: rows in the batch (at least 2: batch norm divides by ``n - 1``).
      data: path to names.txt; ``None`` uses ``$JAXNINJA_DATA`` or the bundled copy
        (see :func:`jaxninja.data.load_splits`).
      tolerance: max abs difference allowed per row; default :data:`TOLERANCES`.

    Returns:
      a :class:`CheckReport`; the CLI prints ``report.format()`` and exits 1 unless
      ``report.ok``.
    """
    name = _dtype_name(dtype)
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (Bessel's correction), got {batch_size}")
    tol = TOLERANCES[name] if tolerance is None else float(tolerance)
    vocab_size, Xn, Yn = training_batch(data, seed, batch_size)

    with jax.enable_x64(name == "float64"):
        X, Y = jnp.asarray(Xn), jnp.asarray(Yn)
        # Eager, so the parameters are exactly model.init_params' (jit may round the
        # scaling differently).
        params = model.init_params(
            jax.random.key(seed), vocab_size, n_hidden=n_hidden, dtype=jnp.dtype(name)
        )
        acts = _forward(params, X, Y)
        manual = _backward(params, acts, X, Y)
        ref = _reference(params, X, Y)
        ex1 = tuple(compare(g, manual[g], ref[g]) for g in ninja.GRADIENTS)

        dlogits = _ce_backward(acts["logits"], Y)
        dhprebn = _bn_backward(ref["hpreact"], params["bngain"], acts["bnvar_inv"], acts["bnraw"])
        fused = (
            compare("logits (fused)", dlogits, ref["logits"]),
            compare("hprebn (fused)", dhprebn, ref["hprebn"]),
        )

        _, grads = _manual(params, X, Y)
        auto = _autodiff(params, X, Y)
        ex4 = tuple(compare(k, grads[k], auto[k]) for k in model.PARAM_NAMES)

    return CheckReport(
        dtype=name,
        n_hidden=n_hidden,
        seed=seed,
        batch_size=batch_size,
        tolerance=tol,
        rows={SECTION_EX1: ex1, SECTION_FUSED: fused, SECTION_EX4: ex4},
    )
