"""`probe evaluate` and `probe tasks`: heads scored from the store, and the tasks a store supports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from ..errors import NothingToEvaluateError, UsageError
from .common import SafeTable, _check_format, _emit, _fmt, _print_wide, _progress, _say, app, err, friendly
from .options import (
    DEFAULT_STORE,
    EVAL_OPTIONS,
    AddressOpt,
    ClusterOpt,
    ConfounderOpt,
    FormatOpt,
    GroupOpt,
    LabelOpt,
    LogDirOpt,
    MemOpt,
    NameOpt,
    ParallelOpt,
    PartitionOpt,
    StoreArg,
    TasksFileOpt,
    TimeOpt,
    WhereOpt,
    config_options,
    config_values,
)


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


def _eval_config(preset: str | None, settings: dict[str, Any], tasks: tuple[api.TaskSpec, ...]) -> api.EvalConfig:
    """The options as one validated EvalConfig: options given explicitly override the --preset."""
    overrides = {**config_values(EVAL_OPTIONS, settings), "tasks": tasks}
    return api.EvalConfig.preset(preset, **overrides) if preset else api.EvalConfig(**overrides)


@app.command()
@friendly
@config_options(EVAL_OPTIONS, after="preset")
def evaluate(
    store: StoreArg = DEFAULT_STORE,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these models.")] = None,
    task: Annotated[
        list[str] | None,
        typer.Option("--task", "-t", help="Only tasks matching (e.g. 'fine/*', 'coarse/modality', 'mubench')."),
    ] = None,
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
    templates: Annotated[Path | None, typer.Option(help="Prompt templates file (must be extracted).")] = None,
    jobs: Annotated[int, typer.Option(help="Units evaluated in parallel, in separate processes.", min=1)] = 1,
    force: Annotated[bool, typer.Option(help="Recompute units already in the results.")] = False,
    fmt: FormatOpt = "table",
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
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print every note (run.json keeps them all).")
    ] = False,
    **settings: Any,
) -> None:
    """Score zero-shot, linear-probe, kNN and prototype heads from the store alone."""
    cfg = _eval_config(preset, settings, _task_specs(label, where, group, name, tasks_file))
    results = out_dir or api.default_results_dir(store)
    fmt = _check_format(fmt)
    with _progress(unit="units") as bar:
        units = bar.add_task("evaluate", total=None)

        def tick(unit: Any, done: int, total: int) -> None:
            bar.update(units, completed=done, total=total, description=f"{unit.model_name} {unit.task_name}")

        res = api.evaluate(
            store, cfg, models=model, tasks=task, templates=templates, results_dir=results, force=force, jobs=jobs,
            progress=tick, launcher=launcher,
            resources=api.Resources(partition, gpus_per_job, cpus_per_job, mem, time, array_parallelism),
            address=address, log_dir=log_dir, cluster=submitit_cluster,
        )  # fmt: skip
    _print_results(res, fmt)
    nothing = res.scored == 0
    for line in note_lines(res, verbose or nothing):
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


def _print_results(res: Any, fmt: str) -> None:
    """The summary: one table per model (scores, then retrieval) and μ-Bench's Table 1; or CSV / JSON."""
    summ = api.summary(res.table)
    if fmt != "table":
        _emit(_flat_summary(summ), fmt)
        return
    for model_name, rows in summ.groupby("model", sort=True) if len(summ) else []:
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
    _table1(res.table)
    _robustness(res.table)


GROUPED_NOTES = {  # kind -> how a group of such notes reads on the terminal (all of them stay in run.json);
    # other kinds (excluded classes: which classes a score leaves out) are always printed in full
    "probe_c_edge": "a probe chose an edge of the C grid",
    "probe_folds": "how the probes' folds were made",
    "missing_class": "a training fold lacks a class (its test rows count as errors)",
    "skipped": "a head or task skipped",
}


def note_lines(res: Any, verbose: bool, limit: int = 3) -> list[str]:
    """An evaluation's notes for the terminal: every one with --verbose; else kinds with more than
    `limit` notes become one line with their count (C-grid edges also count the probe fits they
    came from), so a long run's notes do not bury its results (run.json keeps every note)."""
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
    store: StoreArg = DEFAULT_STORE,
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


def _robustness(table: Any) -> None:
    """Per model, the mean drop of perception and of alignment over matched perturbations."""
    rows = api.robustness_summary(table)
    if rows.empty:
        return
    t = SafeTable(title="robustness (means over the perturbations every model has)", title_justify="left")
    cols = [c for c in rows.columns if c != "model"]
    t.add_column("model", no_wrap=True)
    for c in cols:
        t.add_column(c, justify="right", no_wrap=True)
    for _, r in rows.iterrows():
        t.add_row(str(r["model"]), *[_number(r[c]) for c in cols])
    _print_wide(t)


def _number(v: Any) -> str:
    if v is None or v != v:
        return "–"
    return f"{float(v):.3f}" if isinstance(v, float) else str(v)
