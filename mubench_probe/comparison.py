"""Models side by side: tables with CIs, paired tests on per-sample predictions, representation similarity.

Tables, arrays and opened runs in, DataFrames out (`compare_models` is all of it); opening the
store and evaluating into results happens in the caller (`api.compare`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .errors import UsageError
from .heads.metrics import DEFAULT_BOOTSTRAP, paired_difference
from .robustness import summary as robustness_summary
from .similarity import linear_cka, mcnemar, mutual_knn

if TYPE_CHECKING:
    from .store import Run

MAIN_HEADS = ("zs_caption", "zs_prompt", "lp", "knn@10", "proto")


@dataclass
class CompareResult:
    side_by_side: pd.DataFrame
    pairwise: pd.DataFrame
    cka: pd.DataFrame
    mutual_knn: pd.DataFrame
    figures: list[Path] = field(default_factory=list)
    report: Path | None = None
    text_cka: pd.DataFrame = field(default_factory=pd.DataFrame)
    robustness: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per model (robustness.summary)


def side_by_side(
    table: pd.DataFrame, models: Sequence[str] | None = None, heads: Sequence[str] = MAIN_HEADS
) -> pd.DataFrame:
    """Accuracy with CI per (task, head) x model (overall stratum, no few-shot seeds)."""
    t = table[
        (table["metric"] == "accuracy") & (table["stratum"] == "all") & table["seed"].isna() & table["head"].isin(heads)
    ]
    if models:
        t = t[t["model"].isin(models)]
    if t.empty:
        return pd.DataFrame()
    wide = t.pivot_table(
        index=["task", "head"], columns="model", values=["value", "ci_low", "ci_high"], aggfunc="first"
    )
    return wide.swaplevel(0, 1, axis=1).sort_index(axis=1)


def pairwise_tests(
    preds: pd.DataFrame,
    models: Sequence[str] | None = None,
    heads: Sequence[str] = MAIN_HEADS,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> pd.DataFrame:
    """Per pair of models and (task, head): accuracy difference with a paired bootstrap CI and McNemar's p."""
    p = preds[preds["head"].isin(heads)]
    names = sorted(models or p["model"].unique())
    rows = []
    for a, b in combinations(names, 2):
        pa, pb = p[p["model"] == a], p[p["model"] == b]
        for (task, head), ga in pa.groupby(["task", "head"]):
            gb = pb[(pb["task"] == task) & (pb["head"] == head)]
            if gb.empty:
                continue
            m = ga.merge(gb, on="row", suffixes=("_a", "_b"))
            m = m[m["y_true_a"] == m["y_true_b"]]
            if m.empty:
                continue
            ca = (m["y_pred_a"] == m["y_true_a"]).to_numpy()
            cb = (m["y_pred_b"] == m["y_true_b"]).to_numpy()
            d = paired_difference(ca, cb, n_boot, seed)["difference"]
            test = mcnemar(ca, cb)
            rows.append(
                {
                    "task": task,
                    "head": head,
                    "model_a": a,
                    "model_b": b,
                    "n": len(m),
                    "acc_a": ca.mean(),
                    "acc_b": cb.mean(),
                    "difference": d.value,
                    "ci_low": d.ci_low,
                    "ci_high": d.ci_high,
                    "a_only": test["a_only"],
                    "b_only": test["b_only"],
                    "p_mcnemar": test["p_value"],
                }
            )
    return pd.DataFrame(rows)


def similarity_matrices(embeddings: dict[str, np.ndarray], k: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Linear CKA and mutual-kNN alignment between every pair of models on the same rows (k=0: CKA only)."""
    names = list(embeddings)
    cka = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    mknn = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for a, b in combinations(names, 2):
        cka.loc[a, b] = cka.loc[b, a] = linear_cka(embeddings[a], embeddings[b])
        if k > 0:
            mknn.loc[a, b] = mknn.loc[b, a] = mutual_knn(embeddings[a], embeddings[b], k)
    return cka, mknn


def text_prototypes(plan: dict, texts: Sequence[str], text_emb: np.ndarray) -> np.ndarray:
    """Class-prompt ensemble vectors of every task of a run's prompt plan, stacked in a fixed order."""
    from .heads.zeroshot import ensemble_weights, template_indices
    from .tasks import prompt_texts

    rows = [
        ensemble_weights(text_emb[template_indices(list(texts), prompt_texts(classes, plan["templates"]))])
        for _, classes in sorted(plan.get("tasks", {}).items())
    ]
    return np.concatenate(rows) if rows else np.zeros((0, text_emb.shape[1]), np.float32)


def aligned_runs(runs: Sequence[Run]) -> tuple[list[Run], dict[str, np.ndarray], pd.DataFrame]:
    """The complete runs of the dataset most models were extracted on, with their image embeddings
    and metadata on the rows valid in every one: representation similarity needs the same rows."""
    by_dataset: dict[str, list[Run]] = {}
    for r in runs:
        if r.complete:
            by_dataset.setdefault(r.path.split("/")[1], []).append(r)
    group = max(by_dataset.values(), key=len) if by_dataset else []
    if not group:
        return [], {}, pd.DataFrame()
    valid = np.logical_and.reduce([r.valid_mask() for r in group])
    embeddings = {r.model_spec: r.image_embeddings()[valid] for r in group}
    return group, embeddings, group[0].meta()[valid].reset_index(drop=True)


def compare_models(
    table: pd.DataFrame,
    preds: pd.DataFrame,
    runs: Sequence[Run],
    *,
    k: int = 10,
    n_boot: int = DEFAULT_BOOTSTRAP,
    color_by: Sequence[str] = ("label_name",),
) -> tuple[CompareResult, dict[str, np.ndarray], pd.DataFrame]:
    """Every comparison of the models in a results table and their runs: the result, and the aligned
    embeddings and metadata the report's maps are drawn from (`color_by` must be columns of it)."""
    side = side_by_side(table)
    pairs = pairwise_tests(preds, n_boot=n_boot)
    group, embeddings, meta = aligned_runs(runs)
    missing = [c for c in color_by if c not in meta.columns] if group else []
    if missing:
        raise UsageError(f"--color-by {missing}: no such metadata column (have: {', '.join(meta.columns)})")
    cka, mknn = similarity_matrices(embeddings, k) if len(embeddings) > 1 else (pd.DataFrame(), pd.DataFrame())
    prototypes = {
        r.model_spec: text_prototypes(r.prompts(), r.texts(), r.text_embeddings()) for r in group if r.has_text
    }
    text_cka = similarity_matrices(prototypes, k=0)[0] if len(prototypes) > 1 else pd.DataFrame()
    result = CompareResult(side, pairs, cka, mknn, text_cka=text_cka, robustness=robustness_summary(table))
    return result, embeddings, meta
