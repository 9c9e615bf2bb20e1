"""The robustness figures of `probe compare`: severity curves and a models x perturbations heat map.

Drawn from the `robustness/` rows of a results table (see robustness.py). `report.build_report`
calls `figures` with its own matplotlib handle and palette (so the figure rules, the private
matplotlib folder and the colours are the report's); nothing here imports the report module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .perturb import PERTURBATIONS
from .robustness import ALIGNMENT, PERCEPTION, long_table, per_perturbation

# one row of panels per measure: (title, heads, metric of the perturbed point, metric of the clean point
# or None when the clean value is fixed, that fixed value)
CURVES: tuple[tuple[str, tuple[str, ...], str, str | None, float], ...] = (
    ("perception: linear probe accuracy", PERCEPTION, "accuracy", "accuracy_clean", np.nan),
    ("alignment: zero-shot accuracy", ALIGNMENT, "accuracy", "accuracy_clean", np.nan),
    ("invariance: median cosine to clean", ("invariance",), "cosine_median", None, 1.0),
)
CLEAN = "clean"


def strength(name: str, severity: float) -> float:
    """How far a severity is from leaving the image unchanged (its perturbation's identity), for
    ordering: noise's identity is an infinite SNR, so there a smaller SNR is stronger."""
    spec = PERTURBATIONS.get(name)
    if spec is None or not np.isfinite(severity):
        return float(severity) if np.isfinite(severity) else 0.0
    if np.isinf(spec.identity):
        return 1.0 / severity if severity > 0 else np.inf
    return abs(severity - spec.identity)


def curve_points(table: pd.DataFrame) -> pd.DataFrame:
    """Per (measure, model, perturbation, severity): the mean over the (dataset, task, head) cells
    every model with the measure and severity has, with the clean point (severity label `clean`, strength 0)
    first. Columns: measure, model, perturbation, key, strength, value."""
    t = long_table(table)
    if t.empty:
        return pd.DataFrame()
    rows = []
    for title, heads, metric, clean_metric, clean_value in CURVES:
        m = t[t["head"].isin(heads) & t["metric"].isin([metric, clean_metric])]
        cell = ["key", "dataset", "task", "head", "metric"]
        m = m[m.groupby(cell)["model"].transform("nunique") == m.groupby("key")["model"].transform("nunique")]
        for (model, name), g in m.groupby(["model", "perturbation"]):
            shifted = g[g["metric"] == metric]
            for key, h in shifted.groupby("key"):
                sev = float(h["severity"].iloc[0])
                rows.append((title, model, name, key, strength(str(name), sev), float(h["value"].mean())))
            clean = g[g["metric"] == clean_metric]["value"].mean() if clean_metric else clean_value
            if len(shifted):
                rows.append((title, model, name, CLEAN, 0.0, float(clean)))
    out = pd.DataFrame(rows, columns=["measure", "model", "perturbation", "key", "strength", "value"])
    return out.sort_values(["measure", "model", "perturbation", "strength"], kind="stable").reset_index(drop=True)


def severity_curves(table: pd.DataFrame, path: Path, plt: Any, palette: Callable[[int], list]) -> Path | None:
    """One panel per perturbation (columns) and measure (rows), models as lines: accuracy of the
    clean-trained probe and of zero-shot, and the median cosine, from clean to the strongest severity."""
    pts = curve_points(table)
    if pts.empty:
        return None
    measures = [c[0] for c in CURVES if c[0] in set(pts["measure"])]
    names = sorted(pts["perturbation"].unique())
    models = sorted(pts["model"].unique())
    colours = dict(zip(models, palette(len(models)), strict=True))
    height = 2.7 * len(measures) + 0.9
    fig, axes = plt.subplots(len(measures), len(names), figsize=(3.3 * len(names) + 0.6, height), squeeze=False)
    for i, measure in enumerate(measures):
        for j, name in enumerate(names):
            ax = axes[i][j]
            g = pts[(pts["measure"] == measure) & (pts["perturbation"] == name)]
            ticks = g.drop_duplicates("key").sort_values("strength", kind="stable")["key"].tolist()
            for model in models:
                h = g[g["model"] == model].set_index("key")
                xs = [k for k, key in enumerate(ticks) if key in h.index]
                ax.plot(xs, [h.loc[ticks[k], "value"] for k in xs], "-o", ms=3, color=colours[model], label=model)
            labels = [CLEAN if key == CLEAN else str(key).rpartition(":")[2] for key in ticks]
            ax.set_xticks(range(len(ticks)), labels, fontsize=7)
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if i == 0:
                unit = PERTURBATIONS[name].unit if name in PERTURBATIONS else ""
                ax.set_title(f"{name}" + (f" ({unit})" if unit else ""), fontsize=9)
            if i == len(measures) - 1:
                ax.set_xlabel("severity", fontsize=8)
            if j == 0:
                ax.set_ylabel(measure.replace(": ", ":\n"), fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    title = "What survives a perturbation (heads trained on clean rows; mean over tasks)"
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height)
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 1 - 0.3 / height),
        ncol=min(len(models), 4),
        fontsize=7,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


HEATMAP_PANELS = (
    ("perception_drop", "perception drop (linear probe)"),
    ("alignment_drop", "alignment drop (zero-shot)"),
)


def drop_heatmap(table: pd.DataFrame, path: Path, plt: Any) -> Path | None:
    """Models x perturbation keys: accuracy drop (clean - perturbed) of the probe and of zero-shot,
    side by side; red is a loss, blue a gain, each cell annotated."""
    p = per_perturbation(table)
    panels = [(c, title) for c, title in HEATMAP_PANELS if not p.empty and c in p and p[c].notna().any()]
    if not panels:
        return None
    order = p.assign(s=[strength(n, s) for n, s in zip(p["perturbation"], p["severity"], strict=True)])
    keys = order.drop_duplicates("key").sort_values(["perturbation", "s"], kind="stable")["key"].tolist()
    models = sorted(p["model"].unique())
    walls = [p.pivot_table(index="model", columns="key", values=c, aggfunc="first") for c, _ in panels]
    walls = [w.reindex(index=models, columns=keys) for w in walls]
    span = max(0.05, max(float(np.nanmax(np.abs(w.to_numpy(dtype=float)))) for w in walls))
    width = 1.6 + 0.07 * max(len(m) for m in models) + 0.75 * len(keys)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels), 1.7 + 0.45 * len(models)), squeeze=False, layout="constrained"
    )
    im = None
    for j, (ax, (_, title), wide) in enumerate(zip(axes[0], panels, walls, strict=True)):
        values = wide.to_numpy(dtype=float)
        im = ax.imshow(values, vmin=-span, vmax=span, cmap="RdBu_r", aspect="auto")
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(models)), models if j == 0 else [], fontsize=8)
        for (i, k), v in np.ndenumerate(values):
            if v == v:
                dark = abs(v) > 0.6 * span
                ax.text(k, i, f"{v:+.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=list(axes[0]), label="accuracy drop (clean - perturbed)")
    fig.suptitle("Accuracy lost to each perturbation: models x perturbations", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def figures(
    table: pd.DataFrame, folder: Path, plt_factory: Callable[[], Any], palette: Callable[[int], list]
) -> Sequence[tuple[str, Path | None]]:
    """The report's robustness sections (heading, PNG in `folder`), none without robustness rows."""
    if long_table(table).empty:
        return []
    plt = plt_factory()
    return [
        ("Robustness: severity curves", severity_curves(table, folder / "robustness_curves.png", plt, palette)),
        ("Robustness: models x perturbations", drop_heatmap(table, folder / "robustness_heatmap.png", plt)),
    ]
