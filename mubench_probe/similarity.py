"""Representation similarity between models on the same images, and paired significance tests."""

from __future__ import annotations

import math

import numpy as np


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between two representations of the same n samples.

    Invariant to orthogonal transforms and isotropic scaling of either side; CKA(X, X) = 1.
    Computed with feature-space Gram matrices, so the cost is O(n d^2) rather than O(n^2).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(x) != len(y):
        raise ValueError("CKA needs the same samples on both sides")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x, "fro") ** 2
    denom = np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")
    return float(cross / denom) if denom > 0 else float("nan")


def _knn_sets(x: np.ndarray, k: int) -> np.ndarray:
    from .heads.knn import search
    from .store import l2_normalize

    x = l2_normalize(x)  # cosine neighbours
    _, idx = search(x, x, k + 1)
    # drop each sample itself (it is its own nearest neighbour, up to ties with duplicates)
    out = np.empty((len(x), k), dtype=np.int64)
    for i, row in enumerate(idx):
        row = row[row != i]
        out[i] = row[:k]
    return out


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mean fraction of shared k nearest neighbours (cosine) between two representations."""
    if len(x) <= k:
        k = len(x) - 1
    a, b = _knn_sets(x, k), _knn_sets(y, k)
    shared = [len(np.intersect1d(ra, rb, assume_unique=True)) for ra, rb in zip(a, b, strict=True)]
    return float(np.mean(shared) / k)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float]:
    """Exact McNemar test (two-sided binomial on the discordant pairs) for paired predictions."""
    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    n01 = int((a & ~b).sum())  # a right, b wrong
    n10 = int((~a & b).sum())
    n = n01 + n10
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p_value": 1.0}
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return {"a_only": n01, "b_only": n10, "p_value": float(min(1.0, 2 * tail))}
