"""The `probe` command line: parses arguments, calls the public API, prints, exits.

Nothing below this layer prints or exits; every ProbeError becomes one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
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
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from . import api
from .errors import NothingToEvaluateError, ProbeError, StoreDamageError, UsageError
from .launch import Resources
from .report import printable

app = typer.Typer(
    help="mubench_probe: extract embeddings of microscopy images once, evaluate everything.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(emoji=False)
err = Console(stderr=True, emoji=False)
F = TypeVar("F", bound=Callable[..., Any])
StoreOpt = Annotated[str, typer.Option("--store", "-s", help="Zarr store: a directory or an fsspec URL (s3://...).")]


def _safe(text: Any) -> str:
    """User data (a label, a column, model or file name, an error message) for a rich markup
    string: control characters made visible (ESC -> `\\x1b`, newline -> `\\n`), brackets escaped."""
    return escape(printable(text))


def _say(console: Console, message: Any, prefix: str = "") -> None:
    """The one way this module prints a line: `prefix` is our own markup (a style, a label such as
    "error:"); `message` is data, printed as it is (never parsed as markup or emoji codes), with
    every control character made visible, so no value can restyle, erase or forge the output."""
    body = escape(printable(message) + " ")[:-1]  # last in the line: a trailing backslash needs no escape
    console.print(prefix + body, highlight=False, soft_wrap=True, emoji=False)


class SafeTable(Table):
    """A rich Table whose title, headers and cells are data: shown as they are, never parsed as
    markup, with control characters made visible (the terminal counterpart of `_say`)."""

    def __init__(self, *headers: Any, title: Any = None, **kwargs: Any) -> None:
        title = None if title is None else Text(printable(title), style="table.title")
        super().__init__(*(_cell_text(h) for h in headers), title=title, **kwargs)

    def add_column(self, header: Any = "", *args: Any, **kwargs: Any) -> None:
        super().add_column(_cell_text(header), *args, **kwargs)

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(_cell_text(c) for c in cells), **kwargs)


def _cell_text(value: Any) -> Any:
    return Text(printable(value)) if isinstance(value, str) else value


def friendly(fn: F) -> F:
    """Turn package errors and Ctrl-C into one-line messages with meaningful exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ProbeError as exc:  # escaped: messages name extras like mubench-probe[formats]
            _say(err, exc, prefix="[bold red]error:[/] ")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _say(err, "interrupted: finished chunks are saved; rerun the same command to resume")
            raise typer.Exit(130) from None
        except OSError as exc:  # unwritable store, full disk, missing file: the user's environment
            _say(err, exc, prefix="[bold red]error:[/] ")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


class RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {task.fields.get('unit', 'img')}/s" if speed else "–/s", style="cyan")


class LineProgress:
    """Progress for logs (stderr not a terminal): one plain line per task every `every` seconds.

    A live bar prints nothing until the run ends when redirected; these lines say how far a
    long run is (rows, rate, ETA) in a job's log file. Same calls as rich's Progress.
    """

    def __init__(self, every: float = 30.0, unit: str = "img") -> None:
        self.every, self.unit = every, unit
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for tid in self.tasks:
            self._line(tid, final=True)

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        tid = len(self.tasks)
        now = time.monotonic()
        self.tasks[tid] = {"description": description, "total": total, "done": 0.0, "t0": now, "last": now}
        return tid

    def advance(self, tid: int, n: float) -> None:
        self.update(tid, completed=self.tasks[tid]["done"] + n)

    def update(self, tid: int, completed: float | None = None, total: float | None = None, description=None) -> None:
        task = self.tasks[tid]
        if completed is not None:
            task["done"] = completed
        if total is not None:
            task["total"] = total
        if description is not None:
            task["description"] = description
        if time.monotonic() - task["last"] >= self.every:
            self._line(tid)

    def _line(self, tid: int, final: bool = False) -> None:
        task = self.tasks[tid]
        task["last"] = now = time.monotonic()
        elapsed = max(now - task["t0"], 1e-9)
        rate = task["done"] / elapsed
        total = task["total"]
        parts = [f"{task['description']}: {task['done']:,.0f}" + (f"/{total:,.0f}" if total else "")]
        if total:
            parts.append(f"({100 * task['done'] / total:.0f}%)")
        parts.append(f"{rate:,.1f} {self.unit}/s, {elapsed:,.0f} s elapsed")
        if total and rate > 0 and not final:
            parts.append(f"ETA {(total - task['done']) / rate:,.0f} s")
        _say(err, " ".join(parts) + (" (done)" if final else ""))


class DescriptionColumn(ProgressColumn):
    """A task's description (a model spec, a task name) as data: never markup, controls visible."""

    def render(self, task: Any) -> Text:
        return Text(printable(task.description))


def _progress(unit: str = "img") -> Progress | LineProgress:
    """A live bar on a terminal; periodic plain lines when stderr goes to a file or pipe."""
    if not err.is_terminal:
        return LineProgress(unit=unit)
    return Progress(
        DescriptionColumn(),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )


FORMATS = ("table", "csv", "json")
FormatOpt = Annotated[str, typer.Option("--format", help="Output: table, csv or json.")]


def _check_format(fmt: str, as_json: bool = False) -> str:
    fmt = "json" if as_json else fmt
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def _print_wide(renderable: Any) -> None:
    """Print at the width the renderable needs: cells are never wrapped, in a terminal or in a log."""
    natural = Console(width=100_000).measure(renderable).maximum  # measured without a width limit
    Console(width=max(natural, 40), file=out.file, highlight=False, emoji=False).print(renderable)


def _data(text: str, nl: bool = True) -> None:
    """CSV or JSON on stdout, for programs: every value exactly as it is (JSON escapes control
    characters itself; click would strip ANSI sequences from a pipe, altering values). Only when
    stdout is a terminal, where a person reads it, are control characters made visible."""
    if out.is_terminal:
        text = printable(text, keep_newlines=True)
    typer.echo(text, nl=nl, color=True)


def _emit(records: list[dict[str, Any]], fmt: str, title: str = "") -> None:
    """Records as a table (one line per record), CSV or JSON on stdout."""
    if fmt == "json":
        _data(json.dumps(records, default=str, indent=2))
        return
    if fmt == "csv":
        import pandas as pd

        _data(pd.DataFrame(records).to_csv(index=False), nl=False)
        return
    columns = list(dict.fromkeys(k for r in records for k in r))
    table = SafeTable(title=title or None, title_justify="left")
    for c in columns:
        table.add_column(str(c), no_wrap=True)
    for r in records:
        table.add_row(*[_cell(r.get(c)) for c in columns])
    _print_wide(table)


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


DatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="'sample', Hub id, folder, CSV, parquet/arrow, save_to_disk folder, WebDataset shards "
        "('DIR/shards-{000..009}.tar'), or a folder/CSV of OME-TIFF, OME-Zarr, CZI, ND2, LIF files.",
    ),
]
SplitOpt = Annotated[str | None, typer.Option(help="Dataset split (μ-Bench: test).")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (μ-Bench is pinned).")]
LimitOpt = Annotated[int | None, typer.Option(help="Only the first N rows.", min=1)]
SceneOpt = Annotated[
    str | None, typer.Option(help="Multi-scene microscopy files: only this scene (index or name); default: every one.")
]
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
ChannelsOpt = Annotated[
    str | None,
    typer.Option(help="Channels to use, by index or by the file's channel name: '0,2,4' or 'DNA,Mito'."),
]
ChannelModeOpt = Annotated[
    str,
    typer.Option(
        help="How channels reach an RGB model: rgb (up to 3 to R,G,B), each (one grayscale image and one stored "
        "embedding per channel), composite (a colour per channel, summed)."
    ),
]
ZOpt = Annotated[str | None, typer.Option("--z", help="Z-stack projection: max, mean, middle or index:K.")]
TOpt = Annotated[str | None, typer.Option("--t", help="Time-series projection: max, mean, middle or index:K.")]
TargetMppOpt = Annotated[
    float | None,
    typer.Option(help="Resample every image to this many micrometres per pixel (from metadata or microns_per_pixel)."),
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
    _say(err, line, prefix="note: ")


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
    max_file_bytes: Annotated[
        int, typer.Option(help="Larger image files (and any non-regular file) are failed rows, never read.", min=1)
    ] = api.DEFAULT_MAX_FILE_BYTES,
    claim_timeout: ClaimTimeoutOpt = api.DEFAULT_CLAIM_TIMEOUT,
    scene: SceneOpt = None,
    channels: ChannelsOpt = None,
    channel_mode: ChannelModeOpt = "rgb",
    z: ZOpt = None,
    t: TOpt = None,
    target_mpp: TargetMppOpt = None,
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
        max_file_bytes=max_file_bytes,
        claim_timeout=claim_timeout,
        channels=channels,
        channel_mode=channel_mode,
        z=z,
        t=t,
        target_mpp=target_mpp,
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
            scene,
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
    ds = api.open_dataset(dataset, split=split, revision=revision, limit=limit, scene=scene)
    total = len(ds) if cfg.shard is None else api.shard_rows(len(ds), cfg.chunk_rows, cfg.shard)
    where = "" if cfg.shard is None else f" (shard {cfg.shard[0]}/{cfg.shard[1]}: {total} rows)"
    _say(err, f"dataset {ds.spec} ({ds.split}): {len(ds)} rows -> {store}{where}")
    for spec in models:
        with _progress() as bar:
            task = bar.add_task(spec, total=total)
            report = api.extract(
                spec, ds, store=store, config=cfg, progress=lambda n, t=task: bar.advance(t, n), notify=_notify
            )
        _print_report(report)


def _launch(models, dataset, store, cfg, launcher, shards, split, revision, limit, scene, log_dir, address,
            cluster, partition, gpus, cpus, mem, time, parallelism) -> None:  # fmt: skip
    """--launcher: start the shards and say where they are (and wait where the launcher does)."""
    res = Resources(partition, gpus, cpus, mem, time, parallelism)
    _say(err, f"{launcher}: {shards} shard(s) of {', '.join(models)} on {dataset} -> {store}")
    launched = api.launch_extract(
        models, dataset, store=store, config=cfg, launcher=launcher, shards=shards, resources=res, address=address,
        log_dir=log_dir, cluster=cluster, split=split, revision=revision, limit=limit, scene=scene, notify=_notify,
    )  # fmt: skip
    if launcher == "slurm":
        job = launched.job_ids[0].split("_")[0] if launched.job_ids else "?"
        _say(out, f"submitted job array {job} ({shards} shards), logs in {launched.log_dir}")
        if cluster != "local":
            _say(out, f"progress: probe status {store}")
            return
        launched.wait()  # submitit's local jobs end with this process: wait for them
    for shard_reports in launched.results or []:
        for r in shard_reports or []:
            _say(
                out,
                f"shard {r['shard'][0]}/{r['shard'][1]} {r['model']}: {r['chunks_written']} chunks written, "
                f"{r['chunks_skipped']} already done, {r['chunks_by_others']} by another writer "
                f"({r['seconds']:.1f} s on {r['host']})",
            )
    _say(out, f"done: probe status {store}")


def _print_report(report: Any) -> None:
    for line in report.repaired:
        _say(err, line, prefix="[yellow]repaired:[/] ")
    msg = (
        f"{report.model}: {report.chunks_written} chunks written, {report.chunks_skipped} already done, "
        f"{report.texts_encoded} texts encoded"
    )
    if report.chunks_by_others:
        msg += f", {report.chunks_by_others} written by another writer"
    if report.rows:
        msg += f", {report.images_per_second:.1f} img/s"
    _say(out, msg)
    for line in report.notes:
        _say(err, line, prefix="note: ")
    for row, reason in sorted(report.failures.items())[:10]:
        _say(err, f"  skipped row {row}: {reason}")
    if len(report.failures) > 10:
        _say(err, f"  ... {len(report.failures)} unreadable rows in all (see `probe info`)")


def _fmt(cell: Any) -> str:
    if cell is None or (isinstance(cell, float) and cell != cell):
        return "–"
    value, lo, hi = cell
    if lo is None or hi is None or lo != lo or hi != hi:  # no CI (NaN; None after --bootstrap 0)
        return f"{value:.3f}"

    def short(v: float) -> str:  # 0.29 -> .29, -0.05 -> -.05: keeps the CI short on one line
        return f"{v:.2f}".replace("0.", ".", 1)

    return f"{value:.3f} [{short(lo)}, {short(hi)}]"


LabelOpt = Annotated[
    str | None,
    typer.Option(help="Define a task: this metadata column holds the classes (the task is custom/NAME)."),
]
WhereOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--where",
        help="With --label: only rows with COLUMN=VALUE (repeatable; values of one column are alternatives) "
        "and not COLUMN!=VALUE.",
    ),
]
GroupOpt = Annotated[
    str | None, typer.Option("--group", help="With --label: folds hold out whole values of this column.")
]
NameOpt = Annotated[str | None, typer.Option("--name", help="With --label: the task's name (default: the column).")]
TasksFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--tasks", help="YAML file of task definitions (label, where, group, protocol, train/test_where, heads)."
    ),
]
ConfounderOpt = Annotated[
    str | None,
    typer.Option(
        "--batch",
        help="Confounder column (plate, site, patient) for knn_nsb, the batch-effect index, mAP and loso "
        "[dataset where present].",
    ),
]


def _task_specs(
    label: str | None, where: list[str] | None, group: str | None, name: str | None, tasks_file: Path | None
) -> tuple[api.TaskSpec, ...]:
    """--label/--where/--group/--name and --tasks as task definitions (empty: the built-in tasks)."""
    if label is None and (where or group or name):
        raise UsageError("--where, --group and --name define a task together with --label COLUMN")
    specs = list(api.read_task_file(tasks_file)) if tasks_file else []
    if label is not None:
        specs.append(
            api.TaskSpec.from_dict({"label": label, "name": name or label, "where": where or (), "group": group})
        )
    names = [t.name for t in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"task names must be unique ({', '.join(names)}): give --name")
    return tuple(specs)


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
    fmt: FormatOpt = "table",
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
    label: LabelOpt = None,
    where: WhereOpt = None,
    group: GroupOpt = None,
    name: NameOpt = None,
    tasks_file: TasksFileOpt = None,
    batch: ConfounderOpt = None,
    probe_select: Annotated[
        str,
        typer.Option(help="How the probe's C is chosen on validation rows: accuracy, balanced_accuracy, log_loss."),
    ] = api.DEFAULT_PROBE_SELECT,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print every note (run.json keeps them all).")
    ] = False,
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
        "probe_select": probe_select,
        "batch": batch,
        "tasks": _task_specs(label, where, group, name, tasks_file),
    }
    overrides = {**fixed, **{k: v for k, v in given.items() if v is not None}}
    cfg = api.EvalConfig.preset(preset, **overrides) if preset else api.EvalConfig(**overrides)
    results = out_dir or api.default_results_dir(store)
    fmt = _check_format(fmt)
    with _progress(unit="units") as bar:
        units = bar.add_task("evaluate", total=None)

        def tick(unit: Any, done: int, total: int) -> None:
            bar.update(units, completed=done, total=total, description=f"{unit.model_name} {unit.task_name}")

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
    if fmt != "table":
        _emit(_flat_summary(summ), fmt)
    for model_name, rows in summ.groupby("model", sort=True) if len(summ) and fmt == "table" else []:
        retrieval = rows["task"].str.startswith("retrieval/")
        for part, title in ((rows[~retrieval], "value [95% CI]"), (rows[retrieval], "retrieval")):
            cols = [c for c in part.columns if c not in ("model", "task") and part[c].notna().any()]
            if part.empty or not cols:
                continue
            table = SafeTable(title=f"{model_name}  ({title})", title_justify="left")
            table.add_column("task", no_wrap=True)
            for c in cols:
                table.add_column(c, justify="right", no_wrap=True)
            for _, r in part.iterrows():
                table.add_row(r["task"], *[_fmt(r[c]) for c in cols])
            _print_wide(table)
    if fmt == "table":
        _table1(res.table)
    nothing = res.scored == 0
    for line in _note_lines(res, verbose or nothing):
        _say(err, line, prefix="note: ")
    if nothing:
        raise NothingToEvaluateError(
            "nothing to evaluate: every selected task was skipped (the notes above say why); "
            f"run.json in {results} records them"
        )
    _say(
        err,
        f"{res.computed} units computed, {res.skipped} already in {results}; "
        f"results.parquet, results.csv, predictions.parquet, run.json",
    )


GROUPED_NOTES = {  # kind -> how a group of such notes reads on the terminal (all of them stay in run.json);
    # other kinds (excluded classes: which classes a score leaves out) are always printed in full
    "probe_c_edge": "a probe chose an edge of the C grid",
    "probe_folds": "how the probes' folds were made",
    "missing_class": "a training fold lacks a class (its test rows count as errors)",
    "skipped": "a head or task skipped",
}


def _note_lines(res: Any, verbose: bool, limit: int = 3) -> list[str]:
    """Notes for the terminal: every one with --verbose; else kinds with more than `limit` notes
    become one line with their count (C-grid edges also count the probe fits they came from)."""
    pairs = sorted(set(zip(res.notes, res.note_kinds or ["other"] * len(res.notes), strict=False)))
    if verbose:
        return [n for n, _ in pairs]
    by_kind: dict[str, list[str]] = {}
    for n, k in pairs:
        by_kind.setdefault(k, []).append(n)
    lines = []
    for kind, notes in by_kind.items():
        if kind == "other" or kind not in GROUPED_NOTES or len(notes) <= limit:
            lines += notes
            continue
        if kind == "probe_c_edge" and "metric" in res.table:
            t = res.table[res.table["metric"] == "C_at_edge"]
            edge = int((t["value"] > 0).sum())
            lines.append(
                f"a probe chose an edge of the C grid in {edge} of {len(t)} fits (widen --probe-cs): see run.json"
            )
        else:
            lines.append(f"{len(notes)} notes: {GROUPED_NOTES[kind]}: see run.json (--verbose prints them)")
    return lines


@app.command(name="tasks")
@friendly
def list_tasks(
    store: Annotated[str, typer.Argument(help="Zarr store: a directory or an fsspec URL (s3://...).")] = str(
        api.DEFAULT_STORE
    ),
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these models' datasets.")] = None,
    label: LabelOpt = None,
    where: WhereOpt = None,
    group: GroupOpt = None,
    name: NameOpt = None,
    tasks_file: TasksFileOpt = None,
    batch: ConfounderOpt = None,
    protocol: Annotated[str, typer.Option(help="kfold, split, transfer or loso (as for evaluate).")] = "kfold",
    fmt: FormatOpt = "table",
) -> None:
    """The tasks a store supports: name, label column, rows, classes, grouping, batches, protocol."""
    fmt = _check_format(fmt)
    specs = _task_specs(label, where, group, name, tasks_file)
    cfg = api.EvalConfig(tasks=specs, batch=batch, protocol=protocol) if protocol != "transfer" else None
    if cfg is None:
        raise UsageError("probe tasks lists tasks under kfold, split or loso; transfer conditions belong to evaluate")
    table = api.list_tasks(store, cfg, models=model)
    _emit(table.to_dict("records"), fmt, title=f"tasks in {store}")


def _flat_summary(summ: Any) -> list[dict[str, Any]]:
    """The summary with each (value, low, high) cell as three columns, for CSV and JSON."""
    records = []
    for _, r in summ.iterrows():
        rec: dict[str, Any] = {"model": r["model"], "task": r["task"]}
        for col in summ.columns[2:]:
            value = r[col]
            ok = isinstance(value, tuple)
            rec[col], rec[f"{col} low"], rec[f"{col} high"] = value if ok else (None, None, None)
        records.append(rec)
    return records


def _table1(table: Any) -> None:
    """μ-Bench Table 1 layout: pooled coarse / fine caption accuracy in percent ± CI half-width."""
    rows = api.mubench_table1(table)
    if rows.empty:
        return
    t = SafeTable(title="μ-Bench zero-shot (% ± CI half-width)", title_justify="left")
    for c in ("model", "coarse", "fine"):
        t.add_column(c, justify="left" if c == "model" else "right", no_wrap=True)
    for _, r in rows.iterrows():
        cells = [f"{100 * r[g]:.2f} ± {100 * r[g + '_ci']:.2f}" if r[g] == r[g] else "–" for g in ("coarse", "fine")]
        t.add_row(str(r["model"]), *cells)
    _print_wide(t)


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
    scene: SceneOpt = None,
    channels: ChannelsOpt = None,
    channel_mode: ChannelModeOpt = "rgb",
    z: ZOpt = None,
    t: TOpt = None,
    target_mpp: TargetMppOpt = None,
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
        channels=channels,
        channel_mode=channel_mode,
        z=z,
        t=t,
        target_mpp=target_mpp,
    )
    for a in values:
        if not 0 <= a <= 1:
            _say(err, f"alpha={a:g} is outside [0, 1]: extrapolating", prefix="[yellow]warning:[/] ")
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
            scene=scene,
            preprocess=preprocess,
            save_dir=save_dir,
            progress=bar_for,
            notify=_notify,
        )
    for r in reports:
        _print_report(r)
    _say(out, f"next: probe evaluate {store} && probe compare {store} --report report.html")


@app.command()
@friendly
def info(
    store: Annotated[str, typer.Argument(help="Zarr store: a directory or an fsspec URL (s3://...).")] = str(
        api.DEFAULT_STORE
    ),
    verify: Annotated[bool, typer.Option(help="Read every chunk and check its checksum.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    fmt: FormatOpt = "table",
) -> None:
    """Models, datasets, rows, completeness, provenance and size of a store."""
    fmt = _check_format(fmt, as_json)
    summary = api.store_info(store, verify=verify)
    if fmt == "json":
        _data(json.dumps(summary, default=str, indent=2))
    else:
        records = [
            {
                "model": r["model"] or r["group"],
                "dataset": r["dataset"],
                "split": r["split"],
                "rows": r["rows"],
                "chunks": r["chunks_done"],
                "texts": r["texts"],
                "failed": r["failed_rows"],
                "status": r["status"],
                "MB": round(r["size_bytes"] / 1e6, 2),
                "weights": str(r["provenance"].get("weights_hash"))[:12],
                "created": r["provenance"].get("created"),
            }
            for r in summary["runs"]
        ]
        _emit(records, fmt, f"{store}  ({summary['size_bytes'] / 1e6:.1f} MB)")
        if fmt == "table":
            for r in summary["runs"]:
                p = r["provenance"]
                _say(
                    out,
                    f": dataset {p.get('dataset_id')}@{p.get('dataset_revision')} "
                    f"fp {p.get('dataset_fingerprint')}, {p.get('dtype')}; model {p.get('model_spec')}; "
                    f"intensity {str(p.get('intensity_policy')).split(':')[0]}"
                    + (f"; pixels {p['pixels'].get('rule')}" if p.get("pixels") else ""),
                    prefix=f"[bold]{_safe(r['group'])}[/]",
                )
    if verify:
        _report_problems(summary["problems"], store)
    damaged = [r for r in summary["runs"] if r["status"] == "damaged"]
    for line in (line for r in damaged for line in r["problems"]):
        _say(err, line, prefix="[red]damaged:[/] ")
    if damaged:
        raise StoreDamageError(f"{len(damaged)} damaged run(s) in {store}; repair with `probe verify --repair {store}`")


def _report_problems(problems: list[str], store: str) -> None:
    """One line per problem, then a non-zero exit naming the repair command."""
    for line in problems:
        _say(err, line, prefix="[red]damaged:[/] ")
    if problems:
        raise StoreDamageError(
            f"{len(problems)} problem(s) in {store}; repair with `probe verify --repair {store}` "
            "(reloads each damaged run's model and dataset from its provenance)"
        )
    _say(
        err,
        "verify: intact (every chunk present, every chunk matches its checksum, provenance and texts "
        "match their digests)",
    )


@app.command()
@friendly
def status(
    store: Annotated[str, typer.Argument(help="Zarr store (directory or fsspec URL).")] = str(api.DEFAULT_STORE),
    shards: Annotated[int | None, typer.Option(help="Show progress per shard for N shards [as recorded].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    fmt: FormatOpt = "table",
) -> None:
    """Progress of every run: chunks done / total, per shard, live and stale claims (cheap, no checksums)."""
    fmt = _check_format(fmt, as_json)
    st = api.store_status(store, shards)
    if fmt == "json":
        _data(json.dumps(st, default=str, indent=2))
        return
    rows = []
    for r in st["runs"]:
        live = sum(1 for c in r["claims"] if c["live"])
        rows.append(
            {
                "run": r["group"],
                "status": r["status"],
                "chunks": "?" if r["chunks_total"] is None else f"{r['chunks_done']}/{r['chunks_total']}",
                "shards": "  ".join(f"{s['shard']}: {s['done']}/{s['total']}" for s in r["per_shard"]) or "–",
                "claims": f"{live} live, {len(r['claims']) - live} stale",
            }
        )
    _emit(rows, fmt, title=str(store))
    if fmt != "table":
        return
    for r in st["runs"]:
        for c in r["claims"]:
            state = "live" if c["live"] else "stale (taken over by the next writer)"
            _say(
                out,
                f"  {r['group']}: {c['key']} held by pid {c['pid']} on {c['host']}, heartbeat {c['age_s']:.0f} s "
                f"ago: {state}",
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
    as_json: Annotated[bool, typer.Option("--json", help="Same as --format json.")] = False,
    sheet: Annotated[Path | None, typer.Option(help="Write a contact sheet PNG of the image hits.")] = None,
    device: Annotated[str, typer.Option(help="Device for encoding a new query.")] = "auto",
    fmt: FormatOpt = "table",
) -> None:
    """Query the store: text->image, image->image, image->text."""
    fmt = _check_format(fmt, as_json)
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
    for note in res.notes:  # a truncated query text, a rebuilt index: stderr, so --json stays parseable
        _say(err, note, prefix="note: ")
    if fmt == "json":
        payload = {"query": res.query, "index": res.index, "hits": res.hits, "notes": res.notes}
        _data(json.dumps(payload, default=str, indent=2))
    else:
        _emit(res.hits, fmt, f"{res.query}")
        if res.index.get("recall_at_10") is not None:
            _say(
                err,
                f"index {res.index['factory']}: recall@10 vs exact search = {res.index['recall_at_10']:.3f} "
                f"({res.index['recall_queries']} sampled queries)",
            )
    if sheet is not None:
        path = api.contact_sheet(store, res, sheet)
        _say(err, f"contact sheet: {path}")


@app.command()
@friendly
def compare(
    source: Annotated[
        str, typer.Argument(help="A store (folder or URL; evaluated first, cached) or a results folder.")
    ],
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these models.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report here.")] = None,
    k: Annotated[int, typer.Option("-k", help="k for mutual-kNN alignment.", min=1)] = 10,
    color_by: Annotated[
        list[str] | None,
        typer.Option(
            help="Colour the report's embedding maps by this metadata column (repeatable; "
            "e.g. label_name, dataset, modality, stain) [label_name]."
        ),
    ] = None,
    fmt: FormatOpt = "table",
) -> None:
    """Models side by side: accuracies with CIs, paired tests, CKA, and an HTML report."""
    fmt = _check_format(fmt)
    res = api.compare(source, model, report=report, k=k, color_by=tuple(color_by or ("label_name",)))
    side = res.side_by_side
    models = sorted({m for m, _ in side.columns}) if not side.empty else []
    records = []
    for (task, head), r in side.iterrows() if not side.empty else []:
        rec: dict[str, Any] = {"task": task, "head": head}
        for m in models:
            v, lo, hi = r.get((m, "value")), r.get((m, "ci_low")), r.get((m, "ci_high"))
            if fmt == "table":
                rec[m] = _fmt((v, lo, hi)) if v is not None and v == v else "–"
            else:
                rec[m], rec[f"{m} low"], rec[f"{m} high"] = v, lo, hi
        records.append(rec)
    pairs = [
        {
            "task": r["task"],
            "head": r["head"],
            "a": r["model_a"],
            "b": r["model_b"],
            "n": r["n"],
            **(
                {"a - b": _fmt((r["difference"], r["ci_low"], r["ci_high"])), "p": f"{r['p_mcnemar']:.3g}"}
                if fmt == "table"
                else {"a - b": r["difference"], "low": r["ci_low"], "high": r["ci_high"], "p": r["p_mcnemar"]}
            ),
        }
        for _, r in res.pairwise.iterrows()
    ]
    if fmt != "table":
        payload = {"accuracy": records, "pairwise": pairs}
        for name in ("cka", "mutual_knn", "text_cka"):
            mat = getattr(res, name)
            payload[name] = [{"model": i, **row} for i, row in mat.round(4).to_dict("index").items()]
        if fmt == "json":
            _data(json.dumps(payload, default=str, indent=2))
        else:  # one CSV per table, each after a '# name' line
            for name, rows in payload.items():
                _data(f"# {name}")
                _emit(rows, "csv")
    else:
        if records:
            _emit(records, fmt, "accuracy (value [95% CI])")
        if pairs:
            _emit(pairs, fmt, "paired differences (a - b) and McNemar")
        for title, mat in (
            ("linear CKA (image embeddings)", res.cka),
            (f"mutual kNN (k={k})", res.mutual_knn),
            ("linear CKA (class-prompt text prototypes)", res.text_cka),
        ):
            if not mat.empty:
                _say(out, f"{title}:")
                shown = mat.round(3).rename(index=printable, columns=printable)  # names become one line each
                for line in shown.to_string().splitlines():
                    _say(out, line)
    if res.report:
        _say(err, f"report: {res.report} ({len(res.figures)} figures)")


@app.command()
@friendly
def export(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Zarr store directory.")],
    target: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output: a .h5ad file (anndata), a folder (npy) or a .parquet file.")
    ],
    to: Annotated[str, typer.Option("--to", help="anndata, npy (clip-retrieval's layout) or parquet.")] = "anndata",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model spec in the store.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset key, if the model has several.")] = None,
) -> None:
    """Export one finished run's embeddings, metadata and provenance for scanpy, FAISS or pandas."""
    res = api.export(store, to, target, model=model, dataset=dataset)
    _say(out, f"exported {res.rows} rows to {', '.join(str(f) for f in res.files)}")


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
        for line in api.open_store(store).notes():  # e.g. runs written before the chunk and metadata digests
            _notify(line)
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
        _say(err, line, prefix="[yellow]repaired:[/] ")
    for line in res.commands:
        _say(err, line, prefix="[red]not repaired:[/] ")
    if res.remaining or res.commands:
        for line in res.remaining:
            _say(err, line, prefix="[red]damaged:[/] ")
        raise StoreDamageError(f"{len(res.remaining)} problem(s) remain in {store} (see above)")
    _say(out, f"verify --repair: {len(res.repaired)} problem(s) repaired; {store} is intact")


@app.command()
@friendly
def models(
    all_tags: Annotated[bool, typer.Option("--all", help="List every open_clip tag.")] = False,
) -> None:
    """Model spec forms each backend takes, with examples."""
    for b in api.list_backends():
        _say(out, f": {b.help}", prefix=f"[bold]{_safe(b.name)}[/]")
        for ex in b.examples:
            _say(out, f"  {ex}")
    if all_tags:
        for spec in api.list_open_clip_specs():
            _say(out, spec)


@app.command()
@friendly
def datasets() -> None:
    """Dataset spec forms, in the order they are tried."""
    for f in api.list_dataset_formats():
        _say(out, f": {f.help}", prefix=f"[bold]{_safe(f.name)}[/]")


def main() -> None:
    from . import allocator

    allocator.tune()  # every command: large buffers stay in the heap instead of being re-mapped per batch
    logging.getLogger().setLevel(logging.ERROR)
    app(prog_name="probe")


if __name__ == "__main__":
    sys.exit(main())
