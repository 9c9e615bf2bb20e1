"""Zero-shot heads: the μ-Bench per-image caption protocol and class-prompt classification.

Both take embeddings that are already L2-normalised and return predictions; neither knows
where the arrays came from.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import UsageError
from .knn import encode_labels
from .scoring import BLOCK_ROWS, RowView, exact_pairs, exact_scores, grid, validate_fit


def caption_choice(
    image_emb: np.ndarray, text_emb: np.ndarray, options: np.ndarray, answer: np.ndarray, scores: bool = False
) -> tuple[np.ndarray, ...]:
    """μ-Bench protocol: each image picks the most similar of its own caption options.

    options (N, K) holds indices into text_emb with -1 padding; answer (N,) is the correct
    option's position (-1 = null entry, excluded). Returns (valid mask, chosen position, correct),
    and with `scores` also each row's option similarities (N, K), -inf for padding and invalid rows.
    Scores are exact (`scoring`), so options with identical embeddings (e.g. captions that differ
    only after the tokenizer's context length) tie on every machine; ties go to the first option.
    """
    options = np.asarray(options)
    answer = np.asarray(answer)
    valid = (answer >= 0) & (options >= 0).any(axis=1)
    chosen = np.full(len(answer), -1, dtype=np.int64)
    rows = np.flatnonzero(valid)
    si, st = grid(image_emb), grid(text_emb)
    all_sims = np.full(options.shape, -np.inf) if scores else None
    for s in range(0, len(rows), BLOCK_ROWS):
        part = rows[s : s + BLOCK_ROWS]
        opts = options[part]
        sims = np.where(opts >= 0, exact_pairs(image_emb[part], text_emb[np.maximum(opts, 0)], si, st), -np.inf)
        chosen[part] = sims.argmax(axis=1)
        if all_sims is not None:
            all_sims[part] = sims
    correct = valid & (chosen == answer)
    return (valid, chosen, correct, all_sims) if all_sims is not None else (valid, chosen, correct)


def ensemble_weights(class_template_emb: np.ndarray) -> np.ndarray:
    """(C, T, D) prompt embeddings -> (C, D): normalise each, average over templates, re-normalise."""
    e = np.asarray(class_template_emb, dtype=np.float64)
    return _unit_rows(_unit_rows(e).mean(axis=1)).astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class CosineClassifier(ClassifierMixin, BaseEstimator):
    """Nearest class prototype by cosine similarity (NearestCentroid with a cosine metric).

    `fit(X, y)` normalises each row, averages the rows of each class and re-normalises: for
    image embeddings this is the prototype head, for prompt text embeddings (one row per class
    and template) it is class-prompt zero-shot with a template ensemble. Comparing the two on
    the same images isolates how well text aligns with what the image encoder perceives.
    Classes without rows (below `n_classes`) can never be predicted. Scores are exact
    (`scoring`), ties go to the lower class index.
    """

    def __init__(self, n_classes: int | None = None) -> None:
        self.n_classes = n_classes

    def fit(self, X: np.ndarray | RowView, y: np.ndarray) -> CosineClassifier:
        """Class means of the normalised rows of X (an array, or a RowView: summed block by block,
        in row order, so the sums are the same as in one pass)."""
        X, y = validate_fit(self, X, y, np.float64)
        self.classes_, idx = encode_labels(y, self.n_classes)
        blocks = X.blocks(BLOCK_ROWS) if isinstance(X, RowView) else iter([(0, X)])
        sums = np.zeros((len(self.classes_), X.shape[1]))
        for start, block in blocks:  # in row order: the same sums as one np.add.at over all rows
            np.add.at(sums, idx[start : start + len(block)], _unit_rows(np.asarray(block, dtype=np.float64)))
        self.present_ = np.bincount(idx, minlength=len(self.classes_)) > 0
        self.weights_ = _unit_rows(sums).astype(np.float32)
        return self

    def similarities(self, X: np.ndarray) -> np.ndarray:
        """Cosine similarity (n, classes) to each class prototype (exact; -inf for classes without rows)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float32, reset=False)
        scores = exact_scores(X, self.weights_)
        scores[:, ~self.present_] = -np.inf
        norms = np.empty((len(X), 1))  # in row blocks: no float64 copy of X
        for s in range(0, len(X), BLOCK_ROWS):
            norms[s : s + BLOCK_ROWS] = np.linalg.norm(X[s : s + BLOCK_ROWS].astype(np.float64), axis=1, keepdims=True)
        return np.divide(scores, norms, out=scores, where=norms > 0)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """`similarities`; for two classes the second's minus the first's, as scikit-learn expects."""
        s = self.similarities(X)
        return s[:, 1] - s[:, 0] if s.shape[1] == 2 else s

    def predict(self, X: np.ndarray) -> np.ndarray:
        best = self.similarities(X).argmax(axis=1)  # ties: the lower class
        return self.classes_[best]


class PrototypeHead(CosineClassifier):
    """Nearest class mean of (normalised) training image embeddings."""


class PromptZeroShot(CosineClassifier):
    """Class-prompt zero-shot: `fit(prompt_text_emb, prompt_class)`, one row per (class, template)."""

    @classmethod
    def from_templates(cls, class_template_emb: np.ndarray, template: int | None = None) -> PromptZeroShot:
        """Fitted from (C, T, D) prompt embeddings: every template (ensemble) or only `template`."""
        e = np.asarray(class_template_emb)
        if e.ndim != 3:
            raise UsageError("class prompt embeddings must be (classes, templates, dim)")
        if template is not None:
            e = e[:, [template]]
        c, t, d = e.shape
        return cls(n_classes=c).fit(e.reshape(c * t, d), np.repeat(np.arange(c), t))


def template_indices(texts: Sequence[str], prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """(C, T) indices of each class's prompt strings in the store's text table."""
    lookup = {t: i for i, t in enumerate(texts)}
    missing = [p for row in prompts for p in row if p not in lookup]
    if missing:
        raise KeyError(missing[0])
    return np.array([[lookup[p] for p in row] for row in prompts], dtype=np.int64)
