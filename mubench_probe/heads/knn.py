"""Temperature-weighted kNN: every k from one search, identical on every CPU.

Votes are exp(similarity / T) (T = 0.07, as in DINO's evaluation). Neighbours come from
`scoring.top_k`: FAISS proposes candidates, exact scores rank them, and neighbours with equal
similarity are ordered by training index, so duplicates tie the same way on every machine.
A class absent from the training rows can never be predicted (it gets no votes).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..config import DEFAULT_KS, TEMPERATURE
from .scoring import top_k


def search(train: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products (exact float64 scores, training indices), ties to the lower index."""
    return top_k(np.asarray(train, dtype=np.float32), np.asarray(query, dtype=np.float32), k)


def weighted_votes(
    scores: np.ndarray, labels: np.ndarray, n_classes: int, ks: Sequence[int], temperature: float = TEMPERATURE
) -> dict[int, np.ndarray]:
    """Predictions for each k from one neighbour list; vote ties go to the lower class index."""
    w = np.exp((scores - scores[:, :1]) / temperature)  # shifted for stability; argmax unchanged
    onehot = np.zeros((*labels.shape, n_classes))
    np.put_along_axis(onehot, labels[..., None], 1.0, axis=-1)
    cum = np.cumsum(onehot * w[..., None], axis=1)
    return {k: cum[:, min(k, cum.shape[1]) - 1].argmax(axis=1) for k in ks}


class KNNHead(ClassifierMixin, BaseEstimator):
    """Estimator: `fit` stores the gallery, `predict_all` returns predictions for every k in `ks`.

    `predict` uses the largest k. With `n_classes`, labels must be class indices 0..n_classes-1
    (a class absent from the gallery is never predicted); otherwise any labels.
    """

    def __init__(
        self, ks: Sequence[int] = DEFAULT_KS, temperature: float = TEMPERATURE, n_classes: int | None = None
    ) -> None:
        self.ks = ks
        self.temperature = temperature
        self.n_classes = n_classes

    def fit(self, X: np.ndarray, y: np.ndarray) -> KNNHead:
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_, self.y_ = encode_labels(y, self.n_classes)
        self.x_ = np.ascontiguousarray(X)
        return self

    def predict_all(self, X: np.ndarray) -> dict[int, np.ndarray]:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        ks = tuple(self.ks)
        scores, idx = search(self.x_, X, max(ks))
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
