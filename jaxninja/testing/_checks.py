"""Checks for hand-written VJPs, yours and ours: against autodiff of a plain ``jnp`` reference
(``assert_vjp_matches``) or central differences (``check_finite_differences``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import test_util as jtu

__all__ = ["assert_vjp_matches", "check_finite_differences", "default_tolerances"]

_TOLERANCES = {  # (atol, rtol): a right rule passes comfortably, a wrong one fails by far
    np.dtype(np.float64): (1e-12, 1e-10),
    np.dtype(np.float32): (1e-5, 1e-4),
    np.dtype(np.float16): (1e-2, 1e-2),
    np.dtype(jnp.bfloat16): (5e-2, 5e-2),
}


def default_tolerances(dtype: Any) -> tuple[float, float]:
    """Default ``(atol, rtol)`` for a floating ``dtype`` (complex: its parts'; fp8: 0.1).

    Examples:
      >>> default_tolerances(jnp.float64), default_tolerances(jnp.float32)
      ((1e-12, 1e-10), (1e-05, 0.0001))
    """
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"no default tolerance for non-floating dtype {np.dtype(dtype)}")
    return _TOLERANCES.get(jnp.finfo(dtype).dtype, (1e-1, 1e-1))  # finfo: a complex's parts


def _label(fn: Callable[..., Any], i: int) -> str:
    """``argument 1 'labels'`` (the name when ``fn``'s signature says it)."""
    try:
        param = list(inspect.signature(fn).parameters.values())[i]
    except (TypeError, ValueError, IndexError):
        return f"argument {i}"
    named = param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
    return f"argument {i}" + (f" '{param.name}'" if named else "")


def _at(path: tuple) -> str:
    return f" at path {jax.tree_util.keystr(path)}" if path else ""


def _argnums(argnums: Sequence[int] | int | None, args: tuple, who: str, fn: Callable) -> tuple:
    """Normalised ``argnums`` (``None``: all); ``TypeError`` for a ``None``/integer argument."""
    argnums = tuple(range(len(args))) if argnums is None else argnums
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not nums or not all(isinstance(i, int) and -len(args) <= i < len(args) for i in nums):
        raise ValueError(f"argnums={argnums} is out of range for {len(args)} positional args")
    nums = tuple(i % len(args) for i in nums)
    if len(set(nums)) != len(nums):
        raise ValueError(f"argnums={argnums} repeats an argument")
    for i in nums:
        what, leaves = f"{who} {_label(fn, i)}", jax.tree.leaves_with_path(args[i])
        if not leaves:
            raise TypeError(f"{what}, which holds no array ({args[i]!r:.40})")
        for path, leaf in leaves:
            if not jnp.issubdtype(dtype := jnp.result_type(leaf), jnp.inexact):
                raise TypeError(f"{what}{_at(path)} of dtype {dtype}: leave it out of argnums=")
    return nums


def _partial(fn: Callable[..., Any], args: tuple, nums: tuple[int, ...]) -> Callable[..., Any]:
    """``fn`` of the arguments ``nums``, the others fixed to ``args``."""
    return lambda *xs: fn(*(dict(zip(nums, xs, strict=True)).get(i, a) for i, a in enumerate(args)))


def _assert_close(
    tree_f: Any, tree_r: Any, atol, rtol, what: str, suffix: str = "", scale_atol: bool = False
) -> float:
    """Max abs difference of two pytrees whose leaves pass ``isclose`` (integers: equal;
    float0: skipped). ``scale_atol``: ``atol`` times the largest finite ``|b|`` of the leaf
    (at least 1), for values whose rounding grows with the inputs' magnitude."""
    maxdiff = 0.0
    leaves_r = jax.tree.leaves(tree_r)
    for (path, a), b in zip(jax.tree.leaves_with_path(tree_f), leaves_r, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        where = f"{what}{_at(path)} (shape {a.shape}, {a.dtype})"
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AssertionError(f"{where}: reference gives shape {b.shape} {b.dtype}{suffix}")
        if a.dtype == jax.dtypes.float0:  # an integer input's (symbolic zero) cotangent
            continue
        at, rt = default_tolerances(a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else (0, 0)
        if jnp.issubdtype(a.dtype, jnp.inexact):  # integers must be equal
            at, rt = at if atol is None else atol, rt if rtol is None else rtol
            if scale_atol:
                finite = np.abs(b[np.isfinite(b)]).astype(np.float64)
                at = at * max(1.0, float(finite.max(initial=0.0)))
        aw, bw = (x.astype(np.complex128 if np.iscomplexobj(a) else np.float64) for x in (a, b))
        ok = np.isclose(aw, bw, rtol=rt, atol=at, equal_nan=True)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(aw - bw)  # NaN where both are NaN or the same inf (ok), else a miss
        diff = np.where(np.isnan(diff), np.where(ok, 0.0, np.inf), diff)
        if not ok.all():
            idx = tuple(map(int, np.unravel_index(np.argmax(np.where(ok, -1, diff)), a.shape)))
            raise AssertionError(
                f"{where}: {(~ok).sum()} of {a.size} elements differ beyond atol={at:g}, "
                f"rtol={rt:g}\n  max abs diff {diff.max():.4g}; worst element at index {idx}: "
                f"f gives {aw[idx]:.10g}, reference gives {bw[idx]:.10g}{suffix}"
            )
        maxdiff = max(maxdiff, float(diff.max(initial=0.0)))
    return maxdiff


def _avals(tree: Any) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(jnp.shape(x), jnp.result_type(x)) for x in leaves]


def _standard_normal(out: Any, seed: int) -> Any:
    """Standard normal cotangents shaped like ``out``; an integer output takes a float0
    (a symbolic zero). All ones could hide a wrong rule."""
    leaves, treedef = jax.tree.flatten(out)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    cts = [
        jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
        else np.zeros(jnp.shape(x), jax.dtypes.float0)
        for k, x in zip(keys, leaves, strict=False)
    ]
    return jax.tree.unflatten(treedef, cts)


def _vjp_body(f: Callable[..., Any], reference: Callable[..., Any], seed: int) -> Callable:
    """``run(primals, ct) -> (out_f, out_r, vjp_f(ct), vjp_r(ct))``, not jitted (callers
    jit it alone or with others). ``ct=None``: standard normal from ``seed``. The VJPs are
    ``None`` when the outputs' shapes or dtypes differ (the caller reports it)."""

    def run(primals: list[Any], ct: Any) -> tuple[Any, Any, Any, Any]:
        (out_f, vjp_f), (out_r, vjp_r) = jax.vjp(f, *primals), jax.vjp(reference, *primals)
        if _avals(out_f) != _avals(out_r):
            return out_f, out_r, None, None
        ct = _standard_normal(out_f, seed) if ct is None else ct
        return out_f, out_r, vjp_f(ct), vjp_r(ct)

    return run


def _vjp_runner(f: Callable[..., Any], reference: Callable[..., Any], seed: int) -> Callable:
    """``_vjp_body`` jitted: one compilation for both functions and both VJPs, reused
    for any primals of the same shapes and dtypes."""
    return jax.jit(_vjp_body(f, reference, seed))


def assert_vjp_matches(
    f: Callable[..., Any],
    reference: Callable[..., Any],
    *args: Any,
    argnums: int | Sequence[int] = 0,
    atol: float | None = None,
    rtol: float | None = None,
    cotangent: Any = None,
    seed: int = 0,
) -> float:
    r"""Assert that ``f``'s VJP equals autodiff's VJP of ``reference``, at ``args``.

    The outputs, then :math:`v^\top \partial f/\partial x_i` for each ``i`` in ``argnums``
    (:math:`v`: ``cotangent``, else standard normal from ``seed``, as all ones can hide a
    wrong rule) must match leaf by leaf, ``|a - b| <= atol + rtol * |b|`` (numpy's
    ``isclose``; ``default_tolerances`` if ``None``). Returns the max abs difference:

    Examples:
      >>> @jax.custom_vjp
      ... def softplus(x):
      ...     return jnp.logaddexp(x, 0.0)
      >>> softplus.defvjp(lambda x: (softplus(x), x), lambda x, g: (2 * g * jax.nn.sigmoid(x),))
      >>> assert_vjp_matches(softplus, lambda x: jnp.logaddexp(x, 0.0), jnp.linspace(-3.0, 3.0, 7))
      Traceback (most recent call last):
      AssertionError: VJP of f=softplus does not match autodiff of reference=<lambda>
        for argument 0 'x' (shape (7,), float32): 7 of 7 elements differ beyond ...
        max abs diff 0.6896; worst element at index (6,): f gives 1.379..., reference gives 0.689...
        (cotangent: standard normal, seed=0)
    """
    nums = _argnums(argnums, args, "assert_vjp_matches differentiates", f)
    f_part, ref_part = _partial(f, args, nums), _partial(reference, args, nums)
    f_name, ref_name = (getattr(g, "__name__", type(g).__name__) for g in (f, reference))
    run = _vjp_runner(f_part, ref_part, seed)
    out_f, out_r, grads_f, grads_r = run([args[i] for i in nums], cotangent)
    names = f"f={f_name} and reference={ref_name}"
    if (tree_f := _avals(out_f)[0]) != (tree_r := _avals(out_r)[0]):
        raise AssertionError(f"{names} return different output structures: {tree_f}, {tree_r}")
    _assert_close(out_f, out_r, atol, rtol, f"outputs of {names} differ\n  in the output")
    header = f"VJP of f={f_name} does not match autodiff of reference={ref_name}\n  for "
    ct = f"standard normal, seed={seed}" if cotangent is None else "given"
    return max(
        _assert_close(g_f, g_r, atol, rtol, header + _label(f, i), f"\n  (cotangent: {ct})")
        for g_f, g_r, i in zip(grads_f, grads_r, nums, strict=True)
    )


def check_finite_differences(
    f: Callable[..., Any],
    *args: Any,
    order: int = 1,
    eps: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    argnums: int | Sequence[int] | None = None,
) -> None:
    r"""Check ``f``'s reverse-mode derivatives against central finite differences.

    ``jax.test_util.check_grads``, reverse mode: :math:`\langle v, (f(x + \epsilon u) -
    f(x - \epsilon u)) / 2\epsilon\rangle \approx \langle \mathrm{vjp}_f(v), u\rangle` for
    random :math:`u, v` (``order=2``: the VJP's too). Use float64; ``argnums=None``: all.

    Examples:
      >>> from jaxninja.ops import cross_entropy
      >>> with jax.enable_x64(True):
      ...     logits = jax.random.normal(jax.random.key(0), (8, 5), jnp.float64)
      ...     check_finite_differences(cross_entropy, logits, jnp.arange(8) % 5, argnums=0, order=2)
    """
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive int (1 or 2), got {order!r}")
    nums = _argnums(argnums, args, "check_finite_differences perturbs", f)
    g = jax.jit(_partial(f, args, nums))  # check_grads evaluates f many times
    try:
        jtu.check_grads(g, tuple(args[i] for i in nums), order, ["rev"], atol, rtol, eps)
    except AssertionError as e:
        raise AssertionError(
            f"finite-difference check of {getattr(f, '__name__', type(f).__name__)}'s reverse-mode"
            f" derivatives (order={order}, argnums={nums}, eps={eps or 1e-4:g}) failed ('VJP' is"
            f" order 1, 'VJP of VJP' order 2; recheck float32 in float64):\n{e}"
        ) from e
