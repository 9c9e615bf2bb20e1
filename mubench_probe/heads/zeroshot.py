"""Zero-shot heads: the μ-Bench per-image caption protocol and class-prompt classification.

Both take embeddings that are already L2-normalised and return predictions; neither knows
where the arrays came from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import UsageError


def caption_choice(
    image_emb: np.ndarray, text_emb: np.ndarray, options: np.ndarray, answer: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """μ-Bench protocol: each image picks the most similar of its own caption options.

    options (N, K) holds indices into text_emb with -1 padding; answer (N,) is the correct
    option's position (-1 = null entry, excluded). Returns (valid mask, chosen position, correct).
    Ties go to the first option, as `argmax` does.
    """
    options = np.asarray(options)
    answer = np.asarray(answer)
    valid = (answer >= 0) & (options >= 0).any(axis=1)
    chosen = np.full(len(answer), -1, dtype=np.int64)
    rows = np.flatnonzero(valid)
    if rows.size:
        opts = options[rows]
        sims = np.einsum("nd,nkd->nk", image_emb[rows], text_emb[np.maximum(opts, 0)])
        sims = np.where(opts >= 0, sims, -np.inf)
        chosen[rows] = sims.argmax(axis=1)
    correct = valid & (chosen == answer)
    return valid, chosen, correct


def ensemble_weights(class_template_emb: np.ndarray) -> np.ndarray:
    """(C, T, D) prompt embeddings -> (C, D): normalise each, average over templates, re-normalise."""
    e = np.asarray(class_template_emb, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    w = e.mean(axis=1)
    return (w / np.maximum(np.linalg.norm(w, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


class CosineClassifier:
    """Predicts the class whose unit weight vector is closest in cosine similarity.

    The common form of class-prompt zero-shot and of the image prototype head: comparing the
    two on the same images isolates how well text aligns with what the image encoder perceives.
    """

    weights_: np.ndarray

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32) @ self.weights_.T

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.decision_function(x).argmax(axis=1)

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())


class PromptZeroShot(CosineClassifier):
    """Class-prompt zero-shot: weights from text embeddings of (class x template) prompts."""

    def __init__(self, class_template_emb: np.ndarray, template: int | None = None) -> None:
        self.class_template_emb = np.asarray(class_template_emb)
        self.template = template

    def fit(self, x: np.ndarray | None = None, y: np.ndarray | None = None) -> PromptZeroShot:
        """Nothing is learned from images; `fit` exists so the head composes like an estimator."""
        e = self.class_template_emb
        if e.ndim != 3:
            raise UsageError("class prompt embeddings must be (classes, templates, dim)")
        self.weights_ = ensemble_weights(e if self.template is None else e[:, [self.template]])
        return self


class PrototypeHead(CosineClassifier):
    """Nearest class mean of (normalised) training image embeddings, like NearestCentroid with cosine."""

    def __init__(self, n_classes: int | None = None) -> None:
        self.n_classes = n_classes

    def fit(self, x: np.ndarray, y: np.ndarray) -> PrototypeHead:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
        c = self.n_classes or int(y.max()) + 1
        sums = np.zeros((c, x.shape[1]))
        np.add.at(sums, y, x)
        counts = np.bincount(y, minlength=c)[:, None]
        means = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        self.weights_ = (means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)).astype(np.float32)
        self.classes_present_ = counts[:, 0] > 0
        return self


def template_indices(texts: Sequence[str], prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """(C, T) indices of each class's prompt strings in the store's text table."""
    lookup = {t: i for i, t in enumerate(texts)}
    missing = [p for row in prompts for p in row if p not in lookup]
    if missing:
        raise KeyError(missing[0])
    return np.array([[lookup[p] for p in row] for row in prompts], dtype=np.int64)
