"""Results on disk: one long-format table (Parquet + CSV), per-sample predictions, a JSON run record.

Every write goes to a temporary file that replaces the old one, so a run that dies mid-write
leaves the previous, complete files behind. Writes hold the folder's lock (`.lock`, flock), and
rows another process saved since this one last read the folder are merged in (by unit: each
unit's rows come from one writer), so two evaluations writing one folder at once lose nothing
and duplicate nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
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
        self._stamp: tuple | None = None  # the table file as this process last read or wrote it

    def _disk_stamp(self) -> tuple | None:
        try:
            st = self.table_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @property
    def table_path(self) -> Path:
        return self.path / "results.parquet"

    @property
    def predictions_path(self) -> Path:
        return self.path / "predictions.parquet"

    def load(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        self._stamp = self._disk_stamp()
        table = pd.read_parquet(self.table_path) if self.table_path.exists() else pd.DataFrame(columns=COLUMNS)
        preds = (
            pd.read_parquet(self.predictions_path)
            if self.predictions_path.exists()
            else pd.DataFrame(columns=PRED_COLUMNS)
        )
        return table, preds

    def save(
        self, table: pd.DataFrame, preds: pd.DataFrame, record: dict[str, Any]
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Write the folder; returns the frames as written (with other writers' new units merged in)."""
        with self._locked():
            if self._disk_stamp() != self._stamp:  # another process saved since we read: keep its units
                disk_table, disk_preds = self.load()
                mine = set(table["unit"]) if len(table) else set()
                extra_t = disk_table[~disk_table["unit"].isin(mine)] if len(disk_table) else disk_table
                extra_p = disk_preds[~disk_preds["unit"].isin(mine)] if len(disk_preds) else disk_preds
                if len(extra_t):
                    table = pd.concat([table, extra_t], ignore_index=True) if len(table) else extra_t
                if len(extra_p):
                    preds = pd.concat([preds, extra_p], ignore_index=True) if len(preds) else extra_p
            table = table.reset_index(drop=True)
            _replace(self.table_path, lambda p: table.to_parquet(p, index=False))
            _replace(self.path / "results.csv", lambda p: table.to_csv(p, index=False))
            _replace(self.predictions_path, lambda p: preds.reset_index(drop=True).to_parquet(p, index=False))
            self._write_record(record)
            self._stamp = self._disk_stamp()
        return table, preds

    def save_record(self, record: dict[str, Any]) -> None:
        """run.json: the latest invocation's record, plus `history`, one entry per invocation ever made
        into this folder (config, versions, timings, counts; identified by its `started` time)."""
        with self._locked():
            self._write_record(record)

    def _write_record(self, record: dict[str, Any]) -> None:
        path = self.path / "run.json"
        try:
            old = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:  # a damaged run.json loses its history, never the results
            old = {}
        history = [h for h in old.get("history", []) if h.get("started") != record.get("started")]
        history.append({k: v for k, v in record.items() if k not in ("notes", "history")})
        _replace(path, lambda p: p.write_text(json.dumps({**record, "history": history}, indent=2, default=str)))
