"""Checks for hand-written VJPs, yours and ours: against autodiff of a plain ``jnp`` reference
(:func:`assert_vjp_matches`) or central differences (:func:`check_finite_differences`)."""

from jaxninja.testing._checks import (
    assert_vjp_matches,
    check_finite_differences,
    default_tolerances,
)

__all__ = ["assert_vjp_matches", "check_finite_differences", "default_tolerances"]
