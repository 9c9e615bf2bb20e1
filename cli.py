"""Thin shim: `python cli.py ...` is the same as the installed `probe` command."""

from mubench_probe.cli import main

if __name__ == "__main__":
    main()
