"""Tasks derived from per-row metadata: fine-grained per source dataset, coarse per attribute.

μ-Bench's `label` is one global ClassLabel across all sources, so a fine-grained task's label
space is the classes of one source `dataset`; coarse tasks (domain, ..., stain) span all rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

COARSE_ATTRIBUTES = ("domain", "subdomain", "modality", "submodality", "stain")
# μ-Bench caption keys per task group; "_1" keys are the second template.
COARSE_CAPTION_KEYS = tuple(k for a in COARSE_ATTRIBUTES for k in (a, f"{a}_1"))
FINE_CAPTION_KEYS = ("classification_0", "classification_1")


@dataclass(frozen=True)
class Task:
    """One classification problem over a subset of rows with its own label space."""

    name: str
    group: str  # "fine" | "coarse"
    column: str
    rows: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def _present(values: pd.Series) -> np.ndarray:
    return (values.notna() & (values.astype(str).str.len() > 0)).to_numpy()


def _task(name: str, group: str, column: str, meta: pd.DataFrame, mask: np.ndarray) -> Task:
    vals = meta[column].to_numpy()[mask].astype(str)
    classes = tuple(sorted(set(vals)))
    lookup = {c: i for i, c in enumerate(classes)}
    return Task(name, group, column, np.flatnonzero(mask), np.array([lookup[v] for v in vals]), classes)


def derive_tasks(meta: pd.DataFrame, min_classes: int = 2) -> list[Task]:
    """All tasks with at least `min_classes` classes, fine first, in a stable order."""
    tasks: list[Task] = []
    if "label_name" in meta.columns:
        has_label = _present(meta["label_name"])
        sources = meta["dataset"].astype(object).where(meta["dataset"].notna(), None)
        for src in sorted({s for s in sources if s}):
            mask = has_label & (sources.to_numpy() == src)
            tasks.append(_task(f"fine/{src}", "fine", "label_name", meta, mask))
    for attr in COARSE_ATTRIBUTES:
        if attr in meta.columns:
            tasks.append(_task(f"coarse/{attr}", "coarse", attr, meta, _present(meta[attr])))
    return [t for t in tasks if t.n_classes >= min_classes]


def class_text(name: str) -> str:
    """Class names as prompts read them: underscores become spaces."""
    return name.replace("_", " ").strip()


def prompt_texts(classes: Sequence[str], templates: Sequence[str]) -> list[list[str]]:
    """texts[c][t]: class c's name in template t."""
    return [[t.format(class_text(c)) for t in templates] for c in classes]


def unique_texts(groups: Iterable[Iterable[str]]) -> list[str]:
    """Deduplicated texts in first-seen order (the store's text table)."""
    seen: dict[str, None] = {}
    for g in groups:
        for t in g:
            seen.setdefault(t, None)
    return list(seen)
