"""Temperature-weighted kNN on FAISS inner-product search: every k from one search.

Votes are exp(similarity / T) (T = 0.07, as in DINO's evaluation). Neighbours with equal
similarity are ordered by training index, so the result does not depend on FAISS's internal
tie order (exact unless more than `tie_margin` neighbours tie at the k-th place).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_KS = (1, 5, 10, 20)
TEMPERATURE = 0.07


def _index(x: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(np.ascontiguousarray(x, dtype=np.float32))
    return index


def search(train: np.ndarray, query: np.ndarray, k: int, tie_margin: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products (scores, indices) with ties broken by the lower training index."""
    import faiss  # noqa: F401  (imported for its side effect of a clear ImportError here)

    k = min(k, len(train))
    kk = min(k + tie_margin, len(train))
    scores, idx = _index(train).search(np.ascontiguousarray(query, dtype=np.float32), kk)
    order = np.lexsort((idx, -scores), axis=1)
    scores = np.take_along_axis(scores, order, axis=1)[:, :k]
    idx = np.take_along_axis(idx, order, axis=1)[:, :k]
    return scores, idx


def weighted_votes(
    scores: np.ndarray, labels: np.ndarray, n_classes: int, ks: Sequence[int], temperature: float = TEMPERATURE
) -> dict[int, np.ndarray]:
    """Predictions for each k from one neighbour list; vote ties go to the lower class index."""
    w = np.exp((scores - scores[:, :1]) / temperature)  # shifted for stability; argmax unchanged
    onehot = np.zeros((*labels.shape, n_classes))
    np.put_along_axis(onehot, labels[..., None], 1.0, axis=-1)
    cum = np.cumsum(onehot * w[..., None], axis=1)
    return {k: cum[:, min(k, cum.shape[1]) - 1].argmax(axis=1) for k in ks}


class KNNHead:
    """Estimator-like: fit stores the gallery, predict_all returns predictions for every k."""

    def __init__(
        self, ks: Sequence[int] = DEFAULT_KS, temperature: float = TEMPERATURE, n_classes: int | None = None
    ) -> None:
        self.ks, self.temperature, self.n_classes = tuple(ks), temperature, n_classes

    def fit(self, x: np.ndarray, y: np.ndarray) -> KNNHead:
        self.x_ = np.ascontiguousarray(x, dtype=np.float32)
        self.y_ = np.asarray(y)
        self.n_classes_ = self.n_classes or int(self.y_.max()) + 1
        return self

    def predict_all(self, x: np.ndarray) -> dict[int, np.ndarray]:
        scores, idx = search(self.x_, x, max(self.ks))
        return weighted_votes(scores, self.y_[idx], self.n_classes_, self.ks, self.temperature)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predict_all(x)[self.ks[-1]]
