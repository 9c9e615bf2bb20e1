"""`probe extract` and `probe interpolate`: models and a dataset in, embeddings in the store."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from ..errors import UsageError
from .common import _bars_for, _numbers, _progress, _say, app, err, friendly, notify, out
from .options import (
    DEFAULT_STORE,
    EXTRACT_OPTIONS,
    AddressOpt,
    ClusterOpt,
    DatasetOpt,
    LimitOpt,
    LogDirOpt,
    MemOpt,
    ParallelOpt,
    PartitionOpt,
    RevisionOpt,
    SceneOpt,
    SplitOpt,
    StoreOpt,
    TimeOpt,
    config_options,
    config_values,
)

# what `interpolate` does not take: it writes one unsharded run per alpha, features not stored
INTERPOLATE_OPTIONS = [n for n in EXTRACT_OPTIONS if n not in ("features", "max_file_bytes", "shard", "perturb")]


def _extract_config(settings: dict[str, Any]) -> api.ExtractConfig:
    """The command's ExtractConfig options as one validated ExtractConfig."""
    return api.ExtractConfig(**config_values(EXTRACT_OPTIONS, settings))


@app.command()
@friendly
@config_options(EXTRACT_OPTIONS, after="store")
def extract(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Model spec; repeat for several. Default: the μ-Bench contrastive models."),
    ] = None,
    dataset: DatasetOpt = api.MUBENCH_ID,
    split: SplitOpt = None,
    revision: RevisionOpt = None,
    limit: LimitOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    scene: SceneOpt = None,
    launcher: Annotated[
        str | None,
        typer.Option(help="Run --shards N shards: local (processes here), slurm (job array via submitit), ray."),
    ] = None,
    shards: Annotated[int, typer.Option(help="Number of shards for --launcher.", min=1)] = 2,
    partition: PartitionOpt = None,
    gpus_per_shard: Annotated[
        int, typer.Option(help="GPUs per shard (slurm gpus_per_node, ray num_gpus, local devices).", min=0)
    ] = 0,
    cpus_per_shard: Annotated[
        int | None, typer.Option(help="CPUs per shard (slurm cpus_per_task, ray num_cpus).", min=1)
    ] = None,
    mem: MemOpt = None,
    time: TimeOpt = None,
    array_parallelism: ParallelOpt = None,
    address: AddressOpt = None,
    log_dir: LogDirOpt = None,
    submitit_cluster: ClusterOpt = "slurm",
    **settings: Any,
) -> None:
    """Embed a dataset with one or more models into the store (resumable, repairs damage, and
    several processes on one store split the work; --shard / --launcher split it on purpose)."""
    cfg = _extract_config(settings)
    models = model or list(api.MUBENCH_MODELS)
    if launcher is not None:
        if cfg.shard is not None:
            raise UsageError("--shard is for one shard; --launcher starts all --shards of them")
        resources = api.Resources(partition, gpus_per_shard, cpus_per_shard, mem, time, array_parallelism)
        _say(err, f"{launcher}: {shards} shard(s) of {', '.join(models)} on {dataset} -> {store}")
        launched = api.launch_extract(
            models, dataset, store=store, config=cfg, launcher=launcher, shards=shards, resources=resources,
            address=address, log_dir=log_dir, cluster=submitit_cluster, split=split, revision=revision, limit=limit,
            scene=scene, notify=notify,
        )  # fmt: skip
        _print_launch(launched, launcher, shards, store, submitit_cluster)
        return
    ds = api.open_dataset(dataset, split=split, revision=revision, limit=limit, scene=scene)
    total = len(ds) if cfg.shard is None else api.shard_rows(len(ds), cfg.chunk_rows, cfg.shard)
    where = "" if cfg.shard is None else f" (shard {cfg.shard[0]}/{cfg.shard[1]}: {total} rows)"
    if cfg.perturb:  # every perturbation is one more run of the same rows
        where += f" and {len(cfg.perturb)} perturbed run(s): {', '.join(cfg.perturb)}"
        total *= 1 + len(cfg.perturb)
    _say(err, f"dataset {ds.spec} ({ds.split}): {len(ds)} rows -> {store}{where}")
    for spec in models:
        with _progress() as bar:
            task = bar.add_task(spec, total=total)
            report = api.extract(spec, ds, store=store, config=cfg, progress=partial(bar.advance, task), notify=notify)
        _print_report(report)
        for twin in report.perturbed:
            _print_report(twin)


def _print_launch(launched: Any, launcher: str, shards: int, store: str, cluster: str) -> None:
    """--launcher: say where the shards are (and wait for submitit's local jobs, which end with us)."""
    if launcher == "slurm":
        job = launched.job_ids[0].split("_")[0] if launched.job_ids else "?"
        _say(out, f"submitted job array {job} ({shards} shards), logs in {launched.log_dir}")
        if cluster != "local":
            _say(out, f"progress: probe status {store}")
            return
        launched.wait()  # submitit's local jobs end with this process: wait for them
    for shard_reports in launched.results or []:
        for r in shard_reports or []:
            name = f"{r['model']} ~ {r['perturbation']}" if r.get("perturbation") else r["model"]
            _say(
                out,
                f"shard {r['shard'][0]}/{r['shard'][1]} {name}: {r['chunks_written']} chunks written, "
                f"{r['chunks_skipped']} already done, {r['chunks_by_others']} by another writer "
                f"({r['seconds']:.1f} s on {r['host']})",
            )
    _say(out, f"done: probe status {store}")


def _print_report(report: Any) -> None:
    """One extraction's outcome: repairs, chunks and speed, notes, the first unreadable rows."""
    for line in report.repaired:
        _say(err, line, prefix="[yellow]repaired:[/] ")
    name = report.model if report.perturbation is None else f"{report.model} ~ {report.perturbation}"
    msg = (
        f"{name}: {report.chunks_written} chunks written, {report.chunks_skipped} already done, "
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


@app.command()
@friendly
@config_options(EXTRACT_OPTIONS, *INTERPOLATE_OPTIONS, after="save_dir")
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
    store: StoreOpt = DEFAULT_STORE,
    preprocess: Annotated[
        str | None, typer.Option(help="Whose preprocessing if they differ: base or finetuned.")
    ] = None,
    save_dir: Annotated[Path | None, typer.Option(help="Also save each alpha's weights here (ARCH:/path).")] = None,
    scene: SceneOpt = None,
    **settings: Any,
) -> None:
    """Extract weight interpolations between a base and a fine-tuned model, one model per alpha."""
    values = _numbers(alphas, "--alphas")
    cfg = _extract_config(settings)
    for a in values:
        if not 0 <= a <= 1:
            _say(err, f"alpha={a:g} is outside [0, 1]: extrapolating", prefix="[yellow]warning:[/] ")
    bars = _progress()
    with bars, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reports = api.interpolate(
            base, finetuned, values, dataset, store=store, config=cfg, split=split, revision=revision, limit=limit,
            scene=scene, preprocess=preprocess, save_dir=save_dir, progress=_bars_for(bars), notify=notify,
        )  # fmt: skip
    for r in reports:
        _print_report(r)
    _say(out, f"next: probe evaluate {store} && probe compare {store} --report report.html")
