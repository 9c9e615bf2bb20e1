"""The `probe` command line: parses arguments, calls the public API (`mubench_probe.api`), prints, exits.

Nothing below this layer prints or exits; every ProbeError becomes one line on stderr and a
non-zero exit code, never a traceback. One module per group of commands; `common` holds the app,
the consoles and the only ways to print, `options` the options several commands share.
"""

from __future__ import annotations

import logging

from . import browse, catalog, evaluate, extract, search, store  # noqa: F401  (each registers its commands)
from .common import DescriptionColumn, LineProgress, app, err, notify, out
from .evaluate import note_lines

__all__ = ["DescriptionColumn", "LineProgress", "app", "err", "main", "note_lines", "notify", "out"]


def main() -> None:
    """The `probe` console script."""
    from .. import allocator

    allocator.tune()  # every command: large buffers stay in the heap instead of being re-mapped per batch
    logging.getLogger().setLevel(logging.ERROR)
    app(prog_name="probe")
