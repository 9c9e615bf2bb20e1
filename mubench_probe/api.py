"""The public Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .datasets import FORMATS, MUBENCH_ID, DatasetFormat, LoadedDataset, load_dataset
from .encoders import BACKENDS, MUBENCH_MODELS, Backend, load_encoder
from .encoders.openclip import list_specs
from .errors import StoreError, UsageError
from .evaluation import EvaluationResult, Unit, evaluate_store, mubench_table1, summary
from .extraction import ExtractReport, ProgressFn, prepare, run_extraction
from .imaging import get_policy
from .protocol import HEADS, EvalConfig
from .results import ResultsDir
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
    "mubench_table1",
    "open_dataset",
    "open_store",
    "store_info",
    "summary",
    "verify_store",
]


def open_dataset(
    spec: str = MUBENCH_ID, split: str | None = None, revision: str | None = None, limit: int | None = None
) -> LoadedDataset:
    """Resolve a dataset spec ('sample', Hub id, folder, CSV, parquet, save_to_disk folder)."""
    return load_dataset(spec, split=split, revision=revision, limit=limit)


def open_store(path: str | Path = DEFAULT_STORE, create: bool = False) -> EmbeddingStore:
    return EmbeddingStore(path, create=create)


def _templates(templates: str | Path | Sequence[str] | None) -> tuple[str, ...]:
    """A templates file (None = the defaults) or the templates themselves."""
    return tuple(templates) if isinstance(templates, list | tuple) else read_templates(templates)


def _extract_inputs(
    dataset: LoadedDataset | str,
    store: str | Path | EmbeddingStore,
    intensity: str,
    templates: str | Path | Sequence[str] | None,
):
    """Everything extract and interpolate resolve the same way before loading a model."""
    ds = open_dataset(dataset) if isinstance(dataset, str) else dataset
    st = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store, create=True)
    return ds, st, get_policy(intensity), _templates(templates)


def _extract_with(
    encoder: Any,
    ds: LoadedDataset,
    st: EmbeddingStore,
    policy: Any,
    templates: tuple[str, ...],
    *,
    chunk_rows: int,
    dtype: str,
    features: bool,
    overwrite: bool,
    batch_size: int,
    num_workers: int,
    progress: ProgressFn | None,
) -> ExtractReport:
    run = prepare(
        st,
        encoder,
        ds,
        policy=policy,
        chunk_rows=chunk_rows,
        dtype=dtype,
        features=features,
        templates=templates,
        overwrite=overwrite,
    )
    return run_extraction(
        run, encoder, ds, policy=policy, batch_size=batch_size, num_workers=num_workers, progress=progress
    )


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
    ds, st, policy, tmpl = _extract_inputs(dataset, store, intensity, templates)
    encoder = load_encoder(model, device=device, precision=precision)
    return _extract_with(
        encoder,
        ds,
        st,
        policy,
        tmpl,
        chunk_rows=chunk_rows,
        dtype=dtype,
        features=features,
        overwrite=overwrite,
        batch_size=batch_size,
        num_workers=num_workers,
        progress=progress,
    )


def verify_store(path: str | Path = DEFAULT_STORE) -> list[str]:
    """One line per damaged chunk in the whole store (empty list = intact)."""
    return [p for run in EmbeddingStore(path).runs() for p in run.verify()]


def store_info(path: str | Path = DEFAULT_STORE, verify: bool = False) -> dict[str, Any]:
    st = EmbeddingStore(path)
    runs = st.runs()
    info: dict[str, Any] = {"store": str(st.path), "size_bytes": st.size_bytes(), "runs": [describe(r) for r in runs]}
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
    tmpl = _templates(templates) if templates is not None else None  # None: the templates extracted
    return evaluate_store(
        store,
        config,
        models=models,
        tasks=tasks,
        templates=tmpl,
        results_dir=results_dir,
        force=force,
        jobs=jobs,
        progress=progress,
    )


@dataclass
class CompareResult:
    side_by_side: pd.DataFrame
    pairwise: pd.DataFrame
    cka: pd.DataFrame
    mutual_knn: pd.DataFrame
    figures: list[Path] = field(default_factory=list)
    report: Path | None = None
    text_cka: pd.DataFrame = field(default_factory=pd.DataFrame)


def _text_prototypes(run: Any) -> np.ndarray:
    """Class-prompt ensemble vectors of every task, stacked (rows = classes, in a fixed order)."""
    from .heads.zeroshot import ensemble_weights, template_indices
    from .tasks import prompt_texts

    plan, texts, emb = run.prompts(), run.texts(), run.text_embeddings()
    rows = [
        ensemble_weights(emb[template_indices(texts, prompt_texts(classes, plan["templates"]))])
        for _, classes in sorted(plan.get("tasks", {}).items())
    ]
    return np.concatenate(rows) if rows else np.zeros((0, emb.shape[1]), np.float32)


def _results_and_store(source: str | Path, models: Sequence[str] | None) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    """A store (evaluated into results/<name>, cached) or a results folder (whose run.json names its store)."""
    src = Path(source)
    if (src / "zarr.json").exists():
        res = evaluate(src, models=models, results_dir=Path("results") / src.name.removesuffix(".zarr"))
        return res.table, res.predictions, src
    if (src / "results.parquet").exists():
        table, preds = ResultsDir(src).load()
        record = json.loads((src / "run.json").read_text()) if (src / "run.json").exists() else {}
        return table, preds, Path(record.get("store", ""))
    raise StoreError(f"{src} is neither a store nor a results folder (no zarr.json or results.parquet)")


def compare(
    source: str | Path,
    models: Sequence[str] | None = None,
    *,
    report: str | Path | None = None,
    k: int = 10,
    n_boot: int = 1000,
) -> CompareResult:
    """Models side by side with CIs, paired tests, CKA / mutual-kNN, and optionally an HTML report."""
    from . import report as rep
    from .comparison import pairwise_tests, side_by_side, similarity_matrices

    table, preds, store_path = _results_and_store(source, models)
    if models:
        table, preds = table[table["model"].isin(models)], preds[preds["model"].isin(models)]
    side = side_by_side(table)
    pairs = pairwise_tests(preds, n_boot=n_boot)
    embeddings: dict[str, np.ndarray] = {}
    labels: dict[str, list[str]] = {}
    if (store_path / "zarr.json").exists():
        runs = [r for r in EmbeddingStore(store_path).runs() if not models or r.model_spec in models]
        by_dataset: dict[str, list] = {}
        for r in runs:
            by_dataset.setdefault(r.path.split("/")[1], []).append(r)
        group = max(by_dataset.values(), key=len) if by_dataset else []
        if group:
            valid = np.logical_and.reduce([r.valid_mask() for r in group])
            for r in group:
                embeddings[r.model_spec] = r.image_embeddings()[valid]
                labels[r.model_spec] = list(r.meta()["label_name"].astype(str).to_numpy()[valid])
    cka, mknn = similarity_matrices(embeddings, k) if len(embeddings) > 1 else (pd.DataFrame(), pd.DataFrame())
    prototypes = {r.model_spec: _text_prototypes(r) for r in (group if embeddings else []) if r.has_text}
    text_cka = similarity_matrices(prototypes, k=0)[0] if len(prototypes) > 1 else pd.DataFrame()
    result = CompareResult(side, pairs, cka, mknn, text_cka=text_cka)
    if report is not None:
        out = Path(report)
        figdir = out.with_name(out.stem + "_figures")
        figdir.mkdir(parents=True, exist_ok=True)
        figs = [
            rep.perception_vs_alignment(table, figdir / "zs_vs_lp.png"),
            rep.heatmap(table, figdir / "heatmap.png"),
            rep.matrix_plot(cka, "linear CKA of image embeddings", figdir / "cka.png"),
            rep.matrix_plot(mknn, f"mutual kNN (k={k}) of image embeddings", figdir / "mutual_knn.png"),
            rep.matrix_plot(text_cka, "linear CKA of class-prompt text prototypes", figdir / "text_cka.png"),
            rep.alpha_curve(table, figdir / "alpha_curve.png"),
        ]
        for i, (m, x) in enumerate(embeddings.items()):
            figs.append(rep.embedding_map(x, labels[m], m, figdir / f"map_{i}.png"))
        result.figures = [f for f in figs if f is not None]
        sections: list = [("Perception vs. alignment", figdir / "zs_vs_lp.png")]
        sections += [
            (title, p)
            for title, p in (
                ("Models x tasks", figdir / "heatmap.png"),
                ("Representation similarity: CKA", figdir / "cka.png"),
                ("Representation similarity: mutual kNN", figdir / "mutual_knn.png"),
                ("Text prototypes: CKA", figdir / "text_cka.png"),
                ("Weight interpolation: accuracy vs alpha", figdir / "alpha_curve.png"),
            )
            if p in result.figures
        ]
        sections += [(f"Image embeddings: {m}", figdir / f"map_{i}.png") for i, m in enumerate(embeddings)]
        sections += [
            ("Accuracy side by side (value, 95% CI)", side),
            ("Paired differences (bootstrap CI) and McNemar tests", pairs),
        ]
        if sections[0][1] not in result.figures:
            sections = sections[1:]
        result.report = rep.write_html(out, f"mubench_probe comparison: {source}", sections)
    return result


def search(store: str | Path = DEFAULT_STORE, model: str | None = None, **kw: Any) -> Any:
    """Top-k hits for a text, image or stored-row query (see `mubench_probe.queries.search_store`)."""
    from .queries import search_store

    return search_store(store, model, **kw)


def contact_sheet(store: str | Path, result: Any, path: str | Path) -> Path:
    """A PNG grid of the image hits of a search result, captioned with rank, score and label."""
    from .queries import hit_images, pick_run, run_policy
    from .report import contact_sheet as sheet

    hits = [h for h in result.hits if "row" in h]
    if not hits:
        raise StoreError("a contact sheet needs image hits (use --to image)")
    run = pick_run(EmbeddingStore(store), result.query["model"])
    images = hit_images(run, [h["row"] for h in hits])
    caps = [f"#{h['rank']} {h['score']:.3f}\n{h.get('label_name', '')}" for h in hits]
    return sheet(images, caps, Path(path), run_policy(run))


def interpolate(
    base: str,
    finetuned: str,
    alphas: Sequence[float],
    dataset: LoadedDataset | str = "sample",
    *,
    store: str | Path | EmbeddingStore = DEFAULT_STORE,
    preprocess: str | None = None,
    save_dir: str | Path | None = None,
    device: str | None = None,
    precision: str = "fp32",
    batch_size: int = 64,
    num_workers: int = 2,
    dtype: str = "float16",
    chunk_rows: int = 256,
    intensity: str = "percentile",
    templates: str | Path | Sequence[str] | None = None,
    overwrite: bool = False,
    progress: Callable[[str], ProgressFn | None] | None = None,
) -> list[ExtractReport]:
    """Extract `interp(base, finetuned, alpha)` for each alpha into the store (compatibility checked first).

    Holds the two source state dicts and one output model; `save_dir` also writes each alpha's
    weights as a checkpoint loadable with `ARCH:/path`.
    """
    from .encoders import device_for
    from .encoders.interpolate import Interpolator

    if not alphas:
        raise UsageError("give at least one alpha")
    ds, st, policy, tmpl = _extract_inputs(dataset, store, intensity, templates)
    interp = Interpolator(base, finetuned, device_for(device, precision), precision, preprocess)
    reports = []
    for alpha in alphas:
        encoder = interp.encoder(float(alpha))
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            interp.save(str(Path(save_dir) / f"interp_alpha{alpha:g}.pt"))
        reports.append(
            _extract_with(
                encoder,
                ds,
                st,
                policy,
                tmpl,
                chunk_rows=chunk_rows,
                dtype=dtype,
                features=False,
                overwrite=overwrite,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress(encoder.info.spec) if progress else None,
            )
        )
    return reports
