"""The results table condensed for people: one row per model × task, and μ-Bench's Table 1 layout.

Pure pandas over the long results table (`probe evaluate` prints these; the files keep everything)."""

from __future__ import annotations

from typing import Any

import pandas as pd

SUMMARY_COLUMNS = {
    # column: (head, metric) candidates, first found wins; ZS is the caption protocol on μ-Bench
    # rows and class-prompt zero-shot on task rows
    "ZS": (("zs_prompt", "accuracy"), ("zs_caption", "accuracy")),
    "LP": (("lp", "accuracy"),),
    "kNN@10": (("knn@10", "accuracy"),),
    "kNN-NSB@10": (("knn_nsb@10", "accuracy"),),
    "proto": (("proto", "accuracy"),),
    "gap LP-ZS": (("alignment", "lp_minus_zs"),),
    "I->T R@1": (("image_to_text", "R@1"),),
    "T->I R@1": (("text_to_image", "R@1"),),
}


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model x task: ZS, LP, kNN@10, prototype and the LP - ZS gap (value and CI).

    Per-caption-key μ-Bench rows are left to the files; the pooled coarse/fine rows stay.
    """
    if table.empty:
        return pd.DataFrame()
    per_key = table["task"].str.startswith("mubench/") & ~table["task"].isin(["mubench/coarse", "mubench/fine"])
    t = table[(table["stratum"] == "all") & table["seed"].isna() & ~per_key]
    rows = []
    for (model, task), g in t.groupby(["model", "task"], sort=True):
        row: dict[str, Any] = {"model": model, "task": task}
        for col, candidates in SUMMARY_COLUMNS.items():
            row[col] = None
            for head, metric in candidates:
                m = g[(g["head"] == head) & (g["metric"] == metric)]
                if len(m):
                    row[col] = tuple(m.iloc[0][["value", "ci_low", "ci_high"]])
                    break
        rows.append(row)
    return pd.DataFrame(rows)


def mubench_table1(table: pd.DataFrame) -> pd.DataFrame:
    """Pooled μ-Bench caption accuracy per model, as the paper's Table 1 shows it.

    Columns: model, coarse, coarse_ci, coarse_n, fine, fine_ci, fine_n (accuracy, CI half-width
    |high - estimate|, rows). Empty when the results have no pooled caption scores.
    """
    t = table[
        (table["head"] == "zs_caption")
        & (table["stratum"] == "all")
        & table["task"].isin(["mubench/coarse", "mubench/fine"])
    ]
    rows = []
    for model, g in t.groupby("model", sort=True):
        row: dict[str, Any] = {"model": model}
        for group in ("coarse", "fine"):
            acc = g[(g["task"] == f"mubench/{group}") & (g["metric"] == "accuracy")]
            half = g[(g["task"] == f"mubench/{group}") & (g["metric"] == "ci_half_width")]
            row[group] = float(acc["value"].iloc[0]) if len(acc) else float("nan")
            row[f"{group}_ci"] = float(half["value"].iloc[0]) if len(half) else float("nan")
            row[f"{group}_n"] = int(acc["n"].iloc[0]) if len(acc) and acc["n"].iloc[0] == acc["n"].iloc[0] else 0
        rows.append(row)
    return pd.DataFrame(rows)
