"""Classification metrics and bootstrap confidence intervals over plain arrays.

Bootstrap over samples with a fixed seed: the percentile interval (default) or the basic
interval (2 * estimate - upper and lower quantiles, as `scipy.stats.bootstrap(method="basic")`,
which μ-Bench's paper used). A paired bootstrap resamples the same indices for two prediction
vectors, so the CI of a difference accounts for their correlation. Resample indices are drawn
in blocks from one generator (the same stream as one big draw), so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import DEFAULT_BOOTSTRAP

DEFAULT_SEED = 0
_BLOCK_CELLS = 2_000_000  # resample indices drawn at a time (16 MB)


def confusion(y: np.ndarray, p: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(y * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _batched_confusion(y: np.ndarray, p: np.ndarray, idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrices for many resamples at once: idx (B, n) -> (B, C, C)."""
    b = idx.shape[0]
    codes = (y[idx] * n_classes + p[idx]) + (np.arange(b)[:, None] * n_classes * n_classes)
    return np.bincount(codes.ravel(), minlength=b * n_classes * n_classes).reshape(b, n_classes, n_classes)


def _acc(cm: np.ndarray) -> np.ndarray:
    tot = cm.sum(axis=(-1, -2))
    return np.trace(cm, axis1=-2, axis2=-1) / np.maximum(tot, 1)


def _recall(cm: np.ndarray) -> np.ndarray:
    support = cm.sum(axis=-1)
    diag = np.diagonal(cm, axis1=-2, axis2=-1)
    return np.divide(diag, support, out=np.full(diag.shape, np.nan), where=support > 0)


def _balanced(cm: np.ndarray) -> np.ndarray:
    """Mean recall over classes present in y (scikit-learn's balanced_accuracy_score)."""
    return np.nanmean(_recall(cm), axis=-1)


def _macro_f1(cm: np.ndarray) -> np.ndarray:
    """Macro F1 over classes present in y or predictions (scikit-learn's f1_score, zero_division=0)."""
    diag = np.diagonal(cm, axis1=-2, axis2=-1).astype(float)
    support, predicted = cm.sum(axis=-1), cm.sum(axis=-2)
    denom = support + predicted
    f1 = np.divide(2 * diag, denom, out=np.zeros(diag.shape), where=denom > 0)
    present = denom > 0
    return (f1 * present).sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


SUMMARY_METRICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "accuracy": _acc,
    "balanced_accuracy": _balanced,
    "macro_f1": _macro_f1,
}


@dataclass(frozen=True)
class Estimate:
    value: float
    ci_low: float
    ci_high: float
    n: int


def _interval(b: np.ndarray, value: float, alpha: float, method: str = "percentile") -> tuple[float, float]:
    """Bootstrap interval ignoring NaN resamples (e.g. a class absent from a resample); NaN if none."""
    b = b[~np.isnan(b)]
    if b.size == 0:
        return float("nan"), float("nan")
    lo, hi = (float(q) for q in np.quantile(b, [alpha, 1 - alpha]))
    if method == "basic":
        return 2 * value - hi, 2 * value - lo
    return lo, hi


def _index_blocks(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Resample index matrices (rows = resamples) in blocks of bounded size, one generator stream."""
    rng = np.random.default_rng(seed)
    step = max(1, _BLOCK_CELLS // max(n, 1))
    for s in range(0, n_boot, step):
        yield rng.integers(0, n, size=(min(step, n_boot - s), n))


def classification_metrics(
    y: np.ndarray,
    p: np.ndarray,
    n_classes: int,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    ci: float = 0.95,
    class_names: Sequence[str] | None = None,
    ci_method: str = "percentile",
) -> dict[str, Estimate]:
    """Accuracy, balanced accuracy and macro-F1 with bootstrap CIs; per-class recall (no CI)."""
    y, p = np.asarray(y, dtype=np.int64), np.asarray(p, dtype=np.int64)
    n = len(y)
    if n == 0:
        return {}
    cm = confusion(y, p, n_classes)
    out: dict[str, Estimate] = {}
    boots: dict[str, list[np.ndarray]] = {k: [] for k in SUMMARY_METRICS}
    for idx in _index_blocks(n, n_boot, seed) if n_boot > 0 else ():
        cms = _batched_confusion(y, p, idx, n_classes)
        for k, fn in SUMMARY_METRICS.items():
            boots[k].append(fn(cms))
    alpha = (1 - ci) / 2
    for k, fn in SUMMARY_METRICS.items():
        value = float(fn(cm))
        if n_boot > 0:
            lo, hi = _interval(np.concatenate(boots[k]), value, alpha, ci_method)
        else:
            lo = hi = float("nan")
        out[k] = Estimate(value, float(lo), float(hi), n)
    rec = _recall(cm)
    for c in range(n_classes):
        if not np.isnan(rec[c]):
            name = class_names[c] if class_names else c
            out[f"recall[{name}]"] = Estimate(float(rec[c]), float("nan"), float("nan"), int(cm[c].sum()))
    return out


def paired_difference(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    ci: float = 0.95,
    ci_method: str = "percentile",
) -> dict[str, Estimate]:
    """acc(a) - acc(b) and acc(b) / acc(a) on the same samples, with paired bootstrap CIs."""
    a, b = np.asarray(correct_a, dtype=float), np.asarray(correct_b, dtype=float)
    n = len(a)
    if n == 0:
        return {}
    alpha = (1 - ci) / 2
    diff, ratio = a.mean() - b.mean(), (b.mean() / a.mean() if a.mean() > 0 else float("nan"))
    if n_boot > 0:
        means = [(a[idx].mean(axis=1), b[idx].mean(axis=1)) for idx in _index_blocks(n, n_boot, seed)]
        ma, mb = np.concatenate([m[0] for m in means]), np.concatenate([m[1] for m in means])
        d_lo, d_hi = _interval(ma - mb, float(diff), alpha, ci_method)
        r_lo, r_hi = _interval(np.divide(mb, ma, out=np.full(ma.shape, np.nan), where=ma > 0), ratio, alpha, ci_method)
    else:
        d_lo = d_hi = r_lo = r_hi = float("nan")
    return {
        "difference": Estimate(float(diff), float(d_lo), float(d_hi), n),
        "ratio": Estimate(float(ratio), float(r_lo), float(r_hi), n),
    }


def modality_gap(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Distance between the centroids of L2-normalised image and text embeddings (Liang et al. 2022)."""

    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return float(np.linalg.norm(unit(image_emb).mean(axis=0) - unit(text_emb).mean(axis=0)))
