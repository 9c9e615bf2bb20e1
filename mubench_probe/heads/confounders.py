"""Confounders and calibration: does an embedding group images by biology or by batch, and do a
head's probabilities mean what they say? Pure functions over arrays, identical on every CPU.

* Not-same-batch (NSB) kNN: a query's neighbours may not come from its own batch (plate, source,
  patient). Nearest neighbours from the same plate share its illumination and staining, so plain
  kNN rewards batch effects; NSB is the rule of the BBBC021 mechanism-of-action evaluation
  (Ljosa et al. 2013, "not same compound"; Ando et al. 2017, "not same compound or batch") that
  Dino4Cells (Doron et al. 2023) and Cell-DINO evaluate with.
* Batch-effect index: among each row's k nearest other rows, the share of the same class, of the
  same batch, and PathoROB's robustness index (Kömen et al. 2025, "Towards robust foundation
  models for digital pathology").
* Calibration: top-label expected calibration error (Naeini et al. 2015; Guo et al. 2017, "On
  calibration of modern neural networks") and its reliability curve.

Neighbours are ranked as `scoring.top_k` ranks them: FAISS proposes candidates, exact scores rank
them, ties go to the lower gallery row, and a search is repeated with more candidates until the
candidates prove that no row outside them ties with or beats the k-th.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from ..config import DEFAULT_BOOTSTRAP, TEMPERATURE
from .knn import weighted_votes
from .metrics import DEFAULT_SEED, Estimate, _index_blocks, _interval
from .scoring import FRACTION_BITS, RowView, exact_pairs, faiss_candidates, grid, rank_rows, view

MARGIN = 16  # candidates beyond k, as in scoring.top_k
SEARCH_CELLS = 1 << 22  # candidate indices per search call (32 MB of int64): queries searched in chunks
OVERFETCH_CELLS = 1 << 22  # a batch whose queries x (its gallery rows + k) fit here is over-fetched, see below
_NO_ROW = np.iinfo(np.int64).max

Search = Callable[[np.ndarray, int], np.ndarray]


def _codes(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batch labels of two arrays as integer codes on one shared table (any hashable labels)."""
    a, b = np.asarray(a), np.asarray(b)
    both = np.concatenate([a, b]) if a.dtype.kind in "iub" and b.dtype.kind in "iub" else None
    if both is None:
        both = np.concatenate([a.astype(object), b.astype(object)])
    codes, _ = pd.factorize(both, use_na_sentinel=False)
    codes = codes.astype(np.int64)
    return codes[: len(a)], codes[len(a) :]


def _slack(dim: int, sg: float, sq: float) -> float:
    """How far a float32 search score may be from the exact one, twice (as in scoring.top_k)."""
    return 4.0 * np.sqrt(dim) * np.finfo(np.float32).eps * 2.0 ** (2 * FRACTION_BITS) / (sg * sq)


def _sub_gallery(gallery: np.ndarray | RowView, rows: np.ndarray) -> np.ndarray | RowView:
    """gallery[rows] without copying a RowView (or a large array) whole."""
    if isinstance(gallery, RowView):
        return RowView(gallery.x, rows if gallery.rows is None else gallery.rows[rows])
    return view(gallery, rows)


def _search_eligible(
    gallery: np.ndarray | RowView,
    gcodes: np.ndarray,
    queries: np.ndarray | RowView,
    qcodes: np.ndarray,
    todo: np.ndarray,
    k: int,
    search: Search,
    pool: int,
    kk: int,
    grids: tuple[float, float],
    out: tuple[np.ndarray, np.ndarray],
) -> None:
    """Exact top-k of the eligible rows (code differs from the query's) for queries `todo`, into `out`.

    `search(q, kk)` returns gallery rows in decreasing float32 score from a pool of `pool` rows (the
    whole gallery, or only rows eligible for these queries). Per query the first m = k + MARGIN
    eligible candidates (in search order) are re-scored exactly and ranked by (-score, row). Every
    eligible row not re-scored has a float32 score at most that of each re-scored one (and, when all
    returned eligible rows were re-scored, at most that of the last returned row), so its exact score
    is at most the lowest of theirs plus `slack`: if that is below the k-th exact score, the top-k is
    proven. Otherwise the query is searched again with twice as many candidates and re-scored rows,
    until every eligible row of the pool has been re-scored (ties at the k-th: duplicates).
    """
    sq, sg = grids
    dim = gallery.shape[1]
    slack, m = _slack(dim, sg, sq), k + MARGIN
    out_s, out_r = out
    kk = min(kk, pool)
    while len(todo):
        unsure = []
        per_call = max(1, SEARCH_CELLS // kk)
        step = max(1, (1 << 21) // ((m + 1) * max(dim, 1)))  # ~16 MB of float64 re-scored at a time
        for c in range(0, len(todo), per_call):
            chunk = todo[c : c + per_call]
            found = np.asarray(search(queries[chunk], kk), dtype=np.int64)
            for s in range(0, len(chunk), step):
                part, cand = chunk[s : s + step], found[s : s + step]
                ok = (cand >= 0) & (gcodes[np.maximum(cand, 0)] != qcodes[part][:, None])
                first = np.argsort(~ok, axis=1, kind="stable")[:, :m]  # the first m eligible, search order
                picked, picked_ok = np.take_along_axis(cand, first, axis=1), np.take_along_axis(ok, first, axis=1)
                cols = np.concatenate([picked, cand[:, -1:]], axis=1)  # + the last returned row
                sc = exact_pairs(queries[part], gallery[np.maximum(cols, 0)], sq, sg)
                last = np.where(cand[:, -1] >= 0, sc[:, -1], -np.inf)
                sc = np.where(picked_ok, sc[:, :-1], -np.inf)
                order = rank_rows(sc, np.where(picked_ok, picked, _NO_ROW))[:, :k]
                top_s = np.take_along_axis(sc, order, axis=1)
                top_r = np.where(np.isfinite(top_s), np.take_along_axis(picked, order, axis=1), -1)
                out_s[part, : top_s.shape[1]], out_r[part, : top_s.shape[1]] = top_s, top_r
                n_ok = ok.sum(axis=1)
                complete = n_ok <= m  # every eligible row returned was re-scored
                everything = (kk >= pool) | (cand[:, -1] < 0)  # every row of the pool was returned
                floor = np.where(picked_ok, sc, np.inf).min(axis=1)
                floor = np.where(complete, np.minimum(floor, last), floor)
                proven = (n_ok >= k) & (floor < top_s[:, -1] - slack) if top_s.shape[1] == k else False
                unsure.append(part[~((everything & complete) | proven)])
        todo = np.concatenate(unsure) if unsure else np.zeros(0, np.int64)
        kk, m = min(pool, 2 * kk), 2 * m


def _top_k_other(
    gallery: np.ndarray | RowView,
    gcodes: np.ndarray,
    queries: np.ndarray | RowView,
    qcodes: np.ndarray,
    k: int,
    gallery_grid: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k gallery rows per query among rows whose code differs from the query's code.

    Two ways to find them, chosen per query batch b (n_b gallery rows, q_b queries):
    over-fetch: search the whole gallery for n_b + k + MARGIN candidates and drop batch b (at least
    k + MARGIN eligible rows are among them); right when batches are small (patients), as many
    batches share one search. Restricted: search only the rows outside b; right when b is large
    (sources with a strong batch effect, where the nearest eligible row may rank 100,000th overall),
    at one search of the gallery per batch. Over-fetch is used while q_b * (n_b + k) fits in
    OVERFETCH_CELLS, i.e. while it costs less than the one extra pass a restricted search does.
    """
    n, nq = len(gallery), len(queries)
    scores, rows = np.full((nq, k), -np.inf), np.full((nq, k), -1, dtype=np.int64)
    if k == 0 or nq == 0 or n == 0:
        return scores, rows
    grids = (grid(queries), gallery_grid or grid(gallery))
    n_codes = int(max(gcodes.max(initial=-1), qcodes.max(initial=-1))) + 1
    n_b = np.bincount(gcodes, minlength=n_codes)  # gallery rows per batch
    q_b = np.bincount(qcodes, minlength=n_codes)  # queries per batch
    want = n_b + k + MARGIN
    over = (q_b * want <= OVERFETCH_CELLS) | (n_b == 0)
    # restricted: one search of the rows outside the batch
    for b in np.flatnonzero(~over & (q_b > 0)):
        outside = np.flatnonzero(gcodes != b)
        if len(outside) == 0:
            continue  # no eligible row at all: padded
        sub = faiss_candidates(_sub_gallery(gallery, outside))

        def restricted(q: np.ndarray, kk: int, sub=sub, outside=outside) -> np.ndarray:
            found = np.asarray(sub(q, kk), dtype=np.int64)
            return np.where(found >= 0, outside[np.maximum(found, 0)], -1)

        todo = np.flatnonzero(qcodes == b)
        _search_eligible(
            gallery, gcodes, queries, qcodes, todo, k, restricted, len(outside), k + MARGIN, grids, (scores, rows)
        )
    # over-fetch: all other queries, in buckets of similar candidate counts (powers of two)
    todo = np.flatnonzero(over[qcodes])
    if len(todo):
        full = faiss_candidates(gallery)
        need = np.minimum(want[qcodes[todo]], n)
        bucket = np.minimum(n, 2 ** np.ceil(np.log2(need)).astype(np.int64))
        for kk in np.unique(bucket):
            _search_eligible(
                gallery, gcodes, queries, qcodes, todo[bucket == kk], k, full, n, int(kk), grids, (scores, rows)
            )
    return scores, rows


def neighbours_not_same_batch(
    gallery: np.ndarray | RowView,
    gallery_batches: np.ndarray,
    queries: np.ndarray,
    query_batches: np.ndarray,
    k: int,
    gallery_grid: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows per query from batches other than the query's: (exact scores, rows).

    Not-same-batch neighbours (BBBC021's NSB rule; Dino4Cells / Cell-DINO's kNN evaluation): a
    neighbour from the query's own plate or source can match on the batch effect alone. Ranked as
    `scoring.top_k` ranks (exact score, ties to the lower row). Always k columns: where fewer than
    k rows are eligible, the rest are row -1 with score -inf. A RowView gallery is never copied
    whole; `gallery_grid`: `grid(gallery)` when the caller has it.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(gallery_batches) != len(gallery) or len(query_batches) != len(queries):
        raise ValueError("one batch label per gallery row and per query is needed")
    if not isinstance(gallery, RowView):
        gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    gcodes, qcodes = _codes(gallery_batches, query_batches)
    return _top_k_other(gallery, gcodes, queries, qcodes, int(k), gallery_grid)


def knn_nsb_predict(
    gallery: np.ndarray | RowView,
    y_gallery: np.ndarray,
    gallery_batches: np.ndarray,
    queries: np.ndarray,
    query_batches: np.ndarray,
    ks: Sequence[int],
    n_classes: int,
    temperature: float = TEMPERATURE,
) -> dict[int, np.ndarray]:
    """Temperature-weighted kNN predictions (`knn.weighted_votes`) from not-same-batch neighbours.

    Labels are class indices 0..n_classes-1. A missing neighbour (row -1) has no vote; a query
    with no eligible neighbour at all is predicted -1 (counts as wrong).
    """
    y_gallery = np.asarray(y_gallery, dtype=np.int64)
    ks = tuple(int(k) for k in ks)
    scores, rows = neighbours_not_same_batch(gallery, gallery_batches, queries, query_batches, max(ks))
    none = rows[:, 0] < 0
    labels = np.where(rows >= 0, y_gallery[np.maximum(rows, 0)], 0) if len(y_gallery) else np.zeros_like(rows)
    scores = np.where(none[:, None], 0.0, scores)  # no neighbour: any finite scores, overwritten below
    votes = weighted_votes(scores, labels, n_classes, ks, temperature)
    return {k: np.where(none, -1, p).astype(np.int64) for k, p in votes.items()}


def batch_effect_index(
    x: np.ndarray | RowView,
    y: np.ndarray,
    batches: np.ndarray,
    k: int = 10,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    ci: float = 0.95,
) -> dict[str, Estimate]:
    """How much neighbourhoods follow class vs batch, over each row's k nearest *other* rows.

    `same_class`, `same_batch`: shares of neighbours with the row's class / batch. `robustness_index`:
    PathoROB's RI (Kömen et al. 2025) = SO / (SO + OS), SO = neighbours of the same class from another
    batch, OS = neighbours of another class from the same batch, summed over rows (NaN if SO + OS = 0):
    1 when biology alone decides, 0 when batch does. Neighbours: exact scores, ties to the lower row,
    the row itself excluded (not merely the first neighbour: duplicates tie with it). Percentile
    bootstrap CIs resampling rows (`metrics._index_blocks`, deterministic with `seed`).
    """
    y, b = np.asarray(y), np.asarray(batches)
    n = len(x)
    if len(y) != n or len(b) != n:
        raise ValueError("one label and one batch per row are needed")
    k = min(int(k), n - 1)
    if k < 1:
        nan = Estimate(float("nan"), float("nan"), float("nan"), n)
        return {"same_class": nan, "same_batch": nan, "robustness_index": nan}
    x = x if isinstance(x, RowView) else np.ascontiguousarray(x, dtype=np.float32)
    itself = np.arange(n, dtype=np.int64)  # each row its own "batch": only the row itself is excluded
    _, rows = _top_k_other(x, itself, x, itself, k)  # queries: x itself (a RowView is gathered in blocks)
    yc, _ = pd.factorize(y, use_na_sentinel=False)
    bc, _ = _codes(b, b[:0])
    same_y, same_b = yc[rows] == yc[:, None], bc[rows] == bc[:, None]
    counts = {
        "same_class": same_y.sum(axis=1),
        "same_batch": same_b.sum(axis=1),
        "so": (same_y & ~same_b).sum(axis=1),
        "os": (~same_y & same_b).sum(axis=1),
    }

    def measures(tot: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        den = tot["so"] + tot["os"]
        ri = np.divide(tot["so"], den, out=np.full(den.shape, np.nan), where=den > 0)
        return {
            "same_class": tot["same_class"] / (n * k),
            "same_batch": tot["same_batch"] / (n * k),
            "robustness_index": ri,
        }

    value = measures({c: np.asarray([v.sum()], dtype=float) for c, v in counts.items()})
    boots: dict[str, list[np.ndarray]] = {m: [] for m in value}
    for idx in _index_blocks(n, n_boot, seed) if n_boot > 0 else ():
        for m, v in measures({c: v[idx].sum(axis=1).astype(float) for c, v in counts.items()}).items():
            boots[m].append(v)
    out = {}
    for m, v in value.items():
        lo, hi = _interval(np.concatenate(boots[m]), float(v[0]), (1 - ci) / 2) if n_boot > 0 else (np.nan, np.nan)
        out[m] = Estimate(float(v[0]), float(lo), float(hi), n)
    return out


def softmax_scores(scores: np.ndarray, scale: float = 100.0) -> np.ndarray:
    """Cosine scores (n, C) to probabilities: softmax(scale * scores), via a stable logsumexp.

    CLIP scores images against texts with a learned logit scale of 100 (Radford et al. 2021): the
    same scale turns a zero-shot head's cosines into the probabilities it implies.
    """
    z = np.asarray(scores, dtype=np.float64) * scale
    top = z.max(axis=-1, keepdims=True)
    lse = top + np.log(np.exp(z - top).sum(axis=-1, keepdims=True))
    return np.exp(z - lse)


def _calibration_inputs(proba: np.ndarray, y: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, correct, bin) per row: max probability, top label == y, right-closed bin."""
    proba, y = np.asarray(proba, dtype=np.float64), np.asarray(y)
    if proba.ndim != 2 or len(proba) != len(y):
        raise ValueError(f"proba must be (n, C) with one label per row; got {proba.shape} and {len(y)} labels")
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)  # ties: the lower class (np.argmax)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds (edges[b], edges[b + 1]]; confidence exactly 0 goes to the first bin
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    return conf, correct, bins


def expected_calibration_error(
    proba: np.ndarray,
    y: np.ndarray,
    n_bins: int = 15,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    ci: float = 0.95,
) -> Estimate:
    """Top-label ECE (Naeini et al. 2015; Guo et al. 2017): sum_b |B_b|/n * |acc(B_b) - conf(B_b)|.

    Equal-width bins on the max probability, right-closed ((b/B, (b+1)/B], 0 in the first bin), 15
    bins as in Guo et al. An accuracy says nothing of whether a head's probabilities can be trusted
    as probabilities; ECE does. Percentile bootstrap CI resampling rows (deterministic with `seed`).
    """
    conf, correct, bins = _calibration_inputs(proba, y, n_bins)
    n = len(conf)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    gap = correct - conf
    value = float(np.abs(np.bincount(bins, weights=gap, minlength=n_bins)).sum() / n)
    if n_boot <= 0:
        return Estimate(value, float("nan"), float("nan"), n)
    boots = []
    for idx in _index_blocks(n, n_boot, seed):
        codes = bins[idx] + n_bins * np.arange(len(idx))[:, None]
        sums = np.bincount(codes.ravel(), weights=gap[idx].ravel(), minlength=len(idx) * n_bins)
        boots.append(np.abs(sums.reshape(len(idx), n_bins)).sum(axis=1) / n)
    lo, hi = _interval(np.concatenate(boots), value, (1 - ci) / 2)
    return Estimate(value, float(lo), float(hi), n)


def reliability_curve(proba: np.ndarray, y: np.ndarray, n_bins: int = 15) -> pd.DataFrame:
    """Per non-empty confidence bin (as in `expected_calibration_error`): mean confidence, accuracy, count.

    The reliability diagram of Guo et al. 2017: a calibrated head lies on the diagonal.
    """
    conf, correct, bins = _calibration_inputs(proba, y, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    keep = np.flatnonzero(count)
    return pd.DataFrame(
        {
            "bin": keep.astype(np.int64),
            "confidence": np.bincount(bins, weights=conf, minlength=n_bins)[keep] / count[keep],
            "accuracy": np.bincount(bins, weights=correct, minlength=n_bins)[keep] / count[keep],
            "count": count[keep].astype(np.int64),
        }
    )
