"""The error type of the tool's expected failures, ``JaxninjaError``: ``jaxninja.cli.main``
prints it as one ``error: ...`` line and exits 2. It is a ``ValueError``, as JAX raises for
bad arguments; ``ConfigError``, a bad setting, is one."""

from collections.abc import Collection


class JaxninjaError(ValueError):
    """An expected failure; the message says what is wrong and, where it can, what to do."""

    def __str__(self) -> str:  # a path or a word may hold ESC & co.: never sent raw to a terminal
        return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in super().__str__())


class ConfigError(JaxninjaError):
    """A setting that cannot run: a config field, an argument or an option of the wrong
    kind or out of range (``jaxninja.limits``); the message names it and the value."""


def listing(names: Collection[str], as_list: bool = False) -> str:
    """At most five of ``names``, sorted and escaped, so that 200,000 junk keys give one line.

    Examples:
      >>> listing([f"k{i}" for i in range(7)])
      'k0, k1, k2, k3, k4 ... (7 in all)'
    """
    first = sorted(names)[:5]
    shown = repr(first) if as_list else ", ".join(k if k.isprintable() else repr(k) for k in first)
    return shown if len(names) <= 5 else f"{shown} ... ({len(names)} in all)"
