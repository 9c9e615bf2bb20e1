"""Errors page data: per run, task and head, the confusion matrix from predictions.parquet, the
images of any cell, and the most confidently wrong images.

predictions.parquet holds (row, y_true, y_pred) but no score. When it has a score column
(`score`, `confidence`, `proba`, `margin`) wrong rows are ranked by it; otherwise by an embedding
margin: cosine to the predicted class's centroid minus cosine to the true class's centroid, in
the run's own (normalised) embedding space, centroids over the rows the head scored, by true
label. It says how far into the wrong class an image sits for that model; `ranked_by` names
the rule used.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from ..errors import NotFoundError
from ..queries import META_COLUMNS
from .context import BrowseContext, clean
from .web import endpoint, int_param, str_param

SCORE_COLUMNS = ("score", "confidence", "proba", "margin")
WRONG_LIST = 24
CELL_LIMIT = 500


def choices(ctx: BrowseContext) -> list[dict[str, Any]]:
    """Every (run, task, head) with predictions, in a stable order."""
    out = []
    for rid in sorted(ctx.runs):
        p = ctx.run_predictions(rid)
        if p.empty:
            continue
        for (task, head), _ in p.groupby(["task", "head"], sort=True):
            out.append({"run": rid, "model": ctx.runs[rid].model_spec, "task": task, "head": head})
    return out


def selection(ctx: BrowseContext, run_id: str, task: str, head: str) -> pd.DataFrame:
    """The predictions of one head on one task of one run (404 when there are none)."""
    p = ctx.run_predictions(run_id)
    sel = p[(p["task"] == task) & (p["head"] == head)]
    if sel.empty:
        raise NotFoundError(f"no predictions for task {task!r}, head {head!r} of run {run_id!r}")
    return sel.sort_values("row", kind="stable").reset_index(drop=True)


def class_names(ctx: BrowseContext, run_id: str, task: str, sel: pd.DataFrame) -> list[str]:
    """Names of the class indices: the task's classes when its labels agree with the predictions'
    y_true on every row (else, e.g. caption options or relabelled subsets, "class i")."""
    n = int(max(sel["y_true"].max(), sel["y_pred"].max())) + 1
    t = ctx.task(run_id, task)
    if t is not None and n <= t.n_classes:
        y_of_row = dict(zip(t.rows.tolist(), t.y.tolist(), strict=True))
        if all(y_of_row.get(r) == y for r, y in zip(sel["row"].tolist(), sel["y_true"].tolist(), strict=True)):
            return list(t.classes)
    prefix = "option" if task.startswith("mubench/") else "class"  # caption tasks: each row has its own options
    return [f"{prefix} {i}" for i in range(n)]


def confusion(sel: pd.DataFrame, n: int) -> np.ndarray:
    """counts[true, pred]."""
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (sel["y_true"].to_numpy(), sel["y_pred"].to_numpy()), 1)
    return m


def wrong_scores(ctx: BrowseContext, run_id: str, sel: pd.DataFrame) -> tuple[np.ndarray, str]:
    """(a confidence per row of `sel`, the rule): a score column if present, else the centroid margin."""
    for col in SCORE_COLUMNS:
        if col in sel.columns:
            return sel[col].to_numpy(dtype=np.float64), col
    x, valid = ctx.embeddings(run_id)
    rows, yt, yp = sel["row"].to_numpy(), sel["y_true"].to_numpy(), sel["y_pred"].to_numpy()
    ok = valid[rows]
    n = int(max(yt.max(), yp.max())) + 1
    emb = x[rows].astype(np.float64)
    sums = np.zeros((n, x.shape[1]))
    np.add.at(sums, yt[ok], emb[ok])
    counts = np.bincount(yt[ok], minlength=n)[:, None]
    centroids = np.divide(sums, np.maximum(counts, 1))
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    centroids = np.divide(centroids, norms, out=np.zeros_like(centroids), where=norms > 0)
    margin = np.einsum("ij,ij->i", emb, centroids[yp]) - np.einsum("ij,ij->i", emb, centroids[yt])
    return np.where(ok, margin, -np.inf), "centroid_margin"


def row_record(ctx: BrowseContext, run_id: str, row: int, names: list[str], yt: int, yp: int) -> dict[str, Any]:
    meta = ctx.meta(run_id)
    rec: dict[str, Any] = {"row": int(row), "y_true": int(yt), "y_pred": int(yp)}
    rec["true"], rec["pred"] = names[yt], names[yp]
    for col in META_COLUMNS:
        if col in meta.columns:
            rec[col] = clean(meta[col].iloc[row])
    return rec


def errors_view(ctx: BrowseContext, run_id: str, task: str, head: str) -> dict[str, Any]:
    """Confusion matrix and the most confidently wrong rows of one head."""
    sel = selection(ctx, run_id, task, head)
    names = class_names(ctx, run_id, task, sel)
    m = confusion(sel, len(names))
    wrong = sel["y_true"].to_numpy() != sel["y_pred"].to_numpy()
    scores, rule = wrong_scores(ctx, run_id, sel)
    idx = np.flatnonzero(wrong)
    order = idx[np.lexsort((sel["row"].to_numpy()[idx], -scores[idx]))][:WRONG_LIST]  # ties: lower row first
    most = []
    for i in order:
        r = sel.iloc[int(i)]
        rec = row_record(ctx, run_id, int(r["row"]), names, int(r["y_true"]), int(r["y_pred"]))
        rec["score"] = float(scores[i]) if np.isfinite(scores[i]) else None
        most.append(rec)
    return {
        "run": run_id,
        "model": ctx.run(run_id).model_spec,
        "task": task,
        "head": head,
        "classes": names,
        "matrix": m.tolist(),
        "total": len(sel),
        "wrong": int(wrong.sum()),
        "ranked_by": rule,
        "most_wrong": most,
        "options": task.startswith("mubench/") and names[0].startswith("option"),
    }


def cell_rows(ctx: BrowseContext, run_id: str, task: str, head: str, yt: int, yp: int) -> dict[str, Any]:
    """The images of one confusion-matrix cell (true class yt predicted as yp), by row."""
    sel = selection(ctx, run_id, task, head)
    names = class_names(ctx, run_id, task, sel)
    if yt >= len(names) or yp >= len(names):
        raise NotFoundError(f"no class {max(yt, yp)} in task {task!r}")
    hit = sel[(sel["y_true"] == yt) & (sel["y_pred"] == yp)]
    rows = [row_record(ctx, run_id, int(r), names, yt, yp) for r in hit["row"].tolist()[:CELL_LIMIT]]
    return {"run": run_id, "task": task, "head": head, "true": names[yt], "pred": names[yp], "total": len(hit),
            "rows": rows}  # fmt: skip


def routes(ctx: BrowseContext) -> list[BaseRoute]:
    @endpoint
    def list_choices(request: Request) -> dict[str, Any]:
        return {"choices": ctx.cached("", "error_choices", lambda: choices(ctx))}

    @endpoint
    def view(request: Request) -> dict[str, Any]:
        run_id, task, head = str_param(request, "run"), str_param(request, "task"), str_param(request, "head")
        ctx.run(run_id)
        selection(ctx, run_id, task, head)  # 404 before anything is cached: keys are real (task, head) pairs only
        return ctx.cached(run_id, f"errors\0{task}\0{head}", lambda: errors_view(ctx, run_id, task, head))

    @endpoint
    def cell(request: Request) -> dict[str, Any]:
        run_id = str_param(request, "run")
        ctx.run(run_id)
        yt, yp = int_param(request, "true", hi=1 << 20), int_param(request, "pred", hi=1 << 20)
        return cell_rows(ctx, run_id, str_param(request, "task"), str_param(request, "head"), yt, yp)

    return [
        Route("/api/errors/choices", list_choices, methods=["GET"]),
        Route("/api/errors", view, methods=["GET"]),
        Route("/api/errors/cell", cell, methods=["GET"]),
    ]
