"""The `probe` command line: parses arguments, calls the public API, prints, exits.

Nothing below this layer prints or exits; every ProbeError becomes one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from . import api
from .errors import ProbeError, StoreDamageError, UsageError
from .launch import Resources

app = typer.Typer(
    help="mubench_probe: extract embeddings of microscopy images once, evaluate everything.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
StoreOpt = Annotated[str, typer.Option("--store", "-s", help="Zarr store: a directory or an fsspec URL (s3://...).")]


def friendly(fn: F) -> F:
    """Turn package errors and Ctrl-C into one-line messages with meaningful exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ProbeError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted: finished chunks are saved; rerun the same command to resume")
            raise typer.Exit(130) from None
        except OSError as exc:  # unwritable store, full disk, missing file: the user's environment
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} img/s" if speed else "– img/s", style="cyan")


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


DatasetOpt = Annotated[
    str, typer.Option("--dataset", "-d", help="'sample', Hub id, folder, CSV, parquet/arrow or save_to_disk folder.")
]
SplitOpt = Annotated[str | None, typer.Option(help="Dataset split (μ-Bench: test).")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (μ-Bench is pinned).")]
LimitOpt = Annotated[int | None, typer.Option(help="Only the first N rows.", min=1)]
# ExtractConfig's fields, shared by `extract` and `interpolate` (and in part `verify --repair`)
BatchOpt = Annotated[int, typer.Option(help="Images per forward pass.", min=1)]
WorkersOpt = Annotated[int, typer.Option(help="DataLoader worker processes (0 = in process).", min=0)]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps.")]
PrecisionOpt = Annotated[str, typer.Option(help="fp32, fp16 (GPU) or bf16.")]
DtypeOpt = Annotated[str, typer.Option(help="Stored embedding dtype: float16 or float32.")]
ChunkRowsOpt = Annotated[int, typer.Option(help="Rows per stored chunk (the resume unit).", min=1)]
IntensityOpt = Annotated[str, typer.Option(help="Intensity policy: percentile, minmax, dtype.")]
TemplatesOpt = Annotated[Path | None, typer.Option(help="Prompt templates file, one per line with {}.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Discard a group extracted differently.")]
MaxPixelsOpt = Annotated[
    int, typer.Option(help="Larger images (width x height) are failed rows, checked before decoding.", min=1)
]
ClaimTimeoutOpt = Annotated[
    float, typer.Option(help="Seconds without heartbeat after which another host's chunk claim is taken over.", min=1)
]


ShardOpt = Annotated[
    str | None,
    typer.Option(
        help="Compute only shard I of N (I/N; chunk ci belongs to shard ci mod N), or auto (torchrun's "
        "RANK/WORLD_SIZE or a Slurm array's task id/count). N processes fill one store."
    ),
]
LauncherOpt = Annotated[
    str | None,
    typer.Option(help="Run --shards N shards: local (processes here), slurm (job array via submitit), ray."),
]
ShardsOpt = Annotated[int, typer.Option(help="Number of shards for --launcher.", min=1)]
PartitionOpt = Annotated[str | None, typer.Option(help="slurm: partition.")]
GpusOpt = Annotated[int, typer.Option(help="GPUs per shard (slurm gpus_per_node, ray num_gpus, local devices).", min=0)]
CpusOpt = Annotated[int | None, typer.Option(help="CPUs per shard (slurm cpus_per_task, ray num_cpus).", min=1)]
MemOpt = Annotated[str | None, typer.Option(help="slurm: memory per shard, e.g. 32G.")]
TimeOpt = Annotated[str | None, typer.Option(help="slurm: time limit per shard, minutes or [D-]HH:MM:SS.")]
ParallelOpt = Annotated[int | None, typer.Option(help="slurm: shards running at once.", min=1)]
AddressOpt = Annotated[str | None, typer.Option(help="ray: cluster address (auto = the running cluster).")]
LogDirOpt = Annotated[Path | None, typer.Option(help="slurm/local: folder for job logs [probe-jobs].")]
ClusterOpt = Annotated[
    str, typer.Option(help="slurm: submitit cluster; 'local' runs the same job array here, without Slurm.")
]


def _extract_config(**settings: Any) -> api.ExtractConfig:
    """The CLI's extraction options as one validated ExtractConfig (`workers` is `num_workers`)."""
    settings["num_workers"] = settings.pop("workers")
    templates = settings.pop("templates", None)
    if templates is not None:
        settings["templates"] = Path(templates)
    return api.ExtractConfig(**settings)


def _notify(line: str) -> None:
    err.print(f"note: {line}", highlight=False, soft_wrap=True)


@app.command()
@friendly
def extract(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model spec; repeat for several. Default: the μ-Bench contrastive models."),
    ] = None,
    dataset: DatasetOpt = api.MUBENCH_ID,
    split: SplitOpt = None,
    revision: RevisionOpt = None,
    limit: LimitOpt = None,
    store: StoreOpt = str(api.DEFAULT_STORE),
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    dtype: DtypeOpt = "float16",
    chunk_rows: ChunkRowsOpt = 256,
    features: Annotated[bool, typer.Option(help="Also store pre-projection features.")] = False,
    intensity: IntensityOpt = "percentile",
    templates: TemplatesOpt = None,
    overwrite: OverwriteOpt = False,
    max_pixels: MaxPixelsOpt = api.DEFAULT_MAX_PIXELS,
    claim_timeout: ClaimTimeoutOpt = api.DEFAULT_CLAIM_TIMEOUT,
    shard: ShardOpt = None,
    launcher: LauncherOpt = None,
    shards: ShardsOpt = 2,
    partition: PartitionOpt = None,
    gpus_per_shard: GpusOpt = 0,
    cpus_per_shard: CpusOpt = None,
    mem: MemOpt = None,
    time: TimeOpt = None,
    array_parallelism: ParallelOpt = None,
    address: AddressOpt = None,
    log_dir: LogDirOpt = None,
    submitit_cluster: ClusterOpt = "slurm",
) -> None:
    """Embed a dataset with one or more models into the store (resumable, repairs damage, and
    several processes on one store split the work; --shard / --launcher split it on purpose)."""
    cfg = _extract_config(
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        dtype=dtype,
        chunk_rows=chunk_rows,
        features=features,
        intensity=intensity,
        templates=templates,
        overwrite=overwrite,
        max_pixels=max_pixels,
        claim_timeout=claim_timeout,
        shard=shard,
    )
    models = model or list(api.MUBENCH_MODELS)
    if launcher is not None:
        if cfg.shard is not None:
            raise UsageError("--shard is for one shard; --launcher starts all --shards of them")
        _launch(
            models,
            dataset,
            store,
            cfg,
            launcher,
            shards,
            split,
            revision,
            limit,
            log_dir,
            address,
            submitit_cluster,
            partition,
            gpus_per_shard,
            cpus_per_shard,
            mem,
            time,
            array_parallelism,
        )
        return
    ds = api.open_dataset(dataset, split=split, revision=revision, limit=limit)
    total = len(ds) if cfg.shard is None else api.shard_rows(len(ds), cfg.chunk_rows, cfg.shard)
    where = "" if cfg.shard is None else f" (shard {cfg.shard[0]}/{cfg.shard[1]}: {total} rows)"
    err.print(f"dataset {ds.spec} ({ds.split}): {len(ds)} rows -> {store}{where}")
    for spec in models:
        with _progress() as bar:
            task = bar.add_task(spec, total=total)
            report = api.extract(
                spec, ds, store=store, config=cfg, progress=lambda n, t=task: bar.advance(t, n), notify=_notify
            )
        _print_report(report)


def _launch(models, dataset, store, cfg, launcher, shards, split, revision, limit, log_dir, address, cluster,
            partition, gpus, cpus, mem, time, parallelism) -> None:  # fmt: skip
    """--launcher: start the shards and say where they are (and wait where the launcher does)."""
    res = Resources(partition, gpus, cpus, mem, time, parallelism)
    err.print(f"{launcher}: {shards} shard(s) of {', '.join(models)} on {dataset} -> {store}", highlight=False)
    launched = api.launch_extract(
        models, dataset, store=store, config=cfg, launcher=launcher, shards=shards, resources=res, address=address,
        log_dir=log_dir, cluster=cluster, split=split, revision=revision, limit=limit, notify=_notify,
    )  # fmt: skip
    if launcher == "slurm":
        job = launched.job_ids[0].split("_")[0] if launched.job_ids else "?"
        out.print(f"submitted job array {job} ({shards} shards), logs in {launched.log_dir}", highlight=False)
        if cluster != "local":
            out.print(f"progress: probe status {store}", highlight=False)
            return
        launched.wait()  # submitit's local jobs end with this process: wait for them
    for shard_reports in launched.results or []:
        for r in shard_reports or []:
            out.print(
                f"shard {r['shard'][0]}/{r['shard'][1]} {r['model']}: {r['chunks_written']} chunks written, "
                f"{r['chunks_skipped']} already done, {r['chunks_by_others']} by another writer "
                f"({r['seconds']:.1f} s on {r['host']})",
                highlight=False,
            )
    out.print(f"done: probe status {store}", highlight=False)


def _print_report(report: Any) -> None:
    for line in report.repaired:
        err.print(f"[yellow]repaired:[/] {line}", highlight=False, soft_wrap=True)
    msg = (
        f"{report.model}: {report.chunks_written} chunks written, {report.chunks_skipped} already done, "
        f"{report.texts_encoded} texts encoded"
    )
    if report.chunks_by_others:
        msg += f", {report.chunks_by_others} written by another writer"
    if report.rows:
        msg += f", {report.images_per_second:.1f} img/s"
    out.print(msg, highlight=False)
    for row, reason in sorted(report.failures.items())[:10]:
        err.print(f"  skipped row {row}: {reason}", highlight=False, soft_wrap=True)
    if len(report.failures) > 10:
        err.print(f"  ... {len(report.failures)} unreadable rows in all (see `probe info`)")


def _fmt(cell: Any) -> str:
    if cell is None or (isinstance(cell, float) and cell != cell):
        return "–"
    value, lo, hi = cell
    if lo != lo:  # no CI (NaN)
        return f"{value:.3f}"

    def short(v: float) -> str:  # 0.29 -> .29, -0.05 -> -.05: keeps CIs readable in 80 columns
        return f"{v:.2f}".replace("0.", ".", 1)

    return f"{value:.3f}\n{short(lo)}–{short(hi)}"


@app.command()
@friendly
def evaluate(
    store: Annotated[str, typer.Argument(help="Zarr store: a directory or an fsspec URL (s3://...).")] = str(
        api.DEFAULT_STORE
    ),
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these models.")] = None,
    task: Annotated[
        list[str] | None,
        typer.Option("--task", "-t", help="Only tasks matching (e.g. 'fine/*', 'coarse/modality', 'mubench')."),
    ] = None,
    head: Annotated[list[str] | None, typer.Option("--head", help="Heads: " + ", ".join(api.HEADS))] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", "-o", help="Results folder (default: results/<store name>).")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="A named configuration: mubench-table1 (μ-Bench Table 1; see the README). Options given "
            "explicitly override it."
        ),
    ] = None,
    folds: Annotated[int, typer.Option(help="k for stratified k-fold.", min=2)] = 5,
    seed: Annotated[int, typer.Option(help="Seed for folds, few-shot draws and bootstrap.")] = 0,
    protocol: Annotated[
        str,
        typer.Option(help="kfold; split (the dataset's split column); transfer (--train-where / --test-where)."),
    ] = "kfold",
    train_where: Annotated[
        list[str] | None,
        typer.Option(
            help="transfer: training rows, COLUMN=VALUE (repeatable; values of one column are "
            "alternatives, columns must all match)."
        ),
    ] = None,
    test_where: Annotated[
        list[str] | None, typer.Option(help="transfer: test rows, COLUMN=VALUE (repeatable).")
    ] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap resamples for CIs (0 = none) [1000].", min=0)] = None,
    ci_method: Annotated[str | None, typer.Option(help="Bootstrap interval: percentile or basic [percentile].")] = None,
    shots: Annotated[str, typer.Option(help="Few-shot k per class, comma-separated.")] = "1,2,4,8,16",
    fewshot_seeds: Annotated[int, typer.Option(help="Few-shot draws per k.", min=1)] = 5,
    knn_k: Annotated[str, typer.Option("--knn-k", help="k values for kNN, comma-separated.")] = "1,5,10,20",
    probe_cs: Annotated[
        str | None, typer.Option(help="The linear probe's C grid, comma-separated [13 values, 1e-2 to 1e4].")
    ] = None,
    templates: Annotated[Path | None, typer.Option(help="Prompt templates file (must be extracted).")] = None,
    caption_templates: Annotated[str | None, typer.Option(help="μ-Bench captions: both, 0 or 1 [both].")] = None,
    fine_templates: Annotated[
        str | None, typer.Option(help="μ-Bench fine-grained captions only: both, 0 or 1.")
    ] = None,
    coarse_templates: Annotated[str | None, typer.Option(help="μ-Bench coarse captions only: both, 0 or 1.")] = None,
    pooling: Annotated[str | None, typer.Option(help="μ-Bench coarse/fine pooling: micro or macro [micro].")] = None,
    exclude_dataset: Annotated[
        list[str] | None, typer.Option(help="Source datasets to leave out of the μ-Bench caption scores.")
    ] = None,
    fine_exclude_dataset: Annotated[
        list[str] | None, typer.Option(help="... of the fine-grained caption scores only.")
    ] = None,
    coarse_exclude_dataset: Annotated[
        list[str] | None, typer.Option(help="... of the coarse caption scores only.")
    ] = None,
    jobs: Annotated[int, typer.Option(help="Units evaluated in parallel, in separate processes.", min=1)] = 1,
    force: Annotated[bool, typer.Option(help="Recompute units already in the results.")] = False,
    knn_index: Annotated[
        str,
        typer.Option(
            help="FAISS factory[:params] proposing kNN candidates (re-scored exactly), e.g. IVF4096,Flat:nprobe=32 "
            "or HNSW32; recall@10 vs exact search is reported. Flat = exact."
        ),
    ] = "Flat",
    probe_backend: Annotated[
        str, typer.Option(help="Linear-probe solver: auto (torch on a GPU), sklearn, torch (same objective).")
    ] = "auto",
    device: Annotated[str, typer.Option(help="Device for the torch probe and FAISS: auto, cpu, cuda.")] = "auto",
    launcher: Annotated[
        str | None, typer.Option(help="Spread units over a cluster: ray (tasks) or slurm (job array via submitit).")
    ] = None,
    gpus_per_job: Annotated[int, typer.Option(help="ray/slurm: GPUs per unit.", min=0)] = 0,
    cpus_per_job: Annotated[int | None, typer.Option(help="ray/slurm: CPUs per unit.", min=1)] = None,
    partition: PartitionOpt = None,
    mem: MemOpt = None,
    time: TimeOpt = None,
    array_parallelism: ParallelOpt = None,
    address: AddressOpt = None,
    log_dir: LogDirOpt = None,
    submitit_cluster: ClusterOpt = "slurm",
) -> None:
    """Score zero-shot, linear-probe, kNN and prototype heads from the store alone."""
    given = {
        "heads": tuple(head) if head else None,
        "n_boot": bootstrap,
        "ci_method": ci_method,
        "cs": _numbers(probe_cs, "--probe-cs") if probe_cs else None,
        "caption_templates": caption_templates,
        "fine_templates": fine_templates,
        "coarse_templates": coarse_templates,
        "pooling": pooling,
        "exclude_datasets": tuple(exclude_dataset) if exclude_dataset else None,
        "fine_exclude_datasets": tuple(fine_exclude_dataset) if fine_exclude_dataset else None,
        "coarse_exclude_datasets": tuple(coarse_exclude_dataset) if coarse_exclude_dataset else None,
    }
    fixed = {
        "folds": folds,
        "seed": seed,
        "protocol": protocol,
        "train_where": tuple(train_where or ()),
        "test_where": tuple(test_where or ()),
        "shots": _ints(shots, "--shots"),
        "fewshot_seeds": fewshot_seeds,
        "ks": _ints(knn_k, "--knn-k"),
        "knn_index": knn_index,
        "probe_backend": probe_backend,
        "device": device,
    }
    overrides = {**fixed, **{k: v for k, v in given.items() if v is not None}}
    cfg = api.EvalConfig.preset(preset, **overrides) if preset else api.EvalConfig(**overrides)
    results = out_dir or api.default_results_dir(store)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err
    ) as bar:
        units = bar.add_task("evaluate", total=None)

        def tick(unit: Any, done: int, total: int) -> None:
            bar.update(units, completed=done, total=total, description=f"{unit.run.model_spec} {unit.task_name}")

        res = api.evaluate(
            store,
            cfg,
            models=model,
            tasks=task,
            templates=templates,
            results_dir=results,
            force=force,
            jobs=jobs,
            progress=tick,
            launcher=launcher,
            resources=Resources(partition, gpus_per_job, cpus_per_job, mem, time, array_parallelism),
            address=address,
            log_dir=log_dir,
            cluster=submitit_cluster,
        )
    summ = api.summary(res.table)
    for model_name, rows in summ.groupby("model", sort=True) if len(summ) else []:
        retrieval = rows["task"].str.startswith("retrieval/")
        for part, title in ((rows[~retrieval], "value, 95% CI"), (rows[retrieval], "retrieval")):
            cols = [c for c in part.columns if c not in ("model", "task") and part[c].notna().any()]
            if part.empty or not cols:
                continue
            table = Table(title=f"{model_name}  ({title})", title_justify="left")
            table.add_column("task", no_wrap=True)
            for c in cols:
                table.add_column(c, justify="right")
            for _, r in part.iterrows():
                table.add_row(r["task"], *[_fmt(r[c]) for c in cols])
            out.print(table)
    _table1(res.table)
    for note in sorted(set(res.notes)):
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    out.print(
        f"{res.computed} units computed, {res.skipped} already in {results}; "
        f"results.parquet, results.csv, predictions.parquet, run.json",
        highlight=False,
        soft_wrap=True,
    )


def _table1(table: Any) -> None:
    """μ-Bench Table 1 layout: pooled coarse / fine caption accuracy in percent ± CI half-width."""
    rows = api.mubench_table1(table)
    if rows.empty:
        return
    t = Table(title="μ-Bench zero-shot (% ± CI half-width)", title_justify="left")
    for c in ("model", "coarse", "fine"):
        t.add_column(c, justify="left" if c == "model" else "right", no_wrap=True)
    for _, r in rows.iterrows():
        cells = [f"{100 * r[g]:.2f} ± {100 * r[g + '_ci']:.2f}" if r[g] == r[g] else "–" for g in ("coarse", "fine")]
        t.add_row(str(r["model"]), *cells)
    out.print(t)


def _numbers(text: str, option: str = "the option") -> tuple[float, ...]:
    """Comma-separated numbers; anything else is a usage error (exit 2)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values:
        raise UsageError(f"{option} takes comma-separated numbers, not {text!r}")
    return values


def _ints(text: str, option: str = "the option") -> tuple[int, ...]:
    """Comma-separated positive integers; anything else is a usage error (exit 2)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes comma-separated positive integers, not {text!r}")
    return values


@app.command()
@friendly
def interpolate(
    base: Annotated[str, typer.Option(help="Pre-trained model spec (e.g. ViT-B-32:openai).")],
    finetuned: Annotated[str, typer.Option(help="Fine-tuned model spec of the same architecture.")],
    alphas: Annotated[
        str, typer.Option(help="Comma-separated alphas; weights = (1-a)*base + a*finetuned.")
    ] = "0,0.25,0.5,0.75,1",
    dataset: DatasetOpt = api.MUBENCH_ID,
    split: SplitOpt = None,
    revision: RevisionOpt = None,
    limit: LimitOpt = None,
    store: StoreOpt = str(api.DEFAULT_STORE),
    preprocess: Annotated[
        str | None, typer.Option(help="Whose preprocessing if they differ: base or finetuned.")
    ] = None,
    save_dir: Annotated[Path | None, typer.Option(help="Also save each alpha's weights here (ARCH:/path).")] = None,
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = 2,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    dtype: DtypeOpt = "float16",
    chunk_rows: ChunkRowsOpt = 256,
    intensity: IntensityOpt = "percentile",
    templates: TemplatesOpt = None,
    overwrite: OverwriteOpt = False,
    max_pixels: MaxPixelsOpt = api.DEFAULT_MAX_PIXELS,
    claim_timeout: ClaimTimeoutOpt = api.DEFAULT_CLAIM_TIMEOUT,
) -> None:
    """Extract weight interpolations between a base and a fine-tuned model, one model per alpha."""
    values = _numbers(alphas, "--alphas")
    cfg = _extract_config(
        batch_size=batch_size,
        workers=workers,
        device=device,
        precision=precision,
        dtype=dtype,
        chunk_rows=chunk_rows,
        intensity=intensity,
        templates=templates,
        overwrite=overwrite,
        max_pixels=max_pixels,
        claim_timeout=claim_timeout,
    )
    for a in values:
        if not 0 <= a <= 1:
            err.print(f"[yellow]warning:[/] alpha={a:g} is outside [0, 1]: extrapolating", highlight=False)
    bars = _progress()
    with bars, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)

        def bar_for(spec: str, total: int):
            t = bars.add_task(spec, total=total)
            return lambda n: bars.advance(t, n)

        reports = api.interpolate(
            base,
            finetuned,
            values,
            dataset,
            store=store,
            config=cfg,
            split=split,
            revision=revision,
            limit=limit,
            preprocess=preprocess,
            save_dir=save_dir,
            progress=bar_for,
            notify=_notify,
        )
    for r in reports:
        _print_report(r)
    out.print(f"next: probe evaluate {store} && probe compare {store} --report report.html", highlight=False)


@app.command()
@friendly
def info(
    store: Annotated[str, typer.Argument(help="Zarr store: a directory or an fsspec URL (s3://...).")] = str(
        api.DEFAULT_STORE
    ),
    verify: Annotated[bool, typer.Option(help="Read every chunk and check its checksum.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Models, datasets, rows, completeness, provenance and size of a store."""
    summary = api.store_info(store, verify=verify)
    if as_json:
        out.print_json(json.dumps(summary, default=str))
    else:
        table = Table(title=f"{store}  ({summary['size_bytes'] / 1e6:.1f} MB)")
        for col in ("model", "dataset", "split", "rows", "chunks", "texts", "failed", "status", "MB"):
            table.add_column(col, overflow="fold")
        for r in summary["runs"]:
            table.add_row(
                str(r["model"] or r["group"]),
                str(r["dataset"]),
                r["split"],
                str(r["rows"]),
                r["chunks_done"],
                str(r["texts"]),
                str(r["failed_rows"]),
                r["status"],
                f"{r['size_bytes'] / 1e6:.2f}",
            )
        out.print(table)
        for r in summary["runs"]:
            p = r["provenance"]
            out.print(
                f"[bold]{r['group']}[/]: weights {str(p.get('weights_hash'))[:12]}, "
                f"dataset {p.get('dataset_id')}@{p.get('dataset_revision')} "
                f"fp {p.get('dataset_fingerprint')}, {p.get('dtype')}, created {p.get('created')}",
                highlight=False,
                soft_wrap=True,
            )
            out.print(f"  model: {p.get('model_spec')}", highlight=False, soft_wrap=True)
            out.print(f"  intensity: {p.get('intensity_policy')}", highlight=False, soft_wrap=True)
    if verify:
        _report_problems(summary["problems"], store)
    damaged = [r for r in summary["runs"] if r["status"] == "damaged"]
    for line in (line for r in damaged for line in r["problems"]):
        err.print(f"[red]damaged:[/] {line}", highlight=False, soft_wrap=True)
    if damaged:
        raise StoreDamageError(f"{len(damaged)} damaged run(s) in {store}; repair with `probe verify --repair {store}`")


def _report_problems(problems: list[str], store: str) -> None:
    """One line per problem, then a non-zero exit naming the repair command."""
    for line in problems:
        err.print(f"[red]damaged:[/] {line}", highlight=False, soft_wrap=True)
    if problems:
        raise StoreDamageError(
            f"{len(problems)} problem(s) in {store}; repair with `probe verify --repair {store}` "
            "(reloads each damaged run's model and dataset from its provenance)"
        )
    err.print(
        "verify: intact (every chunk present, every chunk matches its checksum, provenance and texts "
        "match their digests)",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
@friendly
def status(
    store: Annotated[str, typer.Argument(help="Zarr store (directory or fsspec URL).")] = str(api.DEFAULT_STORE),
    shards: Annotated[int | None, typer.Option(help="Show progress per shard for N shards [as recorded].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Progress of every run: chunks done / total, per shard, live and stale claims (cheap, no checksums)."""
    st = api.store_status(store, shards)
    if as_json:
        out.print_json(json.dumps(st, default=str))
        return
    table = Table(title=f"{store}", title_justify="left")
    for col in ("run", "status", "chunks", "shards", "claims"):
        table.add_column(col, overflow="fold")
    for r in st["runs"]:
        live = sum(1 for c in r["claims"] if c["live"])
        stale = len(r["claims"]) - live
        per = "  ".join(f"{s['shard']}: {s['done']}/{s['total']}" for s in r["per_shard"]) or "–"
        chunks = "?" if r["chunks_total"] is None else f"{r['chunks_done']}/{r['chunks_total']}"
        table.add_row(r["group"], r["status"], chunks, per, f"{live} live, {stale} stale")
    out.print(table)
    for r in st["runs"]:
        for c in r["claims"]:
            state = "live" if c["live"] else "stale (taken over by the next writer)"
            out.print(
                f"  {r['group']}: {c['key']} held by pid {c['pid']} on {c['host']}, heartbeat {c['age_s']:.0f} s "
                f"ago: {state}",
                highlight=False,
                soft_wrap=True,
            )


@app.command()
@friendly
def search(
    store: Annotated[str, typer.Argument(help="Zarr store: a directory or an fsspec URL (s3://...).")] = str(
        api.DEFAULT_STORE
    ),
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model spec in the store.")] = None,
    text: Annotated[str | None, typer.Option(help="Text query (text->image).")] = None,
    image: Annotated[Path | None, typer.Option(help="Image file query (image->image).")] = None,
    row: Annotated[int | None, typer.Option(help="A stored row as the query.")] = None,
    to: Annotated[str, typer.Option(help="Search images, or texts (image->text over captions/prompts).")] = "image",
    k: Annotated[int, typer.Option("-k", help="Hits to return.", min=1)] = 10,
    where: Annotated[list[str] | None, typer.Option(help="Filter the gallery: COLUMN=VALUE (repeatable).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset key, if the model has several.")] = None,
    index: Annotated[str, typer.Option(help="FAISS factory string, e.g. Flat, HNSW32,Flat, IVF256,Flat.")] = "Flat",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    sheet: Annotated[Path | None, typer.Option(help="Write a contact sheet PNG of the image hits.")] = None,
    device: Annotated[str, typer.Option(help="Device for encoding a new query.")] = "auto",
) -> None:
    """Query the store: text->image, image->image, image->text."""
    res = api.search(
        store,
        model,
        text=text,
        image=image,
        row=row,
        to=to,
        k=k,
        where=where,
        dataset=dataset,
        index=index,
        device=device,
    )
    if as_json:
        out.print_json(json.dumps({"query": res.query, "index": res.index, "hits": res.hits}, default=str))
    else:
        table = Table(title=f"{res.query}", title_justify="left")
        cols = list(res.hits[0]) if res.hits else ["rank"]
        for c in cols:
            table.add_column(c, overflow="fold")
        for h in res.hits:
            table.add_row(*[f"{h[c]:.4f}" if isinstance(h[c], float) else str(h[c]) for c in cols])
        out.print(table)
        if res.index.get("recall_at_10") is not None:
            out.print(
                f"index {res.index['factory']}: recall@10 vs exact search = {res.index['recall_at_10']:.3f} "
                f"({res.index['recall_queries']} sampled queries)",
                highlight=False,
            )
    if sheet is not None:
        path = api.contact_sheet(store, res, sheet)
        err.print(f"contact sheet: {path}")


@app.command()
@friendly
def compare(
    source: Annotated[
        str, typer.Argument(help="A store (folder or URL; evaluated first, cached) or a results folder.")
    ],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these models.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report here.")] = None,
    k: Annotated[int, typer.Option("-k", help="k for mutual-kNN alignment.", min=1)] = 10,
) -> None:
    """Models side by side: accuracies with CIs, paired tests, CKA, and an HTML report."""
    res = api.compare(source, model, report=report, k=k)
    side = res.side_by_side
    if not side.empty:
        table = Table(title="accuracy (value, 95% CI)", title_justify="left")
        models = sorted({m for m, _ in side.columns})
        for c in ("task", "head", *models):
            table.add_column(c, overflow="fold")
        for (task, head), r in side.iterrows():
            cells = []
            for m in models:
                v = r.get((m, "value"))
                cells.append(
                    _fmt((v, r.get((m, "ci_low")), r.get((m, "ci_high")))) if v == v and v is not None else "–"
                )
            table.add_row(task, head, *cells)
        out.print(table)
    if not res.pairwise.empty:
        t = Table(title="paired differences (a - b) and McNemar", title_justify="left")
        for c in ("task", "head", "a", "b", "a - b", "p"):
            t.add_column(c, overflow="fold")
        for _, r in res.pairwise.iterrows():
            t.add_row(
                r["task"],
                r["head"],
                r["model_a"],
                r["model_b"],
                _fmt((r["difference"], r["ci_low"], r["ci_high"])),
                f"{r['p_mcnemar']:.3g}",
            )
        out.print(t)
    if not res.cka.empty:
        out.print("linear CKA (image embeddings):")
        out.print(res.cka.round(3).to_string(), highlight=False)
        out.print(f"mutual kNN (k={k}):")
        out.print(res.mutual_knn.round(3).to_string(), highlight=False)
    if not res.text_cka.empty:
        out.print("linear CKA (class-prompt text prototypes):")
        out.print(res.text_cka.round(3).to_string(), highlight=False)
    if res.report:
        out.print(f"report: {res.report} ({len(res.figures)} figures)", highlight=False)


@app.command()
@friendly
def verify(
    store: Annotated[str, typer.Argument(help="Zarr store: a directory or an fsspec URL (s3://...).")] = str(
        api.DEFAULT_STORE
    ),
    repair: Annotated[
        bool, typer.Option(help="Repair what is damaged: reloads each damaged run's model and dataset.")
    ] = False,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = 2,
    batch_size: BatchOpt = 64,
) -> None:
    """Check every chunk (present, checksum) and every digest; `--repair` fixes what it finds."""
    if not repair:
        _report_problems(api.verify_store(store), store)
        return
    bars = _progress()
    with bars:

        def bar_for(spec: str, total: int):
            t = bars.add_task(f"repair {spec}", total=total)
            return lambda n: bars.advance(t, n)

        res = api.repair_store(
            store, device=device, num_workers=workers, batch_size=batch_size, progress=bar_for, notify=_notify
        )
    for line in res.repaired:
        err.print(f"[yellow]repaired:[/] {line}", highlight=False, soft_wrap=True)
    for line in res.commands:
        err.print(f"[red]not repaired:[/] {line}", highlight=False, soft_wrap=True)
    if res.remaining or res.commands:
        for line in res.remaining:
            err.print(f"[red]damaged:[/] {line}", highlight=False, soft_wrap=True)
        raise StoreDamageError(f"{len(res.remaining)} problem(s) remain in {store} (see above)")
    out.print(f"verify --repair: {len(res.repaired)} problem(s) repaired; {store} is intact", highlight=False)


@app.command()
@friendly
def models(
    all_tags: Annotated[bool, typer.Option("--all", help="List every open_clip tag.")] = False,
) -> None:
    """Model spec forms each backend takes, with examples."""
    for b in api.list_backends():
        out.print(f"[bold]{b.name}[/]: {b.help}", highlight=False)
        for ex in b.examples:
            out.print(f"  {ex}", highlight=False)
    if all_tags:
        for spec in api.list_open_clip_specs():
            out.print(spec, highlight=False)


@app.command()
@friendly
def datasets() -> None:
    """Dataset spec forms, in the order they are tried."""
    for f in api.list_dataset_formats():
        out.print(f"[bold]{f.name}[/]: {f.help}", highlight=False)


def main() -> None:
    logging.getLogger().setLevel(logging.ERROR)
    app(prog_name="probe")


if __name__ == "__main__":
    sys.exit(main())
