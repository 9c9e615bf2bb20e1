"""The evaluation protocol over arrays: folds, heads, metrics and alignment for one task.

Pure functions: embeddings, labels and metadata in, long-format records out. The runner
(`evaluation.py`) reads the store and writes results; nothing here does I/O or touches a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from .heads import KNNHead, LinearProbe, PromptZeroShot, PrototypeHead, caption_choice
from .heads.knn import DEFAULT_KS, TEMPERATURE
from .heads.linear import DEFAULT_CS
from .heads.metrics import DEFAULT_BOOTSTRAP, Estimate, classification_metrics, modality_gap, paired_difference
from .heads.retrieval import caption_retrieval
from .tasks import COARSE_ATTRIBUTES, COARSE_CAPTION_KEYS, FINE_CAPTION_KEYS, Task

HEADS = ("zs_caption", "zs_prompt", "lp", "knn", "proto", "fewshot", "retrieval")
STRATA = ("dataset", *COARSE_ATTRIBUTES)


@dataclass(frozen=True)
class EvalConfig:
    """Everything that changes a number; its hash keys the results cache."""

    heads: tuple[str, ...] = HEADS
    folds: int = 5
    seed: int = 0
    protocol: str = "kfold"  # "kfold" or "split" (use the `split` column's train/test rows)
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = TEMPERATURE
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    fewshot_seeds: int = 5
    n_boot: int = DEFAULT_BOOTSTRAP
    cs: tuple[float, ...] = DEFAULT_CS
    caption_templates: str = "both"  # "both", "0" (first template) or "1" (second template)
    pooling: str = "micro"  # pooled accuracy over all answers, or "macro": mean over caption keys
    exclude_datasets: tuple[str, ...] = ()
    strata: tuple[str, ...] = STRATA

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass
class TaskArrays:
    """One task's inputs: L2-normalised image embeddings of its (valid) rows and their labels."""

    task: Task
    rows: np.ndarray
    x: np.ndarray
    y: np.ndarray
    meta: pd.DataFrame
    prompt_emb: np.ndarray | None = None  # (C, T, D) normalised class-prompt text embeddings
    templates: tuple[str, ...] = ()


@dataclass
class Output:
    records: list[dict] = field(default_factory=list)
    predictions: list[pd.DataFrame] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        task: str,
        head: str,
        metric: str,
        est: Estimate | float,
        stratum: str = "all",
        seed: int | None = None,
        n: int | None = None,
    ) -> None:
        if isinstance(est, Estimate):
            value, lo, hi, n = est.value, est.ci_low, est.ci_high, est.n
        else:
            value, lo, hi = float(est), float("nan"), float("nan")
        self.records.append(
            {
                "task": task,
                "head": head,
                "metric": metric,
                "stratum": stratum,
                "value": value,
                "ci_low": lo,
                "ci_high": hi,
                "n": n,
                "seed": seed,
            }
        )

    def predict(self, task: str, head: str, rows: np.ndarray, y: np.ndarray, p: np.ndarray) -> None:
        self.predictions.append(
            pd.DataFrame(
                {
                    "task": task,
                    "head": head,
                    "row": rows.astype(np.int64),
                    "y_true": y.astype(np.int64),
                    "y_pred": p.astype(np.int64),
                }
            )
        )

    def extend(self, other: Output) -> None:
        self.records += other.records
        self.predictions += other.predictions
        self.notes += other.notes


# ---- folds ---------------------------------------------------------------------------------------


def task_folds(t: TaskArrays, cfg: EvalConfig) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """Train/test index pairs over the task's rows, and a note on how they were made.

    Coarse attributes coincide with source datasets, so their folds are grouped by `dataset`
    (a probe could otherwise recognise the source, not the attribute). Returns no folds when a
    task cannot be split honestly.
    """
    y = t.y
    if cfg.protocol == "split":
        split = t.meta["split"].astype(str).str.lower().to_numpy() if "split" in t.meta else None
        if split is None:
            return [], "no 'split' column for --protocol split"
        train, test = np.flatnonzero(np.isin(split, ("train", "val", "valid"))), np.flatnonzero(split == "test")
        if len(train) == 0 or len(test) == 0:
            return [], "the 'split' column has no train/test rows for this task"
        return [(train, test)], "the dataset's own train/test split"
    counts = np.bincount(y)
    k = min(cfg.folds, int(counts[counts > 0].min()))
    if k < 2:
        return [], "a class has fewer than 2 examples: no folds"
    if t.task.group == "coarse" and "dataset" in t.meta:
        groups = t.meta["dataset"].astype(str).to_numpy()
        n_groups = len(set(groups))
        if n_groups < 2:
            return [], "one source dataset only: the attribute equals dataset identity (trivial for a probe)"
        k = min(k, n_groups)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=cfg.seed)
        return list(splitter.split(t.x, y, groups)), f"{k}-fold grouped by dataset"
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=cfg.seed)
    return list(splitter.split(t.x, y)), f"stratified {k}-fold, seed {cfg.seed}"


def few_shot_indices(y: np.ndarray, train: np.ndarray, shots: int, seed: int) -> np.ndarray | None:
    """`shots` random training rows per class (None if some class has fewer)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y):
        pool = train[y[train] == c]
        if len(pool) < shots:
            return None
        out.append(rng.choice(pool, size=shots, replace=False))
    return np.sort(np.concatenate(out))


# ---- heads on one task ---------------------------------------------------------------------------


def _oof(t: TaskArrays, folds, make) -> np.ndarray:
    """Out-of-fold predictions: every test row is predicted by a head fit without it."""
    pred = np.full(len(t.y), -1, dtype=np.int64)
    for train, test in folds:
        pred[test] = make().fit(t.x[train], t.y[train]).predict(t.x[test])
    return pred


def _report(
    out: Output,
    t: TaskArrays,
    head: str,
    idx: np.ndarray,
    pred: np.ndarray,
    cfg: EvalConfig,
    strata: bool = True,
    seed: int | None = None,
) -> None:
    name, y = t.task.name, t.y[idx]
    metrics = classification_metrics(y, pred, t.task.n_classes, cfg.n_boot, cfg.seed, class_names=t.task.classes)
    for metric, est in metrics.items():
        out.add(name, head, metric, est, seed=seed)
    if seed is None:
        out.predict(name, head, t.rows[idx], y, pred)
    if not strata:
        return
    for col in cfg.strata:
        if col not in t.meta:
            continue
        values = t.meta[col].to_numpy()[idx]
        levels = [v for v in pd.unique(values) if v is not None and v == v]
        if not levels:  # single-level strata are kept: they let results be grouped by domain/stain later
            continue
        for v in sorted(levels, key=str):
            m = values == v
            est = classification_metrics(y[m], pred[m], t.task.n_classes, cfg.n_boot, cfg.seed)["accuracy"]
            out.add(name, head, "accuracy", est, stratum=f"{col}={v}")


def evaluate_task(t: TaskArrays, cfg: EvalConfig) -> Output:
    """Every requested head on one task, plus the alignment measures between them."""
    out = Output()
    name = t.task.name
    n_classes = t.task.n_classes
    everyone = np.arange(len(t.y))
    correct: dict[str, np.ndarray] = {}

    if "zs_prompt" in cfg.heads:
        if t.prompt_emb is None:
            out.notes.append(f"{name}: zs_prompt not applicable (image-only model)")
        else:
            pred = PromptZeroShot(t.prompt_emb).fit().predict(t.x)
            _report(out, t, "zs_prompt", everyone, pred, cfg)
            correct["zs"] = pred == t.y
            for j, tmpl in enumerate(t.templates):
                p = PromptZeroShot(t.prompt_emb, template=j).fit().predict(t.x)
                out.add(
                    name,
                    f"zs_prompt[{j}]",
                    "accuracy",
                    classification_metrics(t.y, p, n_classes, 0)["accuracy"],
                    stratum=f"template={tmpl}",
                )
            accs = [r["value"] for r in out.records if r["head"].startswith("zs_prompt[")]
            if accs:
                out.add(name, "zs_prompt", "template_spread", float(np.max(accs) - np.min(accs)), n=len(t.y))
                out.add(name, "zs_prompt", "template_std", float(np.std(accs)), n=len(t.y))
            gap = modality_gap(t.x, t.prompt_emb.reshape(-1, t.prompt_emb.shape[-1]))
            out.add(name, "alignment", "modality_gap", gap, n=len(t.y))

    needs_folds = {"lp", "knn", "proto", "fewshot"} & set(cfg.heads)
    folds, how = task_folds(t, cfg) if needs_folds else ([], "")
    if needs_folds:
        out.notes.append(f"{name}: probes use {how}")
    if not folds:  # zero-shot heads only, or a task that cannot be split honestly
        return out
    tested = np.sort(np.concatenate([te for _, te in folds]))

    if "lp" in cfg.heads:
        pred = _oof(t, folds, lambda: LinearProbe(Cs=cfg.cs, random_state=cfg.seed))
        _report(out, t, "lp", tested, pred[tested], cfg)
        correct["lp"] = pred == t.y
    if "proto" in cfg.heads:
        pred = _oof(t, folds, lambda: PrototypeHead(n_classes))
        _report(out, t, "proto", tested, pred[tested], cfg)
        correct["proto"] = pred == t.y
    if "knn" in cfg.heads:
        preds = {k: np.full(len(t.y), -1, dtype=np.int64) for k in cfg.ks}
        for train, test in folds:
            knn = KNNHead(cfg.ks, cfg.temperature, n_classes).fit(t.x[train], t.y[train])
            for k, p in knn.predict_all(t.x[test]).items():
                preds[k][test] = p
        for k, p in preds.items():
            _report(out, t, f"knn@{k}", tested, p[tested], cfg, strata=k == cfg.ks[min(2, len(cfg.ks) - 1)])
    if "fewshot" in cfg.heads:
        _few_shot(out, t, folds, cfg)

    if "zs" in correct:
        for other, label in (("lp", "lp_minus_zs"), ("proto", "proto_minus_zs")):
            if other in correct:
                d = paired_difference(correct[other][tested], correct["zs"][tested], cfg.n_boot, cfg.seed)
                out.add(name, "alignment", label, d["difference"])
                if other == "lp":
                    out.add(name, "alignment", "zs_over_lp", d["ratio"])
    return out


def _few_shot(out: Output, t: TaskArrays, folds, cfg: EvalConfig) -> None:
    """k shots per class from one training fold per seed; tuned only on those shots."""
    for shots in cfg.shots:
        accs: dict[str, list[float]] = {"lp": [], "proto": []}
        for s in range(cfg.fewshot_seeds):
            train, test = folds[s % len(folds)]
            idx = few_shot_indices(t.y, train, shots, seed=cfg.seed * 1000 + s)
            if idx is None:
                break
            for head, make in (
                ("lp", lambda s=s: LinearProbe(Cs=cfg.cs, val_fraction=0.5, random_state=s)),
                ("proto", lambda: PrototypeHead(t.task.n_classes)),
            ):
                pred = make().fit(t.x[idx], t.y[idx]).predict(t.x[test])
                est = classification_metrics(t.y[test], pred, t.task.n_classes, 0)["accuracy"]
                out.add(t.task.name, f"{head}_{shots}shot", "accuracy", est, seed=s)
                accs[head].append(est.value)
        for head, values in accs.items():
            if values:
                sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                m, half = float(np.mean(values)), 1.96 * sd / np.sqrt(len(values))
                out.records.append(
                    {
                        "task": t.task.name,
                        "head": f"{head}_{shots}shot",
                        "metric": "accuracy",
                        "stratum": "mean_over_seeds",
                        "value": m,
                        "ci_low": m - half,
                        "ci_high": m + half,
                        "n": len(values),
                        "seed": None,
                    }
                )


# ---- μ-Bench caption protocol ----------------------------------------------------------------------


def caption_keys(available: Sequence[str], templates: str) -> dict[str, list[str]]:
    """Caption keys per pooled group ("coarse", "fine"), honouring the template choice."""

    def keep(key: str) -> bool:
        second = key.endswith("_1")
        return templates == "both" or (templates == "1") == second

    return {
        "coarse": [k for k in COARSE_CAPTION_KEYS if k in available and keep(k)],
        "fine": [k for k in FINE_CAPTION_KEYS if k in available and keep(k)],
    }


def evaluate_captions(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    captions: dict[str, tuple[np.ndarray, np.ndarray]],
    meta: pd.DataFrame,
    valid: np.ndarray,
    cfg: EvalConfig,
) -> Output:
    """μ-Bench zero-shot: per caption key, per source dataset, and pooled coarse / fine."""
    out = Output()
    keep = valid.copy()
    if cfg.exclude_datasets and "dataset" in meta:
        keep &= ~meta["dataset"].astype(str).isin(cfg.exclude_datasets).to_numpy()
    groups = caption_keys(list(captions), cfg.caption_templates)
    datasets_col = meta["dataset"].astype(str).to_numpy() if "dataset" in meta else None
    for group, keys in groups.items():
        pooled, per_key = [], []
        for key in keys:
            options, answer = captions[key]
            ok, chosen, right = caption_choice(image_emb, text_emb, options, answer)
            ok &= keep
            rows = np.flatnonzero(ok)
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
            per_key.append(est.value)
        if pooled:
            if cfg.pooling == "macro":
                out.add(
                    f"mubench/{group}",
                    "zs_caption",
                    "accuracy",
                    float(np.mean(per_key)),
                    n=int(sum(len(p) for p in pooled)),
                )
            else:
                out.add(f"mubench/{group}", "zs_caption", "accuracy", _binary(np.concatenate(pooled), cfg))
    return out


def evaluate_retrieval(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    captions: dict[str, tuple[np.ndarray, np.ndarray]],
    valid: np.ndarray,
    cfg: EvalConfig,
) -> Output:
    """Image->text and text->image Recall@1/5/10 and mAP per caption key (see heads.retrieval)."""
    out = Output()
    for key in sorted(captions):
        options, answer = captions[key]
        ok = valid & (answer >= 0)
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
    return classification_metrics(c, np.ones_like(c), 2, cfg.n_boot, cfg.seed)["accuracy"]
