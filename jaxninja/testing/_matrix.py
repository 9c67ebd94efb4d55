"""check_vjp: one VJP comparison (``assert_vjp_matches``'s) run in every setting where a
hand-written VJP breaks; the settings are documented in docs/testing.md."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxninja.testing._checks import (
    _assert_close,
    _at,
    _avals,
    _label,
    _standard_normal,
    _vjp_body,
    default_tolerances,
)

__all__ = ["SETTINGS", "VJPMismatch", "VJPReport", "check_vjp"]

# name -> what it does (the failure message quotes it). Order: cheapest first.
_DESCRIPTIONS = {
    "all_args": "VJP of every floating argument, integer arguments closed over",
    "primal": "f(*args) itself, outside any transformation, against reference(*args)",
    "scaled": "inputs scaled by 0, +scale and -scale",
    "two_calls": "two calls of f with different inputs in one trace",
    "each_output": "each output differentiated alone, the others unused",
    "one_row": "a batch of one row (leading axis sliced to 1)",
    "keywords": "each of keyword_variants on both functions",
    "low_precision": "bfloat16 and float16 inputs: dtypes kept, values to the dtype's tolerance",
    "second_order": "the VJP of the VJP, in float64",
    "jit": "f under its own jax.jit, differentiated eagerly at two inputs",
    "vmap": "jax.vmap over a new leading axis of size 2 on every array",
    "checkpoint": "jax.checkpoint around f",
    "scan": "lax.scan over a new leading axis of size 2 on every array",
    "shard_map": "jax.shard_map with axis_name=, check_vma True and False",
}
SETTINGS: tuple[str, ...] = tuple(_DESCRIPTIONS)
_LOW_DTYPES = (jnp.bfloat16, jnp.float16)


class VJPReport(NamedTuple):
    """What ``check_vjp`` checked: ``checked`` settings (in order), ``not_applicable``
    (setting -> why it was not run) and ``max_abs_diff`` (setting -> the largest
    difference it saw, outputs and VJPs together)."""

    checked: tuple[str, ...]
    not_applicable: dict[str, str]
    max_abs_diff: dict[str, float]


class VJPMismatch(AssertionError):
    """A setting where ``f`` differs from the reference (or raises where it does not)."""


VJPMismatch.__module__ = "jaxninja.testing"  # its public name, in tracebacks and doctests


class _NotApplicable(Exception):
    """A setting that does not apply to this function (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class _Call:
    """A validated ``check_vjp`` call."""

    f: Callable[..., Any]
    reference: Callable[..., Any]
    args: tuple[Any, ...]
    argnums: tuple[int, ...]
    keyword_variants: tuple[dict[str, Any], ...]
    shard_specs: Any
    atol: float | None
    rtol: float | None
    seed: int
    scale: float
    names: str  # "f=... vs reference=..."
    # Collect mode (not None): comparisons are traced (errors surface in their setting),
    # kept here, and compiled together afterwards: one compilation for most settings.
    pending: list[_Point] | None = None


class _Flat(NamedTuple):
    """``args`` as leaves: which are arrays, which are differentiated, and their labels."""

    leaves: list[Any]
    treedef: Any
    arrays: tuple[int, ...]  # array leaves (Python scalars stay constants everywhere)
    diff: tuple[int, ...]  # floating array leaves of the arguments in argnums
    labels: list[str]


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def _is_float(x: Any) -> bool:
    return _is_array(x) and jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _flatten(call: _Call, args: tuple[Any, ...]) -> _Flat:
    leaves, labels, owner = [], [], []
    for i, arg in enumerate(args):
        for path, leaf in jax.tree.leaves_with_path(arg):
            leaves.append(leaf)
            labels.append(f"{_label(call.f, i)}{_at(path)}")
            owner.append(i)
    treedef = jax.tree.structure(args)
    arrays = tuple(k for k, x in enumerate(leaves) if _is_array(x))
    diff = tuple(k for k in arrays if _is_float(leaves[k]) and owner[k] in call.argnums)
    return _Flat(leaves, treedef, arrays, diff, labels)


def _with(flat: _Flat, leaves: Mapping[int, Any]) -> _Flat:
    """``flat`` with some leaves replaced (same structure and labels)."""
    new = [leaves.get(k, x) for k, x in enumerate(flat.leaves)]
    return flat._replace(leaves=new)


def _args(flat: _Flat, replaced: Mapping[int, Any]) -> Any:
    return jax.tree.unflatten(flat.treedef, [replaced.get(k, x) for k, x in enumerate(flat.leaves)])


def _leaf_fn(fn: Callable[..., Any], flat: _Flat, kwargs: Mapping[str, Any]) -> Callable:
    """``fn`` as a function of the differentiated leaves, the others closed over."""

    def of_leaves(*xs: Any) -> Any:
        return fn(*_args(flat, dict(zip(flat.diff, xs, strict=True))), **kwargs)

    return of_leaves


def _primals(flat: _Flat) -> list[Any]:
    return [flat.leaves[k] for k in flat.diff]


def _other_point(flat: _Flat) -> _Flat:
    """Different values of the same shapes and domain: floating arrays reversed along every
    axis and scaled by 0.75 (signs kept: a positive input stays positive)."""
    return _with(flat, {k: np.flip(np.asarray(flat.leaves[k])) * 0.75 for k in flat.diff})


def _cast(flat: _Flat, dtype: Any) -> _Flat:
    floats = (k for k in flat.arrays if _is_float(flat.leaves[k]))
    return _with(flat, {k: jnp.asarray(flat.leaves[k], dtype) for k in floats})


def _run_once(fn: Callable[..., Any], *args: Any) -> Any:
    """``jax.jit(fn)(*args)``, XLA's default compilation. (Its LLVM ``-O0`` compiles a third
    faster here but computed a wrong gradient for linear_cross_entropy at logits of 1e6.)"""
    return jax.jit(fn)(*args)


# --------------------------------------------------------------------------- reporting


def _header(call: _Call, setting: str, note: str) -> str:
    return f"check_vjp: {call.names}\n  setting '{setting}' ({_DESCRIPTIONS[setting]}){note}\n  "


def _report(
    call: _Call, head: str, results: tuple, labels: Sequence[str], scale_atol: bool = False
) -> float:
    """Compare ``(out_f, out_r, grads_f, grads_r)``; the max abs difference."""
    out_f, out_r, grads_f, grads_r = results
    if _avals(out_f) != _avals(out_r):
        raise VJPMismatch(
            f"{head}outputs differ in shape or dtype: f gives {_avals(out_f)[1]}, "
            f"reference gives {_avals(out_r)[1]}"
        )
    tol = (call.atol, call.rtol)
    ct = f"\n  (cotangent: standard normal, seed={call.seed})"
    try:
        what = f"{head}outputs differ: the output"
        diffs = [_assert_close(out_f, out_r, *tol, what, "", scale_atol)]
        for g_f, g_r, label in zip(grads_f, grads_r, labels, strict=True):
            diffs.append(
                _assert_close(g_f, g_r, *tol, f"{head}VJP differs for {label}", ct, scale_atol)
            )
    except AssertionError as e:
        raise VJPMismatch(str(e)) from None
    return max(diffs)


class _Point(NamedTuple):
    """One comparison: ``f`` and ``ref`` of the same ``primals``, reported under ``head``."""

    setting: str
    head: str
    f: Callable[..., Any]
    ref: Callable[..., Any]
    primals: list[Any]
    labels: list[str]
    scale_atol: bool = False


def _check(call: _Call, point: _Point) -> float:
    """Run ``point`` now (its max abs difference), or trace and keep it in collect mode."""
    body = _vjp_body(point.f, point.ref, call.seed)
    if call.pending is not None:
        jax.eval_shape(body, point.primals, None)  # a trace error belongs to this setting
        call.pending.append(point)
        return 0.0
    return _report_point(call, point, _run_once(body, point.primals, None))


def _report_point(call: _Call, point: _Point, results: tuple) -> float:
    return _report(call, point.head, results, point.labels, point.scale_atol)


def _compare(
    call: _Call, setting: str, f: Callable, ref: Callable, flat: _Flat, note: str = ""
) -> float:
    labels = [flat.labels[k] for k in flat.diff]
    return _check(
        call, _Point(setting, _header(call, setting, note), f, ref, _primals(flat), labels)
    )


def _natural(
    call: _Call, kwargs: Mapping[str, Any] | None = None
) -> tuple[_Flat, Callable, Callable]:
    flat = _flatten(call, call.args)
    kwargs = kwargs or {}
    return flat, _leaf_fn(call.f, flat, kwargs), _leaf_fn(call.reference, flat, kwargs)


# ---------------------------------------------------------------------------- settings


def _all_args(call: _Call) -> float:
    flat, f, ref = _natural(call)
    return _compare(call, "all_args", f, ref, flat)


def _primal(call: _Call) -> float:
    flat = _flatten(call, call.args)._replace(diff=())  # nothing differentiated: the primal
    f, ref = _leaf_fn(call.f, flat, {}), _leaf_fn(call.reference, flat, {})
    return _compare(call, "primal", f, ref, flat)


def _scaled(call: _Call) -> float:
    flat, f, ref = _natural(call)
    labels = [flat.labels[k] for k in flat.diff]
    diffs = []
    for s in (0.0, call.scale, -call.scale):
        primals = [(np.asarray(x) * s).astype(np.asarray(x).dtype) for x in _primals(flat)]
        head = _header(call, "scaled", f": inputs x {s:g}, atol relative to each leaf's max")
        diffs.append(_check(call, _Point("scaled", head, f, ref, primals, labels, True)))
    return max(diffs)


def _two_calls(call: _Call) -> float:
    flat, f, ref = _natural(call)
    other = _other_point(flat)
    f2, ref2 = _leaf_fn(call.f, other, {}), _leaf_fn(call.reference, other, {})
    k = len(flat.diff)

    def both(g1: Callable, g2: Callable) -> Callable:
        return lambda *xs: (g1(*xs[:k]), g2(*xs[k:]))

    labels = [flat.labels[i] + " (first call)" for i in flat.diff]
    labels += [flat.labels[i] + " (second call)" for i in flat.diff]
    head = _header(call, "two_calls", ": outputs [0], [1]")
    primals = _primals(flat) + _primals(other)
    return _check(call, _Point("two_calls", head, both(f, f2), both(ref, ref2), primals, labels))


def _each_output(call: _Call) -> float:
    flat, f, ref = _natural(call)
    n = len(jax.tree.leaves(jax.eval_shape(ref, *_primals(flat))))
    if n < 2:
        raise _NotApplicable("the reference has one output")

    def each(g: Callable) -> Callable:  # one call per output, the others never used
        return lambda *xs: tuple(jax.tree.leaves(g(*xs))[i] for i in range(n))

    return _compare(call, "each_output", each(f), each(ref), flat, ": output [i] from call i")


def _one_row(call: _Call) -> float:
    flat = _flatten(call, call.args)
    first = flat.leaves[flat.diff[0]]
    if jnp.ndim(first) == 0 or jnp.shape(first)[0] < 2:
        raise _NotApplicable("the first differentiated array has no batch axis of 2 or more")
    n = jnp.shape(first)[0]
    rows = {
        k: flat.leaves[k][:1]
        for k in flat.arrays
        if jnp.ndim(flat.leaves[k]) and jnp.shape(flat.leaves[k])[0] == n
    }
    one = _with(flat, rows)
    note = f": arrays with leading axis {n} sliced to [:1]"
    f, ref = _leaf_fn(call.f, one, {}), _leaf_fn(call.reference, one, {})
    return _compare(call, "one_row", f, ref, one, note)


def _keywords(call: _Call) -> float:
    if not call.keyword_variants:
        raise _NotApplicable("no keyword_variants given")
    diffs = []
    for i, kwargs in enumerate(call.keyword_variants):
        flat, f, ref = _natural(call, kwargs)
        note = f": keyword_variants[{i}] = {{{', '.join(map(repr, kwargs))}}}"
        diffs.append(_compare(call, "keywords", f, ref, flat, note))
    return max(diffs)


def _low_precision(call: _Call) -> float:
    flat = _flatten(call, call.args)
    parts = [_low_precision_part(call, _cast(flat, dtype)) for dtype in _LOW_DTYPES]
    results = _run_once(lambda prims: [p.run(x) for p, x in zip(parts, prims, strict=True)],
                        [p.primals for p in parts])  # fmt: skip
    return max(_low_precision_report(call, p, r) for p, r in zip(parts, results, strict=True))


class _LowPart(NamedTuple):
    dtype: np.dtype
    head: str
    run: Callable[[list[Any]], tuple]
    primals: list[Any]
    labels: list[str]


def _low_precision_part(call: _Call, low: _Flat) -> _LowPart:
    """f on 16-bit inputs against the reference on the same values in float32."""
    dtype = np.dtype(jnp.result_type(low.leaves[low.diff[0]]))
    head = _header(call, "low_precision", f": {dtype} inputs, reference in float32")
    f, ref_low = _leaf_fn(call.f, low, {}), _leaf_fn(call.reference, low, {})
    try:
        want = jax.eval_shape(ref_low, *_primals(low))
    except Exception as e:  # noqa: BLE001 - any failure of the user's reference
        raise _NotApplicable(f"the reference rejects {dtype} inputs: {e}") from e
    if _avals(got := jax.eval_shape(f, *_primals(low))) != _avals(want):
        raise VJPMismatch(f"{head}outputs {_avals(got)[1]}, reference {_avals(want)[1]}")
    ref = _leaf_fn(call.reference, _cast(low, jnp.float32), {})

    def run(primals: list[Any]) -> tuple:
        (out_f, vjp_f), (out_r, vjp_r) = jax.vjp(f, *primals), jax.vjp(ref, *_up(primals))
        ct = _standard_normal(out_f, call.seed)
        return _up(out_f), out_r, vjp_f(ct), vjp_r(_up(ct))

    return _LowPart(dtype, head, run, _primals(low), [low.labels[k] for k in low.diff])


def _low_precision_report(call: _Call, part: _LowPart, results: tuple) -> float:
    out_f, out_r, grads_f, grads_r = results
    for g, x, label in zip(grads_f, part.primals, part.labels, strict=True):
        if _avals(g) != _avals(x):
            raise VJPMismatch(f"{part.head}VJP for {label} is {_avals(g)[1]}, not its input's type")
    tol = default_tolerances(part.dtype)
    call16 = dataclasses.replace(call, atol=tol[0], rtol=tol[1])
    results = (out_f, out_r, _up(grads_f), grads_r)
    return _report(call16, part.head, results, part.labels, scale_atol=True)


def _up(tree: Any) -> Any:
    """16-bit floating leaves as float32 (float0 and others unchanged)."""

    def up(x: Any) -> Any:
        low = _is_float(x) and jnp.finfo(jnp.result_type(x)).bits == 16
        return x.astype(jnp.float32) if low else x

    return jax.tree.map(up, tree)


def _second_order(call: _Call) -> float:
    with jax.enable_x64(True):
        flat = _cast(_flatten(call, call.args), jnp.float64)
        f, ref = _leaf_fn(call.f, flat, {}), _leaf_fn(call.reference, flat, {})
        ct = _numpy_normal(jax.eval_shape(ref, *_primals(flat)), call.seed + 1)

        def vjp_of(g: Callable) -> Callable:  # the first-order VJP, a function of the primals
            return lambda *xs: jax.vjp(g, *xs)[1](ct)

        labels = [flat.labels[k] for k in flat.diff]
        body = _vjp_body(vjp_of(f), vjp_of(ref), call.seed)
        head = _header(call, "second_order", ": outputs are the first-order VJPs")
        return _report(call, head, _run_once(body, _primals(flat), None), labels)


def _numpy_normal(avals: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)

    def draw(a: Any) -> Any:
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return rng.standard_normal(a.shape).astype(a.dtype)
        return np.zeros(a.shape, jax.dtypes.float0)

    return jax.tree.map(draw, avals)


def _jit(call: _Call) -> float:
    flat = _flatten(call, call.args)
    f, ref = jax.jit(_leaf_fn(call.f, flat, {})), jax.jit(_leaf_fn(call.reference, flat, {}))
    labels = [flat.labels[k] for k in flat.diff]
    diffs = []
    for which, point in (("first", flat), ("second", _other_point(flat))):
        primals = _primals(point)
        (out_f, vjp_f), (out_r, vjp_r) = jax.vjp(f, *primals), jax.vjp(ref, *primals)
        ct = _numpy_normal(jax.eval_shape(ref, *primals), call.seed)
        results = (out_f, out_r, vjp_f(ct), vjp_r(ct)) if _avals(out_f) == _avals(out_r) else None
        head = _header(call, "jit", f": {which} input")
        diffs.append(_report(call, head, results or (out_f, out_r, (), ()), labels))
    return max(diffs)


def _stacked(call: _Call, mapper: str) -> float:
    """f mapped (``vmap`` or ``scan``) over a new leading axis: the inputs and their other
    point stacked; integer arrays repeated."""
    flat = _flatten(call, call.args)
    other = _other_point(flat)
    stacked = _with(flat, {k: jnp.stack([flat.leaves[k], other.leaves[k]]) for k in flat.arrays})

    def mapped(fn: Callable) -> Callable:
        def one(arrays: dict[int, Any]) -> Any:
            return fn(*_args(flat, arrays))

        def of_leaves(*xs: Any) -> Any:
            arrays = {k: stacked.leaves[k] for k in flat.arrays} | dict(
                zip(flat.diff, xs, strict=True)
            )
            if mapper == "vmap":
                return jax.vmap(one)(arrays)
            return lax.scan(lambda c, a: (c, one(a)), None, arrays)[1]

        return of_leaves

    note = ": outputs [0] at the inputs, [1] at other values"
    return _compare(call, mapper, mapped(call.f), mapped(call.reference), stacked, note)


def _vmap(call: _Call) -> float:
    return _stacked(call, "vmap")


def _scan(call: _Call) -> float:
    return _stacked(call, "scan")


def _checkpoint(call: _Call) -> float:
    flat, f, ref = _natural(call)
    return _compare(call, "checkpoint", jax.checkpoint(f), ref, flat)


def _shard_map(call: _Call) -> float:
    if call.shard_specs is None:
        raise _NotApplicable("no shard_specs given")
    in_specs, out_specs = call.shard_specs
    name = _mesh_axis(call.shard_specs)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), (name,))
    flat = _flatten(call, call.args)
    ref = _leaf_fn(call.reference, flat, {})
    diffs = []
    for check_vma in (True, False):
        sharded = jax.shard_map(
            lambda *a: call.f(*a, axis_name=name),
            mesh=mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            check_vma=check_vma,
        )
        note = f": {mesh.size} devices, check_vma={check_vma}"
        diffs.append(_compare(call, "shard_map", _leaf_fn(sharded, flat, {}), ref, flat, note))
    return max(diffs)


_RUNNERS: dict[str, Callable[[_Call], float]] = {
    "all_args": _all_args,
    "primal": _primal,
    "scaled": _scaled,
    "two_calls": _two_calls,
    "each_output": _each_output,
    "one_row": _one_row,
    "keywords": _keywords,
    "low_precision": _low_precision,
    "second_order": _second_order,
    "jit": _jit,
    "vmap": _vmap,
    "checkpoint": _checkpoint,
    "scan": _scan,
    "shard_map": _shard_map,
}
assert tuple(_RUNNERS) == SETTINGS


def _run_setting(call: _Call, setting: str) -> float:
    """Run one setting; an exception from f (not from the reference) is a failure."""
    try:
        return _RUNNERS[setting](call)
    except (VJPMismatch, _NotApplicable):
        raise
    except Exception as e:  # noqa: BLE001 - whatever f raises, reported with the setting
        error = e
    if setting == "shard_map":  # the reference never runs with axis_name=: f's failure
        raise VJPMismatch(
            f"{_header(call, setting, '')}f raised {type(error).__name__}:\n  {error}"
        ) from error
    # The same setting with the reference in f's place (traced only, in collect mode).
    as_reference = dataclasses.replace(
        call, f=call.reference, pending=None if call.pending is None else []
    )
    try:
        _RUNNERS[setting](as_reference)
    except Exception as e:  # noqa: BLE001
        raise _NotApplicable(f"the reference raises too: {type(e).__name__}: {e}") from e
    raise VJPMismatch(
        f"{_header(call, setting, '')}f raised {type(error).__name__} (the reference does not):"
        f"\n  {error}"
    ) from error


# ------------------------------------------------------------------------- validation


def _mesh_axis(shard_specs: Any) -> str:
    """The one mesh axis name the specs use."""
    specs = jax.tree.leaves(
        shard_specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)
    )
    names: set[Any] = set()
    for spec in specs:
        if not isinstance(spec, jax.sharding.PartitionSpec):
            raise TypeError(f"shard_specs holds {spec!r}, not a jax.sharding.PartitionSpec")
        for entry in spec:
            names.update(entry if isinstance(entry, tuple) else () if entry is None else (entry,))
    if len(names) != 1:
        raise ValueError(
            f"shard_specs must shard over exactly one mesh axis name (the 1-D mesh of "
            f"{jax.device_count()} devices), got {sorted(map(str, names))}"
        )
    return names.pop()


def _check_shard_specs(f: Callable, args: tuple, out: Any, shard_specs: Any) -> None:
    if not (isinstance(shard_specs, tuple | list) and len(shard_specs) == 2):
        raise TypeError("shard_specs must be a pair (in_specs, out_specs)")
    in_specs, out_specs = shard_specs
    _mesh_axis(shard_specs)
    if not isinstance(in_specs, tuple | list) or len(in_specs) != len(args):
        raise ValueError(
            f"shard_specs' in_specs must hold one spec per positional argument "
            f"({len(args)}), got {in_specs!r}"
        )
    try:
        params = dict(inspect.signature(f).parameters)
    except (TypeError, ValueError):
        params = {}
    if params and "axis_name" not in params:
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise TypeError("shard_specs given, but f takes no axis_name= keyword argument")
    ndev = jax.device_count()
    for i, (spec, arg) in enumerate(zip(in_specs, args, strict=True)):
        _check_divides(spec, arg, ndev, f"argument {i}")
    try:
        pairs = jax.tree.leaves(
            jax.tree.map(lambda s, o: (s, o), out_specs, out, is_leaf=_is_spec),
            is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and _is_spec(x[0]),
        )
    except ValueError as e:
        raise ValueError(f"shard_specs' out_specs do not fit the reference's outputs: {e}") from e
    for spec, o in pairs:
        _check_divides(spec, o, ndev, "an output")


def _is_spec(x: Any) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)


def _check_divides(spec: Any, tree: Any, ndev: int, what: str) -> None:
    if spec is None:
        return
    for path, leaf in jax.tree.leaves_with_path(tree):
        shape = jnp.shape(leaf)
        if len(spec) > len(shape):
            raise ValueError(
                f"shard_specs: {what}{_at(path)} of shape {shape} has fewer axes than {spec}"
            )
        for axis, entry in enumerate(spec):
            if entry is not None and shape[axis] % ndev:
                raise ValueError(
                    f"shard_specs: {what}{_at(path)} of shape {shape} is split along axis "
                    f"{axis} by {spec}, but {shape[axis]} does not divide over {ndev} devices"
                )


def _check_argnums(argnums: Any, args: tuple) -> tuple[int, ...]:
    if argnums is None:
        return tuple(range(len(args)))
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not nums or not all(isinstance(i, int) and -len(args) <= i < len(args) for i in nums):
        raise ValueError(f"argnums={argnums} is out of range for {len(args)} positional args")
    return tuple(sorted({i % len(args) for i in nums}))


def _check_settings(settings: Sequence[str] | None, skip: Sequence[str]) -> tuple[str, ...]:
    for name in (*(settings or ()), *skip):
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; the settings are {', '.join(SETTINGS)}")
    chosen = SETTINGS if settings is None else tuple(settings)
    return tuple(s for s in SETTINGS if s in chosen and s not in skip)


def _validate(call: _Call) -> None:
    """Bad calls: a clear TypeError/ValueError before any setting runs."""
    flat = _flatten(call, call.args)
    if call.argnums != tuple(range(len(call.args))):  # chosen: each must hold a float array
        for i in call.argnums:
            if not any(_is_float(x) for x in jax.tree.leaves(call.args[i])):
                raise TypeError(
                    f"check_vjp: {_label(call.f, i)} in argnums holds no floating array "
                    f"({call.args[i]!r:.40}); integer arrays are closed over"
                )
    if not flat.diff:
        raise TypeError("check_vjp: no argument holds a floating array to differentiate")
    _, f, ref = _natural(call)  # integer arrays closed over, as in every setting
    out_f, out_r = (jax.eval_shape(g, *_primals(flat)) for g in (f, ref))
    shapes_f, shapes_r = (jax.tree.map(lambda a: a.shape, o) for o in (out_f, out_r))
    if str(jax.tree.structure(out_f)) != str(jax.tree.structure(out_r)) or shapes_f != shapes_r:
        raise TypeError(
            f"check_vjp: {call.names} return different output structures or shapes:\n"
            f"  f: {shapes_f}\n  reference: {shapes_r}"
        )
    if call.shard_specs is not None:
        _check_shard_specs(call.f, call.args, out_r, call.shard_specs)


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def check_vjp(
    f: Callable[..., Any],
    reference: Callable[..., Any],
    *args: Any,
    argnums: int | Sequence[int] | None = None,
    keyword_variants: Sequence[Mapping[str, Any]] = (),
    shard_specs: tuple[Any, Any] | None = None,
    settings: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
    scale: float = 1e3,
) -> VJPReport:
    r"""Check ``f``'s VJP against autodiff of ``reference`` in every setting of ``SETTINGS``.

    Each setting runs ``assert_vjp_matches``'s comparison (outputs, then the VJP of a
    standard normal cotangent from ``seed``, leaf by leaf) on a transformed call; most wrong
    rules are right at one natural point and wrong in one setting only. The first failing
    setting raises; a setting that does not apply (no ``shard_specs``, one output, a
    reference that raises there too) is recorded in the report.

    Args:
      f: the function with hand-written VJPs.
      reference: plain ``jnp``, same signature and outputs.
      *args: a natural point: arrays or pytrees of arrays (e.g. a params dict); Python
        scalars are closed over.
      argnums: the positional arguments whose floating arrays are differentiated
        (``None``: all of them; integer arrays are always closed over).
      keyword_variants: dicts of keyword arguments (a non-default axis, a mask, a flag),
        each checked on both functions (setting ``keywords``).
      shard_specs: ``(in_specs, out_specs)`` for ``jax.shard_map`` over a 1-D mesh of all
        devices; ``f`` is called with ``axis_name=`` (setting ``shard_map``) and compared
        with ``reference`` on the whole arrays.
      settings: the settings to run (``None``: all); ``skip``: settings not to run.
      atol: absolute tolerance (``None``: ``default_tolerances`` of each leaf's dtype).
      rtol: relative tolerance, likewise.
      seed: seed of the cotangents.
      scale: the large magnitude of setting ``scaled``.

    Returns:
      A ``VJPReport``.

    Raises:
      VJPMismatch: (an ``AssertionError``) a setting where ``f`` differs from
        ``reference`` (or raises where the reference does not); the message names the
        setting, the argument (index, name, pytree path), the worst element and both values.
      TypeError: outputs of another structure or shape, an argument with nothing to
        differentiate, ``shard_specs`` that are not specs, ``f`` without ``axis_name``.
      ValueError: ``argnums`` out of range, an unknown setting, ``shard_specs`` that do not
        fit the mesh.

    Examples:
      >>> def softplus_ref(x):
      ...     return jnp.logaddexp(x, 0.0)
      >>> @jax.custom_vjp
      ... def softplus(x):
      ...     return softplus_ref(x)
      >>> def fwd(x):
      ...     return softplus(x), jnp.exp(x)
      >>> def bwd(e, g):  # sigmoid as exp(x) / (1 + exp(x)): inf / inf for large x
      ...     return (g * e / (1 + e),)
      >>> softplus.defvjp(fwd, bwd)
      >>> check_vjp(softplus, softplus_ref, jnp.linspace(-3.0, 3.0, 8), settings=["all_args"])
      VJPReport(checked=('all_args',), not_applicable={}, max_abs_diff={'all_args': ...})
      >>> check_vjp(softplus, softplus_ref, jnp.linspace(-3.0, 3.0, 8))
      Traceback (most recent call last):
      jaxninja.testing.VJPMismatch: check_vjp: f=softplus vs reference=softplus_ref
        setting 'scaled' (inputs scaled by 0, +scale and -scale): inputs x 1000, ...
        VJP differs for argument 0 'x' (shape (8,), float32): 4 of 8 elements differ ...
    """
    for fn, what in ((f, "f"), (reference, "reference")):
        if not callable(fn):
            raise TypeError(f"check_vjp: {what} must be callable, got {fn!r:.60}")
    if isinstance(keyword_variants, Mapping) or not all(
        isinstance(kw, Mapping) for kw in keyword_variants
    ):
        raise TypeError("keyword_variants must be a sequence of dicts of keyword arguments")
    call = _Call(
        f, reference, args, _check_argnums(argnums, args),
        tuple(dict(kw) for kw in keyword_variants), shard_specs, atol, rtol, seed, float(scale),
        f"f={_name(f)} vs reference={_name(reference)}",
    )  # fmt: skip
    chosen = _check_settings(settings, skip)
    _validate(call)
    return _run_matrix(call, chosen)


# Settings whose comparisons are compiled together (the others need eager calls, float64
# or two dtypes): one XLA compilation instead of one per comparison.
_SHARED: tuple[str, ...] = ("all_args", "primal", "scaled", "two_calls", "each_output")
_SHARED += ("one_row", "keywords", "vmap", "checkpoint", "scan", "shard_map")


def _run_matrix(call: _Call, chosen: tuple[str, ...]) -> VJPReport:
    not_applicable: dict[str, str] = {}
    diffs: dict[str, float] = {}
    pending: list[_Point] = []
    collecting = dataclasses.replace(call, pending=pending)
    for setting in (s for s in chosen if s in _SHARED):
        done = len(pending)
        try:
            _run_setting(collecting, setting)
        except _NotApplicable as e:
            not_applicable[setting] = str(e)
            del pending[done:]  # a variant that did apply is not checked alone
    diffs.update(_run_pending(call, pending))
    for setting in (s for s in chosen if s not in _SHARED):
        try:
            diffs[setting] = _run_setting(call, setting)
        except _NotApplicable as e:
            not_applicable[setting] = str(e)
    checked = tuple(s for s in chosen if s in diffs)
    return VJPReport(checked, not_applicable, {s: diffs[s] for s in checked})


def _run_pending(call: _Call, points: list[_Point]) -> dict[str, float]:
    """The collected comparisons in one jit, reported in order (max abs diff per setting)."""

    def run_all(primals: list[list[Any]]) -> list[tuple]:
        bodies = (_vjp_body(p.f, p.ref, call.seed) for p in points)
        return [body(x, None) for body, x in zip(bodies, primals, strict=True)]

    try:
        results = _run_once(run_all, [p.primals for p in points])
    except Exception:  # noqa: BLE001 - a runtime failure: run them one by one to name it
        results = [None] * len(points)
    diffs: dict[str, float] = {}
    for point, result in zip(points, results, strict=True):
        if result is None:
            diff = _run_setting_point(call, point)
        else:
            diff = _report_point(call, point, result)
        diffs[point.setting] = max(diffs.get(point.setting, 0.0), diff)
    return diffs


def _run_setting_point(call: _Call, point: _Point) -> float:
    try:
        return _check(call, point)
    except VJPMismatch:
        raise
    except Exception as e:  # noqa: BLE001
        raise VJPMismatch(f"{point.head}f raised {type(e).__name__}:\n  {e}") from e
