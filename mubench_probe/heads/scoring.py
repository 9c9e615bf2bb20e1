"""Similarity scores that are identical on every CPU, and top-k that breaks ties by index.

A float32 matrix product (FAISS, numpy, torch) sums in an order that depends on the BLAS
kernel, the CPU's vector width, the thread count and even where a row sits in memory. Two
identical gallery rows can then score differently in the last bit, and "ties go to the lower
index" holds only where the kernel happens to be exact: on an AVX2 machine kNN and search
tests failed that passed on AVX-512.

Here every score is computed exactly. Vectors are rounded to a grid of 24 fractional bits
(unit vectors, as all our heads use them; longer ones to a coarser power-of-two grid chosen
from the array's largest norm) and held as integers in float64; a product of two such values
is an integer below 2^49 and every partial sum of a dot product stays below 2^53, so float64
represents each step exactly and the result does not depend on the order of summation, the
BLAS kernel or the machine. The rounding (< 6e-8 per component, < 1e-7 on a unit-vector score)
is far below what float16 storage keeps. Exact duplicates therefore tie exactly, and ties are
broken by the lower index by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import column_or_1d, validate_data

FRACTION_BITS = 24
BLOCK_ROWS = 4096
LARGE_CELLS = 1 << 26  # galleries above this many floats (256 MB float32) are never copied whole
GATHER_ROWS = 65536  # at most this many rows gathered at a time from a RowView ...
GATHER_BYTES = 1 << 25  # ... and at most 32 MB of float32 (8,192 rows of 1024-d)


def gather_rows(dim: int) -> int:
    """Rows per gathered block for vectors of `dim` floats (read at call time, so tests can shrink it)."""
    return max(1, min(GATHER_ROWS, GATHER_BYTES // (4 * max(dim, 1))))


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
        """(start, contiguous float32 block) over all rows, in order (`gather_rows` rows by default)."""
        size = size or gather_rows(self.x.shape[1])
        for s in range(0, len(self), size):
            block = self.x[s : s + size] if self.rows is None else self.x[self.rows[s : s + size]]
            yield s, np.ascontiguousarray(block, dtype=np.float32)


def validate_fit(est: Any, X: np.ndarray | RowView, y: np.ndarray, dtype: type) -> tuple[Any, np.ndarray]:
    """scikit-learn's fit-time checks (`validate_data`, classification targets) for an array X;
    for a RowView the same checks on y and the shape, its rows being gathered only when used."""
    if isinstance(X, RowView):
        y = column_or_1d(y)
        if len(X) == 0 or len(y) != len(X):
            raise ValueError(f"X must be (n, d) with one label per row; got {X.shape} and {len(y)} labels")
        est.n_features_in_ = X.shape[1]
    else:
        X, y = validate_data(est, X, y, dtype=dtype)
    check_classification_targets(y)
    return X, y


def view(x: np.ndarray, rows: np.ndarray) -> np.ndarray | RowView:
    """x[rows]: a copy when small, a RowView when the copy would be large (see LARGE_CELLS)."""
    if len(rows) * x.shape[1] <= LARGE_CELLS:
        return x[rows]
    return RowView(x, rows)


def grid(x: np.ndarray | RowView) -> float:
    """The power of two the rows of `x` are multiplied by before rounding to integers.

    2^24 for rows of norm up to ~1 (embeddings); halved for each doubling of the largest norm,
    so that |row| * scale < 2^24.01 and every dot product of two rounded rows stays exact.
    A RowView is read block by block (never copied whole).
    """
    if isinstance(x, RowView):
        sq = max((float(np.einsum("nd,nd->n", b, b).max()) for _, b in x.blocks() if len(b)), default=0.0)
    else:
        x = np.asarray(x)
        if x.size == 0:
            return float(2**FRACTION_BITS)
        sq = float(np.max(np.einsum("...d,...d->...", x, x)))
    if not np.isfinite(sq):
        raise ValueError("exact scores need finite vectors (found NaN or inf)")
    e = max(0, int(np.ceil(np.log2(np.sqrt(sq) / 1.001)))) if sq > 0 else 0
    return float(2 ** (FRACTION_BITS - e))


def quantize(x: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Rows rounded to the grid (`grid(x)` unless given), as exact integers in float64.

    One new array, scaled and rounded in place (no temporaries the size of `x`)."""
    x = np.array(x, dtype=np.float64)  # always a copy
    np.multiply(x, grid(x) if scale is None else scale, out=x)
    return np.rint(x, out=x)


def exact_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All inner products a @ b.T (float64), exact for the rounded vectors, computed in row blocks."""
    sa, sb = grid(a), grid(b)
    qb = quantize(b, sb)
    out = np.empty((len(a), len(b)), dtype=np.float64)
    for s in range(0, len(a), BLOCK_ROWS):
        out[s : s + BLOCK_ROWS] = quantize(a[s : s + BLOCK_ROWS], sa) @ qb.T
    return out / (sa * sb)


def exact_pairs(a: np.ndarray, b: np.ndarray, sa: float | None = None, sb: float | None = None) -> np.ndarray:
    """Inner product of each row of a (n, d) with each of its own candidates b (n, k, d): (n, k).

    `sa`, `sb`: the grids of the whole arrays these rows come from (so that a row's score never
    depends on which block it was computed in); by default those of `a` and `b` themselves.
    """
    sa, sb = sa or grid(a), sb or grid(b)
    return np.einsum("nd,nkd->nk", quantize(a, sa), quantize(b, sb)) / (sa * sb)


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
    gallery_grid: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows per query by exact score, ties to the lower row: (scores float64, rows).

    A fast search (FAISS, float32) proposes k + margin candidates; they are re-scored exactly
    and ranked by (-score, row). Where the candidates cannot prove that nothing outside them
    ties with or beats the k-th (the worst candidate is within float32 error of it, e.g. many
    duplicates), the search is repeated with twice as many candidates, up to the whole gallery.
    Missing candidates (-1, from approximate indexes) rank last with score -inf. With an
    approximate candidate generator, `prove=False`: its candidates are re-scored and ranked
    exactly, but nothing is searched again (approximate search cannot prove anything).
    `gallery_grid`: `grid(gallery)` when the caller already has it (a head searching one gallery
    block after block of queries: a RowView gallery is read whole to find it).
    """
    n = len(gallery)
    k = min(k, n)
    scores = np.zeros((len(queries), k))
    rows = np.zeros((len(queries), k), dtype=np.int64)
    if k == 0 or len(queries) == 0:
        return scores, rows
    search = candidates or faiss_candidates(gallery)
    sg, sq = gallery_grid or grid(gallery), grid(queries)
    # float32 dot products are off by at most a few sqrt(d) ulps of the product of the norms
    slack = 4.0 * np.sqrt(gallery.shape[1]) * np.finfo(np.float32).eps * 2.0 ** (2 * FRACTION_BITS) / (sg * sq)
    todo, kk = np.arange(len(queries)), min(n, k + margin)
    while len(todo):
        q = queries if len(todo) == len(queries) else queries[todo]  # the first round: no copy
        found = np.asarray(search(q, kk), dtype=np.int64)  # one search call per round
        unsure = []
        block = max(1, (1 << 21) // (kk * max(gallery.shape[1], 1)))  # ~16 MB of float64 per step
        for start in range(0, len(todo), block):
            part, cand = todo[start : start + block], found[start : start + block]
            s = exact_pairs(queries[part], gallery[np.maximum(cand, 0)], sq, sg)
            s[cand < 0] = -np.inf
            order = rank_rows(s, np.where(cand < 0, np.iinfo(np.int64).max, cand))
            s, cand = np.take_along_axis(s, order, axis=1), np.take_along_axis(cand, order, axis=1)
            scores[part], rows[part] = s[:, :k], cand[:, :k]
            if kk < n and prove:
                unsure.append(part[np.isfinite(s[:, -1]) & (s[:, -1] >= s[:, k - 1] - slack)])
        todo, kk = (np.concatenate(unsure), min(n, 2 * kk)) if unsure else (np.zeros(0, np.int64), kk)
    return scores, rows
