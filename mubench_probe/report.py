"""Figures (PNG) and one self-contained HTML report (images inlined; opens offline, no server)."""

from __future__ import annotations

import atexit
import base64
import html
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .head_specs import HEAD_SPECS

# C0 and C1 controls, DEL, line/paragraph separators and bidi controls: what can move a terminal's
# cursor, retitle its window, clear it, or reorder the text a person reads
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: Any, keep_newlines: bool = False) -> str:
    """`text` as it may be shown to a person: every control character becomes visible escape text
    (ESC -> `\\x1b`, newline -> `\\n` unless `keep_newlines`), so data (a label, a column or
    model name, a path) can never drive a terminal or garble a figure; everything else is kept."""

    def visible(m: re.Match[str]) -> str:
        c = m.group()
        if c == "\n" and keep_newlines:
            return c
        return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    return _CONTROLS.sub(visible, str(text))


def _private_mpl_config() -> None:
    """Point matplotlib's config and font cache at a folder of this process, removed at exit.

    Without it matplotlib writes `~/.config/matplotlib` and `~/.cache/matplotlib` (or under
    XDG_*): a report must write its own files only. An MPLCONFIGDIR the user set is kept, and so
    is the folder of a matplotlib that is already imported (its folders are fixed at import).
    """
    if "matplotlib" in sys.modules or os.environ.get("MPLCONFIGDIR"):
        return
    folder = tempfile.mkdtemp(prefix="mubench-mpl-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["MPLCONFIGDIR"] = folder


def _plt():
    _private_mpl_config()
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # a '$' in a label is text, not mathtext that may not parse
    import matplotlib.pyplot as plt

    return plt


def _acc(table: pd.DataFrame) -> pd.DataFrame:
    return table[(table["metric"] == "accuracy") & (table["stratum"] == "all") & table["seed"].isna()]


MAX_COLUMNS = 4


def _grid(plt, n: int, panel: tuple[float, float]):
    """A figure with n panels in rows of at most MAX_COLUMNS; unused axes hidden."""
    cols = min(n, MAX_COLUMNS)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel[0] * cols, panel[1] * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes.ravel()[:n]


def perception_vs_alignment(table: pd.DataFrame, path: Path) -> Path | None:
    """Per task: zero-shot vs linear probe bars for each model, with 95% CIs (a grid of <= 4 columns)."""
    t = _acc(table)
    tasks = sorted(set(t[t["head"] == "lp"]["task"]))
    if not tasks:
        return None
    models = sorted(t["model"].unique())
    plt = _plt()
    fig, axes = _grid(plt, len(tasks), (max(3.2, 1.4 + 0.9 * len(models)), 3.4))
    handles: list[Any] = []
    for ax, task in zip(axes, tasks, strict=True):
        g = t[t["task"] == task]
        width = 0.38
        handles = []
        for j, (head, colour, name) in enumerate(
            (("zs_prompt", "#d95f02", "zero-shot (prompts)"), ("lp", "#1b9e77", "linear probe"))
        ):
            vals, lo, hi = [], [], []
            for m in models:
                r = g[(g["model"] == m) & (g["head"] == head)]
                v = float(r["value"].iloc[0]) if len(r) else np.nan
                vals.append(v)
                lo.append(v - float(r["ci_low"].iloc[0]) if len(r) and r["ci_low"].notna().all() else 0)
                hi.append(float(r["ci_high"].iloc[0]) - v if len(r) and r["ci_high"].notna().all() else 0)
            x = np.arange(len(models)) + (j - 0.5) * width
            handles.append(ax.bar(x, vals, width, yerr=[lo, hi], color=colour, label=name, capsize=3))
        ax.set_xticks(np.arange(len(models)), [_short(m).replace(":", ":\n") for m in models], fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_title(task, fontsize=9)
        ax.set_ylabel("accuracy", fontsize=8)
    fig.suptitle("What the image encoder perceives (linear probe) vs. what text reaches (zero-shot)", fontsize=10)
    fig.legend(handles, [h.get_label() for h in handles], loc="upper right", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap(table: pd.DataFrame, path: Path, heads: Sequence[str] = ("zs_caption", "zs_prompt", "lp")) -> Path | None:
    """Models x tasks accuracy, one row per (model, head)."""
    t = _acc(table)
    t = t[
        t["head"].isin(heads)
        & ~(t["task"].str.startswith("mubench/") & ~t["task"].isin(["mubench/coarse", "mubench/fine"]))
    ]
    if t.empty:
        return None
    wide = t.pivot_table(index=["model", "head"], columns="task", values="value", aggfunc="first")
    plt = _plt()
    ylabels = [f"{m} · {h}" for m, h in wide.index]
    width = 2.0 + 0.07 * max(len(v) for v in ylabels) + 1.1 * wide.shape[1]
    fig, ax = plt.subplots(figsize=(width, 1.4 + 0.42 * wide.shape[0]))
    im = ax.imshow(wide.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(wide.shape[1]), wide.columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(wide.shape[0]), ylabels, fontsize=8)
    for (i, j), v in np.ndenumerate(wide.to_numpy(dtype=float)):
        if v == v:
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title("accuracy: models x tasks", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def matrix_plot(mat: pd.DataFrame, title: str, path: Path) -> Path | None:
    if mat.empty:
        return None
    plt = _plt()
    n = len(mat)
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * n, 2.0 + 0.8 * n))
    im = ax.imshow(mat.to_numpy(dtype=float), vmin=0, vmax=1, cmap="magma")
    labels = [m.replace(":", ":\n") for m in mat.index]
    ax.set_xticks(range(n), labels, fontsize=7, rotation=30, ha="right")
    ax.set_yticks(range(n), labels, fontsize=7)
    for (i, j), v in np.ndenumerate(mat.to_numpy(dtype=float)):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="white" if v < 0.5 else "black")
    fig.colorbar(im, ax=ax)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def palette(n: int) -> list:
    """n distinguishable colours: tab10 up to 10, tab20 up to 20, then tab20 + tab20b + tab20c (60)."""
    plt = _plt()
    if n <= 10:
        return [plt.cm.tab10(i) for i in range(n)]
    base = [plt.cm.tab20(i) for i in range(20)]
    if n > 20:
        base += [plt.cm.tab20b(i) for i in range(20)] + [plt.cm.tab20c(i) for i in range(20)]
    return [base[i % len(base)] for i in range(n)]


def embedding_map(
    x: np.ndarray, labels: Sequence[str], title: str, path: Path, seed: int = 0, color_by: str = "label"
) -> Path:
    """2-D map of image embeddings coloured by a metadata column: UMAP if installed, else PCA.

    The legend sits outside the axes (it never covers the data); beyond 60 levels the rarest are
    drawn in grey as "other" so every legend colour stays distinct.
    """
    try:
        import umap

        xy = umap.UMAP(random_state=seed).fit_transform(x)
        how = "UMAP"
    except ImportError:
        xc = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(xc, full_matrices=False)
        xy = xc @ vt[:2].T
        how = "PCA"
    plt = _plt()
    names = np.asarray(["(none)" if v is None or v != v else str(v) for v in labels])
    levels, counts = np.unique(names, return_counts=True)
    shown = [lv for _, lv in sorted(zip(-counts, levels, strict=True))][:60]
    colours = dict(zip(sorted(shown), palette(len(shown)), strict=True))
    legend_cols = 1 if len(shown) <= 20 else 2 if len(shown) <= 40 else 3
    fig, ax = plt.subplots(figsize=(5.0 + 1.9 * legend_cols, 4.4))
    other = ~np.isin(names, shown)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=5, alpha=0.4, color="0.7", label=f"other ({other.sum()})")
    for lab in sorted(shown):
        m = names == lab
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.75, label=f"{lab} ({m.sum()})", color=colours[lab])
    ax.legend(fontsize=6, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=legend_cols, frameon=False)
    ax.set_title(f"{_short(title)}: {how}, coloured by {color_by}", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def contact_sheet(images: Sequence[bytes], captions: Sequence[str], path: Path, policy=None, cols: int = 5) -> Path:
    """A grid of hit images with their captions (rank, score, label)."""
    from .imaging import get_policy, load_rgb

    plt = _plt()
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    pol = policy or get_policy("percentile")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, data, cap in zip(axes.ravel(), images, captions, strict=False):
        ax.imshow(load_rgb(data, pol))
        ax.set_title(printable(cap), fontsize=7)
    fig.tight_layout(pad=1.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(
    out: Path,
    title: str,
    table: pd.DataFrame,
    result: Any,
    embeddings: dict[str, np.ndarray],
    meta: pd.DataFrame,
    color_by: Sequence[str],
    k: int,
) -> tuple[Path, list[Path]]:
    """Every figure of a comparison (PNGs in `<report>_figures/`) and the HTML file that inlines them.

    These two are all it writes. Figure names are fixed or numbered (`map_<i>_<j>.png`: the i-th
    model coloured by the j-th column), never made of user text; user text drawn in a figure has
    its control characters made visible. Figures are drawn in a private folder and renamed into place, and the HTML is
    written beside its path and renamed over it, so a link planted at either is replaced, never
    followed, and an interrupted report never leaves a half-written file.
    """
    from . import report_robustness  # here, not at import: the CLI imports this module for `printable`
    from .errors import UsageError

    figdir = out.with_name(out.stem + "_figures")
    if figdir.is_symlink():
        raise UsageError(f"{figdir} is a symbolic link: the report's figures need a folder of their own")
    figdir.mkdir(parents=True, exist_ok=True)
    shown = _printable_frame(table, ("model", "task", "dataset", "head", "stratum"))
    cka, mknn, text_cka = (
        m.rename(index=_shown, columns=_shown) for m in (result.cka, result.mutual_knn, result.text_cka)
    )
    with tempfile.TemporaryDirectory(prefix=".drawing-", dir=figdir) as tmp:
        draw = Path(tmp)
        named = [
            ("Perception vs. alignment", perception_vs_alignment(shown, draw / "zs_vs_lp.png")),
            ("Models x tasks", heatmap(shown, draw / "heatmap.png")),
            ("Representation similarity: CKA", matrix_plot(cka, "linear CKA of image embeddings", draw / "cka.png")),
            (
                "Representation similarity: mutual kNN",
                matrix_plot(mknn, f"mutual kNN (k={k}) of image embeddings", draw / "mutual_knn.png"),
            ),
            (
                "Text prototypes: CKA",
                matrix_plot(text_cka, "linear CKA of class-prompt text prototypes", draw / "text_cka.png"),
            ),
            ("Weight interpolation: accuracy vs alpha", alpha_curve(shown, draw / "alpha_curve.png")),
            ("Calibration: reliability diagrams", reliability_diagram(shown, draw / "reliability.png")),
            *report_robustness.figures(shown, draw, _plt, palette),
        ]
        for i, (model, x) in enumerate(embeddings.items()):
            for j, column in enumerate(color_by):
                labels = [_shown(v) for v in meta[column]]
                path = embedding_map(x, labels, printable(model), draw / f"map_{i}_{j}.png", color_by=printable(column))
                named.append((f"Image embeddings: {model}, by {column}", path))
        sections: list[tuple[str, Path | pd.DataFrame]] = [(h, p) for h, p in named if p is not None]
        sections += [
            ("Accuracy side by side (value, 95% CI)", result.side_by_side),
            ("Paired differences (bootstrap CI) and McNemar tests", result.pairwise),
        ]
        if len(result.robustness):
            sections.append(("Robustness per model (mean over matched perturbations)", result.robustness))
        page = write_html(out, title, sections)
        figures = []
        for _, p in named:
            if p is not None:
                os.replace(p, figdir / p.name)
                figures.append(figdir / p.name)
    return page, figures


def _shown(value: Any) -> Any:
    """A string made printable; any other value as it is."""
    return printable(value) if isinstance(value, str) else value


def _printable_frame(table: pd.DataFrame, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """`table` with the text of `columns` (default: every cell, label and header) made printable."""
    if columns is not None:
        return table.assign(**{c: table[c].map(_shown) for c in columns if c in table})
    return table.apply(lambda col: col.map(_shown)).rename(index=_shown, columns=_shown)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></figure>'


def write_html(path: Path, title: str, sections: Sequence[tuple[str, str | Path | pd.DataFrame]]) -> Path:
    """One HTML file: headings, inlined PNGs and tables; no external assets.

    Every user string is HTML-escaped (title and headings here, table cells and headers by pandas)
    and its control characters made visible (no bidi override can reorder what a reader sees).
    """

    def text(value: str) -> str:
        return html.escape(printable(value))

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{text(title)}</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1400px}img{max-width:100%}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
        "figure{margin:1em 0}</style></head><body>",
        f"<h1>{text(title)}</h1>",
    ]
    for heading, body in sections:
        parts.append(f"<h2>{text(heading)}</h2>")
        if isinstance(body, Path):
            parts.append(_img(body))
        elif isinstance(body, pd.DataFrame):
            parts.append(_printable_frame(body).to_html(float_format=lambda v: f"{v:.3f}", na_rep="–", escape=True))
        else:
            parts.append(f"<p>{text(str(body))}</p>")
    parts.append("</body></html>")
    _replace_file(path, "\n".join(parts).encode("utf-8"))
    return path


def _replace_file(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a new file beside it (exclusive create, never through a
    link), renamed over it. A link planted at `path` is replaced, its target left alone."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


ALPHA_GROUPS = (
    ("all tasks", lambda s: s == "all"),
    ("pathology", lambda s: s == "domain=pathology"),
    ("H&E", lambda s: s.startswith("stain=") and ("H&E" in s or "hematoxylin" in s.lower())),
    ("biology", lambda s: s == "domain=biology"),
)


def alpha_points(table: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy per (parents, alpha, task group, head) over non-μ-Bench tasks, for interp(...) models."""
    from .encoders.interpolate import parse_interp

    t = table[
        (table["metric"] == "accuracy")
        & table["seed"].isna()
        & table["head"].isin(["zs_prompt", "lp"])
        & table["model"].str.startswith("interp(")
    ]
    rows = []
    for model, g in t.groupby("model"):
        spec = parse_interp(str(model))
        for group, pick in ALPHA_GROUPS:
            sel = g[g["stratum"].map(pick)]
            for head, h in sel.groupby("head"):
                rows.append(
                    {
                        "parents": f"{spec.base} -> {spec.finetuned}",
                        "alpha": spec.alpha,
                        "group": group,
                        "head": head,
                        "accuracy": h["value"].mean(),
                        "tasks": h["task"].nunique(),
                    }
                )
    return pd.DataFrame(rows)


def _short(text: str) -> str:
    """Model specs with long checkpoint paths, shortened to the file names for titles."""
    import re

    return re.sub(r"(/[^\s:,>]+)+/", ".../", text)


def alpha_curve(table: pd.DataFrame, path: Path) -> Path | None:
    """Accuracy vs alpha per task group, zero-shot and linear probe on the same axes."""
    pts = alpha_points(table)
    if pts.empty:
        return None
    groups = [g for g, _ in ALPHA_GROUPS if g in set(pts["group"])]
    plt = _plt()
    fig, axes = _grid(plt, len(groups), (3.6, 3.2))
    for ax, group in zip(axes, groups, strict=True):
        g = pts[pts["group"] == group]
        for (_, head), h in g.groupby(["parents", "head"]):
            h = h.sort_values("alpha")
            style = "-o" if head == "lp" else "--s"
            ax.plot(h["alpha"], h["accuracy"], style, label=f"{'linear probe' if head == 'lp' else 'zero-shot'}")
        ax.set_title(f"{group} ({int(g['tasks'].max())} tasks)", fontsize=9)
        ax.set_xlabel("alpha (0 = base, 1 = fine-tuned)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"weight interpolation: {_short(pts['parents'].iloc[0])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CALIBRATION_HEADS = {s.name: s.label for s in HEAD_SPECS.values() if s.calibrated}


def reliability_diagram(table: pd.DataFrame, path: Path) -> Path | None:
    """Reliability diagrams (Guo et al. 2017): accuracy vs confidence per bin, one panel per head.

    From the long table's `calibration_accuracy` / `calibration_confidence` rows (stratum `bin=NN`,
    n = rows in the bin): each model's line pools its tasks bin by bin, weighting by count; its
    label gives its mean ECE over tasks. A calibrated head lies on the diagonal. None without
    calibration rows.
    """
    t = table[table["metric"].isin(["calibration_accuracy", "calibration_confidence"])]
    t = t[t["stratum"].astype(str).str.startswith("bin=")]
    if "seed" in t and t["seed"].isna().any():
        t = t[t["seed"].isna()]  # the main results, not per-seed repeats
    if t.empty:
        return None
    keys = ["model", "dataset", "task", "head", "stratum"]
    wide = t.pivot_table(index=keys, columns="metric", values=["value", "n"], aggfunc="first").dropna()
    if wide.empty:
        return None
    pts = pd.DataFrame(
        {
            "accuracy": wide[("value", "calibration_accuracy")].to_numpy(dtype=float),
            "confidence": wide[("value", "calibration_confidence")].to_numpy(dtype=float),
            "count": wide[("n", "calibration_accuracy")].to_numpy(dtype=float),
        },
        index=wide.index,
    ).reset_index()
    pts["bin"] = pts["stratum"].str.slice(4).astype(int)
    pts = pts[pts["count"] > 0]
    for c in ("accuracy", "confidence"):
        pts[c] = pts[c] * pts["count"]
    pooled = pts.groupby(["head", "model", "bin"])[["accuracy", "confidence", "count"]].sum().reset_index()
    for c in ("accuracy", "confidence"):
        pooled[c] = pooled[c] / pooled["count"]
    ece = table[(table["metric"] == "ece") & (table["stratum"] == "all")]
    if "seed" in ece and ece["seed"].isna().any():
        ece = ece[ece["seed"].isna()]
    ece_mean = ece.groupby(["head", "model"])["value"].mean()
    heads = [h for h in CALIBRATION_HEADS if h in set(pooled["head"])]
    heads += sorted(set(pooled["head"]) - set(heads))
    models = sorted(pooled["model"].unique())
    colours = dict(zip(models, palette(len(models)), strict=True))
    plt = _plt()
    fig, axes = _grid(plt, len(heads), (3.6, 3.4))
    for ax, head in zip(axes, heads, strict=True):
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="calibrated")
        for model in models:
            g = pooled[(pooled["head"] == head) & (pooled["model"] == model)].sort_values("bin")
            if g.empty:
                continue
            e = ece_mean.get((head, model), np.nan)
            label = _short(model) + (f" (ECE {e:.3f})" if e == e else "")
            ax.plot(g["confidence"], g["accuracy"], "-o", ms=3, color=colours[model], label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(CALIBRATION_HEADS.get(head, head), fontsize=9)
        ax.set_xlabel("confidence (max probability)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.legend(fontsize=6, loc="upper left", frameon=False)
    fig.suptitle("Reliability: accuracy vs confidence per bin (pooled over tasks)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
