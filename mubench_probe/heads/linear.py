"""Linear probe: multinomial logistic regression with C chosen on a held-out validation split.

The sweep runs from strong to weak regularisation, each fit warm-started from the previous
solution, with a tight tolerance (on unit-norm features lbfgs's default tolerance stops long
before convergence and every C looks alike). It stops once validation accuracy has not improved
for `patience` steps (the weakly regularised fits are the slow ones), then refits on
train + validation, warm-started from the chosen C's solution.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

DEFAULT_CS = tuple(float(c) for c in np.logspace(-2, 4, 13))
DEFAULT_TOL = 1e-6
DEFAULT_MAX_ITER = 1000
FALLBACK_C = 10.0  # used when there is too little data to hold any out (e.g. 1-shot)


def _lr(c: float, tol: float, max_iter: int, warm: bool = False) -> LogisticRegression:
    return LogisticRegression(C=c, tol=tol, max_iter=max_iter, solver="lbfgs", warm_start=warm)


def can_validate(y: np.ndarray, val_fraction: float) -> bool:
    """A stratified split needs two examples per class and a validation set with every class."""
    counts = np.bincount(y)
    counts = counts[counts > 0]
    return len(counts) >= 2 and counts.min() >= 2 and round(len(y) * val_fraction) >= len(counts)


class LinearProbe:
    """Estimator: fit(X, y) picks C on a stratified validation split, then refits on all of X."""

    def __init__(
        self,
        Cs: tuple[float, ...] = DEFAULT_CS,
        C: float | None = None,
        val_fraction: float = 0.2,
        patience: int = 2,
        tol: float = DEFAULT_TOL,
        max_iter: int = DEFAULT_MAX_ITER,
        random_state: int = 0,
    ) -> None:
        self.Cs, self.C, self.val_fraction, self.patience = Cs, C, val_fraction, patience
        self.tol, self.max_iter, self.random_state = tol, max_iter, random_state

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearProbe:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y)
        self.val_scores_: dict[float, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            if self.C is not None or not can_validate(y, self.val_fraction):
                self.C_ = float(self.C if self.C is not None else FALLBACK_C)
                self.model_ = _lr(self.C_, self.tol, self.max_iter).fit(x, y)
                return self
            xtr, xva, ytr, yva = train_test_split(
                x, y, test_size=self.val_fraction, stratify=y, random_state=self.random_state
            )
            lr = _lr(self.Cs[0], self.tol, self.max_iter, warm=True)
            best, best_coef, since = -1.0, None, 0
            for c in self.Cs:
                lr.set_params(C=c).fit(xtr, ytr)
                score = float((lr.predict(xva) == yva).mean())
                self.val_scores_[c] = score
                if score > best:
                    best, since = score, 0
                    self.C_ = c
                    best_coef = (lr.coef_.copy(), lr.intercept_.copy())
                else:
                    since += 1
                    if since >= self.patience:
                        break
            final = _lr(self.C_, self.tol, self.max_iter, warm=True)
            if len(np.unique(ytr)) == len(np.unique(y)) and best_coef is not None:
                final.coef_, final.intercept_ = best_coef
                final.classes_ = lr.classes_
            self.model_ = final.fit(x, y)
        return self

    @property
    def classes_(self) -> np.ndarray:
        return self.model_.classes_

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model_.predict(np.asarray(x, dtype=np.float64))

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(np.asarray(x, dtype=np.float64))

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())
