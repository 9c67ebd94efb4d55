"""The one error type of the tool's expected failures: ``jaxninja.cli.main`` prints it as one
``error: ...`` line and exits 2. It is a ``ValueError``, as JAX raises for bad arguments."""

from collections.abc import Collection


class JaxninjaError(ValueError):
    """An expected failure; the message says what is wrong and, where it can, what to do."""

    def __str__(self) -> str:  # a path or a word may hold ESC & co.: never sent raw to a terminal
        return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in super().__str__())


def listing(names: Collection[str], as_list: bool = False) -> str:
    """At most five of ``names``, sorted and escaped, so that 200,000 junk keys give one line.

    Examples:
      >>> listing([f"k{i}" for i in range(7)])
      'k0, k1, k2, k3, k4 ... (7 in all)'
    """
    first = sorted(names)[:5]
    shown = repr(first) if as_list else ", ".join(k if k.isprintable() else repr(k) for k in first)
    return shown if len(names) <= 5 else f"{shown} ... ({len(names)} in all)"
