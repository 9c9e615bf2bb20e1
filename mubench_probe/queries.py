"""Queries against a store: text->image, image->image and image->text.

New query texts or images need the model; it is reloaded from the store's provenance and must
reproduce the stored weights hash and preprocessing exactly, or the query is refused. A query
text longer than the model's context is truncated by its tokenizer, as every CLIP model does;
the result says so (`notes`, and the token counts in `query`) instead of hiding it.
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
from .tasks import where_mask

META_COLUMNS = ("label_name", "dataset", "domain", "modality", "submodality", "stain", "image_id")


@dataclass
class SearchResult:
    query: dict[str, Any]
    hits: list[dict[str, Any]]
    index: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the user should know: a truncated query, a rebuilt index


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


def run_policy(run: Run):
    """The intensity policy the run's images went through (its description starts with the name)."""
    from .imaging import get_policy

    return get_policy(run.provenance.get("intensity_policy", "percentile").split(":")[0])


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
    if (text is not None or to == "text") and not run.has_text:
        what = "it cannot embed a text query" if text is not None else "it has no text embeddings to search"
        raise UsageError(f"{run.model_spec} is image-only: {what}")
    notes: list[str] = []
    q, query = query_vector(run, arrays, text=text, image=image, row=row, device=device, notes=notes)
    vectors, ids, idx_obj, info = gallery(st, run, arrays, to, where, index, notes=notes)
    found = hits(arrays, q, vectors, ids, idx_obj, to, k, where)
    return SearchResult({**query, "model": run.model_spec}, found, info, notes)


def text_tokens(enc: Any, text: str) -> tuple[int, int] | None:
    """(tokens in `text`, tokens the model reads of it), start and end tokens included; None when
    the encoder's tokenizer cannot tell (the count for Hugging Face tokenizers is approximate)."""
    tok, ctx = getattr(enc, "tokenizer", None), enc.info.context_length
    if tok is None or not ctx:
        return None
    if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # open_clip's CLIP BPE tokenizer
        n = len(tok.encode(text)) + 2
    elif callable(getattr(tok, "tokenizer", None)):  # open_clip's wrappers of Hugging Face tokenizers
        clean = getattr(tok, "clean_fn", None)
        n = len(tok.tokenizer(clean(text) if callable(clean) else text)["input_ids"])
    else:
        return None
    return n, min(n, int(ctx))


def query_vector(
    run: Run,
    arrays: RunArrays,
    *,
    text: str | None,
    image: str | Path | None,
    row: int | None,
    device: str | None,
    notes: list[str] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The normalised query: a stored row as is, or a new text or image encoded by the run's own model.

    A text query reports its length in tokens and how many the model kept; a truncated one adds a note."""
    if row is not None:
        if not 0 <= row < run.layout.n_rows:
            raise UsageError(f"--row must be in 0..{run.layout.n_rows - 1}")
        if not arrays.valid[row]:
            reason = run.failures().get(row, "its chunk is not extracted yet")
            raise UsageError(f"row {row} has no embedding: {reason}")
        return arrays.x[row], {"row": row}
    enc = matching_encoder(run, device)
    if text is not None:
        query: dict[str, Any] = {"text": text}
        counted = text_tokens(enc, text)
        if counted is not None:
            query["tokens"], query["tokens_kept"] = counted
            if counted[0] > counted[1] and notes is not None:
                notes.append(
                    f"the query text is longer than {run.model_spec} reads: kept {counted[1]} of {counted[0]} "
                    "tokens (its start); the rest was ignored"
                )
        return l2_normalize(enc.encode_texts([text]))[0], query
    from .imaging import load_rgb

    path = Path(str(image))
    if not path.is_file():
        raise UsageError(f"query image {path} does not exist")
    x = enc.transform(load_rgb(path.read_bytes(), run_policy(run)))[None]
    return l2_normalize(enc.encode_images(x)[0])[0], {"image": str(path)}


def _text_side(arrays: RunArrays) -> tuple[np.ndarray, list[str]]:
    """A run's text embeddings and texts (searching texts refuses an image-only run before this)."""
    if arrays.text_emb is None or arrays.texts is None:
        raise UsageError(f"{arrays.run.model_spec} is image-only: it has no texts to search")
    return arrays.text_emb, arrays.texts


def gallery(
    st: EmbeddingStore,
    run: Run,
    arrays: RunArrays,
    to: str,
    where: list[str] | None,
    index: str,
    notes: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, Any, dict[str, Any]]:
    """What is searched: (vectors, their row or text ids, a FAISS index over them, the index's info).

    Texts and the whole image gallery use the index saved beside the store (rebuilt when stale or
    unreadable; `notes` gets a line when it was damaged); a `--where`-filtered gallery gets its
    own index, built on the fly.
    """
    cache = IndexCache(st.path)
    if to == "text":
        text_emb, texts = _text_side(arrays)
        idx_obj, info, _ = cache.get(run.path, "text", text_emb, EXACT)
        if notes is not None:
            notes += cache.notes
        return text_emb, np.arange(len(texts)), idx_obj, info.__dict__
    emb = arrays.x
    if where:
        ids = np.flatnonzero(arrays.valid & where_mask(arrays.meta, where))
        idx_obj, info = build_index(emb[ids], index)
        return emb[ids], ids, idx_obj, info.__dict__
    idx_obj, info, _ = cache.get(run.path, "image", emb, index)
    if notes is not None:
        notes += cache.notes
    return emb, np.arange(len(emb)), idx_obj, info.__dict__


def hits(
    arrays: RunArrays,
    q: np.ndarray,
    vectors: np.ndarray,
    ids: np.ndarray,
    idx_obj: Any,
    to: str,
    k: int,
    where: list[str] | None,
    gallery_grid: float | None = None,
) -> list[dict[str, Any]]:
    """The top k, ranked by exact score (ties to the lower row, the same on every CPU), with metadata.

    The index proposes candidates; rows whose image failed are skipped, so the whole image
    gallery asks for k plus their number. `gallery_grid`: `scoring.grid(vectors)` when the caller
    keeps the gallery for many queries (a server): finding it reads the whole gallery.
    """
    valid = arrays.valid
    texts = _text_side(arrays)[1] if to == "text" else []
    extra = 0 if to == "text" or where else int((~valid).sum())
    kk = min(len(ids), k + extra)
    scores, found = top_k(
        vectors,
        q[None],
        kk,
        candidates=lambda qs, n: idx_obj.search(qs.astype(np.float32), n)[1],
        gallery_grid=gallery_grid,
    )
    out: list[dict[str, Any]] = []
    for s, j in zip(scores[0], found[0], strict=True):
        if j < 0:
            continue
        item = int(ids[j])
        if to == "image" and not valid[item]:
            continue
        hit: dict[str, Any] = {"rank": len(out) + 1, "score": float(s)}
        if to == "text":
            hit.update(text_index=item, text=texts[item])
        else:
            hit["row"] = item
            for col in META_COLUMNS:
                if col in arrays.meta:
                    v = arrays.meta[col].iloc[item]
                    hit[col] = None if v is None or (isinstance(v, float) and v != v) else v
        out.append(hit)
        if len(out) == k:
            break
    return out


def run_dataset(run: Run, what: str = "its images") -> Any:
    """The dataset a run was extracted from, opened as its provenance names it; refused (StoreError,
    naming `what` cannot be shown) when its fingerprint says it changed since extraction."""
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
            f"the dataset {p.get('dataset_spec')} changed since extraction (fingerprint differs); cannot show {what}"
        )
    return ds


def hit_images(run: Run, rows: list[int]) -> list[bytes]:
    """Raw bytes of the hit images, read from the dataset named in the store's provenance."""
    ds = run_dataset(run, "its images for these hits")
    return [ds.reader.read(r) for r in rows]
