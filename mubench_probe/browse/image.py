"""Image page data: one row's metadata, every head's prediction in every model over the same
images, and its k nearest neighbours in each model side by side.

Neighbours are exact cosine top-k over the run's stored, normalised image embeddings
(`heads.scoring.top_k`: a float32 matrix-vector product proposes, exact scores rank, ties to the
lower row), the row itself and rows without an embedding left out. No index is built or written
beside the store (a FAISS copy would double the memory for one product per request).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from ..errors import ProbeError
from ..heads.scoring import grid, top_k
from ..queries import META_COLUMNS
from .context import BrowseContext, clean
from .errors import class_names, selection
from .thumbs import channel_colours, thumbnails
from .web import endpoint, int_param

DEFAULT_K = 8
MAX_K = 100


def matvec_candidates(x: np.ndarray) -> Any:
    """Candidate rows by a float32 matrix-vector product (no index, no copy of the embeddings);
    `top_k` re-scores them exactly and widens the search when float error could hide a tie."""

    def search(q: np.ndarray, n: int) -> np.ndarray:
        s = np.asarray(q, dtype=np.float32) @ x.T
        n = min(n, x.shape[0])
        part = np.argpartition(-s, n - 1, axis=1)[:, :n] if n < x.shape[0] else np.tile(np.arange(n), (len(s), 1))
        return part

    return search


def neighbours(ctx: BrowseContext, run_id: str, row: int, k: int = DEFAULT_K) -> list[dict[str, Any]]:
    """The k rows nearest to `row` in this run's embedding space (cosine), best first."""
    ctx.check_row(run_id, row)
    x, valid = ctx.embeddings(run_id)
    if not valid[row]:
        return []
    search = ctx.cached(run_id, "candidates", lambda: matvec_candidates(x))
    extra = int((~valid).sum()) + 1  # the row itself and rows without an embedding are skipped
    scale = ctx.cached(run_id, "grid", lambda: grid(x))  # the gallery's exact-score grid, found once
    scores, found = top_k(x, x[row : row + 1], min(len(x), k + extra), candidates=search, gallery_grid=scale)
    meta = ctx.meta(run_id)
    out: list[dict[str, Any]] = []
    for s, j in zip(scores[0], found[0], strict=True):
        j = int(j)
        if j < 0 or j == row or not valid[j]:
            continue
        hit: dict[str, Any] = {"rank": len(out) + 1, "row": j, "score": float(s)}
        for col in ("label_name", "dataset", "stain"):
            if col in meta.columns:
                hit[col] = clean(meta[col].iloc[j])
        out.append(hit)
        if len(out) == k:
            break
    return out


def predictions_of_row(ctx: BrowseContext, run_id: str, row: int) -> list[dict[str, Any]]:
    """Every head's prediction for this image, in every run over the same rows."""
    out = []
    for rid in ctx.same_rows(run_id):
        p = ctx.run_predictions(rid)
        if p.empty:
            continue
        for r in p[p["row"] == row].sort_values(["task", "head"]).to_dict("records"):
            task, head, yt, yp = str(r["task"]), str(r["head"]), int(r["y_true"]), int(r["y_pred"])
            names = ctx.caption_texts(rid, task, row)  # a caption task: this row's own options
            if names is None or max(yt, yp) >= len(names):
                names = _names(ctx, rid, task, head)
            out.append(
                {
                    "run": rid,
                    "model": ctx.runs[rid].model_spec,
                    "task": task,
                    "head": head,
                    "true": names[yt],
                    "pred": names[yp],
                    "correct": yt == yp,
                }
            )
    return out


def _names(ctx: BrowseContext, run_id: str, task: str, head: str) -> list[str]:
    """Class names of one head's predictions (kept: the check behind them reads every row)."""
    return ctx.cached(
        run_id, f"names\0{task}\0{head}", lambda: class_names(ctx, run_id, task, selection(ctx, run_id, task, head))
    )


def image_view(ctx: BrowseContext, run_id: str, row: int, k: int = DEFAULT_K) -> dict[str, Any]:
    run = ctx.check_row(run_id, row)
    meta = ctx.meta(run_id)
    _, valid = ctx.embeddings(run_id)
    failure = ctx.cached(run_id, "failures", run.failures_unchecked).get(row)
    try:
        channels = channel_colours(thumbnails(ctx).n_channels(run_id, row))
        image_error = None
    except ProbeError as exc:  # an unreadable image still has metadata, predictions, maybe neighbours
        channels, image_error = [], str(exc)
    return {
        "run": run_id,
        "model": run.model_spec,
        "path": run.path,
        "row": row,
        "rows": run.layout.n_rows,
        "valid": bool(valid[row]),
        "failure": failure,
        "image_error": image_error,
        "channels": channels,
        "meta": [{"column": c, "value": clean(meta[c].iloc[row])} for c in meta.columns],
        "predictions": predictions_of_row(ctx, run_id, row),
        "neighbours": [
            {"run": rid, "model": ctx.runs[rid].model_spec, "hits": neighbours(ctx, rid, row, k)}
            for rid in ctx.same_rows(run_id)
        ],
        "meta_columns": [c for c in META_COLUMNS if c in meta.columns],
    }


def routes(ctx: BrowseContext) -> list[BaseRoute]:
    @endpoint
    def view(request: Request) -> dict[str, Any]:
        row = int_param(request, "row")
        return image_view(ctx, request.path_params["run_id"], row, int_param(request, "k", DEFAULT_K, 1, MAX_K))

    return [Route("/api/image/{run_id}/{row}", view, methods=["GET"])]
