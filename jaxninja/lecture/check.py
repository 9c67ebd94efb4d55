"""``jaxninja check``: every hand-written gradient against ``jax.grad``, in one table: the
lecture's ``cmp`` rows for Exercises 1-4, all ``jax.jit``-compiled (docs "The lecture", "Why
not 26/26 bit-exact", says why not every float32 row is). ``--solution FILE`` grades the
functions FILE defines instead of the package's (``load_solution``).

Every row is graded by ``jaxninja.lecture.ninja.grade``: right (bit-exact),
approximately right (within ``jaxninja.lecture.ninja.TOLERANCES``, the ``approximate``
column), wrong, or missing; the command exits 1 when a row is wrong, else 0.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxninja.errors import JaxninjaError
from jaxninja.lecture import model, ninja
from jaxninja.lecture.data import load_splits
from jaxninja.lecture.ninja import MISSING, RIGHT, WRONG, Grade, Tolerance, grade
from jaxninja.limits import check_int

SECTION_EX1 = "Exercise 1: manual backprop through the atomized forward pass vs jax.grad"
SECTION_FUSED = "Exercises 2-3: fused backward rules vs jax.grad"
SECTION_EX4 = "Exercise 4: manual_grads vs jax.grad(model.loss)"

FUNCTIONS = ("backward_atomized", "cross_entropy_backward", "batch_norm_backward", "manual_grads")
"""The functions a solution file may define, with :mod:`~jaxninja.lecture.ninja`'s
signatures and return structures."""
BUILTIN = "jaxninja.lecture.ninja"
MAX_HIDDEN = 100_000  # run_check's n_hidden: more is a typo

_autodiff = jax.jit(jax.grad(model.loss))  # one wrapper, so that repeated checks reuse it


class CheckError(JaxninjaError):
    """A solution file that cannot be graded; the one-line message says where and why."""


class Solution(NamedTuple):
    """What ``run_check`` grades.

    Attributes:
        functions: ``{name: function}`` for the ``FUNCTIONS`` defined.
        origin: ``BUILTIN``, or the file they come from.
    """

    functions: Mapping[str, Callable[..., Any]]
    origin: str = BUILTIN


def _location(exc: BaseException, path: str) -> str:
    """``path:line`` of the last traceback frame in ``path`` (the learner's own line)."""
    if isinstance(exc, SyntaxError) and exc.lineno is not None:
        return f"{path}:{exc.lineno}"
    real = os.path.realpath(path)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == real]
    return f"{path}:{frames[-1].lineno}" if frames else path


def _first_line(exc: BaseException) -> str:
    text = exc.msg if isinstance(exc, SyntaxError) else str(exc)
    lines = str(text).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _import(path: str) -> Any:
    """Run the file ``path`` as a module, whatever its suffix; errors become one line."""
    p = Path(path)
    if not p.exists():
        raise CheckError(f"{path}: no such file")
    if not p.is_file():
        raise CheckError(f"{path}: not a file")
    name = "jaxninja_solution"
    loader = importlib.machinery.SourceFileLoader(name, os.path.realpath(p))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look it up while it runs
    try:
        loader.exec_module(module)
    except (Exception, SystemExit) as e:
        raise CheckError(f"{_location(e, path)}: cannot import it: {_first_line(e)}") from None
    finally:
        sys.modules.pop(name, None)
    return module


def _check_signature(path: str, name: str, fn: Any) -> None:
    """Refuse ``fn`` unless it takes the positional arguments ``ninja.<name>`` takes."""
    want = inspect.signature(getattr(ninja, name))
    if not callable(fn):
        raise CheckError(f"{path}: {name} is a {type(fn).__name__}, not a function")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # no signature to read (a builtin): the call will tell
    try:
        sig.bind(*want.parameters)
    except TypeError:
        code = getattr(fn, "__code__", None)
        where = f"{path}:{code.co_firstlineno}" if code else path
        plain = f"({', '.join(want.parameters)})"
        raise CheckError(
            f"{where}: {name}{sig} has another signature than jaxninja's {name}{plain}"
        ) from None


def load_solution(path: str | os.PathLike[str]) -> Solution:
    """The ``FUNCTIONS`` the Python file ``path`` defines, for ``run_check``.

    Args:
        path: a Python file (any suffix) defining some of ``FUNCTIONS``.

    Returns:
        A ``Solution`` with the functions it defines (the others grade as missing).

    Raises:
        CheckError: the file is missing, fails to import (the message is the error's first
            line and the file's line), defines none of the functions, or defines one that
            cannot be called with the package's arguments.

    Examples:
        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "mine.py")
        ...     _ = path.write_text("def cross_entropy_backward(logits):\\n    return logits\\n")
        ...     load_solution(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        jaxninja.lecture.check.CheckError: .../mine.py:1: cross_entropy_backward(logits) has another signature than jaxninja's cross_entropy_backward(logits, Y)
    """  # noqa: E501
    shown = os.fspath(path)
    module = _import(shown)
    functions = {name: getattr(module, name) for name in FUNCTIONS if hasattr(module, name)}
    if not functions:
        raise CheckError(f"{shown}: defines none of {', '.join(FUNCTIONS)}")
    for name, fn in functions.items():
        _check_signature(shown, name, fn)
    return Solution(functions, shown)


class CheckReport(NamedTuple):
    """The result of ``run_check``.

    Attributes:
        dtype: ``"float32"`` or ``"float64"``.
        n_hidden: hidden units.
        seed: the parameters' and the batch's seed.
        batch_size: rows in the batch.
        tolerance: what counts as approximately right.
        rows: ``{section title: (Grade, ...)}`` in table order (26 Exercise-1 rows, 2
            fused, 7 ``manual_grads``).
        origin: where the graded functions come from (``Solution.origin``).
        jitted: whether they ran ``jax.jit``-compiled.
    """

    dtype: str
    n_hidden: int
    seed: int
    batch_size: int
    tolerance: Tolerance
    rows: Mapping[str, tuple[Grade, ...]]
    origin: str = BUILTIN
    jitted: bool = True

    @property
    def all_rows(self) -> tuple[Grade, ...]:
        """Every row, in table order."""
        return tuple(row for rows in self.rows.values() for row in rows)

    @property
    def failures(self) -> tuple[Grade, ...]:
        """The wrong rows."""
        return tuple(r for r in self.all_rows if r.verdict == WRONG)

    @property
    def ok(self) -> bool:
        """No row is wrong (missing rows are not wrong: a solution may define some)."""
        return not self.failures

    @property
    def n_exact(self) -> int:
        """How many of the Exercise-1 rows are bit-for-bit equal to ``jax.grad``'s."""
        return sum(r.verdict == RIGHT for r in self.rows[SECTION_EX1])

    def summary(self) -> str:
        """One line: the bit-exact count, then how many rows got each verdict.

        Example: ``float32: 11/26 Exercise-1 rows bit-exact; 35 rows: 11 right, 24
        approximately right (|diff| <= 1e-06 + 1e-05 * |jax.grad|), 0 wrong``.
        """
        rows, bad = self.all_rows, self.failures
        count = {v: sum(r.verdict == v for r in rows) for v in (RIGHT, ninja.APPROXIMATE)}
        text = (
            f"{self.dtype}: {self.n_exact}/{len(self.rows[SECTION_EX1])} Exercise-1 rows "
            f"bit-exact; {len(rows)} rows: {count[RIGHT]} right, {count[ninja.APPROXIMATE]} "
            f"approximately right ({self.tolerance}), {len(bad)} wrong"
        )
        if bad:
            text += ": " + ", ".join(r.name for r in bad)
        if missing := sum(r.verdict == MISSING for r in rows):
            text += f", {missing} missing"
        return text

    def format(self) -> str:
        """The lecture-style table: a title, each section's header and rows, the summary."""
        lines = [
            f"jaxninja check: {self.dtype}, n_hidden={self.n_hidden}, "
            f"batch of {self.batch_size} from the training split, seed {self.seed}, "
            f"{'jit-compiled' if self.jitted else 'eager'}"
        ]
        if self.origin != BUILTIN:
            lines.append(f"grading {self.origin}")
        for title, rows in self.rows.items():
            lines += ["", title]
            for row in rows:
                lines.append(row.row())
                if row.verdict == WRONG:
                    lines.append(f"    {row.advice()}")
        return "\n".join([*lines, "", self.summary()])


def training_batch(data: Any, seed: int, batch_size: int) -> tuple[int, np.ndarray, np.ndarray]:
    """``batch_size`` training examples drawn with replacement.

    Args:
        data: the word list (``None``: the default, see
            ``jaxninja.lecture.data.resolve_data_path``).
        seed: numpy's seed for the draw.
        batch_size: how many examples.

    Returns:
        ``(vocab_size, X, Y)``, ``X (batch_size, 3)`` and ``Y (batch_size,)`` int32.

    Examples:
        >>> vocab_size, X, Y = training_batch(None, seed=0, batch_size=4)
        >>> vocab_size, X.shape, Y.shape, str(X.dtype)
        (27, (4, 3), (4,), 'int32')
    """
    splits = load_splits(data)
    Xtr, Ytr = splits.data["train"]
    ix = np.random.default_rng(seed).integers(0, len(Ytr), size=batch_size)
    return splits.vocab.size, Xtr[ix], Ytr[ix]


def _call(solution: Solution, name: str, *args: Any) -> Any:
    """``solution.functions[name](*args)``, jit-compiled where it can be (as the package's
    are, so that a copy of them gets the same table), else eagerly; a learner's exception
    becomes a ``CheckError`` naming their line."""
    fn = solution.functions[name]
    if solution.origin == BUILTIN:
        return jax.jit(fn)(*args)
    try:
        return jax.jit(fn)(*args)
    except Exception:  # blanks (...) in the result or Python control flow: run it eagerly
        pass
    try:
        return fn(*args)
    except Exception as e:
        where = _location(e, solution.origin)
        raise CheckError(f"{where}: {name} raised {_first_line(e)}") from None


def _mapping(solution: Solution, name: str, value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CheckError(
            f"{solution.origin}: {name} returned a {type(value).__name__}, expected {what}"
        )
    return value


def _grade_all(
    solution: Solution, params: model.Params, X: jax.Array, Y: jax.Array
) -> dict[str, tuple[Grade, ...]]:
    """Every row: each function of ``solution`` against ``jax.grad``; absent ones missing."""
    have = solution.functions
    acts = jax.jit(ninja.forward_atomized)(params, X, Y)
    ref = jax.jit(ninja.reference_grads)(params, X, Y)
    auto = _autodiff(params, X, Y)
    ex1: Mapping[str, Any] = {}
    if "backward_atomized" in have:
        out = _call(solution, "backward_atomized", params, acts, X, Y)
        ex1 = _mapping(solution, "backward_atomized", out, "a dict of the 26 gradients")
    dlogits = dhprebn = None
    if "cross_entropy_backward" in have:
        dlogits = _call(solution, "cross_entropy_backward", acts["logits"], Y)
    if "batch_norm_backward" in have:
        bn_args = (ref["hpreact"], params["bngain"], acts["bnvar_inv"], acts["bnraw"])
        dhprebn = _call(solution, "batch_norm_backward", *bn_args)
    ex4: Mapping[str, Any] = {}
    if "manual_grads" in have:
        out = _call(solution, "manual_grads", params, X, Y)
        pair = out if isinstance(out, tuple) and len(out) == 2 else (None, out)
        ex4 = _mapping(solution, "manual_grads", pair[1], "(loss, {parameter: gradient})")
    return {
        SECTION_EX1: tuple(grade(g, ex1.get(g), ref[g]) for g in ninja.GRADIENTS),
        SECTION_FUSED: (
            grade("logits (fused)", dlogits, ref["logits"]),
            grade("hprebn (fused)", dhprebn, ref["hprebn"]),
        ),
        SECTION_EX4: tuple(grade(k, ex4.get(k), auto[k]) for k in model.PARAM_NAMES),
    }


def run_check(
    dtype: Any = "float32",
    n_hidden: int = 64,
    seed: int = 42,
    batch_size: int = 32,
    data: str | os.PathLike[str] | None = None,
    solution: Solution | None = None,
) -> CheckReport:
    """Compare every hand-written gradient with ``jax.grad`` on one training batch.

    Args:
        dtype: ``"float32"`` or ``"float64"`` (turns on ``jax_enable_x64`` for this call).
        n_hidden: hidden units, ``1..MAX_HIDDEN`` (a bound on time and memory).
        seed: seeds the parameters and the batch, ``0..jaxninja.limits.INT32_MAX``.
        batch_size: rows drawn with replacement, at least 2 (Bessel's correction).
        data: the word list (default: see ``jaxninja.lecture.data.resolve_data_path``).
        solution: the functions to grade (default: the package's own, all four).

    Returns:
        A ``CheckReport``; ``print(report.format())`` is ``jaxninja check``'s table.

    Raises:
        ValueError: a bad ``dtype``.
        ConfigError: a number of the wrong kind or out of range, naming it.
        CheckError: a solution's function raised, or returned another structure.

    Examples:
        On a made-up word list:

        >>> import tempfile, pathlib
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = pathlib.Path(tmp, "names.txt")
        ...     words = ["emma", "olivia", "ava", "isabella", "sophia"] * 20
        ...     _ = path.write_text("\\n".join(words))
        ...     report = run_check("float64", n_hidden=16, data=path)
        >>> report.ok, report.n_exact >= 11, [len(rows) for rows in report.rows.values()]
        (True, True, [26, 2, 7])
    """
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in ninja.TOLERANCES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    check_int("n_hidden", n_hidden, 1, MAX_HIDDEN)
    check_int("seed", seed, 0)
    check_int("batch_size", batch_size, 2, why=" (Bessel's correction)")
    solution = solution or Solution({f: getattr(ninja, f) for f in FUNCTIONS})
    vocab_size, Xn, Yn = training_batch(data, seed, batch_size)
    with jax.enable_x64(name == "float64"):
        X, Y = jnp.asarray(Xn), jnp.asarray(Yn)
        # eager: exactly model.init_params' parameters (jit may round the scaling otherwise)
        params = model.init_params(
            jax.random.key(seed), vocab_size, n_hidden=n_hidden, dtype=jnp.dtype(name)
        )
        rows = _grade_all(solution, params, X, Y)
    tolerance = ninja.TOLERANCES[name]
    return CheckReport(name, n_hidden, seed, batch_size, tolerance, rows, solution.origin)
