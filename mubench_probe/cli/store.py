"""`probe info`, `status`, `verify` and `export`: what is in a store, how far it is, whether it is intact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from ..errors import StoreDamageError
from .common import _bars_for, _check_format, _emit, _json, _progress, _safe, _say, app, err, friendly, notify, out
from .options import DEFAULT_STORE, EXTRACT_OPTIONS, BatchOpt, DeviceOpt, FormatOpt, JsonOpt, StoreArg, WorkersOpt


@app.command()
@friendly
def info(
    store: StoreArg = DEFAULT_STORE,
    verify: Annotated[bool, typer.Option(help="Read every chunk and check its checksum.")] = False,
    as_json: JsonOpt = False,
    fmt: FormatOpt = "table",
) -> None:
    """Models, datasets, rows, completeness, provenance and size of a store."""
    fmt = _check_format(fmt, as_json)
    summary = api.store_info(store, verify=verify)
    if fmt == "json":
        _json(summary)
    else:
        _print_runs(summary, store, fmt)
    if verify:
        _report_problems(summary["problems"], store)
    damaged = [r for r in summary["runs"] if r["status"] == "damaged"]
    for line in (line for r in damaged for line in r["problems"]):
        _say(err, line, prefix="[red]damaged:[/] ")
    if damaged:
        raise StoreDamageError(f"{len(damaged)} damaged run(s) in {store}; repair with `probe verify --repair {store}`")


def _print_runs(summary: dict[str, Any], store: str, fmt: str) -> None:
    """One record per run (table or CSV); on a table, one provenance line per run below it."""
    records = [
        {
            "model": r["model"] or r["group"],
            "dataset": r["dataset"],
            "split": r["split"],
            "rows": r["rows"],
            "chunks": r["chunks_done"],
            "texts": r["texts"],
            "failed": r["failed_rows"],
            "status": r["status"],
            "MB": round(r["size_bytes"] / 1e6, 2),
            "weights": str(r["provenance"].get("weights_hash"))[:12],
            "created": r["provenance"].get("created"),
        }
        for r in summary["runs"]
    ]
    _emit(records, fmt, f"{store}  ({summary['size_bytes'] / 1e6:.1f} MB)")
    if fmt != "table":
        return
    for r in summary["runs"]:
        p = r["provenance"]
        _say(
            out,
            f": dataset {p.get('dataset_id')}@{p.get('dataset_revision')} "
            f"fp {p.get('dataset_fingerprint')}, {p.get('dtype')}; model {p.get('model_spec')}; "
            f"intensity {str(p.get('intensity_policy')).split(':')[0]}"
            + (f"; pixels {p['pixels'].get('rule')}" if p.get("pixels") else ""),
            prefix=f"[bold]{_safe(r['group'])}[/]",
        )


def _report_problems(problems: list[str], store: str) -> None:
    """One line per problem, then a non-zero exit naming the repair command."""
    for line in problems:
        _say(err, line, prefix="[red]damaged:[/] ")
    if problems:
        raise StoreDamageError(
            f"{len(problems)} problem(s) in {store}; repair with `probe verify --repair {store}` "
            "(reloads each damaged run's model and dataset from its provenance)"
        )
    _say(
        err,
        "verify: intact (every chunk present, every chunk matches its checksum, provenance and texts "
        "match their digests)",
    )


@app.command()
@friendly
def status(
    store: Annotated[str, typer.Argument(help="Zarr store (directory or fsspec URL).")] = DEFAULT_STORE,
    shards: Annotated[int | None, typer.Option(help="Show progress per shard for N shards [as recorded].")] = None,
    as_json: JsonOpt = False,
    fmt: FormatOpt = "table",
) -> None:
    """Progress of every run: chunks done / total, per shard, live and stale claims (cheap, no checksums)."""
    fmt = _check_format(fmt, as_json)
    st = api.store_status(store, shards)
    if fmt == "json":
        _json(st)
        return
    rows = []
    for r in st["runs"]:
        live = sum(1 for c in r["claims"] if c["live"])
        rows.append(
            {
                "run": r["group"],
                "status": r["status"],
                "chunks": "?" if r["chunks_total"] is None else f"{r['chunks_done']}/{r['chunks_total']}",
                "shards": "  ".join(f"{s['shard']}: {s['done']}/{s['total']}" for s in r["per_shard"]) or "–",
                "claims": f"{live} live, {len(r['claims']) - live} stale",
            }
        )
    _emit(rows, fmt, title=str(store))
    if fmt != "table":
        return
    for r in st["runs"]:
        for c in r["claims"]:
            state = "live" if c["live"] else "stale (taken over by the next writer)"
            _say(
                out,
                f"  {r['group']}: {c['key']} held by pid {c['pid']} on {c['host']}, heartbeat {c['age_s']:.0f} s "
                f"ago: {state}",
            )


@app.command()
@friendly
def export(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Zarr store directory.")],
    target: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output: a .h5ad file (anndata), a folder (npy) or a .parquet file.")
    ],
    to: Annotated[str, typer.Option("--to", help="anndata, npy (clip-retrieval's layout) or parquet.")] = "anndata",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model spec in the store.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset key, if the model has several.")] = None,
) -> None:
    """Export one finished run's embeddings, metadata and provenance for scanpy, FAISS or pandas."""
    res = api.export(store, to, target, model=model, dataset=dataset)
    _say(out, f"exported {res.rows} rows to {', '.join(str(f) for f in res.files)}")


@app.command()
@friendly
def verify(
    store: StoreArg = DEFAULT_STORE,
    repair: Annotated[
        bool, typer.Option(help="Repair what is damaged: reloads each damaged run's model and dataset.")
    ] = False,
    device: DeviceOpt = EXTRACT_OPTIONS["device"].default,
    workers: WorkersOpt = EXTRACT_OPTIONS["workers"].default,
    batch_size: BatchOpt = EXTRACT_OPTIONS["batch_size"].default,
) -> None:
    """Check every chunk (present, checksum) and every digest; `--repair` fixes what it finds."""
    if not repair:
        for line in api.open_store(store).notes():  # e.g. runs written before the chunk and metadata digests
            notify(line)
        _report_problems(api.verify_store(store), store)
        return
    bars = _progress()
    with bars:
        res = api.repair_store(
            store,
            device=device,
            num_workers=workers,
            batch_size=batch_size,
            progress=_bars_for(bars, "repair {}"),
            notify=notify,
        )
    for line in res.repaired:
        _say(err, line, prefix="[yellow]repaired:[/] ")
    for line in res.commands:
        _say(err, line, prefix="[red]not repaired:[/] ")
    if res.remaining or res.commands:
        for line in res.remaining:
            _say(err, line, prefix="[red]damaged:[/] ")
        raise StoreDamageError(f"{len(res.remaining)} problem(s) remain in {store} (see above)")
    _say(out, f"verify --repair: {len(res.repaired)} problem(s) repaired; {store} is intact")
