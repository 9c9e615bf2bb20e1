"""The evaluation protocol over arrays: rows, folds, heads, metrics and alignment for one task.

Pure functions: embeddings, labels and metadata in, long-format records out. The runner
(`evaluation.py`) reads the store and writes results; nothing here does I/O or touches a model.

What each protocol measures (every head of a task is scored on the same test rows, so
`lp - zs` compares like with like):
- kfold (default): every row gets one out-of-fold prediction from stratified k-fold. Coarse
  attributes (modality, stain, ...) coincide with source datasets, so their folds are grouped
  by `dataset`: a probe is then tested on sources it never saw, and measures whether the
  attribute transfers across sources, not whether the source can be recognised. Only classes
  that occur in at least two sources can be tested that way; the others are excluded (noted).
- split: train on the rows whose `split` is train/val, test on the `split == test` rows.
- transfer: train on rows matching --train-where, test on rows matching --test-where (e.g.
  train on one stain, test on another), over the classes both sides share.
A class absent from a training fold is never predicted by a probe; its test rows count as
errors and a note says so. Anything a head cannot do becomes a note, never a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from .config import PROBE_HEADS, EvalConfig, parse_conditions
from .errors import ProbeError, UsageError
from .heads import KNNHead, LinearProbe, PromptZeroShot, PrototypeHead, caption_choice, scoring
from .heads.confounders import (
    batch_effect_index,
    expected_calibration_error,
    knn_nsb_predict,
    reliability_curve,
    softmax_scores,
)
from .heads.metrics import (
    Estimate,
    classification_metrics,
    modality_gap,
    paired_difference,
)
from .heads.phenotypic import phenotypic_map
from .heads.retrieval import caption_retrieval
from .heads.scoring import view
from .tasks import COARSE_CAPTION_KEYS, FINE_CAPTION_KEYS, Task, where_mask

# Errors a head raises on data it cannot handle (too few rows, degenerate classes, ...): they
# become a note and a skipped head, never a traceback.
HEAD_ERRORS = (ValueError, ArithmeticError, np.linalg.LinAlgError, ProbeError)
TRAIN_SPLITS = ("train", "val", "valid", "validation")


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
    prompt_note: str | None = None  # why there are no prompt embeddings, when the model has text

    def subset(self, keep: np.ndarray, classes: Sequence[int] | None = None) -> TaskArrays:
        """The rows in `keep` (bool mask), relabelled to `classes` (old indices, in order)."""
        classes = list(range(self.task.n_classes)) if classes is None else list(classes)
        if keep.all() and classes == list(range(self.task.n_classes)):
            return self  # nothing to drop: no copy of the embeddings
        lookup = np.full(self.task.n_classes, -1)
        lookup[classes] = np.arange(len(classes))
        keep = keep & (lookup[self.y] >= 0)
        y = lookup[self.y[keep]]
        task = replace(self.task, rows=self.task.rows[keep], y=y, classes=tuple(self.task.classes[c] for c in classes))
        prompts = self.prompt_emb[classes] if self.prompt_emb is not None else None
        return TaskArrays(
            task,
            self.rows[keep],
            self.x[keep],
            y,
            self.meta[keep].reset_index(drop=True),
            prompts,
            self.templates,
            self.prompt_note,
        )


NOTE_KINDS = ("probe_c_edge", "probe_folds", "missing_class", "excluded_classes", "skipped", "other")


@dataclass
class Output:
    """What a unit produced: long-format records, predictions, and notes with their kind
    (`note_kinds[i]` is one of NOTE_KINDS: the terminal groups frequent kinds, run.json keeps all)."""

    records: list[dict] = field(default_factory=list)
    predictions: list[pd.DataFrame] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    note_kinds: list[str] = field(default_factory=list)

    def note(self, text: str, kind: str = "other") -> None:
        self.notes.append(text)
        self.note_kinds.append(kind)

    def kinds(self) -> list[str]:
        """One kind per note (notes added to `notes` directly are "other")."""
        return self.note_kinds + ["other"] * (len(self.notes) - len(self.note_kinds))

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
        self.note_kinds = self.kinds() + other.kinds()
        self.notes += other.notes


# ---- rows and folds ---------------------------------------------------------------------------------

Folds = list[tuple[np.ndarray, np.ndarray]]


@dataclass
class TaskPlan:
    """A task restricted to the rows and classes its protocol can score, with its folds.

    `test` indexes the rows every head is scored on (all rows for k-fold, whose folds give each
    row one out-of-fold prediction); `folds` is empty when probes cannot run (`why` says why).
    """

    arrays: TaskArrays
    test: np.ndarray
    folds: Folds
    how: str
    notes: list[str] = field(default_factory=list)
    grouped: bool = False  # folds hold out whole values of the task's group column
    batch: str | None = None  # loso: the column whose values are the folds


def task_config(cfg: EvalConfig, task: Task | None) -> EvalConfig:
    """The evaluation settings for one task: its own protocol, train/test conditions and heads win."""
    spec = task.spec if task is not None else None
    if spec is None or (spec.protocol is None and spec.heads is None and not spec.train_where):
        return cfg
    changes: dict = {}
    if spec.protocol is not None:
        changes["protocol"] = spec.protocol
        if spec.protocol != "transfer":
            changes.update(train_where=(), test_where=())
    if spec.train_where or spec.test_where:
        changes.update(train_where=spec.train_where, test_where=spec.test_where)
    if spec.heads is not None:
        changes["heads"] = spec.heads
    return cfg.replace(**changes)


def batch_column(meta: pd.DataFrame, cfg: EvalConfig) -> str | None:
    """The confounder column: --batch when given (it must exist), else `dataset` where present."""
    if cfg.batch is not None:
        if cfg.batch not in meta.columns:
            raise UsageError(f"--batch: no metadata column {cfg.batch!r} (have: {', '.join(map(str, meta.columns))})")
        return cfg.batch
    return "dataset" if "dataset" in meta.columns else None


def test_mask(meta: pd.DataFrame, cfg: EvalConfig) -> np.ndarray | None:
    """The rows a protocol tests on (None = all rows, k-fold / loso); used for the μ-Bench caption unit too."""
    if cfg.protocol == "split":
        if "split" not in meta.columns:
            raise UsageError("--protocol split needs a 'split' column in the dataset")
        return (meta["split"].astype(str).str.lower() == "test").to_numpy()
    if cfg.protocol == "transfer":
        return where_mask(meta, cfg.test_where)
    return None


def train_mask(meta: pd.DataFrame, cfg: EvalConfig) -> np.ndarray:
    if cfg.protocol == "split":
        return meta["split"].astype(str).str.lower().isin(TRAIN_SPLITS).to_numpy()
    return where_mask(meta, cfg.train_where)


def check_protocol(meta: pd.DataFrame, cfg: EvalConfig) -> None:
    """Refuse, before any work, train/test conditions that select nothing or overlap, and a missing --batch."""
    if cfg.protocol == "loso" or cfg.batch is not None:
        batch_column(meta, cfg)
    if cfg.protocol in ("kfold", "loso"):
        return
    test = test_mask(meta, cfg)
    if test is None:
        raise UsageError(f"--protocol {cfg.protocol} has no test rows")
    train = train_mask(meta, cfg)
    for side, mask, conds in (("train", train, cfg.train_where), ("test", test, cfg.test_where)):
        if not mask.any():
            if cfg.protocol == "split":
                values = sorted(meta["split"].astype(str).unique())
                raise UsageError(f"--protocol split: no {side} rows (the 'split' column has {values})")
            include, exclude = parse_conditions(conds)
            have = {c: sorted(meta[c].astype(str).unique())[:12] for c in (*include, *exclude)}
            raise UsageError(f"--{side}-where {' '.join(conds)} matches no row (values present: {have})")
    if (train & test).any():
        raise UsageError(f"{int((train & test).sum())} rows match both the train and the test conditions")


def _class_note(t: TaskArrays, classes: Sequence[int], keep: np.ndarray, why: str) -> str:
    names = [t.task.classes[c] for c in classes]
    return f"{t.task.name}: {len(names)} class(es) excluded ({why}): {', '.join(names)} ({int(keep.sum())} rows)"


def _groups(t: TaskArrays) -> np.ndarray | None:
    """The values of the task's grouping column (source, plate, patient), or None (stratified)."""
    col = t.task.group_by
    return t.meta[col].astype(str).to_numpy() if col is not None and col in t.meta else None


def plan_task(t: TaskArrays, cfg: EvalConfig) -> TaskPlan:
    """Which rows and classes of the task each protocol scores, and the probes' folds."""
    if cfg.protocol == "kfold":
        return _plan_kfold(t, cfg)
    if cfg.protocol == "loso":
        return _plan_loso(t, cfg)
    train, test = train_mask(t.meta, cfg), test_mask(t.meta, cfg)
    if test is None:
        raise UsageError(f"--protocol {cfg.protocol} has no test rows")
    shared = [c for c in range(t.task.n_classes) if (t.y[train] == c).any() and (t.y[test] == c).any()]
    how = "the dataset's own train/test split" if cfg.protocol == "split" else "train and test rows chosen by --*-where"
    sides = train | test
    if len(shared) < 2:
        on = [int(train.sum()), int(test.sum())]
        skip = (
            f"{t.task.name}: skipped, fewer than two of its classes are on both the train and the test side "
            f"({on[0]} train rows, {on[1]} test rows; classes there: "
            f"{sorted({t.task.classes[c] for c in t.y[train]})} / {sorted({t.task.classes[c] for c in t.y[test]})})"
        )
        return TaskPlan(t.subset(np.zeros(len(t.y), dtype=bool)), np.zeros(0, np.int64), [], how, [skip])
    notes = []
    lost = [c for c in range(t.task.n_classes) if c not in shared and (t.y[sides] == c).any()]
    if lost:
        notes.append(_class_note(t, lost, sides & np.isin(t.y, lost), "not on both the train and the test side"))
    sub = t.subset(sides, shared)
    kept = np.isin(t.y[sides], shared)
    train, test = train[sides][kept], test[sides][kept]
    if (src := _groups(sub)) is not None:
        common = sorted(set(src[train]) & set(src[test]))
        if common:
            notes.append(
                f"{t.task.name}: train and test share {t.task.group_by} values ({', '.join(common[:10])}): a probe "
                f"may recognise the {t.task.group_by} rather than the {t.task.column}"
            )
    return TaskPlan(sub, np.flatnonzero(test), [(np.flatnonzero(train), np.flatnonzero(test))], how, notes)


def _plan_loso(t: TaskArrays, cfg: EvalConfig) -> TaskPlan:
    """Leave one batch out: one fold per batch value, trained on every other batch."""
    col = batch_column(t.meta, cfg)
    everyone = np.arange(len(t.y))
    if col is None:
        return TaskPlan(t, everyone, [], "no batch column for --protocol loso (use --batch COLUMN)")
    batches = t.meta[col].astype(str).to_numpy()
    names = sorted(set(batches))
    if len(names) < 3:
        return TaskPlan(t, everyone, [], f"leave-one-{col}-out needs at least 3 values of {col} ({len(names)} here)")
    folds = [(np.flatnonzero(batches != b), np.flatnonzero(batches == b)) for b in names]
    return TaskPlan(t, everyone, folds, f"leave-one-{col}-out ({len(names)} folds)", batch=col)


def _plan_kfold(t: TaskArrays, cfg: EvalConfig) -> TaskPlan:
    everyone = np.arange(len(t.y))
    src = _groups(t)
    col = t.task.group_by
    if src is None:
        k = min(cfg.folds, len(t.y))
        counts = np.bincount(t.y, minlength=t.task.n_classes)
        small = [t.task.classes[c] for c in np.flatnonzero((counts > 0) & (counts < k))]
        notes = [f"{t.task.name}: class(es) with fewer rows than folds: {', '.join(small)}"] if small else []
        if k < 2 or counts.max() < k:
            return TaskPlan(t, everyone, [], "too few rows for k-fold", notes)
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=cfg.seed)
        return TaskPlan(t, everyone, list(splitter.split(t.x, t.y)), f"stratified {k}-fold, seed {cfg.seed}", notes)
    if len(set(src)) < 2:
        what = "source dataset" if col == "dataset" else f"value of {col}"
        return TaskPlan(t, everyone, [], f"one {what} only: the label equals {col} identity (trivial for a probe)")
    n_sources = np.array([len(set(src[t.y == c])) for c in range(t.task.n_classes)])
    multi = [c for c in range(t.task.n_classes) if n_sources[c] >= 2]
    single = [c for c in range(t.task.n_classes) if n_sources[c] == 1]
    if len(multi) < 2:
        return TaskPlan(t, everyone, [], f"no two classes occur in two or more values of {col}")
    notes = []
    if single:
        by_source = {c: src[t.y == c][0] for c in single}
        detail = ", ".join(
            f"{t.task.classes[c]} (only in {by_source[c]}, {int((t.y == c).sum())} rows)" for c in single
        )
        what = "source dataset" if col == "dataset" else f"value of {col}"
        notes.append(f"{t.task.name}: classes in a single {what} excluded: {detail}")
    sub = t.subset(np.ones(len(t.y), dtype=bool), multi)
    groups = _groups(sub)
    if groups is None:
        raise UsageError(f"{t.task.name}: no grouping column {col!r}")
    k = min(cfg.folds, len(set(groups)))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=cfg.seed)
    folds = list(splitter.split(sub.x, sub.y, groups))
    how = f"{k}-fold grouped by {col} (lp validates C on held-out {col} values where it can)"
    return TaskPlan(sub, np.arange(len(sub.y)), folds, how, notes, grouped=True)


def few_shot_indices(y: np.ndarray, train: np.ndarray, shots: int, seed: int) -> np.ndarray | None:
    """`shots` random training rows per class present in `train` (None if one has fewer)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(y[train]):
        pool = train[y[train] == c]
        if len(pool) < shots:
            return None
        out.append(rng.choice(pool, size=shots, replace=False))
    return np.sort(np.concatenate(out))


# ---- heads on one task -------------------------------------------------------------------------------


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
    metrics = classification_metrics(
        y, pred, t.task.n_classes, cfg.n_boot, cfg.seed, class_names=t.task.classes, ci_method=cfg.ci_method
    )
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
        for v in sorted(levels, key=str):  # single-level strata are kept: results can be grouped by them
            m = values == v
            est = classification_metrics(y[m], pred[m], t.task.n_classes, cfg.n_boot, cfg.seed, ci_method=cfg.ci_method)
            out.add(name, head, "accuracy", est["accuracy"], stratum=f"{col}={v}")


def _blocks(idx: np.ndarray, dim: int) -> list[np.ndarray]:
    """Index blocks of bounded size: predictions are made a block of rows of `dim` floats at a time."""
    step = scoring.gather_rows(dim)
    return [idx[s : s + step] for s in range(0, len(idx), step)] or [idx]


def _rows(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """x[idx], or x itself when idx is every row in order (no copy)."""
    return x if len(idx) == len(x) and bool((idx == np.arange(len(x))).all()) else x[idx]


def _guarded(out: Output, name: str, head: str, fn: Callable[[], None]) -> None:
    """Run one head; data it cannot handle becomes a note and a skipped head."""
    try:
        fn()
    except HEAD_ERRORS as exc:
        out.note(f"{name}: {head} skipped ({type(exc).__name__}: {exc})", "skipped")


def _missing_class_notes(t: TaskArrays, folds: Folds) -> list[str]:
    notes = []
    for i, (train, test) in enumerate(folds):
        absent = sorted(set(t.y[test]) - set(t.y[train]))
        if absent:
            n = int(np.isin(t.y[test], absent).sum())
            names = ", ".join(t.task.classes[c] for c in absent)
            notes.append(
                f"{t.task.name}: fold {i} has no training rows of {names}: probes cannot predict "
                f"it, its {n} test rows count as errors"
            )
    return notes


def _plan_note_kind(text: str) -> str:
    if "excluded" in text:
        return "excluded_classes"
    return "skipped" if "skipped" in text else "other"


def evaluate_task(t: TaskArrays, cfg: EvalConfig) -> Output:
    """Every requested head on one task, plus the alignment and confounder measures between them.

    The task's own protocol and heads (a TaskSpec's overrides) replace the evaluation's here."""
    cfg = task_config(cfg, t.task)
    out = Output()
    plan = plan_task(t, cfg)
    for n in plan.notes:
        out.note(n, _plan_note_kind(n))
    t, test, folds = plan.arrays, plan.test, plan.folds
    name = t.task.name
    if len(test) == 0:
        if not plan.notes:
            out.note(f"{name}: no rows to test under --protocol {cfg.protocol}", "skipped")
        return out
    correct: dict[str, np.ndarray] = {}

    if "zs_prompt" in cfg.heads:
        if t.prompt_emb is None:
            out.note(f"{name}: zs_prompt not applicable ({t.prompt_note or 'image-only model'})", "skipped")
        else:
            _guarded(out, name, "zs_prompt", lambda: _zero_shot(out, t, test, cfg, correct))

    batch = plan.batch or batch_column(t.meta, cfg)
    batches = t.meta[batch].astype(str).to_numpy() if batch is not None else None
    many_batches = batches is not None and len(set(batches)) >= 2
    if "batch" in cfg.heads and many_batches:
        _guarded(out, name, "batch", lambda: _batch_effect(out, t, batches, batch, cfg))
    if "map" in cfg.heads and many_batches:
        _guarded(out, name, "map", lambda: _phenotypic_map(out, t, batches, batch, cfg))

    if PROBE_HEADS & set(cfg.heads):
        if folds:
            out.note(f"{name}: probes use {plan.how}", "probe_folds")
        else:
            out.note(f"{name}: probes skipped ({plan.how})", "skipped")
        for n in _missing_class_notes(t, folds):
            out.note(n, "missing_class")
    if not folds:
        return out

    if "lp" in cfg.heads:
        grouped = plan.grouped
        _guarded(out, name, "lp", lambda: run_linear_probe(out, t, folds, test, cfg, correct, grouped))
    if "proto" in cfg.heads:

        def proto() -> None:
            pred = np.full(len(t.y), -1, dtype=np.int64)
            for train, te in folds:
                head = PrototypeHead(t.task.n_classes).fit(view(t.x, train), t.y[train])
                for block in _blocks(te, t.x.shape[1]):
                    pred[block] = head.predict(t.x[block])
            _report(out, t, "proto", test, pred[test], cfg)
            correct["proto"] = pred == t.y

        _guarded(out, name, "proto", proto)
    if "knn" in cfg.heads:
        nsb = batches if many_batches and not plan.grouped and plan.batch is None else None
        _guarded(out, name, "knn", lambda: run_knn(out, t, folds, test, cfg, nsb))
    if "fewshot" in cfg.heads:
        _guarded(out, name, "fewshot", lambda: run_few_shot(out, t, folds, cfg))

    if "zs" in correct:
        for other, label in (("lp", "lp_minus_zs"), ("proto", "proto_minus_zs")):
            if other in correct:
                d = paired_difference(
                    correct[other][test], correct["zs"][test], cfg.n_boot, cfg.seed, ci_method=cfg.ci_method
                )
                out.add(name, "alignment", label, d["difference"])
                if other == "lp":
                    out.add(name, "alignment", "zs_over_lp", d["ratio"])
    if plan.batch is not None and batches is not None:
        _per_batch(out, t, batches, plan.batch)
    return out


def _per_batch(out: Output, t: TaskArrays, batches: np.ndarray, col: str) -> None:
    """Leave-one-batch-out: each head's accuracy on every held-out batch, and their mean."""
    name = t.task.name
    for frame in [f for f in out.predictions if len(f) and f["task"].iloc[0] == name]:
        head = str(frame["head"].iloc[0])
        b = batches[np.searchsorted(t.rows, frame["row"].to_numpy())]  # t.rows is sorted (row order)
        right = (frame["y_true"].to_numpy() == frame["y_pred"].to_numpy()).astype(float)
        accs = []
        for value in sorted(set(b)):
            m = b == value
            out.add(name, head, "accuracy", float(right[m].mean()), stratum=f"loso:{col}={value}", n=int(m.sum()))
            accs.append(float(right[m].mean()))
        out.add(name, head, "loso_mean_accuracy", float(np.mean(accs)), n=len(accs))


def _calibration(out: Output, name: str, head: str, proba: np.ndarray, y: np.ndarray, cfg: EvalConfig) -> None:
    """Expected calibration error (15 bins, bootstrap CI) and the reliability curve behind it."""
    out.add(name, head, "ece", expected_calibration_error(proba, y, CALIBRATION_BINS, cfg.n_boot, cfg.seed))
    for _, r in reliability_curve(proba, y, CALIBRATION_BINS).iterrows():
        stratum, n = f"bin={int(r['bin']):02d}", int(r["count"])
        out.add(name, head, "calibration_confidence", float(r["confidence"]), stratum=stratum, n=n)
        out.add(name, head, "calibration_accuracy", float(r["accuracy"]), stratum=stratum, n=n)


def _batch_effect(out: Output, t: TaskArrays, batches: np.ndarray, col: str, cfg: EvalConfig) -> None:
    """Over each row's k nearest neighbours: share of the same class vs of the same batch, and
    PathoROB's robustness index (same class from another batch vs other class from the same batch)."""
    k = min(cfg.batch_k, len(t.y) - 1)
    if k < 1:
        return
    for metric, est in batch_effect_index(t.x, t.y, batches, k, cfg.n_boot, cfg.seed).items():
        out.add(t.task.name, "batch", f"{metric}@{k}", est, stratum=f"batch={col}")


def _phenotypic_map(out: Output, t: TaskArrays, batches: np.ndarray, col: str, cfg: EvalConfig) -> None:
    """copairs' phenotypic retrieval mAP per class (positives: same class in another batch), with a
    permutation null and Benjamini-Hochberg q-values."""
    name = t.task.name
    table = phenotypic_map(t.x, t.y, batches, n_perm=cfg.map_permutations, seed=cfg.seed)
    for _, r in table.iterrows():
        cls = f"class={t.task.classes[int(r['class'])]}"
        n = int(r["n_queries"])
        out.add(name, "map", "mAP", float(r["mean_average_precision"]), stratum=cls, n=n)
        out.add(name, "map", "p_value", float(r["p_value"]), stratum=cls, n=n)
        out.add(name, "map", "q_value", float(r["q_value"]), stratum=cls, n=n)
    scored = table[table["n_queries"] > 0]
    if len(scored):
        n = int(scored["n_queries"].sum())
        out.add(name, "map", "mAP", float(scored["mean_average_precision"].mean()), stratum=f"batch={col}", n=n)
        out.add(name, "map", "fraction_q<0.05", float((scored["q_value"] < 0.05).mean()), stratum=f"batch={col}", n=n)


def _zero_shot(out: Output, t: TaskArrays, test: np.ndarray, cfg: EvalConfig, correct: dict) -> None:
    name, x = t.task.name, _rows(t.x, test)
    assert t.prompt_emb is not None
    pred = np.full(len(t.y), -1, dtype=np.int64)
    head = PromptZeroShot.from_templates(t.prompt_emb)
    sims = head.similarities(x)
    pred[test] = sims.argmax(axis=1)  # ties: the lower class, as `predict`
    _report(out, t, "zs_prompt", test, pred[test], cfg)
    _calibration(out, name, "zs_prompt", softmax_scores(sims), t.y[test], cfg)
    correct["zs"] = pred == t.y
    accs = []
    for j, tmpl in enumerate(t.templates):
        p = PromptZeroShot.from_templates(t.prompt_emb, template=j).predict(x)
        est = classification_metrics(t.y[test], p, t.task.n_classes, 0)["accuracy"]
        out.add(name, f"zs_prompt[{j}]", "accuracy", est, stratum=f"template={tmpl}")
        accs.append(est.value)
    if accs:
        out.add(name, "zs_prompt", "template_spread", float(np.max(accs) - np.min(accs)), n=len(test))
        out.add(name, "zs_prompt", "template_std", float(np.std(accs)), n=len(test))
    gap = modality_gap(x, t.prompt_emb.reshape(-1, t.prompt_emb.shape[-1]))
    out.add(name, "alignment", "modality_gap", gap, n=len(test))


def _probe_record(
    out: Output, name: str, head: str, probe: LinearProbe, n: int, stratum: str, seed: int | None
) -> None:
    """The chosen C, whether it is an edge of the grid, and the validation curve behind it."""
    out.add(name, head, "chosen_C", probe.C_, stratum=stratum, seed=seed, n=n)
    out.add(name, head, "C_at_edge", float(probe.at_edge_), stratum=stratum, seed=seed, n=n)
    for c, score in probe.val_curve_:
        out.add(name, head, f"val_{probe.select}", score, stratum=f"{stratum};C={c:g}", seed=seed, n=n)


def _edge_note(name: str, head: str, probes: list[tuple[str, LinearProbe]], cs: Sequence[float]) -> list[str]:
    notes = []
    for end, c in (("smallest", cs[0]), ("largest", cs[-1])):
        where = [label for label, p in probes if p.at_edge_ and p.C_ == c]
        if where:
            notes.append(
                f"{name}: {head} chose C={c:g}, the {end} value of the grid, in {', '.join(where)}: "
                "the best C may lie outside it (widen --probe-cs)"
            )
    return notes


def _probe(cfg: EvalConfig, **kw) -> LinearProbe:
    """A linear probe with the evaluation's C grid, stopping rule, selection criterion and solver."""
    settings = dict(
        Cs=cfg.cs,
        patience=cfg.patience,
        random_state=cfg.seed,
        fallback_C=cfg.fallback_c,
        backend=cfg.probe_backend,
        device=cfg.device,
        select=cfg.probe_select,
    )
    return LinearProbe(**{**settings, **kw})


def run_linear_probe(
    out: Output, t: TaskArrays, folds: Folds, test: np.ndarray, cfg: EvalConfig, correct: dict, grouped: bool = False
) -> None:
    """Out-of-fold probe; with `grouped` folds, C is also validated on held-out groups (sources, plates).

    One head of `evaluate_task`, public so that it can be run on hand-made folds."""
    name = t.task.name
    pred = np.full(len(t.y), -1, dtype=np.int64)
    proba = np.zeros((len(t.y), t.task.n_classes))
    probes = []
    groups = _groups(t) if grouped else None
    for i, (train, te) in enumerate(folds):
        probe = _probe(cfg)
        probe.fit(view(t.x, train), t.y[train], groups=groups[train] if groups is not None else None)
        for block in _blocks(te, t.x.shape[1]):
            pred[block] = probe.predict(t.x[block])
            proba[np.ix_(block, probe.classes_)] = probe.predict_proba(t.x[block])
        _probe_record(out, name, "lp", probe, len(train), f"fold={i}", None)
        probes.append((f"fold {i}", probe))
        if len(probe.classes_) < 2:
            out.note(f"{name}: lp fold {i} has one training class: it predicts that class", "other")
    _report(out, t, "lp", test, pred[test], cfg)
    _calibration(out, name, "lp", proba[test], t.y[test], cfg)
    correct["lp"] = pred == t.y
    for n in _edge_note(name, "lp", probes, cfg.cs):
        out.note(n, "probe_c_edge")
    in_source = [label for label, p in probes if groups is not None and p.validation_ == "stratified"]
    if in_source:
        out.note(
            f"{name}: lp validated C on a stratified split of the training {t.task.group_by} values in "
            f"{', '.join(in_source)} (too few {t.task.group_by} values per class to hold some out)",
            "probe_folds",
        )


RECALL_QUERIES = 1000  # test rows per fold on which an approximate kNN index is checked against exact search
CALIBRATION_BINS = 15


def run_knn(
    out: Output, t: TaskArrays, folds: Folds, test: np.ndarray, cfg: EvalConfig, batches: np.ndarray | None = None
) -> None:
    """Out-of-fold kNN; with `batches`, also kNN whose neighbours never share the query's batch
    (`knn_nsb@k`, "not same batch"); with an approximate --knn-index, its recall@10 against exact search.
    One head of `evaluate_task`, public so that it can be run on hand-made folds."""
    preds = {k: np.full(len(t.y), -1, dtype=np.int64) for k in cfg.ks}
    nsb = {k: np.full(len(t.y), -1, dtype=np.int64) for k in cfg.ks} if batches is not None else {}
    recalls, asked = [], 0
    device = None if cfg.device == "auto" else cfg.device
    for i, (train, te) in enumerate(folds):
        knn = KNNHead(cfg.ks, cfg.temperature, t.task.n_classes, index=cfg.knn_index, device=device, seed=cfg.seed)
        gallery = view(t.x, train)
        knn.fit(gallery, t.y[train])
        for block in _blocks(te, t.x.shape[1]):
            for k, p in knn.predict_all(t.x[block]).items():
                preds[k][block] = p
            if batches is not None:
                found = knn_nsb_predict(
                    gallery,
                    t.y[train],
                    batches[train],
                    t.x[block],
                    batches[block],
                    cfg.ks,
                    t.task.n_classes,
                    cfg.temperature,
                )
                for k, p in found.items():
                    nsb[k][block] = p
        if cfg.knn_index != "Flat":
            rng = np.random.default_rng(cfg.seed + i)
            sample = np.sort(rng.choice(te, size=min(RECALL_QUERIES, len(te)), replace=False))
            recalls.append(knn.recall(t.x[sample], 10))
            asked += len(sample)
        del knn  # this fold's index (a copy of its gallery) goes before the next fold's is built
    main_k = cfg.ks[min(2, len(cfg.ks) - 1)]
    for k, p in preds.items():
        _report(out, t, f"knn@{k}", test, p[test], cfg, strata=k == main_k)
    for k, p in nsb.items():
        _report(out, t, f"knn_nsb@{k}", test, p[test], cfg, strata=False)
        d = paired_difference(
            preds[k][test] == t.y[test], p[test] == t.y[test], cfg.n_boot, cfg.seed, ci_method=cfg.ci_method
        )
        out.add(t.task.name, "batch", f"knn_minus_nsb@{k}", d["difference"])
    if recalls:
        out.add(
            t.task.name, "knn", "index_recall@10", float(np.mean(recalls)), stratum=f"index={cfg.knn_index}", n=asked
        )


def run_few_shot(out: Output, t: TaskArrays, folds: Folds, cfg: EvalConfig) -> None:
    """k shots per class from one training fold per seed; C tuned only on those shots.

    One head of `evaluate_task`, public so that it can be run on hand-made folds."""
    name = t.task.name
    for shots in cfg.shots:
        accs: dict[str, list[float]] = {"lp": [], "proto": []}
        probes = []
        for s in range(cfg.fewshot_seeds):
            train, test = folds[s % len(folds)]
            idx = few_shot_indices(t.y, train, shots, seed=cfg.seed * 1000 + s)
            if idx is None:
                out.note(f"{name}: {shots}-shot skipped (a class has fewer than {shots} training rows)", "skipped")
                break
            probe = _probe(cfg, val_fraction=0.5, random_state=s).fit(t.x[idx], t.y[idx])
            probes.append((f"seed {s}", probe))
            _probe_record(out, name, f"lp_{shots}shot", probe, len(idx), "all", s)
            for head, model in (("lp", probe), ("proto", PrototypeHead(t.task.n_classes).fit(t.x[idx], t.y[idx]))):
                pred = np.concatenate([model.predict(t.x[block]) for block in _blocks(test, t.x.shape[1])])
                est = classification_metrics(t.y[test], pred, t.task.n_classes, 0)["accuracy"]
                out.add(name, f"{head}_{shots}shot", "accuracy", est, seed=s)
                accs[head].append(est.value)
        for head, values in accs.items():
            if values:
                sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                m, half = float(np.mean(values)), 1.96 * sd / np.sqrt(len(values))
                out.records.append(
                    {
                        "task": name,
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
        if shots > 1:
            for n in _edge_note(name, f"lp_{shots}shot", probes, cfg.cs):
                out.note(n, "probe_c_edge")


# ---- μ-Bench caption protocol ----------------------------------------------------------------------


def caption_keys(available: Sequence[str], cfg: EvalConfig) -> dict[str, list[str]]:
    """Caption keys per pooled group ("coarse", "fine"), honouring each group's template choice."""

    def keep(key: str, templates: str) -> bool:
        second = key.endswith("_1")
        return templates == "both" or (templates == "1") == second

    return {
        group: [k for k in keys if k in available and keep(k, cfg.templates_for(group))]
        for group, keys in (("coarse", COARSE_CAPTION_KEYS), ("fine", FINE_CAPTION_KEYS))
    }


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
    rows_tested = test_mask(meta, cfg)
    datasets_col = meta["dataset"].astype(str).to_numpy() if "dataset" in meta else None
    for group, keys in caption_keys(list(captions), cfg).items():
        keep = valid.copy() if rows_tested is None else valid & rows_tested
        excluded = cfg.excluded_for(group)
        if excluded and datasets_col is not None:
            keep &= ~np.isin(datasets_col, excluded)
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
        _calibration(out, task, "zs_caption", proba, np.concatenate(answers), cfg)
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
