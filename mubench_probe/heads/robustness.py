"""Robustness measures over arrays: how much of an embedding, and of what heads read from it, survives a perturbation.

Inputs are a clean run's embeddings and its perturbed twin's, row-aligned (row i of both is the
same image, once clean, once blurred / rotated / restained). Nothing here reads a store.

- Invariance (THUNDER, Marza et al. 2025): each row's cosine between its clean and perturbed
  embedding; its median and 5th percentile carry distribution-free confidence intervals from
  order statistics (no resampling, exact for any sample size).
- Clean-trained heads scored on perturbed rows: a head is fitted on the clean training rows of
  each fold and predicts both the clean and the perturbed test rows, so the two accuracies differ
  only by the perturbation. Their paired difference (the drop) and ratio (the share retained, one
  minus PathoROB's relative performance drop, Kömen et al. 2025) get paired bootstrap CIs.
- Agreement: the share of test rows whose clean and perturbed predictions are the same class
  (for kNN: "do the clean and the perturbed neighbours vote for the same label"), right or wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import binom

from ..config import DEFAULT_BOOTSTRAP
from .metrics import DEFAULT_SEED, Estimate, classification_metrics, paired_difference
from .scoring import BLOCK_ROWS, gather_rows

Predictor = Callable[[np.ndarray], dict[str, np.ndarray]]  # rows -> {head name: predicted class per row}


def row_cosines(clean: np.ndarray, perturbed: np.ndarray) -> np.ndarray:
    """Cosine between row i of `clean` and row i of `perturbed` (float64; rows re-normalised, so
    stored float16 embeddings give the cosine of what the heads see, not of their rounding)."""
    clean, perturbed = np.asarray(clean), np.asarray(perturbed)
    if clean.shape != perturbed.shape:
        raise ValueError(f"clean {clean.shape} and perturbed {perturbed.shape} embeddings are not row-aligned")
    out = np.empty(len(clean))
    for s in range(0, len(clean), BLOCK_ROWS):  # float64 copies of one block at a time
        a = clean[s : s + BLOCK_ROWS].astype(np.float64)
        b = perturbed[s : s + BLOCK_ROWS].astype(np.float64)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        out[s : s + BLOCK_ROWS] = np.einsum("ij,ij->i", a, b) / np.maximum(na * nb, 1e-300)
    return np.clip(out, -1.0, 1.0)


def quantile_estimate(values: np.ndarray, q: float, ci: float = 0.95) -> Estimate:
    """The q-quantile (numpy's linear interpolation) with a distribution-free CI [x_(l), x_(u)]:
    the order statistics whose ranks bracket Binomial(n, q) at (1 - ci) / 2 on each side, which
    cover the true quantile with probability >= ci for any continuous distribution. A side the
    sample is too small to bound is NaN."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    alpha = (1 - ci) / 2
    lo_rank = int(binom.ppf(alpha, n, q))  # 1-based rank l: P(Binomial <= l - 1) < alpha
    hi_rank = int(binom.ppf(1 - alpha, n, q)) + 1  # 1-based rank u: P(Binomial >= u) <= alpha
    lo = float(v[lo_rank - 1]) if lo_rank >= 1 else float("nan")
    hi = float(v[hi_rank - 1]) if hi_rank <= n else float("nan")
    return Estimate(float(np.quantile(v, q)), lo, hi, n)


def invariance(
    cosines: np.ndarray, y: np.ndarray | None = None, n_classes: int = 0, ci: float = 0.95
) -> tuple[dict[str, Estimate], dict[int, dict[str, Estimate]]]:
    """Median, 5th percentile and mean cosine overall, and median and 5th percentile per class of `y`
    (classes without rows are left out): the typical and the worst-case invariance."""

    def stats(c: np.ndarray) -> dict[str, Estimate]:
        return {"cosine_median": quantile_estimate(c, 0.5, ci), "cosine_p05": quantile_estimate(c, 0.05, ci)}

    cos = np.asarray(cosines, dtype=np.float64)
    overall = stats(cos)
    overall["cosine_mean"] = Estimate(float(cos.mean()) if len(cos) else float("nan"), np.nan, np.nan, len(cos))
    per_class: dict[int, dict[str, Estimate]] = {}
    if y is not None:
        for c in range(n_classes):
            m = y == c
            if m.any():
                per_class[c] = stats(cos[m])
    return overall, per_class


def share(
    hits: np.ndarray, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = DEFAULT_SEED, ci_method: str = "percentile"
) -> Estimate:
    """The mean of a 0/1 vector with a bootstrap CI (the resamples of `classification_metrics`)."""
    h = np.asarray(hits).astype(np.int64)
    if len(h) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    return classification_metrics(h, np.ones_like(h), 2, n_boot, seed, ci_method=ci_method)["accuracy"]


def shift_scores(
    y: np.ndarray,
    pred_clean: np.ndarray,
    pred_perturbed: np.ndarray,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    ci_method: str = "percentile",
) -> dict[str, Estimate]:
    """One head's predictions on the same rows, clean and perturbed: both accuracies, the drop
    (clean - perturbed, paired bootstrap CI), the share retained (perturbed / clean) and the
    agreement of the two predictions (whatever the truth)."""
    y, pc, pp = (np.asarray(a, dtype=np.int64) for a in (y, pred_clean, pred_perturbed))
    if len(y) == 0:
        return {}
    right_c, right_p = pc == y, pp == y
    paired = paired_difference(right_c, right_p, n_boot, seed, ci_method=ci_method)
    return {
        "accuracy_clean": share(right_c, n_boot, seed, ci_method),
        "accuracy": share(right_p, n_boot, seed, ci_method),
        "drop": paired["difference"],
        "retained": paired["ratio"],
        "agreement": share(pc == pp, n_boot, seed, ci_method),
    }


def clean_trained_predictions(
    fit: Callable[[np.ndarray], Predictor],
    x: np.ndarray,
    perturbed: Sequence[np.ndarray],
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    n_rows: int,
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Fit once per fold on clean training rows (`fit(train_indices)` -> predictor), predict each
    fold's test rows clean and in every perturbed copy: ({head: clean predictions}, one such dict
    per copy), -1 for rows no fold tests. One fit serves every perturbation, so the clean and the
    perturbed scores of a head come from the very same model."""
    clean: dict[str, np.ndarray] = {}
    shifted: list[dict[str, np.ndarray]] = [{} for _ in perturbed]
    step = gather_rows(x.shape[1])
    for train, test in folds:
        predict = fit(np.asarray(train))
        for s in range(0, len(test), step):
            block = test[s : s + step]
            for target, rows in ((clean, x), *zip(shifted, perturbed, strict=True)):
                for head, p in predict(rows[block]).items():
                    target.setdefault(head, np.full(n_rows, -1, dtype=np.int64))[block] = p
    return clean, shifted
