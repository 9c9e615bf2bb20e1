"""Results on disk: one long-format table (Parquet + CSV), per-sample predictions, a JSON run record.

Every write goes to a temporary file that replaces the old one, so a run that dies mid-write
leaves the previous, complete files behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

COLUMNS = (
    "model",
    "dataset",
    "task",
    "head",
    "metric",
    "stratum",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "seed",
    "provenance",
    "unit",
)
PRED_COLUMNS = ("model", "dataset", "task", "head", "row", "y_true", "y_pred", "unit")


def _replace(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


class ResultsDir:
    """results.parquet / results.csv / predictions.parquet / run.json under one folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def table_path(self) -> Path:
        return self.path / "results.parquet"

    @property
    def predictions_path(self) -> Path:
        return self.path / "predictions.parquet"

    def load(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        table = pd.read_parquet(self.table_path) if self.table_path.exists() else pd.DataFrame(columns=COLUMNS)
        preds = (
            pd.read_parquet(self.predictions_path)
            if self.predictions_path.exists()
            else pd.DataFrame(columns=PRED_COLUMNS)
        )
        return table, preds

    def save(self, table: pd.DataFrame, preds: pd.DataFrame, record: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        table = table.reset_index(drop=True)
        _replace(self.table_path, lambda p: table.to_parquet(p, index=False))
        _replace(self.path / "results.csv", lambda p: table.to_csv(p, index=False))
        _replace(self.predictions_path, lambda p: preds.reset_index(drop=True).to_parquet(p, index=False))
        self.save_record(record)

    def save_record(self, record: dict[str, Any]) -> None:
        """run.json: the latest invocation's record, plus `history`, one entry per invocation ever made
        into this folder (config, versions, timings, counts; identified by its `started` time)."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / "run.json"
        try:
            old = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:  # a damaged run.json loses its history, never the results
            old = {}
        history = [h for h in old.get("history", []) if h.get("started") != record.get("started")]
        history.append({k: v for k, v in record.items() if k not in ("notes", "history")})
        _replace(path, lambda p: p.write_text(json.dumps({**record, "history": history}, indent=2, default=str)))
