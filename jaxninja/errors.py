"""The one error type of the tool's expected failures.

Everything a user can cause (bad arguments, a bad data file, a damaged checkpoint, an
unwritable run directory) raises a subclass of :class:`JaxninjaError` whose message names
the problem; ``jaxninja.cli.main`` prints it as one ``error: ...`` line and exits 2.
Library functions called with wrong arguments raise ``ValueError``/``TypeError`` as JAX
does (``JaxninjaError`` is a ``ValueError`` too).
"""


class JaxninjaError(ValueError):
    """An expected failure; the message says what is wrong and, where it can, what to do."""
