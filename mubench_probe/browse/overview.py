"""Overview page data: the store's runs with provenance, the tasks, and the headline results with CIs.

Each result cell names the run and, when predictions exist for it, the errors view that lists
the images behind the number.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from ..errors import UsageError
from .context import BrowseContext, clean
from .web import endpoint

HEADLINE = "accuracy"  # the metric shown first; any other metric of the table can be asked for
PROVENANCE_KEYS = (
    "model_spec", "backend", "weights_hash", "dataset_spec", "dataset_fingerprint", "split", "intensity_policy",
    "embed_dim", "dtype", "created",
)  # fmt: skip


def runs_summary(ctx: BrowseContext) -> list[dict[str, Any]]:
    """One record per run: id, model, dataset, split, rows (valid of total), status, provenance."""
    out = []
    for rid, run in ctx.runs.items():
        _, dataset, split = run.path.split("/")
        failed = len(run.failures_unchecked())
        prov = run.provenance
        out.append(
            {
                "id": rid,
                "path": run.path,
                "model": run.model_spec,
                "dataset": dataset,
                "split": split,
                "rows": run.layout.n_rows,
                "failed": failed,
                "status": "complete" if run.complete else "partial",
                "has_text": run.has_text,
                "provenance": {k: clean(prov.get(k)) for k in PROVENANCE_KEYS if k in prov},
            }
        )
    return out


def headline(ctx: BrowseContext, metric: str = HEADLINE) -> dict[str, Any]:
    """Rows (task, head) x columns (runs) of `metric` on all rows (stratum "all"), with CIs and links."""
    table = ctx.results
    if table is None or table.empty:
        return {"metric": metric, "metrics": [], "columns": [], "rows": []}
    every = table[table["stratum"] == "all"]
    metrics = sorted(every["metric"].unique().tolist(), key=lambda m: (m != HEADLINE, m))
    sel = every[every["metric"] == metric]
    with_preds = _prediction_keys(ctx.predictions)
    cols: dict[str, dict[str, Any]] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in sel.to_dict("records"):
        model, dataset, task, head = (str(r[c]) for c in ("model", "dataset", "task", "head"))
        rid = ctx.run_of(model, dataset)
        col = rid or f"{model}|{dataset}"
        cols.setdefault(col, {"id": col, "run": rid, "model": model, "dataset": dataset})
        rec = rows.setdefault((task, head), {"task": task, "head": head, "cells": {}})
        cell = {k: clean(r[k]) for k in ("value", "ci_low", "ci_high", "n")}
        if rid is not None and (model, dataset, task, head) in with_preds:
            cell["errors"] = {"run": rid, "task": task, "head": head}
        rec["cells"][col] = cell
    return {
        "metric": metric,
        "metrics": metrics,
        "columns": list(cols.values()),
        "rows": [rows[k] for k in sorted(rows)],
    }


def tasks_summary(ctx: BrowseContext) -> list[dict[str, Any]]:
    """Each task with the heads scored on it and how many rows were scored (from the predictions)."""
    preds = ctx.predictions
    if preds is None or preds.empty:
        table = ctx.results
        if table is None or table.empty:
            return []
        return [
            {"task": task, "heads": sorted(g["head"].unique().tolist()), "rows": None}
            for task, g in table.groupby("task", sort=True)
        ]
    return [
        {"task": task, "heads": sorted(g["head"].unique().tolist()), "rows": int(g.groupby("head").size().max())}
        for task, g in preds.groupby("task", sort=True)
    ]


def _prediction_keys(preds: pd.DataFrame | None) -> set[tuple[str, str, str, str]]:
    if preds is None or preds.empty:
        return set()
    keys = preds[["model", "dataset", "task", "head"]].drop_duplicates()
    return {(str(a), str(b), str(c), str(d)) for a, b, c, d in keys.itertuples(index=False)}


def routes(ctx: BrowseContext) -> list[BaseRoute]:
    summary, tasks = runs_summary(ctx), tasks_summary(ctx)  # fixed while the server runs: computed once
    known = set() if ctx.results is None else set(ctx.results["metric"].unique().tolist())

    @endpoint
    def overview(request: Request) -> dict[str, Any]:
        metric = request.query_params.get("metric") or (HEADLINE if HEADLINE in known or not known else min(known))
        if metric not in known and ctx.results is not None and not ctx.results.empty:
            raise UsageError(f"no metric {metric!r} in the results")
        return {
            "store": str(ctx.store.path),
            "results_dir": str(ctx.results_dir) if ctx.results_dir else None,
            "notes": ctx.notes,
            "runs": summary,
            "tasks": tasks,
            "headline": ctx.cached("", f"headline\0{metric}", lambda: headline(ctx, metric)),
        }

    return [Route("/api/overview", overview, methods=["GET"])]
