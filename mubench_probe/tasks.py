"""Tasks as data: a `TaskSpec` (label column, row conditions, grouping) resolved on per-row metadata.

The built-in tasks are μ-Bench's: its `label` is one global ClassLabel across all sources, so a
fine-grained task's label space is the classes of one source `dataset`; coarse tasks (domain,
..., stain) span all rows, with folds grouped by source. User tasks (`--label`, `--tasks FILE`)
take the same path: one definition, one resolution, one protocol.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .config import TaskSpec, parse_conditions
from .errors import UsageError

COARSE_ATTRIBUTES = ("domain", "subdomain", "modality", "submodality", "stain")
# μ-Bench caption keys per task group; "_1" keys are the second template.
COARSE_CAPTION_KEYS = tuple(k for a in COARSE_ATTRIBUTES for k in (a, f"{a}_1"))
FINE_CAPTION_KEYS = ("classification_0", "classification_1")


@dataclass(frozen=True)
class Task:
    """One classification problem over a subset of rows with its own label space (a resolved TaskSpec)."""

    name: str
    kind: str  # "fine" | "coarse" | "custom"
    column: str
    rows: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    spec: TaskSpec | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def group_by(self) -> str | None:
        """The column whose values folds hold out whole (None: stratified folds)."""
        return self.spec.group if self.spec is not None else None


def _present(values: pd.Series) -> np.ndarray:
    return (values.notna() & (values.astype(str).str.len() > 0)).to_numpy()


def where_mask(meta: pd.DataFrame, conditions: Sequence[str]) -> np.ndarray:
    """Rows matching every column's condition (COLUMN=VALUE: any of its values; COLUMN!=VALUE:
    none of them). Unknown columns are a usage error naming the columns there are."""
    include, exclude = parse_conditions(conditions)
    mask = np.ones(len(meta), dtype=bool)
    for cols, keep in ((include, True), (exclude, False)):
        for col, values in cols.items():
            if col not in meta.columns:
                raise UsageError(f"no metadata column {col!r} (have: {', '.join(map(str, meta.columns))})")
            mask &= meta[col].astype(str).isin(values).to_numpy() == keep
    return mask


def resolve_task(spec: TaskSpec, meta: pd.DataFrame) -> Task:
    """The rows and classes a task definition selects in this metadata (labels present, `where` matched)."""
    for col in (spec.label, spec.group):
        if col is not None and col not in meta.columns:
            raise UsageError(
                f"task {spec.name}: no metadata column {col!r} (have: {', '.join(map(str, meta.columns))})"
            )
    mask = _present(meta[spec.label]) & where_mask(meta, spec.where)
    vals = meta[spec.label].to_numpy()[mask].astype(str)
    classes = tuple(sorted(set(vals)))
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup[v] for v in vals], dtype=np.int64)
    return Task(spec.name, spec.kind, spec.label, np.flatnonzero(mask), y, classes, spec)


def builtin_specs(meta: pd.DataFrame) -> list[TaskSpec]:
    """μ-Bench's tasks as definitions: `fine/<dataset>` per source, `coarse/<attribute>` grouped by source."""
    specs: list[TaskSpec] = []
    if "label_name" in meta.columns and "dataset" in meta.columns:
        sources = meta["dataset"]
        for src in sorted({str(s) for s in sources[sources.notna()] if str(s)}):
            specs.append(TaskSpec(f"fine/{src}", "label_name", (f"dataset={src}",), kind="fine"))
    elif "label_name" in meta.columns:
        specs.append(TaskSpec("fine/all", "label_name", kind="fine"))
    group = "dataset" if "dataset" in meta.columns else None
    for attr in COARSE_ATTRIBUTES:
        if attr in meta.columns:
            specs.append(TaskSpec(f"coarse/{attr}", attr, group=group, kind="coarse"))
    return specs


def derive_tasks(meta: pd.DataFrame, min_classes: int = 2, specs: Sequence[TaskSpec] | None = None) -> list[Task]:
    """The tasks of `specs` (default: the built-in ones) with at least `min_classes` classes, in order."""
    tasks = [resolve_task(s, meta) for s in (builtin_specs(meta) if specs is None else specs)]
    return [t for t in tasks if t.n_classes >= min_classes]


def class_text(name: str) -> str:
    """Class names as prompts read them: underscores become spaces."""
    return name.replace("_", " ").strip()


def prompt_texts(classes: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """`texts[c][t]`: class c's name in template t."""
    return [[t.format(class_text(c)) for t in templates] for c in classes]


def unique_texts(groups: Iterable[Iterable[str]]) -> list[str]:
    """Deduplicated texts in first-seen order (the store's text table)."""
    seen: dict[str, None] = {}
    for g in groups:
        for t in g:
            seen.setdefault(t, None)
    return list(seen)
