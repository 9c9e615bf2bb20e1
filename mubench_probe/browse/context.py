"""What every page of `probe browse` reads: the store's runs, the results and predictions, caches.

Opened once per server; runs are addressed by a url-safe id derived from their path in the
store (stable across restarts), never by a path: nothing a request carries is joined into a file
name. Arrays are read lazily, once, behind a lock (the server answers from several threads).
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import NotFoundError, UsageError
from ..queries import run_dataset
from ..store import EmbeddingStore, Run, RunArrays

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def run_id_for(path: str) -> str:
    """A url-safe id for a run path `MODEL/DATASET/SPLIT`: readable slug + hash (slugs may collide)."""
    slug = _UNSAFE.sub("-", path).strip("-")[:80]
    return f"{slug}-{hashlib.sha1(path.encode()).hexdigest()[:6]}"


def default_cache_dir(store_path: str | Path) -> Path:
    """Per-store cache folder in the user's cache dir (when no results folder is given)."""
    import platformdirs

    key = hashlib.sha1(str(store_path).encode()).hexdigest()[:16]
    return Path(platformdirs.user_cache_dir("mubench-probe")) / "browse" / key


def clean(value: Any) -> Any:
    """A metadata value as JSON: NaN/None -> None, numpy scalars -> Python."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


@dataclass
class BrowseContext:
    """The store, the results folder and lazily-read per-run data shared by the app's pages."""

    store: EmbeddingStore
    results_dir: Path | None
    results: pd.DataFrame | None
    predictions: pd.DataFrame | None
    runs: dict[str, Run]
    cache_dir: Path
    notes: list[str] = field(default_factory=list)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls, store_path: str | Path, results_dir: str | Path | None = None, cache_dir: str | Path | None = None
    ) -> BrowseContext:
        """Open the store (refused in one line if damaged) and, when given, the results folder."""
        store = EmbeddingStore(store_path)
        runs = {run_id_for(r.path): r for r in store.runs()}
        results = predictions = None
        notes: list[str] = []
        res_path = None
        if results_dir is not None:
            from ..results import ResultsDir

            res_path = Path(results_dir)
            if not res_path.is_dir():
                raise UsageError(f"no results folder at {res_path} (write one with `probe evaluate --out {res_path}`)")
            rd = ResultsDir(res_path)
            results, predictions = rd.load()
            notes += rd.notes
            if results.empty and predictions.empty:
                raise UsageError(f"{res_path} holds no results (write them with `probe evaluate --out {res_path}`)")
        cache = Path(cache_dir) if cache_dir is not None else None
        if cache is None:
            cache = res_path / ".browse-cache" if res_path is not None else default_cache_dir(store.path)
        return cls(store, res_path, results, predictions, runs, cache, notes)

    # ---- lookups (404 for anything the store does not hold) ----------------------------------
    def run(self, run_id: str) -> Run:
        """The run with this id; NotFoundError (404) for any other string."""
        run = self.runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no run {run_id!r} in this store")
        return run

    def check_row(self, run_id: str, row: int) -> Run:
        """The run, after checking that `row` is one of its rows."""
        run = self.run(run_id)
        if not 0 <= row < run.layout.n_rows:
            raise NotFoundError(f"run {run_id!r} has no row {row} (rows 0..{run.layout.n_rows - 1})")
        return run

    def cached(self, run_id: str, what: str, make: Any) -> Any:
        """`make()` computed once per (run, what) and kept (what several pages share)."""
        key = (run_id, what)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
            return self._cache[key]

    def meta(self, run_id: str) -> pd.DataFrame:
        """The run's metadata columns (one row per store row)."""
        run = self.run(run_id)
        return self.cached(run_id, "meta", run.meta)

    def arrays(self, run_id: str) -> RunArrays:
        """The run's arrays (each read from the store at most once, then kept)."""
        run = self.run(run_id)
        return self.cached(run_id, "arrays", lambda: RunArrays(run))

    def embeddings(self, run_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(normalised image embeddings as float32, valid-row mask), read once."""
        arrays = self.arrays(run_id)
        return self.cached(
            run_id, "emb", lambda: (np.ascontiguousarray(arrays.x, dtype=np.float32), np.asarray(arrays.valid))
        )

    def dataset(self, run_id: str) -> Any:
        """The run's source dataset, opened from its provenance once (images are read from it on demand)."""
        run = self.run(run_id)
        return self.cached(run_id, "dataset", lambda: run_dataset(run))

    def image_bytes(self, run_id: str, row: int) -> bytes:
        """The raw bytes of one row's image (as `probe search --sheet` reads them)."""
        self.check_row(run_id, row)
        return self.dataset(run_id).reader.read(row)

    def thumb_url(self, run_id: str, row: int) -> str:
        return f"/thumb/{run_id}/{int(row)}.png"

    # ---- how runs relate to the results table ---------------------------------------------------
    def dataset_key(self, run_id: str) -> str:
        """The `dataset` value the results table uses for this run (its folder in the store)."""
        return self.run(run_id).path.split("/")[1]

    def run_of(self, model: str, dataset: str) -> str | None:
        """The run id behind a results row (model spec, dataset key), or None."""
        for rid, run in self.runs.items():
            if run.model_spec == model and run.path.split("/")[1] == dataset:
                return rid
        return None

    def same_rows(self, run_id: str) -> list[str]:
        """Runs over the same dataset and split as this one (their row i is the same image)."""
        path = self.run(run_id).path.split("/")[1:]
        return [rid for rid, r in self.runs.items() if r.path.split("/")[1:] == path]

    def task(self, run_id: str, name: str) -> Any:
        """The metadata-derived task of this name on the run's rows (None for caption tasks)."""

        def make() -> dict[str, Any]:
            from ..tasks import derive_tasks

            return {t.name: t for t in derive_tasks(self.meta(run_id), min_classes=1)}

        return self.cached(run_id, "tasks", make).get(name)

    def caption_texts(self, run_id: str, task: str, row: int) -> list[str] | None:
        """The caption options of `row` for a μ-Bench caption task (`mubench/<key>`), in option order;
        None for other tasks (their class indices name classes, the same for every row)."""
        run = self.run(run_id)
        key = task.removeprefix("mubench/")
        if not task.startswith("mubench/") or key not in run.caption_keys():
            return None
        options, _ = self.cached(run_id, f"captions\0{key}", lambda: run.captions(key))
        texts = self.cached(run_id, "texts", run.texts)
        return [texts[i] for i in options[row].tolist() if i >= 0]

    def run_predictions(self, run_id: str) -> pd.DataFrame:
        """This run's rows of predictions.parquet (empty without results)."""
        run = self.run(run_id)

        def make() -> pd.DataFrame:
            p = self.predictions
            if p is None or p.empty:
                return pd.DataFrame(columns=["task", "head", "row", "y_true", "y_pred"])
            keep = (p["model"] == run.model_spec) & (p["dataset"] == self.dataset_key(run_id))
            return p[keep].reset_index(drop=True)

        return self.cached(run_id, "predictions", make)
