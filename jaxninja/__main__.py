"""``python -m jaxninja``: the same as the ``jaxninja`` command."""

import sys

from jaxninja.cli import main

if __name__ == "__main__":
    sys.exit(main())
