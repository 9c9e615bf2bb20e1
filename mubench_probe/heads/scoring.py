"""Similarity scores that are identical on every CPU, and top-k that breaks ties by index.

A float32 matrix product (FAISS, numpy, torch) sums in an order that depends on the BLAS
kernel, the CPU's vector width, the thread count and even where a row sits in memory. Two
identical gallery rows can then score differently in the last bit, and "ties go to the lower
index" holds only where the kernel happens to be exact: on an AVX2 machine kNN and search
tests failed that passed on AVX-512.

Here every score is computed exactly. Vectors (unit norm, as all our heads use them) are
rounded to 24 fractional bits and held as integers in float64; a product of two such values
is an integer below 2^48 and every partial sum of a dot product stays below 2^53, so float64
represents each step exactly and the result does not depend on the order of summation, the
BLAS kernel or the machine. The rounding (< 6e-8 per component, < 1e-7 on a score) is far
below what float16 storage keeps. Exact duplicates therefore tie exactly, and ties are broken
by the lower index by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

FRACTION_BITS = 24
_SCALE = float(2**FRACTION_BITS)
_MAX_NORM = 4.0  # |a| * |b| <= 16 keeps every partial sum below 2^52 (Cauchy-Schwarz)
BLOCK_ROWS = 4096
LARGE_CELLS = 1 << 26  # galleries above this many floats (256 MB float32) are never copied whole
GATHER_ROWS = 65536  # rows gathered at a time from a RowView


class RowView:
    """Rows `rows` of `x`, without copying them: heads index it like an array (x[rows[idx]]).

    At a million rows a fold's training rows are most of the run; copying them (and then FAISS
    copying them again) is what made evaluation hold several times the embeddings. A RowView
    gathers blocks of rows only when they are used.
    """

    def __init__(self, x: np.ndarray, rows: np.ndarray | None = None) -> None:
        self.x = x
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.x) if self.rows is None else len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.x.shape[1])

    def __getitem__(self, idx: Any) -> np.ndarray:
        return self.x[idx] if self.rows is None else self.x[self.rows[idx]]

    def blocks(self, size: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start, contiguous float32 block) over all rows, in order (GATHER_ROWS rows by default)."""
        size = size or GATHER_ROWS
        for s in range(0, len(self), size):
            block = self.x[s : s + size] if self.rows is None else self.x[self.rows[s : s + size]]
            yield s, np.ascontiguousarray(block, dtype=np.float32)


def view(x: np.ndarray, rows: np.ndarray) -> np.ndarray | RowView:
    """x[rows]: a copy when small, a RowView when the copy would be large (see LARGE_CELLS)."""
    if len(rows) * x.shape[1] <= LARGE_CELLS:
        return x[rows]
    return RowView(x, rows)


def quantize(x: np.ndarray) -> np.ndarray:
    """Rows rounded to 24 fractional bits, as exact integers in float64 (one new array, no temporaries)."""
    x = np.array(x, dtype=np.float64)  # always a copy: scaled and rounded in place below
    if x.size and np.einsum("...d,...d->...", x, x).max() > _MAX_NORM**2:
        raise ValueError("exact scores need vectors of norm <= 4 (normalise embeddings first)")
    np.multiply(x, _SCALE, out=x)
    return np.rint(x, out=x)


def exact_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All inner products a @ b.T (float64), exact for the rounded vectors, computed in row blocks."""
    qb = quantize(b)
    out = np.empty((len(a), len(b)), dtype=np.float64)
    for s in range(0, len(a), BLOCK_ROWS):
        out[s : s + BLOCK_ROWS] = quantize(a[s : s + BLOCK_ROWS]) @ qb.T
    return out / (_SCALE * _SCALE)


def exact_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Inner product of each row of a (n, d) with each of its own candidates b (n, k, d): (n, k)."""
    return np.einsum("nd,nkd->nk", quantize(a), quantize(b)) / (_SCALE * _SCALE)


def rank_rows(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row, the column order by (-score, id): the deterministic ranking every head uses."""
    return np.lexsort((ids, -scores), axis=-1)


CandidateFn = Callable[[np.ndarray, int], np.ndarray]


def faiss_candidates(gallery: np.ndarray | RowView) -> CandidateFn:
    """Exact float32 inner-product search (FAISS IndexFlatIP) as a candidate generator.

    A RowView gallery is searched block by block (`faiss.knn` on gathered blocks, results
    merged), never copied whole: the same top candidates, in bounded memory."""
    import faiss

    if isinstance(gallery, RowView):
        return lambda q, kk: _blockwise_knn(gallery, np.ascontiguousarray(q, dtype=np.float32), kk)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery, dtype=np.float32))
    return lambda q, kk: index.search(np.ascontiguousarray(q, dtype=np.float32), kk)[1]


def _blockwise_knn(gallery: RowView, q: np.ndarray, kk: int) -> np.ndarray:
    import faiss

    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for start, block in gallery.blocks():
        s, i = faiss.knn(q, block, min(kk, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        s, i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i + start], axis=1)
        keep = np.argsort(-s, axis=1, kind="stable")[:, :kk]
        best_s, best_i = np.take_along_axis(s, keep, axis=1), np.take_along_axis(i, keep, axis=1)
    return best_i


def top_k(
    gallery: np.ndarray | RowView,
    queries: np.ndarray,
    k: int,
    candidates: CandidateFn | None = None,
    margin: int = 16,
    prove: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows per query by exact score, ties to the lower row: (scores float64, rows).

    A fast search (FAISS, float32) proposes k + margin candidates; they are re-scored exactly
    and ranked by (-score, row). Where the candidates cannot prove that nothing outside them
    ties with or beats the k-th (the worst candidate is within float32 error of it, e.g. many
    duplicates), the search is repeated with twice as many candidates, up to the whole gallery.
    Missing candidates (-1, from approximate indexes) rank last with score -inf. With an
    approximate candidate generator, `prove=False`: its candidates are re-scored and ranked
    exactly, but nothing is searched again (approximate search cannot prove anything).
    """
    n = len(gallery)
    k = min(k, n)
    scores = np.zeros((len(queries), k))
    rows = np.zeros((len(queries), k), dtype=np.int64)
    if k == 0 or len(queries) == 0:
        return scores, rows
    search = candidates or faiss_candidates(gallery)
    # float32 dot products of unit vectors are off by at most a few sqrt(d) ulps
    slack = 4.0 * np.sqrt(gallery.shape[1]) * np.finfo(np.float32).eps
    todo, kk = np.arange(len(queries)), min(n, k + margin)
    while len(todo):
        found = np.asarray(search(queries[todo], kk), dtype=np.int64)  # one search call per round
        unsure = []
        block = max(1, (1 << 21) // (kk * max(gallery.shape[1], 1)))  # ~16 MB of float64 per step
        for start in range(0, len(todo), block):
            part, cand = todo[start : start + block], found[start : start + block]
            s = exact_pairs(queries[part], gallery[np.maximum(cand, 0)])
            s[cand < 0] = -np.inf
            order = rank_rows(s, np.where(cand < 0, np.iinfo(np.int64).max, cand))
            s, cand = np.take_along_axis(s, order, axis=1), np.take_along_axis(cand, order, axis=1)
            scores[part], rows[part] = s[:, :k], cand[:, :k]
            if kk < n and prove:
                unsure.append(part[np.isfinite(s[:, -1]) & (s[:, -1] >= s[:, k - 1] - slack)])
        todo, kk = (np.concatenate(unsure), min(n, 2 * kk)) if unsure else (np.zeros(0, np.int64), kk)
    return scores, rows
