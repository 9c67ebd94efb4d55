"""The number rules of the tool: each function that takes a number from a user (a config
field, a sampling size, a job option) checks it with one of these, once, and the CLI only
turns text into numbers.

A rule takes the name to report (a field, an argument or a flag) and the value; it returns
nothing or raises ``jaxninja.errors.ConfigError`` naming both. ``bool`` is refused where a
number is asked (``True == 1`` in Python).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxninja.errors import ConfigError

INT32_MAX = 2**31 - 1  # steps, seeds and sizes travel as int32
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smaller becomes 0 or denormal in float32
FLOAT32_MAX = float(np.finfo(np.float32).max)  # larger becomes inf in float32


def _is_number(value: Any, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int = 1, high: int = INT32_MAX, why: str = "") -> None:
    """Raise ``ConfigError`` unless ``value`` is an ``int`` in ``low..high``.

    Args:
        name: the field, argument or flag, for the message.
        value: the value to check.
        low: the smallest allowed value.
        high: the largest allowed value (default: ``INT32_MAX``).
        why: a reason for the range, shown after it (e.g. ``" (batch norm divides by n-1)"``).

    Raises:
        ConfigError: naming ``name`` and the value: not an ``int`` (a ``bool``, a ``float``,
            a ``str``) or out of range.

    Examples:
        >>> check_int("steps", 10)
        >>> check_int("steps", 0)
        Traceback (most recent call last):
        ...
        jaxninja.errors.ConfigError: steps must be an integer in 1..2147483647, got 0
    """
    if not (_is_number(value, int) and low <= value <= high):
        raise ConfigError(f"{name} must be an integer in {low}..{high}{why}, got {value!r}")


def check_float32(name: str, value: Any, zero: bool = False) -> None:
    """Raise ``ConfigError`` unless ``value`` is a number that float32 keeps: finite, neither
    rounded to 0 nor denormal (``FLOAT32_TINY..FLOAT32_MAX``); also exactly 0 with ``zero``.

    Args:
        name: the field, argument or flag, for the message.
        value: the value to check (an ``int`` or a ``float``).
        zero: allow exactly 0 too (a scale that may switch something off).

    Raises:
        ConfigError: naming ``name`` and the value.

    Examples:
        >>> check_float32("lr", 0.1)
        >>> check_float32("w2_scale", 0.0, zero=True)
        >>> check_float32("lr", 1e300)
        Traceback (most recent call last):
        ...
        jaxninja.errors.ConfigError: lr must be a number between ... (float32), got 1e+300
    """
    if _is_number(value, (int, float)) and (
        (zero and value == 0) or FLOAT32_TINY <= value <= FLOAT32_MAX
    ):
        return
    what = f"a number between {FLOAT32_TINY:.3g} and {FLOAT32_MAX:.3g} (float32)"
    raise ConfigError(f"{name} must be {'0 or ' if zero else ''}{what}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    """Raise ``ConfigError`` unless ``value`` is a positive finite ``int`` or ``float``
    (any of them: ``1e-300`` too).

    Raises:
        ConfigError: naming ``name`` and the value.

    Examples:
        >>> check_positive("temperature", 1e-300)
        >>> check_positive("temperature", float("inf"))
        Traceback (most recent call last):
        ...
        jaxninja.errors.ConfigError: temperature must be a positive finite number, got inf
    """
    if not (_is_number(value, (int, float)) and 0 < value < float("inf")):
        raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
