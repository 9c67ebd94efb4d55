"""``python -m jaxninja``: the same as the ``jaxninja`` command."""

from jaxninja.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
