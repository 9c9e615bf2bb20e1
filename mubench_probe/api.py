"""The public Python API; the CLI is a thin layer over these functions.

Heavy libraries load where they are needed: torch when a model is loaded (extract, interpolate,
repair, a new search query), scikit-learn when evaluating, matplotlib for reports. Importing
this module, `probe info`, `probe verify`, `probe models` and every `--help` stay torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from .config import (
    DEFAULT_CLAIM_TIMEOUT,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_PROBE_SELECT,
    HEADS,
    PRESETS,
    EvalConfig,
    ExtractConfig,
    TaskSpec,
    read_task_file,
    read_templates,
)
from .datasets import FORMATS, MUBENCH_ID, DatasetFormat, LoadedDataset, load_dataset
from .encoders import BACKENDS, MUBENCH_MODELS, Backend
from .engines import Resources
from .errors import StoreError, UsageError
from .locations import store_exists
from .repair import RepairReport, extract_command
from .report import printable
from .results import ResultsDir
from .store import DEFAULT_STORE, EmbeddingStore, describe

if TYPE_CHECKING:
    from .comparison import CompareResult
    from .engines import Launch
    from .evaluation import EvaluationResult, Unit
    from .export import ExportReport
    from .extraction import ExtractReport, NotifyFn, ProgressFn

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_PROBE_SELECT",
    "DEFAULT_STORE",
    "HEADS",
    "MUBENCH_ID",
    "MUBENCH_MODELS",
    "PRESETS",
    "EvalConfig",
    "ExtractConfig",
    "RepairReport",
    "Resources",
    "TaskSpec",
    "compare",
    "default_results_dir",
    "evaluate",
    "export",
    "extract",
    "extract_command",
    "interpolate",
    "launch_extract",
    "list_backends",
    "list_dataset_formats",
    "list_open_clip_specs",
    "list_tasks",
    "mubench_table1",
    "open_dataset",
    "open_store",
    "printable",
    "read_task_file",
    "repair_store",
    "robustness_summary",
    "search",
    "store_info",
    "store_status",
    "summary",
    "verify_store",
]


def open_dataset(
    spec: str = MUBENCH_ID,
    split: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
    scene: str | None = None,
) -> LoadedDataset:
    """Resolve a dataset spec ('sample', Hub id, folder, CSV, parquet, save_to_disk folder,
    WebDataset shards, microscopy files); `scene` keeps one scene of multi-scene files."""
    return load_dataset(spec, split=split, revision=revision, limit=limit, scene=scene)


def open_store(path: str | Path = DEFAULT_STORE, create: bool = False) -> EmbeddingStore:
    return EmbeddingStore(path, create=create)


def _templates(templates: str | Path | Sequence[str] | None) -> tuple[str, ...]:
    """A templates file (None = the defaults) or the templates themselves."""
    if templates is None or isinstance(templates, str | Path):
        return read_templates(templates)
    return tuple(templates)


def default_results_dir(store: str | Path) -> Path:
    """Where `probe evaluate STORE` and `probe compare STORE` keep results: results/<store name>."""
    return Path("results") / Path(store).name.removesuffix(".zarr")


def _extract_inputs(
    dataset: LoadedDataset | str, store: str | Path | EmbeddingStore, **dataset_args: Any
) -> tuple[LoadedDataset, str | Path | EmbeddingStore]:
    """Everything extract and interpolate resolve the same way before loading a model.

    An existing store is opened now (a damaged one fails before the model loads); a new one is
    created only once a model has loaded (`_created`), so a failed load leaves nothing behind.
    """
    ds = open_dataset(dataset, **dataset_args) if isinstance(dataset, str) else dataset
    if not isinstance(store, EmbeddingStore) and store_exists(store):
        store = EmbeddingStore(store)
    return ds, store


def _created(store: str | Path | EmbeddingStore) -> EmbeddingStore:
    return store if isinstance(store, EmbeddingStore) else EmbeddingStore(store, create=True)


def _settings(config: ExtractConfig | None, settings: dict[str, Any]) -> ExtractConfig:
    cfg = config or ExtractConfig()
    return cfg.replace(**settings) if settings else cfg


def extract(
    model: str,
    dataset: LoadedDataset | str = "sample",
    *,
    store: str | Path | EmbeddingStore = DEFAULT_STORE,
    config: ExtractConfig | None = None,
    split: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
    scene: str | None = None,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
    **settings: Any,
) -> ExtractReport:
    """Embed `dataset` with `model` into the store; resumes (and repairs) a matching group.

    `config` (an ExtractConfig) holds every setting; keyword `settings` override its fields
    (e.g. `num_workers=0, dtype="float32"`); `split`, `revision`, `limit` and `scene` apply when
    `dataset` is a spec string. Several processes may run this on the same store and
    model at once: they split the chunks. `notify` receives one-line notices (e.g. waiting for
    chunks another writer holds).
    """
    from .encoders import load_encoder
    from .extraction import extract_into

    cfg = _settings(config, settings)
    ds, st = _extract_inputs(dataset, store, split=split, revision=revision, limit=limit, scene=scene)
    encoder = load_encoder(model, device=cfg.device, precision=cfg.precision)
    return extract_into(_created(st), encoder, ds, cfg, progress, notify)


def launch_extract(
    models: Sequence[str],
    dataset: str = "sample",
    *,
    store: str | Path = DEFAULT_STORE,
    config: ExtractConfig | None = None,
    launcher: str = "local",
    shards: int = 2,
    resources: Resources | None = None,
    address: str | None = None,
    log_dir: str | Path | None = None,
    cluster: str = "slurm",
    split: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
    scene: str | None = None,
    notify: NotifyFn | None = None,
    **settings: Any,
) -> Launch:
    """Extract with `shards` processes (`launcher`: local, slurm, ray), each filling its chunks of one store.

    The dataset is given as a spec string: every shard opens it itself, wherever it runs. The
    local and Ray launchers wait for every shard; Slurm returns once the job array is submitted
    (`Launch.job_ids`; `Launch.wait()` blocks). See `mubench_probe.launch`.
    """
    from .launch import launch_extract, shard_jobs

    jobs = shard_jobs(models, dataset, store, _settings(config, settings), shards, split, revision, limit, scene)
    return launch_extract(jobs, launcher, resources, address=address, log_dir=log_dir, cluster=cluster, notify=notify)


def shard_rows(n_rows: int, chunk_rows: int, shard: tuple[int, int] | None) -> int:
    """Rows a shard computes (chunk ci belongs to shard ci mod N), for progress bars."""
    from .extraction import shard_rows

    return shard_rows(n_rows, chunk_rows, shard)


def store_status(path: str | Path = DEFAULT_STORE, shards: int | None = None) -> dict[str, Any]:
    """Progress of every run: chunks done / total, per shard, live and stale claims (cheap: no checksums)."""
    from .store import run_status

    st = EmbeddingStore(path)
    return {"store": str(st.path), "runs": [run_status(node, shards) for node in st.scan()]}


def verify_store(path: str | Path = DEFAULT_STORE) -> list[str]:
    """One line per problem in the whole store: damaged or missing chunks, damaged zarr.json,
    edited provenance or texts, half-created runs (empty list = intact). Reads every chunk."""
    return [str(d) for d in EmbeddingStore(path).check(deep=True)]


def store_info(path: str | Path = DEFAULT_STORE, verify: bool = False) -> dict[str, Any]:
    st = EmbeddingStore(path)
    info: dict[str, Any] = {
        "store": str(st.path),
        "size_bytes": st.size_bytes(),
        "runs": [describe(r) for r in st.scan()],
    }
    if verify:
        info["problems"] = [str(d) for d in st.check(deep=True)]
    return info


def repair_store(
    path: str | Path = DEFAULT_STORE,
    *,
    config: ExtractConfig | None = None,
    progress: Callable[[str, int], ProgressFn | None] | None = None,
    notify: NotifyFn | None = None,
    **settings: Any,
) -> RepairReport:
    """Repair every damaged run from its own provenance (`probe verify --repair`).

    Half-created runs are removed and damaged intermediate zarr.json files rewritten without a
    model. Each damaged run's model and dataset are reloaded from its provenance and the same
    extraction a rerun of `probe extract` would do fixes it: damaged or missing chunks get their
    done flag cleared and are recomputed, texts re-encoded, metadata rewritten. Where the model
    or dataset cannot be reloaded here, `commands` says which `probe extract` to run. Only the
    forward-pass settings of `config` (device, precision, batch size, workers) are used; what
    the run stores comes from its provenance: from its copy in done/zarr.json where the group's
    was edited and only the copy fits the stored arrays (`EmbeddingStore.repair_record`). A
    repair killed midway is resumed by the next one (the chunks it cleared stay reported).
    """
    from .repair import repair_store as repair

    return repair(path, _settings(config, settings), progress=progress, notify=notify)


def export(
    store: str | Path, to: str, out: str | Path, *, model: str | None = None, dataset: str | None = None
) -> ExportReport:
    """Write one complete run to `out` as anndata (.h5ad), npy (clip-retrieval's layout) or parquet.
    A damaged or unfinished run is refused before anything is written."""
    from .export import export_run

    return export_run(store, to, out, model=model, dataset=dataset)


def list_backends() -> list[Backend]:
    return list(BACKENDS)


def list_open_clip_specs() -> list[str]:
    from .encoders.openclip import list_specs

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
    launcher: str | None = None,
    resources: Resources | None = None,
    address: str | None = None,
    log_dir: str | Path | None = None,
    cluster: str = "slurm",
) -> EvaluationResult:
    """Score every head on every task from the store alone (never loads a model or an image).

    `jobs` > 1 evaluates units in that many processes; `launcher` "ray" or "slurm" spreads them
    over a cluster (`resources`, `address`, `log_dir`, `cluster` as for `launch_extract`)."""
    from .evaluation import evaluate_store

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
        launcher=launcher,
        launch={"resources": resources, "address": address, "log_dir": log_dir, "cluster": cluster},
    )


def list_tasks(
    store: str | Path | EmbeddingStore = DEFAULT_STORE,
    config: EvalConfig | None = None,
    *,
    models: Sequence[str] | None = None,
) -> pd.DataFrame:
    """The tasks `evaluate` would score in this store (the config's user tasks, or the built-in ones):
    name, label column, rows, classes, grouping, batch column and its values, protocol."""
    from .evaluation import task_table

    st = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    return task_table(st, config or EvalConfig(), models)


def _results_and_store(
    source: str | Path, models: Sequence[str] | None
) -> tuple[pd.DataFrame, pd.DataFrame, str | Path]:
    """A store (evaluated into results/<name>, cached) or a results folder (whose run.json names its store)."""
    if store_exists(source):
        res = evaluate(source, models=models, results_dir=default_results_dir(source))
        return res.table, res.predictions, source
    src = Path(source)
    if (src / "zarr.json").exists():
        res = evaluate(src, models=models, results_dir=default_results_dir(src))
        return res.table, res.predictions, src
    if (src / "manifest.json").exists() or (src / "results.parquet").exists():
        table, preds = ResultsDir(src).load()
        record = json.loads((src / "run.json").read_text()) if (src / "run.json").exists() else {}
        return table, preds, Path(record.get("store", ""))
    raise StoreError(f"{src} is neither a store nor a results folder (no zarr.json, manifest.json or results.parquet)")


def compare(
    source: str | Path,
    models: Sequence[str] | None = None,
    *,
    report: str | Path | None = None,
    k: int = 10,
    n_boot: int = 1000,
    color_by: Sequence[str] = ("label_name",),
) -> CompareResult:
    """Models side by side with CIs, paired tests, CKA / mutual-kNN, and optionally an HTML report.

    The embedding maps of the report are coloured by each column of `color_by` (label_name,
    dataset, modality, stain, ...): clusters by source dataset are often what there is to see.
    """
    from . import report as rep
    from .comparison import compare_models

    table, preds, store_path = _results_and_store(source, models)
    if models:
        table, preds = table[table["model"].isin(models)], preds[preds["model"].isin(models)]
    runs = []
    if str(store_path) and store_exists(store_path):
        runs = [r for r in EmbeddingStore(store_path).runs() if not models or r.model_spec in models]
    result, embeddings, meta = compare_models(table, preds, runs, k=k, n_boot=n_boot, color_by=color_by)
    if report is not None:
        result.report, result.figures = rep.build_report(
            Path(report), f"mubench_probe comparison: {source}", table, result, embeddings, meta, color_by, k
        )
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
    config: ExtractConfig | None = None,
    split: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
    scene: str | None = None,
    preprocess: str | None = None,
    save_dir: str | Path | None = None,
    progress: Callable[[str, int], ProgressFn | None] | None = None,
    notify: NotifyFn | None = None,
    **settings: Any,
) -> list[ExtractReport]:
    """Extract `interp(base, finetuned, alpha)` for each alpha into the store.

    Compatibility is checked before any other work: both models are loaded and compared first,
    then the dataset is opened and the store created. Holds the two source state dicts and one
    output model; `save_dir` also writes each alpha's weights as a checkpoint loadable with
    `ARCH:/path`. `config` / `settings` as for `extract` (pre-projection features are not stored).
    """
    from .encoders import device_for
    from .encoders.interpolate import Interpolator
    from .extraction import extract_into

    if not alphas:
        raise UsageError("give at least one alpha")
    cfg = _settings(config, settings)
    interp = Interpolator(base, finetuned, device_for(cfg.device, cfg.precision), cfg.precision, preprocess)
    ds, st = _extract_inputs(dataset, store, split=split, revision=revision, limit=limit, scene=scene)
    st = _created(st)
    reports = []
    for alpha in alphas:
        encoder = interp.encoder(float(alpha))
        if save_dir is not None:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            interp.save(str(Path(save_dir) / f"interp_alpha{alpha:g}.pt"))
        bar = progress(encoder.info.spec, len(ds)) if progress else None
        reports.append(extract_into(st, encoder, ds, cfg.replace(features=False), bar, notify))
    return reports


def mubench_table1(table: pd.DataFrame) -> pd.DataFrame:
    """Pooled μ-Bench caption accuracy per model, in the layout of the paper's Table 1."""
    from .summaries import mubench_table1 as table1

    return table1(table)


def robustness_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model, how much of its perception (linear probe) and of its alignment (zero-shot) survives
    the perturbations every model was extracted with (empty without perturbed runs)."""
    from .robustness import summary as by_model

    return by_model(table)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per model x task: ZS, LP, kNN@10, prototype and the LP - ZS gap (value and CI)."""
    from .summaries import summary as summ

    return summ(table)
