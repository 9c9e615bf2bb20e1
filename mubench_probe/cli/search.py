"""`probe search` and `probe compare`: query a store; models side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from .common import _check_format, _data, _emit, _fmt, _json, _say, app, err, friendly, out
from .options import DEFAULT_STORE, FormatOpt, JsonOpt, StoreArg


@app.command()
@friendly
def search(
    store: StoreArg = DEFAULT_STORE,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model spec in the store.")] = None,
    text: Annotated[str | None, typer.Option(help="Text query (text->image).")] = None,
    image: Annotated[Path | None, typer.Option(help="Image file query (image->image).")] = None,
    row: Annotated[int | None, typer.Option(help="A stored row as the query.")] = None,
    to: Annotated[str, typer.Option(help="Search images, or texts (image->text over captions/prompts).")] = "image",
    k: Annotated[int, typer.Option("-k", help="Hits to return.", min=1)] = 10,
    where: Annotated[list[str] | None, typer.Option(help="Filter the gallery: COLUMN=VALUE (repeatable).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset key, if the model has several.")] = None,
    index: Annotated[str, typer.Option(help="FAISS factory string, e.g. Flat, HNSW32,Flat, IVF256,Flat.")] = "Flat",
    as_json: JsonOpt = False,
    sheet: Annotated[Path | None, typer.Option(help="Write a contact sheet PNG of the image hits.")] = None,
    device: Annotated[str, typer.Option(help="Device for encoding a new query.")] = "auto",
    fmt: FormatOpt = "table",
) -> None:
    """Query the store: text->image, image->image, image->text."""
    fmt = _check_format(fmt, as_json)
    res = api.search(
        store, model, text=text, image=image, row=row, to=to, k=k, where=where, dataset=dataset, index=index,
        device=device,
    )  # fmt: skip
    for note in res.notes:  # a truncated query text, a rebuilt index: stderr, so --json stays parseable
        _say(err, note, prefix="note: ")
    if fmt == "json":
        _json({"query": res.query, "index": res.index, "hits": res.hits, "notes": res.notes})
    else:
        _emit(res.hits, fmt, f"{res.query}")
        if res.index.get("recall_at_10") is not None:
            _say(
                err,
                f"index {res.index['factory']}: recall@10 vs exact search = {res.index['recall_at_10']:.3f} "
                f"({res.index['recall_queries']} sampled queries)",
            )
    if sheet is not None:
        path = api.contact_sheet(store, res, sheet)
        _say(err, f"contact sheet: {path}")


@app.command()
@friendly
def compare(
    source: Annotated[
        str, typer.Argument(help="A store (folder or URL; evaluated first, cached) or a results folder.")
    ],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these models.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report here.")] = None,
    k: Annotated[int, typer.Option("-k", help="k for mutual-kNN alignment.", min=1)] = 10,
    color_by: Annotated[
        list[str] | None,
        typer.Option(
            help="Colour the report's embedding maps by this metadata column (repeatable; "
            "e.g. label_name, dataset, modality, stain) [label_name]."
        ),
    ] = None,
    fmt: FormatOpt = "table",
) -> None:
    """Models side by side: accuracies with CIs, paired tests, CKA, and an HTML report."""
    fmt = _check_format(fmt)
    res = api.compare(source, model, report=report, k=k, color_by=tuple(color_by or ("label_name",)))
    records, pairs = _accuracy_records(res.side_by_side, fmt), _pair_records(res.pairwise, fmt)
    if fmt != "table":
        payload = {"accuracy": records, "pairwise": pairs}
        for name in ("cka", "mutual_knn", "text_cka"):
            mat = getattr(res, name)
            payload[name] = [{"model": i, **row} for i, row in mat.round(4).to_dict("index").items()]
        if fmt == "json":
            _json(payload)
        else:  # one CSV per table, each after a '# name' line
            for name, rows in payload.items():
                _data(f"# {name}")
                _emit(rows, "csv")
    else:
        _print_comparison(res, records, pairs, k)
    if res.report:
        _say(err, f"report: {res.report} ({len(res.figures)} figures)")


def _accuracy_records(side: Any, fmt: str) -> list[dict[str, Any]]:
    """One record per (task, head): each model's value [CI] (a table) or value, low, high (CSV, JSON)."""
    models = sorted({m for m, _ in side.columns}) if not side.empty else []
    records = []
    for (task, head), r in side.iterrows() if not side.empty else []:
        rec: dict[str, Any] = {"task": task, "head": head}
        for m in models:
            v, lo, hi = r.get((m, "value")), r.get((m, "ci_low")), r.get((m, "ci_high"))
            if fmt == "table":
                rec[m] = _fmt((v, lo, hi)) if v is not None and v == v else "–"
            else:
                rec[m], rec[f"{m} low"], rec[f"{m} high"] = v, lo, hi
        records.append(rec)
    return records


def _pair_records(pairwise: Any, fmt: str) -> list[dict[str, Any]]:
    """One record per model pair and (task, head): the paired difference with its CI and McNemar's p."""
    return [
        {
            "task": r["task"],
            "head": r["head"],
            "a": r["model_a"],
            "b": r["model_b"],
            "n": r["n"],
            **(
                {"a - b": _fmt((r["difference"], r["ci_low"], r["ci_high"])), "p": f"{r['p_mcnemar']:.3g}"}
                if fmt == "table"
                else {"a - b": r["difference"], "low": r["ci_low"], "high": r["ci_high"], "p": r["p_mcnemar"]}
            ),
        }
        for _, r in pairwise.iterrows()
    ]


def _print_comparison(res: Any, records: list[dict[str, Any]], pairs: list[dict[str, Any]], k: int) -> None:
    """The comparison as tables: accuracies, paired differences, then the similarity matrices."""
    if records:
        _emit(records, "table", "accuracy (value [95% CI])")
    if pairs:
        _emit(pairs, "table", "paired differences (a - b) and McNemar")
    for title, mat in (
        ("linear CKA (image embeddings)", res.cka),
        (f"mutual kNN (k={k})", res.mutual_knn),
        ("linear CKA (class-prompt text prototypes)", res.text_cka),
    ):
        if not mat.empty:
            _say(out, f"{title}:")
            shown = mat.round(3).rename(index=api.printable, columns=api.printable)  # names become one line each
            for line in shown.to_string().splitlines():
                _say(out, line)
