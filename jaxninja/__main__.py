import sys

from jaxninja.cli import main

sys.exit(main())
