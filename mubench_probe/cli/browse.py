"""`probe browse`: serve the read-only web app over a store (and its results) until Ctrl-C."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .. import api
from .common import _say, app, err, friendly, out
from .options import DEFAULT_STORE, StoreArg


@app.command()
@friendly
def browse(
    store: StoreArg = DEFAULT_STORE,
    results: Annotated[
        Path | None,
        typer.Option(help="Results folder of `probe evaluate` (default: results/<store name> when it exists)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port).", min=0, max=65535)] = 0,
    token: Annotated[str | None, typer.Option(help="Secret every request must carry (required off loopback).")] = None,
    cache: Annotated[Path | None, typer.Option(help="Thumbnail cache folder (default: beside the results).")] = None,
) -> None:
    """See the images behind every number: a local web app over the store and results."""
    # set before any OpenMP runtime loads: idle OpenMP threads sleep between queries instead of spinning,
    # which made a text query 10x slower on a busy CPU (benchmarks/browse.py)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from ..browse.app import create_app
    from ..browse.context import BrowseContext
    from ..browse.server import allowed_hosts, bind, check_host, make_server, url_for

    check_host(host, token)
    if results is None:
        default = Path(api.default_results_dir(store))
        results = default if (default / "results.parquet").exists() or (default / "manifest.json").exists() else None
    ctx = BrowseContext.open(store, results, cache)
    for note in ctx.notes:
        _say(err, note, prefix="note: ")
    sock = bind(host, port)
    server = make_server(create_app(ctx, token, allowed_hosts(sock)))
    shown = f"{len(ctx.runs)} run(s)" + (f", results from {ctx.results_dir}" if ctx.results_dir else ", no results")
    _say(err, f"serving {ctx.store.path} ({shown}); Ctrl-C stops")
    _say(out, url_for(sock, token))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    _say(err, "stopped")
