"""What one task's evaluation works on (`TaskArrays`) and what it produces (`Output`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ..heads.metrics import Estimate
from ..tasks import Task


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
