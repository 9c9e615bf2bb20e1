"""Summaries of a run for `probe info` and `probe status`; derived, never stored."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import shard_of
from .arrays import _DAMAGE, _array_at
from .run import BrokenRun, Run


def describe(node: Run | BrokenRun) -> dict[str, Any]:
    """A JSON-ready summary of a run for `probe info`; the status is derived, never stored."""
    problems = node.check()
    if isinstance(node, BrokenRun) or not node.provenance_ok:
        p = node.raw_provenance if isinstance(node, Run) else {}
        return {
            "group": node.path,
            "model": p.get("model_spec"),
            "dataset": p.get("dataset_spec"),
            "split": node.path.split("/")[-1],
            "rows": p.get("n_rows"),
            "chunks_done": "?",
            "texts": 0,
            "failed_rows": None,
            "status": "damaged",
            "problems": [str(d) for d in problems],
            "complete": False,
            "size_bytes": node.size_bytes(),
            "provenance": p,
        }
    p = node.provenance
    try:
        done = node._check_done(_array_at(node.group, "done"))[0]
    except _DAMAGE:  # the done array's zarr.json is damaged: reported in problems
        done = np.zeros(node.layout.n_chunks, dtype=bool)
    complete = node.texts_done and bool(done.all())
    if problems:
        status = "damaged"
    elif complete:
        status = "complete"
    else:
        status = f"incomplete: {int(done.sum())}/{done.size} chunks" + ("" if node.texts_done else ", texts pending")
    return {
        "group": node.path,
        "model": p.get("model_spec"),
        "dataset": p.get("dataset_spec"),
        "split": node.path.split("/")[-1],
        "rows": p.get("n_rows"),
        "chunks_done": f"{int(done.sum())}/{done.size}",
        "texts": int(_array_at(node.group, "texts").shape[0]) if node.has_text and "texts" in node.group else 0,
        "failed_rows": None if problems else len(node.failures_unchecked()),
        "status": status,
        "problems": [str(d) for d in problems],
        "complete": complete and not problems,
        "templates": node.prompts().get("templates", []),
        "size_bytes": node.size_bytes(),
        "provenance": p,
    }


def run_status(node: Run | BrokenRun, shards: int | None = None) -> dict[str, Any]:
    """Progress of one run for `probe status`: chunks done / total, per shard, live and stale claims.

    Cheap (the done flags and the claims, no checksums). `shards` defaults to the count the
    shards recorded when they started (`ChunkClaims.note_shards`).
    """
    out: dict[str, Any] = {"group": node.path, "model": None, "dataset": None, "status": "damaged"}
    if isinstance(node, BrokenRun) or not node.provenance_ok:
        return {**out, "chunks_done": None, "chunks_total": None, "shards": None, "per_shard": [], "claims": []}
    p = node.provenance
    try:
        done = node._check_done(_array_at(node.group, "done"))[0]
    except _DAMAGE:
        done = np.zeros(node.layout.n_chunks, dtype=bool)
    claims = node.claims()
    owners = claims.owners()
    n = shards or claims.shards_noted()
    held = [
        {"key": str(k), "host": c.host, "pid": c.pid, "age_s": round(c.age_s, 1), "live": c.live}
        for k, c in sorted(owners.items(), key=lambda kv: str(kv[0]))
    ]
    per_shard = []
    for i in range(n or 0):
        mine = [c for c in range(done.size) if shard_of(c, n or 1) == i]
        per_shard.append(
            {
                "shard": i,
                "done": int(done[mine].sum()) if mine else 0,
                "total": len(mine),
                "live_claims": sum(1 for k, c in owners.items() if isinstance(k, int) and k in mine and c.live),
                "stale_claims": sum(1 for k, c in owners.items() if isinstance(k, int) and k in mine and not c.live),
            }
        )
    complete = bool(done.all()) and node.texts_done
    cleared = node.interrupted_repairs(done)
    return {
        **out,
        "model": p.get("model_spec"),
        "dataset": p.get("dataset_spec"),
        "status": "damaged" if cleared else "complete" if complete else "incomplete",
        "interrupted_repair": cleared,
        "chunks_done": int(done.sum()),
        "chunks_total": int(done.size),
        "texts_done": node.texts_done,
        "shards": n,
        "per_shard": per_shard,
        "claims": held,
    }
