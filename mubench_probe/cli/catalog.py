"""`probe models` and `probe datasets`: the spec forms the backends and dataset readers take."""

from __future__ import annotations

from typing import Annotated

import typer

from .. import api
from .common import _safe, _say, app, friendly, out


@app.command()
@friendly
def models(
    all_tags: Annotated[bool, typer.Option("--all", help="List every open_clip tag.")] = False,
) -> None:
    """Model spec forms each backend takes, with examples."""
    for b in api.list_backends():
        _say(out, f": {b.help}", prefix=f"[bold]{_safe(b.name)}[/]")
        for ex in b.examples:
            _say(out, f"  {ex}")
    if all_tags:
        for spec in api.list_open_clip_specs():
            _say(out, spec)


@app.command()
@friendly
def datasets() -> None:
    """Dataset spec forms, in the order they are tried."""
    for f in api.list_dataset_formats():
        _say(out, f": {f.help}", prefix=f"[bold]{_safe(f.name)}[/]")
