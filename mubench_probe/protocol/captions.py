"""The μ-Bench caption protocol and caption retrieval: heads of scope "captions"."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from ..config import EvalConfig
from ..heads import caption_choice
from ..heads.confounders import softmax_scores
from ..heads.metrics import Estimate, classification_metrics
from ..heads.retrieval import caption_retrieval
from ..tasks import COARSE_CAPTION_KEYS, FINE_CAPTION_KEYS
from .arrays import Output
from .heads import calibration
from .plan import test_mask


def caption_keys(available: Sequence[str], cfg: EvalConfig) -> dict[str, list[str]]:
    """Caption keys per pooled group ("coarse", "fine"), honouring each group's template choice."""

    def keep(key: str, templates: str) -> bool:
        second = key.endswith("_1")
        return templates == "both" or (templates == "1") == second

    return {
        group: [k for k in keys if k in available and keep(k, cfg.templates_for(group))]
        for group, keys in (("coarse", COARSE_CAPTION_KEYS), ("fine", FINE_CAPTION_KEYS))
    }


def caption_groups(
    captions: dict[str, tuple[np.ndarray, np.ndarray]], meta: pd.DataFrame, valid: np.ndarray, cfg: EvalConfig
) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per pooled group ("coarse", "fine"): its caption keys and the rows it scores (valid, tested under
    the protocol, not from a dataset the group excludes), so every caption measure pools the same rows."""
    tested = test_mask(meta, cfg)
    sources = meta["dataset"].astype(str).to_numpy() if "dataset" in meta else None
    groups = {}
    for group, keys in caption_keys(list(captions), cfg).items():
        keep = valid.copy() if tested is None else valid & tested
        excluded = cfg.excluded_for(group)
        if excluded and sources is not None:
            keep &= ~np.isin(sources, excluded)
        groups[group] = (keys, keep)
    return groups


def evaluate_captions(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    captions: dict[str, tuple[np.ndarray, np.ndarray]],
    meta: pd.DataFrame,
    valid: np.ndarray,
    cfg: EvalConfig,
) -> Output:
    """μ-Bench zero-shot: per caption key, per source dataset, and pooled coarse / fine.

    Under --protocol split/transfer only the test rows are scored, like every other head.
    """
    out = Output()
    datasets_col = meta["dataset"].astype(str).to_numpy() if "dataset" in meta else None
    for group, (keys, keep) in caption_groups(captions, meta, valid, cfg).items():
        pooled, per_key, probs, answers = [], [], [], []
        for key in keys:
            options, answer = captions[key]
            ok, chosen, right, sims = caption_choice(image_emb, text_emb, options, answer, scores=True)
            rows = np.flatnonzero(ok & keep)
            if rows.size == 0:
                continue
            task = f"mubench/{key}"
            est = _binary(right[rows], cfg)
            out.add(task, "zs_caption", "accuracy", est)
            out.predict(task, "zs_caption", rows, answer[rows], chosen[rows])
            if datasets_col is not None:
                for d in sorted(set(datasets_col[rows])):
                    m = datasets_col[rows] == d
                    out.add(task, "zs_caption", "accuracy", _binary(right[rows][m], cfg), stratum=f"dataset={d}")
            pooled.append(right[rows])
            probs.append(softmax_scores(sims[rows]))
            answers.append(answer[rows])
            per_key.append(est.value)
        if not pooled:
            continue
        task = f"mubench/{group}"
        width = max(p.shape[1] for p in probs)  # keys differ in their number of options: pad with 0
        proba = np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in probs])
        calibration(out, task, "zs_caption", proba, np.concatenate(answers), cfg)
        if cfg.pooling == "macro":
            out.add(task, "zs_caption", "accuracy", float(np.mean(per_key)), n=int(sum(len(p) for p in pooled)))
            continue
        est = _binary(np.concatenate(pooled), cfg)
        out.add(task, "zs_caption", "accuracy", est)
        if est.ci_high == est.ci_high:  # μ-Bench reports a CI as the half-width |high - estimate|
            out.add(task, "zs_caption", "ci_half_width", abs(est.ci_high - est.value), n=est.n)
    return out


def evaluate_retrieval(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    captions: dict[str, tuple[np.ndarray, np.ndarray]],
    meta: pd.DataFrame,
    valid: np.ndarray,
    cfg: EvalConfig,
) -> Output:
    """Image->text and text->image Recall@1/5/10 and mAP per caption key (see heads.retrieval)."""
    out = Output()
    rows_tested = test_mask(meta, cfg)
    usable = valid if rows_tested is None else valid & rows_tested
    for key in sorted(captions):
        options, answer = captions[key]
        ok = usable & (answer >= 0)
        positive = np.full(len(answer), -1, dtype=np.int64)
        rows = np.flatnonzero(ok)
        positive[rows] = options[rows, answer[rows]]
        for direction, metrics in caption_retrieval(image_emb, text_emb, positive).items():
            n = int(metrics.pop("queries"))
            for metric, value in metrics.items():
                out.add(f"retrieval/{key}", direction, metric, value, n=n)
    return out


def _binary(correct: np.ndarray, cfg: EvalConfig) -> Estimate:
    """Accuracy of a 0/1 vector with a bootstrap CI."""
    c = correct.astype(np.int64)
    return classification_metrics(c, np.ones_like(c), 2, cfg.n_boot, cfg.seed, ci_method=cfg.ci_method)["accuracy"]


# The runner half of the registry for heads of scope "captions" (see head_specs.HEAD_SPECS).
CAPTION_RUNNERS = {"zs_caption": evaluate_captions, "retrieval": evaluate_retrieval}
