"""Temperature-weighted kNN: every k from one search, identical on every CPU.

Votes are exp(similarity / T) (T = 0.07, as in DINO's evaluation). Neighbours come from
`scoring.top_k`: FAISS proposes candidates, exact scores rank them, and neighbours with equal
similarity are ordered by training index, so duplicates tie the same way on every machine.
A class absent from the training rows can never be predicted (it gets no votes).

At scale (`index` = a FAISS factory such as "IVF4096,Flat" or "HNSW32", built by `ann.build`)
an approximate index proposes the candidates instead; they are still re-scored and ranked
exactly, and `recall` measures the index against exact search on a sample of queries. A
gallery given as rows of a larger array (`fit(..., rows=)`) is never copied whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ..config import DEFAULT_KS, TEMPERATURE
from ..faiss_factory import EXACT
from . import ann
from .scoring import RowView, grid, top_k, validate_fit


def search(
    train: np.ndarray, query: np.ndarray, k: int, train_grid: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products (exact float64 scores, training indices), ties to the lower index."""
    train, query = np.asarray(train, dtype=np.float32), np.asarray(query, dtype=np.float32)
    return top_k(train, query, k, gallery_grid=train_grid)


def weighted_votes(
    scores: np.ndarray, labels: np.ndarray, n_classes: int, ks: Sequence[int], temperature: float = TEMPERATURE
) -> dict[int, np.ndarray]:
    """Predictions for each k from one neighbour list; vote ties go to the lower class index."""
    w = np.exp((scores - scores[:, :1]) / temperature)  # shifted for stability; argmax unchanged
    votes = np.zeros((len(labels), n_classes))  # (queries, classes): no (queries, k, classes) array
    at = {min(k, labels.shape[1]) - 1: k for k in ks}
    out: dict[int, np.ndarray] = {}
    rows = np.arange(len(labels))
    for j in range(labels.shape[1]):
        votes[rows, labels[:, j]] += w[:, j]  # neighbour j's vote, added in rank order
        if j in at:
            out[at[j]] = votes.argmax(axis=1)
    for k in ks:  # several k beyond the neighbours found share the last column's votes
        out.setdefault(k, out[at[min(k, labels.shape[1]) - 1]])
    return {k: out[k] for k in ks}


class KNNHead(ClassifierMixin, BaseEstimator):
    """Estimator: `fit` stores the gallery, `predict_all` returns predictions for every k in `ks`.

    `predict` uses the largest k. With `n_classes`, labels must be class indices 0..n_classes-1
    (a class absent from the gallery is never predicted); otherwise any labels.
    """

    def __init__(
        self,
        ks: Sequence[int] = DEFAULT_KS,
        temperature: float = TEMPERATURE,
        n_classes: int | None = None,
        index: str = EXACT,
        device: str | None = None,
        seed: int = 0,
    ) -> None:
        self.ks = ks
        self.temperature = temperature
        self.n_classes = n_classes
        self.index = index
        self.device = device
        self.seed = seed

    def fit(self, X: np.ndarray | RowView, y: np.ndarray, rows: np.ndarray | None = None) -> KNNHead:
        """Store the gallery: X, or the `rows` of X without copying them (a RowView)."""
        if rows is not None and not isinstance(X, RowView):
            X = RowView(np.asarray(X), rows)
        X, y = validate_fit(self, X, y, np.float32)
        self.classes_, self.y_ = encode_labels(y, self.n_classes)
        self.x_: np.ndarray | RowView = X if isinstance(X, RowView) else np.ascontiguousarray(X)
        self.grid_ = grid(self.x_)  # once: every block of queries is scored on this gallery's grid
        self.ann_ = None
        if self.index != EXACT:
            self.ann_ = ann.build(self.x_, self.index, seed=self.seed, device=self.device)
        return self

    def _candidates(self):
        if self.ann_ is None:
            return None
        index = self.ann_
        return lambda q, kk: index.search(np.ascontiguousarray(q, dtype=np.float32), kk)[1]

    def neighbours(self, X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores and gallery positions of the top-k (candidates from the index, if any)."""
        q = np.asarray(X, dtype=np.float32)
        if self.ann_ is None and not isinstance(self.x_, RowView):
            return search(self.x_, q, k, self.grid_)
        return top_k(self.x_, q, k, self._candidates(), prove=self.ann_ is None, gallery_grid=self.grid_)

    def recall(self, X: np.ndarray, k: int = 10) -> float:
        """Fraction of the exact top-k (exact search) that this head's neighbours hold (1.0 for Flat)."""
        if self.ann_ is None:
            return 1.0
        return ann.recall(self.neighbours, self.x_, X, k, gallery_grid=self.grid_)

    def predict_all(self, X: np.ndarray) -> dict[int, np.ndarray]:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        ks = tuple(self.ks)
        scores, idx = self.neighbours(X, max(ks))
        votes = weighted_votes(scores, self.y_[idx], len(self.classes_), ks, self.temperature)
        return {k: self.classes_[p] for k, p in votes.items()}

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_all(X)[max(self.ks)]


def encode_labels(y: np.ndarray, n_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(classes_, label indices): 0..n_classes-1 as given, or the sorted distinct labels."""
    if n_classes is None:
        classes, idx = np.unique(y, return_inverse=True)
        return classes, idx.astype(np.int64)
    y = np.asarray(y)
    if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= n_classes)):
        raise ValueError(f"with n_classes={n_classes}, labels must be integers in 0..{n_classes - 1}")
    return np.arange(n_classes), y.astype(np.int64)
