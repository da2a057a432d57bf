"""`python -m tutorial.fleet`, which `make fleet` runs."""

import sys

from .fleet import main

sys.exit(main(sys.argv[1:]))
