"""The one error type of the tool's expected failures: ``jaxninja.cli.main`` prints it as one
``error: ...`` line and exits 2. It is a ``ValueError``, as JAX raises for bad arguments."""


class JaxninjaError(ValueError):
    """An expected failure; the message says what is wrong and, where it can, what to do."""

    def __str__(self) -> str:  # a path or a word may hold ESC & co.: never sent raw to a terminal
        return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in super().__str__())
