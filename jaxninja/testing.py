r"""Test helpers for hand-written VJPs: yours and ours.

Two checks, from strongest to weakest assumption:

* :func:`assert_vjp_matches` compares the VJP of ``f`` (typically a
  :func:`jax.custom_vjp` with a hand-written backward rule) with the VJP that autodiff
  derives for a plain ``jnp`` *reference* implementation of the same function. For a
  random cotangent :math:`v` (one per output, normal, fixed seed) it checks

  .. math::
      f(x) = \mathrm{ref}(x) \quad\text{and}\quad
      v^\top \frac{\partial f}{\partial x} = v^\top \frac{\partial\,\mathrm{ref}}{\partial x}

  element by element, for every differentiated argument and every leaf of its pytree.
  This is the lecture's check ("exact / approx / maxdiff" against PyTorch's autograd),
  and it catches any wrong factor, sign, transpose or missing term.

* :func:`check_finite_differences` needs no reference: it wraps
  :func:`jax.test_util.check_grads` in reverse mode only, comparing
  :math:`\langle v, J u\rangle` (``J u`` by central differences) with
  :math:`\langle J^\top v, u\rangle` (your VJP) in one random direction, up to second
  order (reverse-over-reverse).

Both work on any floating dtype; float64 (``with jax.enable_x64(True):``) gives the
tightest, most meaningful checks.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import test_util as jtu

__all__ = ["assert_vjp_matches", "check_finite_differences", "default_tolerances"]

ArgNums = int | Sequence[int]

# (atol, rtol) by dtype; chosen so that a correct fused rule passes comfortably while a
# wrong factor, sign or missing term fails by orders of magnitude.
_TOLERANCES: dict[Any, tuple[float, float]] = {
    np.dtype(np.float64): (1e-12, 1e-10),
    np.dtype(np.complex128): (1e-12, 1e-10),
    np.dtype(np.float32): (1e-5, 1e-4),
    np.dtype(np.complex64): (1e-5, 1e-4),
    np.dtype(np.float16): (1e-2, 1e-2),
    np.dtype(jnp.bfloat16): (5e-2, 5e-2),
}


def default_tolerances(dtype: Any) -> tuple[float, float]:
    """Default ``(atol, rtol)`` of :func:`assert_vjp_matches` for a floating ``dtype``.

    >>> import jax.numpy as jnp
    >>> default_tolerances(jnp.float64), default_tolerances(jnp.float32)
    ((1e-12, 1e-10), (1e-05, 0.0001))
    """
    dt = np.dtype(dtype)
    if dt in _TOLERANCES:
        return _TOLERANCES[dt]
    if jnp.issubdtype(dt, jnp.inexact):  # fp8 and other narrow formats
        return (1e-1, 1e-1)
    raise TypeError(f"no default tolerance for non-floating dtype {dt}")


# ------------------------------------------------------------------------- helpers


def _normalize_argnums(argnums: ArgNums, nargs: int) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not nums:
        raise ValueError("argnums must name at least one argument")
    out = []
    for i in nums:
        if not isinstance(i, int) or not -nargs <= i < nargs:
            raise ValueError(f"argnums={argnums} is out of range for {nargs} positional args")
        out.append(i % nargs)
    if len(set(out)) != len(out):
        raise ValueError(f"argnums={argnums} repeats an argument")
    return tuple(out)


def _arg_names(fns: Sequence[Callable[..., Any]], nargs: int) -> list[str | None]:
    """Positional parameter names of the first of ``fns`` whose signature can be read."""
    for fn in fns:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            continue
        names: list[str | None] = []
        for p in params:
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.append(p.name)
            elif p.kind is p.VAR_POSITIONAL:
                names.extend([None] * (nargs - len(names)))
                break
        names.extend([None] * (nargs - len(names)))
        return names[:nargs]
    return [None] * nargs


def _fn_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def _partial_positional(
    fn: Callable[..., Any], args: tuple[Any, ...], nums: tuple[int, ...]
) -> Callable[..., Any]:
    def g(*diff_args: Any) -> Any:
        full = list(args)
        for i, a in zip(nums, diff_args, strict=True):
            full[i] = a
        return fn(*full)

    return g


def _is_float0(x: Any) -> bool:
    return getattr(x, "dtype", None) == jax.dtypes.float0


def _fmt(v: Any) -> str:
    return f"{complex(v):.6g}" if np.iscomplexobj(v) else f"{float(v):.10g}"


def _compare_leaf(a: Any, b: Any, atol: float | None, rtol: float | None) -> dict[str, Any] | None:
    """``None`` if ``a`` (f's) matches ``b`` (reference's), else a description of how not."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return {"kind": "shape", "detail": f"shape {a.shape} vs reference shape {b.shape}"}
    if a.dtype != b.dtype:
        return {"kind": "dtype", "detail": f"dtype {a.dtype} vs reference dtype {b.dtype}"}
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        if np.array_equal(a, b):
            return None
        bad = a != b
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        return {
            "kind": "values",
            "n_bad": int(bad.sum()),
            "size": a.size,
            "max_abs_diff": float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))),
            "index": idx,
            "f": a[idx],
            "ref": b[idx],
            "atol": 0.0,
            "rtol": 0.0,
        }
    d_atol, d_rtol = default_tolerances(a.dtype)
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    wide = np.complex128 if np.iscomplexobj(a) else np.float64
    aw, bw = a.astype(wide), b.astype(wide)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(aw - bw)
        same = (aw == bw) | (np.isnan(aw) & np.isnan(bw))  # equal infs, NaN in both
        diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))
        tol = atol + rtol * np.where(np.isfinite(bw), np.abs(bw), 0.0)
        bad = diff > tol
    if not bad.any():
        return None
    # The worst element: the one that exceeds its tolerance by the largest factor.
    ratio = np.where(bad, diff / np.maximum(tol, np.finfo(np.float64).tiny), -1.0)
    flat = int(np.argmax(ratio))
    idx = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    return {
        "kind": "values",
        "n_bad": int(bad.sum()),
        "size": a.size,
        "max_abs_diff": float(np.max(diff)),
        "index": idx,
        "f": a[idx],
        "ref": b[idx],
        "atol": atol,
        "rtol": rtol,
    }


def _describe(what: str, info: dict[str, Any]) -> str:
    if info["kind"] != "values":
        return f"{what}: f gives {info['detail']}"
    return (
        f"{what}: {info['n_bad']} of {info['size']} elements differ beyond "
        f"atol={info['atol']:g}, rtol={info['rtol']:g}\n"
        f"  max abs diff {info['max_abs_diff']:.4g}; worst element at index {info['index']}: "
        f"f gives {_fmt(info['f'])}, reference gives {_fmt(info['ref'])}"
    )


def _leaf_max_diff(a: Any, b: Any) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.size == 0 or not jnp.issubdtype(a.dtype, jnp.inexact):
        return 0.0
    wide = np.complex128 if np.iscomplexobj(a) else np.float64
    with np.errstate(invalid="ignore"):
        d = np.abs(a.astype(wide) - b.astype(wide))
    d = d[~np.isnan(d)]
    return float(d.max()) if d.size else 0.0


def _same_avals(a: Any, b: Any) -> bool:
    """Same pytree structure, shapes and dtypes."""
    la, ta_ = jax.tree_util.tree_flatten(a)
    lb, tb_ = jax.tree_util.tree_flatten(b)
    ta: Any = ta_  # PyTreeDef's stubs declare no __eq__
    tb: Any = tb_
    return bool(ta == tb) and all(
        jnp.shape(x) == jnp.shape(y) and jnp.result_type(x) == jnp.result_type(y)
        for x, y in zip(la, lb, strict=True)
    )


def _random_cotangent(out: Any, seed: int) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(out)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    cts: list[Any] = []
    for k, leaf in zip(keys, leaves, strict=False):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            cts.append(jax.random.normal(k, leaf.shape, leaf.dtype))
        else:  # integer / bool outputs take a float0 (symbolic zero) cotangent
            cts.append(np.zeros(leaf.shape, dtype=jax.dtypes.float0))
    return jax.tree_util.tree_unflatten(treedef, cts)


# ------------------------------------------------------------------------- public API


def assert_vjp_matches(
    f: Callable[..., Any],
    reference: Callable[..., Any],
    *args: Any,
    argnums: ArgNums = 0,
    atol: float | None = None,
    rtol: float | None = None,
    cotangent: Any = None,
    seed: int = 0,
) -> float:
    r"""Assert that ``f``'s VJP equals autodiff's VJP of ``reference``, at ``args``.

    ``f`` is usually a :func:`jax.custom_vjp` with a hand-written backward rule and
    ``reference`` the same function in plain ``jnp`` ops, which ``jax.vjp`` differentiates
    by autodiff. Both are called as ``fn(*args)`` and must return the same pytree of
    arrays (same structure, shapes, dtypes, and values within tolerance). Then, for the
    cotangent :math:`v` (a pytree shaped like the output),

    .. math::
        \bar x_i = v^\top \frac{\partial f}{\partial x_i}
        \quad\text{vs}\quad
        v^\top \frac{\partial\,\mathrm{reference}}{\partial x_i}
        \qquad \text{for } i \in \text{argnums},

    each ``args[i]`` may be a pytree (e.g. a params dict); its cotangent has the same
    structure and every leaf is compared. Each comparison passes where
    ``|a - b| <= atol + rtol * |b|`` (``b`` the reference's), NaN matching NaN.

    Args:
      f: the function under test, e.g. a ``jax.custom_vjp``.
      reference: the autodiff baseline with the same signature.
      *args: positional arguments for both. Close over keyword arguments
        (``lambda z: cross_entropy(z, labels, axis=0)``).
      argnums: int or tuple of ints, the positional arguments to differentiate
        (floating-point; an integer argument's float0 cotangent is not compared).
      atol, rtol: tolerances for every leaf; ``None`` takes the default of the leaf's
        dtype (:func:`default_tolerances`: float64 ``(1e-12, 1e-10)``, float32
        ``(1e-5, 1e-4)``, float16 ``(1e-2, 1e-2)``, bfloat16 ``(5e-2, 5e-2)``).
      cotangent: the cotangent :math:`v`, a pytree like the output. ``None`` draws one
        from a standard normal, keyed by ``seed``, in each output leaf's dtype: a random
        ``v`` exercises every output element (an all-ones ``v`` can hide a wrong rule,
        e.g. a missing term that sums to zero).
      seed: the seed of the random cotangent.

    Returns:
      The largest absolute difference over all compared VJP leaves (a float, handy for
      a report like the lecture's ``maxdiff``).

    Raises:
      AssertionError: naming what differs: the outputs (and where in their pytree) or
        the argument (index, parameter name, pytree path), with the number of
        mismatched elements, the max abs difference, the worst element's index and
        both values.

    Example: a softplus with a hand-written VJP, right and wrong.

      >>> import jax, jax.numpy as jnp
      >>> @jax.custom_vjp
      ... def softplus(x):
      ...     return jnp.logaddexp(x, 0.0)
      >>> softplus.defvjp(lambda x: (softplus(x), x),
      ...                 lambda x, g: (g * jax.nn.sigmoid(x),))
      >>> x = jnp.linspace(-3.0, 3.0, 7)
      >>> assert_vjp_matches(softplus, lambda x: jnp.logaddexp(x, 0.0), x) < 1e-6
      True
      >>> @jax.custom_vjp
      ... def softplus_bad(x):
      ...     return jnp.logaddexp(x, 0.0)
      >>> softplus_bad.defvjp(lambda x: (softplus_bad(x), x),
      ...                     lambda x, g: (2 * g * jax.nn.sigmoid(x),))
      >>> assert_vjp_matches(softplus_bad, lambda x: jnp.logaddexp(x, 0.0), x)
      ... # doctest: +ELLIPSIS
      Traceback (most recent call last):
        ...
      AssertionError: VJP of f=softplus_bad does not match autodiff of reference=<lambda>
        for argument 0 'x' (shape (7,), float32): 7 of 7 elements differ beyond ...
        max abs diff 0.6896; worst element at index (6,): f gives 1.379..., reference gives 0.689...
        (cotangent: standard normal, seed=0)

    Several arguments and pytrees (float64 for the tightest tolerance):

      >>> from jaxninja.ops import batch_norm, batch_norm_reference
      >>> with jax.enable_x64(True):
      ...     kx, kg = jax.random.split(jax.random.key(0))
      ...     x = jax.random.normal(kx, (32, 4), jnp.float64)
      ...     gain = 1.0 + 0.1 * jax.random.normal(kg, (1, 4), jnp.float64)
      ...     bias = jnp.zeros((1, 4), jnp.float64)
      ...     maxdiff = assert_vjp_matches(batch_norm, batch_norm_reference,
      ...                                  x, gain, bias, argnums=(0, 1, 2))
      >>> maxdiff < 1e-12
      True
    """
    args = tuple(args)
    if not args:
        raise ValueError("assert_vjp_matches needs at least one positional argument")
    nums = _normalize_argnums(argnums, len(args))
    f_name, ref_name = _fn_name(f), _fn_name(reference)
    header = f"VJP of f={f_name} does not match autodiff of reference={ref_name}"

    primals = [args[i] for i in nums]
    f_part = _partial_positional(f, args, nums)
    ref_part = _partial_positional(reference, args, nums)

    def run(primals: list[Any], ct: Any) -> tuple[Any, Any, Any, Any]:
        out_f, vjp_f = jax.vjp(f_part, *primals)
        out_r, vjp_r = jax.vjp(ref_part, *primals)
        if not _same_avals(out_f, out_r):  # reported below, from the values
            return out_f, out_r, None, None
        if ct is None:
            ct = _random_cotangent(out_f, seed)
        return out_f, out_r, vjp_f(ct), vjp_r(ct)

    # One compilation for both passes of both functions, rather than op-by-op dispatch.
    out_f, out_r, grads_f, grads_r = jax.jit(run)(primals, cotangent)

    # 1. The outputs.
    out_f_leaves, tree_f_ = jax.tree_util.tree_flatten_with_path(out_f)
    out_r_leaves, tree_r_ = jax.tree_util.tree_flatten(out_r)
    tree_f: Any = tree_f_  # PyTreeDef's stubs declare no __eq__
    tree_r: Any = tree_r_
    if tree_f != tree_r:
        raise AssertionError(
            f"f={f_name} and reference={ref_name} return different output structures:\n"
            f"  f: {tree_f}\n  reference: {tree_r}"
        )
    for (path, a), b in zip(out_f_leaves, out_r_leaves, strict=True):
        info = _compare_leaf(a, b, atol, rtol)
        if info is not None:
            where = f"output {jax.tree_util.keystr(path)}" if path else "output"
            raise AssertionError(
                _describe(
                    f"outputs of f={f_name} and reference={ref_name} differ\n"
                    f"  in {where} (shape {np.shape(a)}, {np.asarray(a).dtype})",
                    info,
                )
            )

    # 2. The VJPs, for the same cotangent.
    ct_desc = f"standard normal, seed={seed}" if cotangent is None else "given"

    names = _arg_names((f, reference), len(args))
    maxdiff = 0.0
    for k, i in enumerate(nums):
        label = f"argument {i}" + (f" '{names[i]}'" if names[i] else "")
        leaves_f, _ = jax.tree_util.tree_flatten_with_path(grads_f[k])
        leaves_r = jax.tree_util.tree_leaves(grads_r[k])
        for (path, a), b in zip(leaves_f, leaves_r, strict=True):
            if _is_float0(a) or _is_float0(b):
                continue
            info = _compare_leaf(a, b, atol, rtol)
            if info is not None:
                at = f" at path {jax.tree_util.keystr(path)}" if path else ""
                raise AssertionError(
                    _describe(
                        f"{header}\n  for {label}{at} (shape {np.shape(a)}, {np.asarray(a).dtype})",
                        info,
                    )
                    + f"\n  (cotangent: {ct_desc})"
                )
            maxdiff = max(maxdiff, _leaf_max_diff(a, b))
    return maxdiff


def check_finite_differences(
    f: Callable[..., Any],
    *args: Any,
    order: int = 1,
    eps: float | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    argnums: ArgNums | None = None,
) -> None:
    r"""Check ``f``'s reverse-mode derivatives against central finite differences.

    A thin wrapper on :func:`jax.test_util.check_grads` with ``modes=["rev"]``:
    ``custom_vjp`` functions have no forward mode, so ``check_grads``'s default
    ``("fwd", "rev")`` would raise. For a random tangent :math:`u` and cotangent
    :math:`v` (fixed seed) it checks

    .. math::
        \Big\langle v,\; \frac{f(x + \epsilon u) - f(x - \epsilon u)}{2\epsilon}\Big\rangle
        \approx \big\langle \mathrm{vjp}_f(v),\; u \big\rangle

    and, with ``order=2``, the same for the VJP function itself (reverse-over-reverse,
    which our ops support). One random direction makes it cheap for any input size;
    finite differences make it approximate: use float64 (``with jax.enable_x64(True):``)
    for a meaningful check; in float32 the defaults are loose (``atol = rtol = 2e-3``).

    Args:
      f: the function to check, ``f(*args)`` -> pytree of floating arrays.
      *args: positional arguments (floating-point where differentiated).
      order: 1 (gradients) or 2 (also the derivative of the VJP).
      eps: finite-difference step (``check_grads``'s default ``1e-4`` if ``None``).
      atol, rtol: tolerances of the inner-product comparison (``check_grads``'s
        per-dtype defaults if ``None``: float64 ``1e-5``, float32 ``2e-3``).
      argnums: the positional arguments to perturb; ``None`` (default) means all of
        them, so integer arguments such as labels must be named out or closed over.

    Raises:
      AssertionError: if a projection differs, with ``check_grads``'s numbers and which
        order failed.
      TypeError: if a perturbed argument is not floating-point.

    Example:

      >>> import jax, jax.numpy as jnp
      >>> from jaxninja.ops import cross_entropy
      >>> with jax.enable_x64(True):
      ...     logits = jax.random.normal(jax.random.key(0), (8, 5), jnp.float64)
      ...     labels = jnp.arange(8) % 5
      ...     check_finite_differences(cross_entropy, logits, labels, argnums=0, order=2)
    """
    args = tuple(args)
    if not args:
        raise ValueError("check_finite_differences needs at least one positional argument")
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive int (1 or 2), got {order!r}")
    nums = tuple(range(len(args))) if argnums is None else _normalize_argnums(argnums, len(args))
    names = _arg_names((f,), len(args))
    for i in nums:
        for path, leaf in jax.tree_util.tree_flatten_with_path(args[i])[0]:
            dtype = jnp.result_type(leaf)
            if not jnp.issubdtype(dtype, jnp.inexact):
                label = f"argument {i}" + (f" '{names[i]}'" if names[i] else "")
                at = f" at path {jax.tree_util.keystr(path)}" if path else ""
                raise TypeError(
                    f"check_finite_differences perturbs {label}{at}, which has dtype "
                    f"{dtype}; only floating arguments can be differentiated: pass "
                    f"argnums= to leave it fixed, or close over it"
                )
    # jit: check_grads evaluates f and its VJP several times at the same shapes.
    g = jax.jit(_partial_positional(f, args, nums))
    try:
        jtu.check_grads(
            g, tuple(args[i] for i in nums), order, modes=["rev"], atol=atol, rtol=rtol, eps=eps
        )
    except AssertionError as e:
        dtypes = sorted({str(jnp.result_type(x)) for x in jax.tree_util.tree_leaves(args)})
        raise AssertionError(
            f"finite-difference check of {_fn_name(f)}'s reverse-mode derivatives "
            f"(order={order}, argnums={nums}, eps={eps or 1e-4:g}, "
            f"dtypes {dtypes}) failed: its VJP disagrees with central differences of its "
            f"forward pass. 'VJP' is the first-order check, 'VJP of VJP' the second "
            f"(reverse-over-reverse); in float32 finite differences are noisy, so recheck "
            f"in float64 before blaming the rule.\n{e}"
        ) from e
