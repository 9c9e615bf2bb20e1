"""Queries against a store: text->image, image->image and image->text.

New query texts or images need the model; it is reloaded from the store's provenance and must
reproduce the stored weights hash and preprocessing exactly, or the query is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ProvenanceMismatchError, StoreError, UsageError
from .heads.scoring import top_k
from .index import EXACT, IndexCache, build_index
from .store import EmbeddingStore, Run, RunArrays, l2_normalize

META_COLUMNS = ("label_name", "dataset", "domain", "modality", "submodality", "stain", "image_id")


@dataclass
class SearchResult:
    query: dict[str, Any]
    hits: list[dict[str, Any]]
    index: dict[str, Any] = field(default_factory=dict)


def pick_run(store: EmbeddingStore, model: str | None, dataset: str | None = None) -> Run:
    runs = store.find(model, dataset)
    if not runs:
        have = ", ".join(sorted({r.model_spec for r in store.runs()})) or "none"
        raise StoreError(f"no extracted model {model!r} in {store.path} (have: {have})")
    if len(runs) > 1:
        raise UsageError(f"{len(runs)} groups match; pass --model and --dataset: " + ", ".join(r.path for r in runs))
    return runs[0]


def matching_encoder(run: Run, device: str | None = None):
    """Load the run's model and prove it is the one that made the store's embeddings."""
    from .encoders import load_encoder

    p = run.provenance
    enc = load_encoder(p["model_spec"], device=device)
    diffs = [
        k
        for k, mine in (("weights_hash", enc.info.weights_hash), ("preprocess", enc.info.preprocess))
        if p.get(k) != mine
    ]
    if diffs:
        raise ProvenanceMismatchError(
            f"the model loaded for {p['model_spec']} differs from the one in the store ({', '.join(diffs)}); "
            "queries would not be comparable with the stored embeddings"
        )
    return enc


def parse_where(where: list[str] | None) -> dict[str, str]:
    out = {}
    for w in where or []:
        col, sep, val = w.partition("=")
        if not sep or not col:
            raise UsageError(f"--where takes COLUMN=VALUE, not {w!r}")
        out[col.strip()] = val.strip()
    return out


def run_policy(run: Run):
    """The intensity policy the run's images went through (its description starts with the name)."""
    from .imaging import get_policy

    return get_policy(run.provenance.get("intensity_policy", "percentile").split(":")[0])


def _gallery_mask(arrays: RunArrays, where: dict[str, str]) -> np.ndarray:
    meta = arrays.meta
    mask = arrays.valid.copy()
    for col, val in where.items():
        if col not in meta:
            raise UsageError(f"no metadata column {col!r}; have {', '.join(meta.columns)}")
        mask &= (meta[col].astype(str) == val).to_numpy()
    return mask


def search_store(
    store: str | Path | EmbeddingStore,
    model: str | None,
    *,
    text: str | None = None,
    image: str | Path | None = None,
    row: int | None = None,
    to: str = "image",
    k: int = 10,
    where: list[str] | None = None,
    dataset: str | None = None,
    index: str = EXACT,
    device: str | None = None,
) -> SearchResult:
    """Top-k hits for one query; plain data out (lists of dicts)."""
    if sum(v is not None for v in (text, image, row)) != 1:
        raise UsageError("give exactly one of --text, --image or --row")
    if to not in ("image", "text"):
        raise UsageError("--to must be image or text")
    if text is not None and not text.strip():
        raise UsageError("--text is empty: give a text to search for")
    st = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    run = pick_run(st, model, dataset)
    arrays = RunArrays(run)  # each array is read from the store at most once
    if text is not None and not run.has_text:
        raise UsageError(f"{run.model_spec} is image-only: it cannot embed a text query")
    if to == "text" and not run.has_text:
        raise UsageError(f"{run.model_spec} is image-only: it has no text embeddings to search")
    # -- the query vector -------------------------------------------------------------------------
    if row is not None:
        if not 0 <= row < run.layout.n_rows:
            raise UsageError(f"--row must be in 0..{run.layout.n_rows - 1}")
        if not arrays.valid[row]:
            reason = run.failures().get(row, "its chunk is not extracted yet")
            raise UsageError(f"row {row} has no embedding: {reason}")
        q = arrays.x[row]
        query: dict[str, Any] = {"row": row}
    else:
        enc = matching_encoder(run, device)
        if text is not None:
            q = l2_normalize(enc.encode_texts([text]))[0]
            query = {"text": text}
        else:
            from .imaging import load_rgb

            path = Path(str(image))
            if not path.is_file():
                raise UsageError(f"query image {path} does not exist")
            x = enc.transform(load_rgb(path.read_bytes(), run_policy(run)))[None]
            q = l2_normalize(enc.encode_images(x)[0])[0]
            query = {"image": str(path)}
    query["model"] = run.model_spec
    # -- the gallery ------------------------------------------------------------------------------
    if to == "text":
        gallery_ids = np.arange(len(arrays.texts))
        idx_obj, info, _ = IndexCache(st.path).get(run.path, "text", arrays.text_emb, EXACT)
    else:
        emb = arrays.x
        mask = _gallery_mask(arrays, parse_where(where))
        if where:  # a filtered gallery gets its own (exact or ANN) index, built on the fly
            gallery_ids = np.flatnonzero(mask)
            idx_obj, info = build_index(emb[gallery_ids], index)
        else:  # the whole gallery: the saved index, rebuilt if stale; unreadable rows filtered out
            gallery_ids = np.arange(len(emb))
            idx_obj, info, _ = IndexCache(st.path).get(run.path, "image", emb, index)
    valid = arrays.valid
    kk = min(len(gallery_ids), k + (0 if to == "text" or where else int((~valid).sum())))
    # the index proposes candidates; exact scores rank them, ties to the lower row (same on every CPU)
    vectors = arrays.text_emb if to == "text" else emb[gallery_ids] if where else emb
    scores, found = top_k(vectors, q[None], kk, candidates=lambda qs, n: idx_obj.search(qs.astype(np.float32), n)[1])
    hits = []
    texts = arrays.texts if to == "text" else None
    meta = arrays.meta if to == "image" else None
    for s, j in zip(scores[0], found[0], strict=True):
        if j < 0:
            continue
        item = int(gallery_ids[j])
        if to == "image" and not valid[item]:
            continue
        hit: dict[str, Any] = {"rank": len(hits) + 1, "score": float(s)}
        if to == "text":
            hit.update(text_index=item, text=texts[item])
        else:
            hit["row"] = item
            for col in META_COLUMNS:
                if col in meta:
                    v = meta[col].iloc[item]
                    hit[col] = None if v is None or (isinstance(v, float) and v != v) else v
        hits.append(hit)
        if len(hits) == k:
            break
    return SearchResult(query, hits, info.__dict__)


def hit_images(run: Run, rows: list[int]) -> list[bytes]:
    """Raw bytes of the hit images, read from the dataset named in the store's provenance."""
    from .datasets import load_dataset

    p = run.provenance
    limit = int(p["dataset_limit"]) if p.get("dataset_limit") else None
    ds = load_dataset(
        p.get("dataset_spec") or "sample",
        split=p.get("split"),
        revision=p.get("dataset_revision"),
        limit=limit,
        scene=p.get("dataset_scene"),
    )
    if p.get("dataset_fingerprint") and ds.identity.get("fingerprint") != p["dataset_fingerprint"]:
        raise StoreError(
            f"the dataset {p.get('dataset_spec')} changed since extraction (fingerprint differs); "
            "cannot show its images for these hits"
        )
    return [ds.reader.read(r) for r in rows]
