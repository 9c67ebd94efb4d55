"""jaxninja: makemore Part 4 ("Becoming a Backprop Ninja") in JAX, backprop written by hand."""

__version__ = "0.2.0"
