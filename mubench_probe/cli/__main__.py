"""`python -m mubench_probe.cli ...` is the `probe` command."""

import sys

from . import main

sys.exit(main())
