"""The public Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .datasets import FORMATS, MUBENCH_ID, DatasetFormat, LoadedDataset, load_dataset
from .encoders import BACKENDS, MUBENCH_MODELS, Backend, load_encoder
from .encoders.openclip import list_specs
from .evaluation import EvaluationResult, Unit, evaluate_store, summary
from .extraction import ExtractReport, ProgressFn, prepare, run_extraction
from .imaging import get_policy
from .protocol import HEADS, EvalConfig
from .store import DEFAULT_STORE, EmbeddingStore, describe
from .tasks import read_templates

__all__ = [
    "DEFAULT_STORE",
    "HEADS",
    "MUBENCH_ID",
    "MUBENCH_MODELS",
    "EvalConfig",
    "evaluate",
    "extract",
    "list_backends",
    "list_dataset_formats",
    "list_open_clip_specs",
    "open_dataset",
    "open_store",
    "store_info",
    "summary",
    "verify_store",
]


def open_dataset(spec: str = MUBENCH_ID, split: str | None = None, revision: str | None = None,
                 limit: int | None = None) -> LoadedDataset:
    """Resolve a dataset spec ('sample', Hub id, folder, CSV, parquet, save_to_disk folder)."""
    return load_dataset(spec, split=split, revision=revision, limit=limit)


def open_store(path: str | Path = DEFAULT_STORE, create: bool = False) -> EmbeddingStore:
    return EmbeddingStore(path, create=create)


def extract(
    model: str,
    dataset: LoadedDataset | str = "sample",
    *,
    store: str | Path | EmbeddingStore = DEFAULT_STORE,
    batch_size: int = 64,
    num_workers: int = 2,
    device: str | None = None,
    precision: str = "fp32",
    dtype: str = "float16",
    chunk_rows: int = 256,
    features: bool = False,
    intensity: str = "percentile",
    templates: str | Path | Sequence[str] | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> ExtractReport:
    """Embed `dataset` with `model` into the store; resumes a matching, unfinished group."""
    ds = open_dataset(dataset) if isinstance(dataset, str) else dataset
    st = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store, create=True)
    policy = get_policy(intensity)
    tmpl = tuple(templates) if isinstance(templates, list | tuple) else read_templates(templates)
    encoder = load_encoder(model, device=device, precision=precision)
    run = prepare(st, encoder, ds, policy=policy, chunk_rows=chunk_rows, dtype=dtype, features=features,
                  templates=tmpl, overwrite=overwrite)
    return run_extraction(run, encoder, ds, policy=policy, batch_size=batch_size,
                          num_workers=num_workers, progress=progress)


def verify_store(path: str | Path = DEFAULT_STORE) -> list[str]:
    """One line per damaged chunk in the whole store (empty list = intact)."""
    return [p for run in EmbeddingStore(path).runs() for p in run.verify()]


def store_info(path: str | Path = DEFAULT_STORE, verify: bool = False) -> dict[str, Any]:
    st = EmbeddingStore(path)
    runs = st.runs()
    info: dict[str, Any] = {"store": str(st.path), "size_bytes": st.size_bytes(),
                            "runs": [describe(r) for r in runs]}
    if verify:
        info["problems"] = [p for r in runs for p in r.verify()]
    return info


def list_backends() -> list[Backend]:
    return list(BACKENDS)


def list_open_clip_specs() -> list[str]:
    return list_specs()


def list_dataset_formats() -> list[DatasetFormat]:
    return list(FORMATS)


def evaluate(
    store: str | Path | EmbeddingStore = DEFAULT_STORE,
    config: EvalConfig | None = None,
    *,
    models: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    templates: str | Path | Sequence[str] | None = None,
    results_dir: str | Path | None = None,
    force: bool = False,
    jobs: int = 1,
    progress: Callable[[Unit, int, int], None] | None = None,
) -> EvaluationResult:
    """Score every head on every task from the store alone (never loads a model or an image)."""
    tmpl = None
    if templates is not None:
        tmpl = tuple(templates) if isinstance(templates, list | tuple) else read_templates(templates)
    return evaluate_store(store, config, models=models, tasks=tasks, templates=tmpl, results_dir=results_dir,
                          force=force, jobs=jobs, progress=progress)
