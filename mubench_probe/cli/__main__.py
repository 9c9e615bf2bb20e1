"""`python -m mubench_probe.cli ...` is the `probe` command."""

from . import main

main()
