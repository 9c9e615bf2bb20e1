"""Models side by side: tables with CIs, paired tests on per-sample predictions, representation similarity.

Arrays and DataFrames in, DataFrames out; reading the store and results happens in the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd

from .heads.metrics import DEFAULT_BOOTSTRAP, paired_difference
from .similarity import linear_cka, mcnemar, mutual_knn

MAIN_HEADS = ("zs_caption", "zs_prompt", "lp", "knn@10", "proto")


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
