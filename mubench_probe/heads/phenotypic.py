"""Phenotypic activity: copairs-style retrieval mAP with permutation p-values, exact and in bounded memory.

copairs (Kalinin et al. 2024) asks of each class (a perturbation, a phenotype) whether its profiles
retrieve each other *across* batches better than chance. It materialises all pairs and was OOM-killed at
9,216 profiles on 14 GB. Here queries are ranked in blocks against every row and only (AP, P, T) is kept
per query, so memory is the embeddings plus one block: 100,000 x 768 fits in a few GB.

Each row is a query. Positives: rows with its label in another batch (a class that only finds its own
plate measures the batch effect, not the phenotype). Negatives: rows with another label, in any batch.
Rows with its label in its own batch, and the query itself, are left out. AP is the mean over positives
of the precision at their rank; a query without a positive or a negative has no AP and is counted as
excluded. A class's mAP is the mean AP of its queries.

Scores are exact integers on the grid of `scoring` (identical on every CPU) and ties rank the lower row
first, so the same inputs give the same ranking, and bitwise the same result, on any machine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from .scoring import grid, quantize

BLOCK_BYTES = 1 << 27  # one block of float64 scores: 128 MB (the block's temporaries add about as much again)
NULL_CELLS = 1 << 21  # random ranks drawn at a time for the null (16 MB of int64 at most)
KEY_BITS = 51  # |score| < 2^48.01 on the grid: score + 2^50 fits in 51 bits, a row number above it
CHUNK_CELLS = 1 << 20  # scores ranked at a time by one thread (about 8 MB per temporary)

__all__ = ["benjamini_hochberg", "phenotypic_map"]


def phenotypic_map(
    x: np.ndarray,
    labels: np.ndarray,
    batches: Sequence[Hashable] | np.ndarray,
    *,
    n_perm: int = 1000,
    seed: int = 0,
    block_rows: int | None = None,
) -> pd.DataFrame:
    """Per class: mAP of retrieving its other-batch rows, permutation p-value, Benjamini-Hochberg q-value.

    x: (n, d) L2-normalised embeddings; labels: (n,) int classes; batches: (n,) any hashable batch ids
    (plate, source). n_perm: null mAP draws per class (0: no null, p and q are NaN). block_rows: queries
    ranked at a time (by default as many as keep a block's scores near `BLOCK_BYTES`); it changes memory
    and speed only, never a bit of the result.

    Returns columns class, mean_average_precision, p_value, q_value, n_queries (queries with an AP) and
    n_excluded (queries without a positive or a negative), one row per class, sorted by class. A class
    whose queries are all excluded (e.g. present in one batch only) has NaN mAP, p and q and takes no
    part in the FDR correction.
    """
    x = np.asarray(x)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != (len(x),) or len(batches) != len(x):
        raise ValueError(
            f"need x (n, d) and one label and batch per row; got {x.shape}, {labels.shape}, {len(batches)} batches"
        )
    if len(x) and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, not {labels.dtype}")
    if n_perm < 0 or (block_rows is not None and block_rows < 1):
        raise ValueError("n_perm must be >= 0 and block_rows >= 1")
    classes, lab = np.unique(labels, return_inverse=True)
    bat = _codes(batches, len(x))

    ap, n_pos, total = query_ap(x, lab, bat, block_rows)
    has_ap = np.isfinite(ap)
    n_queries = np.bincount(lab[has_ap], minlength=len(classes))
    n_excluded = np.bincount(lab, minlength=len(classes)) - n_queries
    # fsum: correctly rounded, so a class's mAP does not depend on the order of its rows
    scored = ap[has_ap][np.argsort(lab[has_ap], kind="stable")]
    ends = np.cumsum(n_queries)
    observed = np.full(len(classes), np.nan)
    for c in np.flatnonzero(n_queries):
        observed[c] = math.fsum(scored[ends[c] - n_queries[c] : ends[c]]) / n_queries[c]

    p = np.full(len(classes), np.nan)
    if n_perm > 0 and has_ap.any():
        null = class_null(lab[has_ap], n_pos[has_ap], total[has_ap], len(classes), n_perm, seed)
        ok = n_queries > 0
        exceed = (null[ok] / n_queries[ok, None] >= observed[ok, None]).sum(axis=1)
        p[ok] = (1 + exceed) / (1 + n_perm)
    return pd.DataFrame(
        {
            "class": classes.astype(np.int64),
            "mean_average_precision": observed,
            "p_value": p,
            "q_value": benjamini_hochberg(p),
            "n_queries": n_queries.astype(np.int64),
            "n_excluded": n_excluded.astype(np.int64),
        }
    )


def _codes(values: Sequence[Hashable] | np.ndarray, n: int) -> np.ndarray:
    """Integer codes for any hashable ids (str, int, tuples, None), without needing them to be sortable."""
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise ValueError(f"batch ids must be one per row (1-D), not shape {values.shape}")
    if not isinstance(values, np.ndarray):
        arr = np.empty(n, dtype=object)
        for i, v in enumerate(values):  # element by element: tuples stay single ids
            arr[i] = v
        values = arr
    if len(values) != n:
        raise ValueError(f"need one batch id per row ({n}); got {len(values)}")
    return pd.factorize(values, use_na_sentinel=False)[0].astype(np.int64)


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (monotone in p, capped at 1); NaN p-values stay NaN and are not counted.

    The same arithmetic as `scipy.stats.false_discovery_control(p, method="bh")`, which rejects NaN."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv, kind="stable")
    scaled = pv[order] * (m / np.arange(1, m + 1))
    scaled = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(scaled, 1.0)
    q[ok] = out
    return q


def query_ap(
    x: np.ndarray, lab: np.ndarray, bat: np.ndarray, block_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: AP (NaN without a positive or a negative), positives P and ranked rows T = P + N.

    lab, bat: integer codes. P and T follow from group sizes alone; only queries with an AP are ranked.
    """
    n = len(x)
    group = lab * (int(bat.max(initial=0)) + 1) + bat  # same label and same batch <=> same group
    _, g_inv, g_size = np.unique(group, return_inverse=True, return_counts=True)
    c_size = np.bincount(lab)[lab]
    n_pos = c_size - g_size[g_inv]  # same label, other batch
    total = n - g_size[g_inv]  # everything but the query's own group
    ap = np.full(n, np.nan)
    todo = np.flatnonzero((n_pos > 0) & (total > n_pos))
    if len(todo) == 0:
        return ap, n_pos, total
    scale = grid(x)
    qx = quantize(x, scale)  # exact integers: every score below is exact, whatever the BLAS
    block = block_rows or max(1, BLOCK_BYTES // (8 * n))
    chunk = max(1, min(4096, CHUNK_CELLS // n))  # < 2^12 rows: a row number fits above KEY_BITS
    workers = _cores()
    with ThreadPoolExecutor(workers) as pool:
        for s in range(0, len(todo), block):
            rows = todo[s : s + block]
            scores = qx[rows] @ qx.T  # (B, n), in place from here on
            parts = [slice(a, a + chunk) for a in range(0, len(rows), chunk)]
            jobs = [pool.submit(_rank_rows, scores[p], rows[p], lab, group, n_pos) for p in parts]
            for p, job in zip(parts, jobs, strict=True):
                ap[rows[p]] = job.result()
            del scores, jobs
    return ap, n_pos, total


def _cores() -> int:
    """Threads for ranking (numpy's array operations release the GIL): the cores this process may use, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def _rank_rows(s: np.ndarray, rows: np.ndarray, lab: np.ndarray, group: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """AP of the queries `rows` from their exact scores `s` (R, n), which are overwritten.

    Only the positives' ranks matter, so nothing sorts a whole row. Each row's candidates fall into n
    equal-width buckets of the score (monotone: a lower bucket always ranks strictly higher), a bincount
    gives the negatives ahead of each bucket, and only the positives and the negatives that share a
    bucket with one (a few per positive) are sorted exactly, by (-score, row index). Ties are thus
    broken by index everywhere, without a special path.
    """
    r_rows, n = s.shape
    bins = n + 2  # per row: bin 0 = not a negative, bins 1..n+1 = buckets 0..n
    first = np.arange(r_rows, dtype=np.int64) * bins  # each row's bin 0
    ranked = group != group[rows, None]  # positives and negatives
    neg = lab != lab[rows, None]
    np.negative(s, out=s)  # the key: lower ranks first
    lo = np.min(s, axis=1, where=ranked, initial=np.inf)
    hi = np.max(s, axis=1, where=ranked, initial=-np.inf)
    t = s - lo[:, None]  # exact (integers below 2^51)
    t *= (n / (hi - lo + 1.0))[:, None]  # rounding is monotone, so buckets are ordered like the keys
    np.floor(t, out=t)
    gid = t.astype(np.int64)
    del t
    gid += first[:, None] + 1
    pr, pc = np.nonzero(ranked & ~neg)  # positives
    pg = gid[pr, pc]
    del ranked
    np.copyto(gid, first[:, None], where=~neg)
    del neg
    below = _exclusive_cumsum(np.bincount(gid.ravel(), minlength=r_rows * bins), first)
    occupied = np.zeros(r_rows * bins, dtype=bool)
    occupied[pg] = True
    occupied[first] = False
    sr, sc = np.nonzero(occupied[gid])  # negatives sharing a bucket with a positive
    sg = gid[sr, sc]
    del gid, occupied
    sel_below = _exclusive_cumsum(np.bincount(sg, minlength=r_rows * bins), first)

    row, col = np.concatenate([pr, sr]), np.concatenate([pc, sc])
    is_neg = np.concatenate([np.zeros(len(pr), dtype=bool), np.ones(len(sr), dtype=bool)])
    key = (row << KEY_BITS) + (s[row, col].astype(np.int64) + (1 << (KEY_BITS - 1)))  # (row, -score), exact
    order = np.argsort(key)
    if len(key) > 1 and (np.diff(key[order]) == 0).any():  # equal scores: lower index first
        order = np.lexsort((col, key))
    row, g, is_neg = row[order], np.concatenate([pg, sg])[order], is_neg[order]
    neg_before = np.cumsum(is_neg) - is_neg  # selected negatives earlier in the list, over all rows
    keep = ~is_neg
    row, g, neg_before = row[keep], g[keep], neg_before[keep]
    # negatives ahead = all in lower buckets + selected ones ahead in the same bucket (running sums reset per row)
    ahead = below[g] - sel_below[g] + neg_before - below[first[row]]
    counts = n_pos[rows]
    k = np.arange(1, len(row) + 1) - (np.cumsum(counts) - counts)[row]
    return ranked_ap(row, k + ahead, counts)


def _exclusive_cumsum(counts: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Running sum of `counts` before each bin (over all rows; bin 0 of each row holds nothing)."""
    counts[first] = 0
    out = np.cumsum(counts)
    out -= counts
    return out


def ranked_ap(r: np.ndarray, rank: np.ndarray, n_pos: np.ndarray) -> np.ndarray:
    """AP per row from its positives' (row r, 1-based rank), in rank order within each row.

    The k-th positive's precision is k / rank, summed in order of k (bincount adds sequentially, like
    `ap_matrix`), so the observed and the null APs are one formula and a row's AP does not depend on
    the rows beside it."""
    starts = np.cumsum(n_pos) - n_pos
    k = np.arange(1, len(r) + 1) - starts[r]
    return np.bincount(r, k / rank, minlength=len(n_pos)) / n_pos


def ap_matrix(rank: np.ndarray) -> np.ndarray:
    """`ranked_ap` for rows with the same number of positives: rank (m, P), sorted. Bitwise the same sums
    (cumsum is sequential too), without `ranked_ap`'s per-positive bookkeeping."""
    prec = np.arange(1, rank.shape[1] + 1) / rank
    return np.cumsum(prec, axis=1)[:, -1] / rank.shape[1]


def class_null(
    lab: np.ndarray, n_pos: np.ndarray, total: np.ndarray, n_classes: int, n_perm: int, seed: int
) -> np.ndarray:
    """(n_classes, n_perm) sums over each class's queries of a null AP for the query's (P, T).

    One set of n_perm null APs per distinct (P, T) (copairs' cache), from its own generator seeded by
    (seed, P, T): a configuration's null does not depend on which others occur, the block size or the
    row order. Permutation i of a class adds null draw i of each of its queries' configurations, in
    order of (P, T), whichever thread drew them.
    """
    cfg, inv = np.unique(np.stack([n_pos, total], axis=1), axis=0, return_inverse=True)
    pairs, counts = np.unique(np.stack([inv.ravel(), lab], axis=1), axis=0, return_counts=True)
    acc = np.zeros((n_classes, n_perm))
    workers = _cores()
    with ThreadPoolExecutor(workers) as pool:
        for s in range(0, len(cfg), 8 * workers):  # a few at a time: finished draws wait in memory
            part = cfg[s : s + 8 * workers]
            nulls = pool.map(lambda pt: null_ap(int(pt[0]), int(pt[1]), n_perm, seed), part)
            for j, null in enumerate(nulls, start=s):
                sel = pairs[:, 0] == j
                for cls, cnt in zip(pairs[sel, 1], counts[sel], strict=True):
                    acc[cls] += cnt * null
    return acc


def null_ap(n_pos: int, total: int, n_perm: int, seed: int) -> np.ndarray:
    """n_perm APs of `n_pos` positives placed uniformly at random among `total` ranked rows (0 < P < T)."""
    rng = np.random.default_rng([seed, n_pos, total])
    draw_pos = 2 * n_pos <= total  # draw the rarer side, so that the rejection ends fast
    out = np.empty(n_perm)
    step = max(1, NULL_CELLS // (n_pos if draw_pos else total))
    for s in range(0, n_perm, step):
        m = min(step, n_perm - s)
        picked = random_subsets(rng, m, n_pos if draw_pos else total - n_pos, total)  # sorted 0-based positions
        if draw_pos:
            rank = picked + 1
        else:  # the picks are the negatives; positives are every other position
            is_pos = np.ones((m, total), dtype=bool)
            is_pos[np.arange(m)[:, None], picked] = False
            rank = np.nonzero(is_pos)[1].reshape(m, n_pos) + 1
        out[s : s + m] = ap_matrix(rank)
    return out


def random_subsets(rng: np.random.Generator, m: int, k: int, t: int) -> np.ndarray:
    """m uniform k-subsets of range(t), each sorted: (m, k).

    Draw k values with replacement, keep the distinct ones and redraw as many as were repeated, until
    all are distinct. Nothing in this depends on which values were drawn, only on which are equal, so
    the result is invariant under relabelling the t values: uniform over k-subsets. Needs 2k <= t to
    end quickly (a few rounds), which the caller ensures.
    """
    dtype = np.int32 if t < 2**31 else np.int64
    a = rng.integers(0, t, size=(m, k), dtype=dtype)
    a.sort(axis=1)
    while True:
        dup = a[:, 1:] == a[:, :-1]
        n_dup = int(dup.sum())
        if n_dup == 0:
            return a
        redo = np.flatnonzero(dup.any(axis=1))
        tail = a[:, 1:]
        tail[dup] = rng.integers(0, t, size=n_dup, dtype=dtype)
        a[redo] = np.sort(a[redo], axis=1)
