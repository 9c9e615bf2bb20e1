"""The Search page's API: text -> image and "more like this" (image -> image), ranked by the very
functions `probe search` uses (`queries.gallery` and `queries.hits`), so a query here and on the
command line list the same rows with the same scores.

What differs is only what a server can keep between queries: the run's arrays and its image index
are read once, and the model (the only reason torch is ever imported by `probe browse`) is loaded
on the first text query of a run, checked against the store's weights hash, then kept.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.routing import BaseRoute, Route

from ..errors import UsageError
from ..heads.scoring import grid
from ..index import EXACT
from ..queries import gallery, hits, matching_encoder, query_vector, text_tokens
from ..store import l2_normalize
from .context import BrowseContext, clean
from .web import endpoint, int_param, str_param

DEFAULT_K, MAX_K = 12, 200
MAX_TEXT = 2000  # characters of a text query (a tokenizer reads far fewer)
FILTERED_GALLERIES = 8  # `where`-filtered galleries kept per server (each holds a copy of its rows)


class SearchService:
    """Per-run galleries and encoders, built once behind locks (queries arrive on several threads)."""

    def __init__(self, ctx: BrowseContext) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._run_locks: dict[str, threading.Lock] = {}
        self._galleries: OrderedDict[tuple[str, tuple[str, ...]], tuple] = OrderedDict()
        self._encoders: dict[str, Any] = {}

    def _run_lock(self, run_id: str) -> threading.Lock:
        with self._lock:
            return self._run_locks.setdefault(run_id, threading.Lock())

    def gallery(self, run_id: str, where: tuple[str, ...]) -> tuple:
        """(vectors, ids, index, info, notes, grid) of the run's image gallery, as `probe search` builds it."""
        key = (run_id, where)
        with self._run_lock(run_id):
            if key in self._galleries:
                self._galleries.move_to_end(key)
                return self._galleries[key]
            run, arrays = self.ctx.run(run_id), self.ctx.arrays(run_id)
            notes: list[str] = []
            vectors, *rest = gallery(self.ctx.store, run, arrays, "image", list(where) or None, EXACT, notes=notes)
            found = (vectors, *rest, notes, grid(vectors))  # the gallery's grid once, not per query
            self._galleries[key] = found
            filtered = [k for k in self._galleries if k[1]]
            if len(filtered) > FILTERED_GALLERIES:
                del self._galleries[filtered[0]]
            return found

    def encoder(self, run_id: str) -> Any:
        """The run's model, loaded on the first text query (torch is imported here, and only here)."""
        with self._run_lock(run_id):
            if run_id not in self._encoders:
                self._encoders[run_id] = matching_encoder(self.ctx.run(run_id))
            return self._encoders[run_id]

    def text_vector(self, run_id: str, text: str, notes: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
        """The normalised text query, exactly as `queries.query_vector` encodes it, with the kept model."""
        run = self.ctx.run(run_id)
        if not run.has_text:
            raise UsageError(f"{run.model_spec} is image-only: it cannot embed a text query")
        enc = self.encoder(run_id)
        query: dict[str, Any] = {"text": text}
        counted = text_tokens(enc, text)
        if counted is not None:
            query["tokens"], query["tokens_kept"] = counted
            if counted[0] > counted[1]:
                notes.append(
                    f"the query text is longer than {run.model_spec} reads: kept {counted[1]} of {counted[0]} "
                    "tokens (its start); the rest was ignored"
                )
        return l2_normalize(enc.encode_texts([text]))[0], query

    def search(
        self, run_id: str, *, text: str | None = None, row: int | None = None, k: int = DEFAULT_K, where: tuple = ()
    ) -> dict[str, Any]:
        """Top-k image hits with scores, metadata and thumbnail URLs (plain data for the page)."""
        t0 = time.perf_counter()
        run, arrays = self.ctx.run(run_id), self.ctx.arrays(run_id)
        notes: list[str] = []
        if text is not None:
            q, query = self.text_vector(run_id, text, notes)
        elif row is None:
            raise UsageError("give a text or a row to search with")
        else:
            self.ctx.check_row(run_id, row)
            q, query = query_vector(run, arrays, text=None, image=None, row=row, device=None, notes=notes)
        vectors, ids, idx_obj, info, gnotes, vgrid = self.gallery(run_id, where)
        found = hits(arrays, q, vectors, ids, idx_obj, "image", k, list(where) or None, gallery_grid=vgrid)
        for h in found:
            h["thumb"] = self.ctx.thumb_url(run_id, h["row"])
            for key, value in list(h.items()):
                h[key] = clean(value)
        return {
            "run_id": run_id,
            "model": run.model_spec,
            "query": query,
            "where": list(where),
            "hits": found,
            "index": {k: clean(v) for k, v in info.items()},
            "notes": notes + gnotes,
            "ms": round((time.perf_counter() - t0) * 1000, 2),
        }


def routes(ctx: BrowseContext) -> list[BaseRoute]:
    """The Search page's endpoints (GET only): the runs, a text query, and "more like this" a row."""
    svc = SearchService(ctx)

    def common(request: Request) -> tuple[int, tuple[str, ...]]:
        where = tuple(w for w in request.query_params.getlist("where") if w)
        return int_param(request, "k", DEFAULT_K, 1, MAX_K), where

    @endpoint
    def runs(request: Request) -> dict[str, Any]:
        out = [
            {
                "run_id": rid,
                "model": r.model_spec,
                "dataset": ctx.dataset_key(rid),
                "rows": int(r.layout.n_rows),
                "has_text": r.has_text,
            }
            for rid, r in sorted(ctx.runs.items())
        ]
        return {"runs": out}

    @endpoint
    def text(request: Request) -> dict[str, Any]:
        q = str_param(request, "q")
        if not q.strip():
            raise UsageError("the text query is empty")
        if len(q) > MAX_TEXT:
            raise UsageError(f"the text query is longer than {MAX_TEXT} characters")
        k, where = common(request)
        return svc.search(request.path_params["run_id"], text=q, k=k, where=where)

    @endpoint
    def like(request: Request) -> dict[str, Any]:
        k, where = common(request)
        return svc.search(request.path_params["run_id"], row=int_param(request, "row"), k=k, where=where)

    return [
        Route("/api/search/runs", runs, methods=["GET"]),
        Route("/api/search/{run_id}/text", text, methods=["GET"]),
        Route("/api/search/{run_id}/row/{row}", like, methods=["GET"]),
    ]
