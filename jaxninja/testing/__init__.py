"""Checks for hand-written VJPs, yours and ours: against autodiff of a plain ``jnp`` reference
at one point (``assert_vjp_matches``) or in every setting where custom VJPs break
(``check_vjp``, ``SETTINGS``), or against central differences
(``check_finite_differences``)."""

from jaxninja.testing._checks import (
    assert_vjp_matches,
    check_finite_differences,
    default_tolerances,
)
from jaxninja.testing._matrix import SETTINGS, VJPMismatch, VJPReport, check_vjp

__all__ = [
    "SETTINGS",
    "VJPMismatch",
    "VJPReport",
    "assert_vjp_matches",
    "check_finite_differences",
    "check_vjp",
    "default_tolerances",
]
