"""The Map page's API: one run's image embeddings in 2-D, colours, and box/lasso selections.

The points travel as one binary float32 array (a million points is 8 MB, parsed by the page with
no JSON), colour codes as uint16 with a small JSON legend; the map itself is computed once per run
and method and cached beside the results (`mapdata.MapCache`). A selection is answered from the
same cached coordinates the page draws, so what the user circles is what the server lists.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..errors import UsageError
from .context import BrowseContext, clean
from .mapdata import (
    MapCache,
    available_methods,
    cache_key,
    check_method,
    colour_codes,
    correctness,
    parse_floats,
    points_bytes,
    project,
    select_box,
    select_lasso,
)
from .web import endpoint, int_param, str_param

DEFAULT_LIMIT, MAX_LIMIT = 60, 500  # thumbnails listed for a selection (the count is always exact)
BATCH_COLUMN = "dataset"  # the batch colouring's default column (a plate, site or patient column where present)


def run_identity(ctx: BrowseContext, run_id: str) -> dict[str, Any]:
    """What a run's map depends on, cheap to read (no embeddings): its path, provenance digest and
    which rows hold an embedding. A run extended or re-extracted gets a new key, so a new map."""
    run = ctx.run(run_id)
    valid = np.asarray(ctx.arrays(run_id).valid, dtype=bool)
    return {
        "path": run.path,
        "provenance": str(run.attrs.get("provenance_sha256", "")),
        "rows": int(run.layout.n_rows),
        "valid": hashlib.sha256(np.packbits(valid).tobytes()).hexdigest(),
    }


# ---- colourings: a registry of what a point can be coloured by ------------------------------
def _meta_values(ctx: BrowseContext, run_id: str, params: dict[str, str]) -> tuple[pd.Series, str]:
    meta = ctx.meta(run_id)
    column = params.get("column", "")
    if column not in meta.columns:
        raise UsageError(f"no metadata column {column!r} (have: {', '.join(map(str, meta.columns))})")
    return meta[column].reset_index(drop=True), column


def _batch_values(ctx: BrowseContext, run_id: str, params: dict[str, str]) -> tuple[pd.Series, str]:
    values, column = _meta_values(ctx, run_id, {"column": params.get("column") or BATCH_COLUMN})
    return values, f"batch ({column})"


def _run_predictions(ctx: BrowseContext, run_id: str) -> pd.DataFrame:
    preds = ctx.predictions
    if preds is None or len(preds) == 0:
        return pd.DataFrame(columns=["task", "head", "row", "y_true", "y_pred"])
    run = ctx.run(run_id)
    return preds[(preds["model"] == run.model_spec) & (preds["dataset"] == ctx.dataset_key(run_id))]


def _correct_values(ctx: BrowseContext, run_id: str, params: dict[str, str]) -> tuple[pd.Series, str]:
    task, head = params.get("task", ""), params.get("head", "")
    preds = _run_predictions(ctx, run_id)
    mine = preds[(preds["task"] == task) & (preds["head"] == head)]
    if len(mine) == 0:
        raise UsageError(f"no predictions of head {head!r} on task {task!r} for this run")
    return correctness(mine, ctx.run(run_id).layout.n_rows), f"{task} / {head}: correct or wrong"


COLOURINGS: dict[str, Callable[[BrowseContext, str, dict[str, str]], tuple[pd.Series, str]]] = {
    "meta": _meta_values,
    "batch": _batch_values,
    "correct": _correct_values,
}


def colour_options(ctx: BrowseContext, run_id: str) -> list[dict[str, Any]]:
    """Everything the page may colour this run by, as the query parameters of the colour endpoints."""
    meta = ctx.meta(run_id)
    opts: list[dict[str, Any]] = [
        {"label": str(c), "params": {"kind": "meta", "column": str(c)}} for c in meta.columns if str(c) != "image_id"
    ]
    if BATCH_COLUMN in meta.columns:
        opts.append({"label": f"batch ({BATCH_COLUMN})", "params": {"kind": "batch", "column": BATCH_COLUMN}})
    pairs = _run_predictions(ctx, run_id)[["task", "head"]].drop_duplicates()
    for task, head in sorted(pairs.itertuples(index=False, name=None)):
        label = f"{task} / {head}: correct or wrong"
        opts.append({"label": label, "params": {"kind": "correct", "task": str(task), "head": str(head)}})
    return opts


# ---- the service behind the routes ------------------------------------------------------------
class MapService:
    """Maps and colourings of the runs of one BrowseContext, each computed once and kept."""

    def __init__(self, ctx: BrowseContext) -> None:
        self.ctx = ctx
        self.cache = MapCache(ctx.cache_dir)
        self._colours: dict[tuple, tuple[np.ndarray, list[dict[str, Any]], str]] = {}

    def coords(self, run_id: str, method: str) -> np.ndarray:
        """The (n, 2) float32 map of a run (NaN rows have no embedding), from the cache when it is there."""
        check_method(method)  # before reading anything
        key = cache_key(run_identity(self.ctx, run_id), method)

        def compute() -> np.ndarray:
            x, valid = self.ctx.embeddings(run_id)
            return project(x, valid, method)

        return self.cache.get(run_id, method, key, compute)

    def colours(self, run_id: str, params: dict[str, str]) -> tuple[np.ndarray, list[dict[str, Any]], str]:
        kind = params.get("kind", "meta")
        if kind not in COLOURINGS:
            raise UsageError(f"unknown colouring {kind!r} (have: {', '.join(COLOURINGS)})")
        self.ctx.run(run_id)
        key = (run_id, kind, params.get("column"), params.get("task"), params.get("head"))
        if key not in self._colours:
            values, title = COLOURINGS[kind](self.ctx, run_id, params)
            codes, legend = colour_codes(values)
            self._colours[key] = (codes, legend, title)
        return self._colours[key]

    def info(self, run_id: str) -> dict[str, Any]:
        run = self.ctx.run(run_id)
        meta = self.ctx.meta(run_id)
        return {
            "run_id": run_id,
            "model": run.model_spec,
            "dataset": self.ctx.dataset_key(run_id),
            "rows": int(run.layout.n_rows),
            "methods": available_methods(),
            "colour_by": colour_options(self.ctx, run_id),
            "default_colour": "label_name" if "label_name" in meta.columns else None,
            "partners": [r for r in self.ctx.same_rows(run_id) if r != run_id],
        }

    def select(self, run_id: str, method: str, params: dict[str, str], limit: int) -> dict[str, Any]:
        """Rows inside a box or lasso (map coordinates of `method`): exact count, the first `limit` with metadata."""
        coords = self.coords(run_id, method)
        if "box" in params:
            rows = select_box(coords, parse_floats(params["box"], "box"))
        elif "lasso" in params:
            rows = select_lasso(coords, parse_floats(params["lasso"], "lasso"))
        else:
            raise UsageError("give box=x0,y0,x1,y1 or lasso=x0,y0,x1,y1,...")
        meta = self.ctx.meta(run_id)
        items = [
            {
                "row": int(r),
                "thumb": self.ctx.thumb_url(run_id, int(r)),
                "meta": {str(c): clean(meta[c].iloc[r]) for c in meta.columns},
            }
            for r in rows[:limit]
        ]
        return {"run_id": run_id, "method": method, "count": len(rows), "items": items}


def _params(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.query_params.items()}


def routes(ctx: BrowseContext) -> list[BaseRoute]:
    """The Map page's JSON and binary endpoints (all GET, all read-only)."""
    svc = MapService(ctx)

    @endpoint
    def runs(request: Request) -> dict[str, Any]:
        out = [
            {"run_id": rid, "model": r.model_spec, "dataset": ctx.dataset_key(rid), "rows": int(r.layout.n_rows)}
            for rid, r in sorted(ctx.runs.items())
        ]
        return {"runs": out, "methods": available_methods()}

    @endpoint
    def info(request: Request) -> dict[str, Any]:
        return svc.info(request.path_params["run_id"])

    @endpoint
    def points(request: Request) -> Response:
        coords = svc.coords(request.path_params["run_id"], str_param(request, "method", "pca"))
        finite = coords[np.isfinite(coords).all(axis=1)]
        lo = finite.min(axis=0) if len(finite) else np.zeros(2)
        hi = finite.max(axis=0) if len(finite) else np.ones(2)
        headers = {"X-Rows": str(len(coords)), "X-Bounds": ",".join(f"{v:.9g}" for v in (*lo, *hi))}
        return Response(points_bytes(coords), media_type="application/octet-stream", headers=headers)

    @endpoint
    def legend(request: Request) -> dict[str, Any]:
        codes, leg, title = svc.colours(request.path_params["run_id"], _params(request))
        return {"title": title, "legend": leg, "rows": len(codes)}

    @endpoint
    def codes(request: Request) -> Response:
        c, _, _ = svc.colours(request.path_params["run_id"], _params(request))
        headers = {"X-Rows": str(len(c))}
        return Response(c.astype("<u2").tobytes(), media_type="application/octet-stream", headers=headers)

    @endpoint
    def select(request: Request) -> dict[str, Any]:
        limit = int_param(request, "limit", DEFAULT_LIMIT, 0, MAX_LIMIT)
        method = str_param(request, "method", "pca")
        return svc.select(request.path_params["run_id"], method, _params(request), limit)

    return [
        Route("/api/map/runs", runs, methods=["GET"]),
        Route("/api/map/{run_id}", info, methods=["GET"]),
        Route("/api/map/{run_id}/points", points, methods=["GET"]),
        Route("/api/map/{run_id}/legend", legend, methods=["GET"]),
        Route("/api/map/{run_id}/codes", codes, methods=["GET"]),
        Route("/api/map/{run_id}/select", select, methods=["GET"]),
    ]
