"""Catch rates of four VJP checks on the zoo of wrong custom VJPs (tests/vjp_zoo.py).

Usage: ``python experiments/check_vjp_catch_rates.py [--per-setting]``

Each wrong rule and each right rule (control) is checked, as a user would call each tool
once at the zoo's natural point:

- ``assert_vjp_matches(f, reference, *args)``: its defaults (argnums=0, the given dtype);
- ``check_finite_differences(f, *args64, argnums=<the floating arguments>)``: float64;
- ``jax.test_util.check_grads(f, args64, order=2, modes=["rev"])``: float64, the floating
  arguments (integers closed over); its default modes include forward mode, which every
  ``custom_vjp`` refuses;
- ``check_vjp(f, reference, *args, **options)``: its defaults.

A cell is ``fails`` (an AssertionError), ``error: <type>`` (another exception) or
``passes``: for a wrong rule the first two catch it, for a right rule they are false alarms.
The shard_map rules need several devices: this script forces 4 CPU devices before importing
jax. ``--per-setting`` also runs each setting of check_vjp alone on each wrong rule and
prints which settings catch it. Prints markdown tables (docs/testing.md quotes them).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the zoo

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import vjp_zoo  # noqa: E402
from jax import test_util as jtu  # noqa: E402

from jaxninja.testing import (  # noqa: E402
    SETTINGS,
    VJPMismatch,
    assert_vjp_matches,
    check_finite_differences,
    check_vjp,
)


def _floating(args: tuple) -> tuple[int, ...]:
    return tuple(i for i, a in enumerate(args) if jnp.issubdtype(jnp.result_type(a), jnp.inexact))


def _to64(args: tuple) -> tuple:
    return tuple(
        a.astype(jnp.float64) if jnp.issubdtype(jnp.result_type(a), jnp.inexact) else a
        for a in args
    )


def natural(case: vjp_zoo.Case) -> None:
    assert_vjp_matches(case.f, case.reference, *case.args)


def finite_differences(case: vjp_zoo.Case) -> None:
    with jax.enable_x64(True):
        check_finite_differences(case.f, *_to64(case.args), argnums=_floating(case.args))


def check_grads(case: vjp_zoo.Case) -> None:
    with jax.enable_x64(True):
        args = _to64(case.args)
        nums = _floating(args)

        def of_floats(*xs: Any) -> Any:
            full = list(args)
            for i, x in zip(nums, xs, strict=True):
                full[i] = x
            return case.f(*full)

        jtu.check_grads(of_floats, tuple(args[i] for i in nums), order=2, modes=["rev"])


def matrix(case: vjp_zoo.Case) -> None:
    check_vjp(case.f, case.reference, *case.args, **case.options)


TOOLS: dict[str, Callable[[vjp_zoo.Case], None]] = {
    "assert_vjp_matches": natural,
    "check_finite_differences": finite_differences,
    "jax check_grads": check_grads,
    "check_vjp": matrix,
}


def outcome(tool: Callable[[vjp_zoo.Case], None], case: vjp_zoo.Case) -> str:
    try:
        tool(case)
    except AssertionError:
        return "fails"
    except Exception as e:  # noqa: BLE001 - any other failure is reported by its type
        return f"error: {type(e).__name__}"
    return "passes"


def first_setting(case: vjp_zoo.Case) -> str:
    try:
        check_vjp(case.f, case.reference, *case.args, **case.options)
    except VJPMismatch as e:
        return str(e).splitlines()[1].split("'")[1]
    return "-"


def cases() -> list[tuple[Callable[[], vjp_zoo.Case], bool]]:
    """Factories (fresh rules for each tool: some keep Python state) and ``wrong``."""
    made = [(make, True) for make in vjp_zoo.WRONG]
    for i, c in enumerate(vjp_zoo.shard_cases()):
        made.append((lambda i=i: vjp_zoo.shard_cases()[i], c.setting is not None))
    for i, _ in enumerate(vjp_zoo.controls()):
        made.append((lambda i=i: vjp_zoo.controls()[i], False))
    return made


def table(per_setting: bool) -> None:
    header = ["rule", "modelled for", *TOOLS, "first failing setting"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    caught = {tool: [0, 0] for tool in TOOLS}  # [wrong caught, right flagged]
    counts = [0, 0]
    catches = {}
    for make, wrong in cases():
        case = make()
        cells = [outcome(tool, make()) for tool in TOOLS.values()]
        counts[not wrong] += 1
        for tool, cell in zip(TOOLS, cells, strict=True):
            caught[tool][not wrong] += cell != "passes"
        first = first_setting(make())
        kind = case.setting if wrong else "right rule"
        print(f"| {case.name} | {kind} | " + " | ".join(cells) + f" | {first} |")
        if per_setting and wrong:
            catches[case.name] = [s for s in SETTINGS if _alone(make, s)]
    print()
    print("| check | wrong rules caught | right rules flagged |")
    print("|---|---|---|")
    for tool, (hit, false) in caught.items():
        print(f"| {tool} | {hit} of {counts[0]} | {false} of {counts[1]} |")
    if per_setting:
        print()
        print("| rule | settings that catch it alone |")
        print("|---|---|")
        for name, settings in catches.items():
            print(f"| {name} | {', '.join(settings)} |")


def _alone(make: Callable[[], vjp_zoo.Case], setting: str) -> bool:
    case = make()
    try:
        check_vjp(case.f, case.reference, *case.args, settings=[setting], **case.options)
    except AssertionError:
        return True
    return False


if __name__ == "__main__":
    start = time.perf_counter()
    print(f"jax {jax.__version__}, {jax.device_count()} CPU devices; {time.strftime('%Y-%m-%d')}")
    print()
    table("--per-setting" in sys.argv)
    print(f"\n({time.perf_counter() - start:.0f} s)")
