"""The number rules of ``jaxninja.limits``, at and past every edge."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from jaxninja.errors import ConfigError, JaxninjaError
from jaxninja.limits import (
    FLOAT32_MAX,
    FLOAT32_TINY,
    INT32_MAX,
    check_float32,
    check_int,
    check_positive,
)

NAN, INF = math.nan, math.inf
BELOW_TINY = float(np.nextafter(np.float32(FLOAT32_TINY), np.float32(0)))  # a float32 denormal
# the edges every rule meets: (value, accepted by check_int, check_float32, check_positive)
EDGES = [
    (1, True, True, True),
    (0, False, False, False),
    (-1, False, False, False),
    (10**30, False, True, True),  # an int float32 holds (about 1e30 < 3.4e38)
    (10**400, False, False, True),
    (2**31 - 1, True, True, True),
    (2**31, False, True, True),
    (NAN, False, False, False),
    (INF, False, False, False),
    (-INF, False, False, False),
    (1e-300, False, False, True),  # float32 rounds it to 0
    (5e-324, False, False, True),  # the smallest float64
    (FLOAT32_TINY, False, True, True),
    (BELOW_TINY, False, False, True),
    (FLOAT32_MAX, False, True, True),
    (1e39, False, False, True),  # float32 makes it inf
    (True, False, False, False),  # True == 1, but not a number
    (False, False, False, False),
    ("3", False, False, False),
    (1.5, False, True, True),
    (3.0, False, True, True),  # an int's value, but a float
    (None, False, False, False),
]
INT = "must be an integer in 1..2147483647"
FLOAT32 = "must be a number between 1.18e-38 and 3.4e+38 (float32)"


def _refused(rule, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        rule(*args, **kwargs)
    return str(e.value)


@pytest.mark.parametrize(("value", "ok"), [(e[0], e[1]) for e in EDGES], ids=repr)
def test_check_int(value, ok) -> None:
    if ok:
        check_int("steps", value)
    else:
        assert _refused(check_int, "steps", value) == f"steps {INT}, got {value!r}"


@pytest.mark.parametrize(("value", "ok"), [(e[0], e[2]) for e in EDGES], ids=repr)
def test_check_float32(value, ok) -> None:
    if ok:
        check_float32("lr", value)
    else:
        assert _refused(check_float32, "lr", value) == f"lr {FLOAT32}, got {value!r}"


@pytest.mark.parametrize(("value", "ok"), [(e[0], e[3]) for e in EDGES], ids=repr)
def test_check_positive(value, ok) -> None:
    message = f"temperature must be a positive finite number, got {value!r}"
    if ok:
        check_positive("temperature", value)
    else:
        assert _refused(check_positive, "temperature", value) == message


@pytest.mark.parametrize(
    ("low", "high", "value", "ok"),
    [
        (0, INT32_MAX, 0, True),
        (0, INT32_MAX, -1, False),
        (1, 1000, 1000, True),
        (1, 1000, 1001, False),
        (2, 2, 2, True),
        (2, 2, 1, False),
    ],
)
def test_check_int_bounds_are_inclusive(low, high, value, ok) -> None:
    if ok:
        check_int("n", value, low, high)
    else:
        message = _refused(check_int, "n", value, low, high, why=" (why)")
        assert message == f"n must be an integer in {low}..{high} (why), got {value}"


@pytest.mark.parametrize("value", [0, 0.0, -0.0])
def test_check_float32_zero_allows_exactly_zero(value) -> None:
    check_float32("w2_scale", value, zero=True)
    with pytest.raises(ConfigError):
        check_float32("w2_scale", value)


@pytest.mark.parametrize("value", [-1, 1e-300, NAN, INF, True, "0"])
def test_check_float32_zero_refuses_the_rest(value) -> None:
    message = _refused(check_float32, "w2_scale", value, zero=True)
    assert message == f"w2_scale must be 0 or a {FLOAT32[10:]}, got {value!r}"


def test_the_error_is_the_tools_expected_failure() -> None:
    """``ConfigError`` prints as one ``error:`` line (a ``JaxninjaError``), and ``except
    ValueError`` still catches it; its old home keeps working."""
    from jaxninja.training import train

    assert issubclass(ConfigError, JaxninjaError) and issubclass(ConfigError, ValueError)
    assert train.ConfigError is ConfigError
    with pytest.raises(ConfigError, match=re.escape(r"n\x1b must be")):
        check_int("n\x1b", 0)  # a name from a file is escaped like every message
