"""Which rows, classes and folds each protocol scores (kfold, split, transfer, loso)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from ..config import EvalConfig, parse_conditions
from ..errors import UsageError
from ..tasks import Task, where_mask
from .arrays import TaskArrays

TRAIN_SPLITS = ("train", "val", "valid", "validation")

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
    note_kinds: list[str] = field(default_factory=list)  # one of NOTE_KINDS per note ("other" if missing)
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


def groups_of(t: TaskArrays) -> np.ndarray | None:
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
        empty = t.subset(np.zeros(len(t.y), dtype=bool))
        return TaskPlan(empty, np.zeros(0, np.int64), [], how, [skip], ["skipped"])
    notes, kinds = [], []
    lost = [c for c in range(t.task.n_classes) if c not in shared and (t.y[sides] == c).any()]
    if lost:
        notes.append(_class_note(t, lost, sides & np.isin(t.y, lost), "not on both the train and the test side"))
        kinds.append("excluded_classes")
    sub = t.subset(sides, shared)
    kept = np.isin(t.y[sides], shared)
    train, test = train[sides][kept], test[sides][kept]
    if (src := groups_of(sub)) is not None:
        common = sorted(set(src[train]) & set(src[test]))
        if common:
            notes.append(
                f"{t.task.name}: train and test share {t.task.group_by} values ({', '.join(common[:10])}): a probe "
                f"may recognise the {t.task.group_by} rather than the {t.task.column}"
            )
    kinds += ["other"] * (len(notes) - len(kinds))
    return TaskPlan(sub, np.flatnonzero(test), [(np.flatnonzero(train), np.flatnonzero(test))], how, notes, kinds)


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
    src = groups_of(t)
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
    notes, kinds = [], []
    if single:
        by_source = {c: src[t.y == c][0] for c in single}
        detail = ", ".join(
            f"{t.task.classes[c]} (only in {by_source[c]}, {int((t.y == c).sum())} rows)" for c in single
        )
        what = "source dataset" if col == "dataset" else f"value of {col}"
        notes.append(f"{t.task.name}: classes in a single {what} excluded: {detail}")
        kinds.append("excluded_classes")
    sub = t.subset(np.ones(len(t.y), dtype=bool), multi)
    groups = groups_of(sub)
    if groups is None:
        raise UsageError(f"{t.task.name}: no grouping column {col!r}")
    k = min(cfg.folds, len(set(groups)))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=cfg.seed)
    folds = list(splitter.split(sub.x, sub.y, groups))
    how = f"{k}-fold grouped by {col} (lp validates C on held-out {col} values where it can)"
    return TaskPlan(sub, np.arange(len(sub.y)), folds, how, notes, kinds, grouped=True)


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
