"""`probe evaluate`: read the store only, run the protocol on every (model, task), save results.

Work is split into units (one model's captions, or one model x task); a unit's key hashes
the store provenance, the task and the config, so a rerun skips what is already computed and
an interrupted run keeps every finished unit.

A `--channel-mode each` run is scored once on its row embeddings (all channels together, under
the model's name) and once per channel on that channel's embeddings alone, reported as the model
`MODEL#channel=NAME` (so summaries, compare and paired tests treat each channel as a model).
Rows with a `microns_per_pixel` are also reported per `pixel_size` stratum (power-of-two bins).

Units can run elsewhere: `jobs` > 1 runs them in that many worker processes on this machine
(joblib's loky), `launcher` "ray" as Ray tasks and "slurm" as a submitit job array. A worker
gets a `UnitSpec` (store, run, unit; picklable), reads the run's arrays itself (so the store
must be reachable from it: a shared filesystem or an object store URL) and sends the unit's
Output back; this process alone writes the results folder, unit by unit, as they finish, under
the folder's lock (see results.py), so two finishing workers neither lose nor duplicate rows and
the resume rules are those of a single process.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import robustness
from .config import TaskSpec
from .errors import StoreError, UsageError
from .head_specs import heads_of
from .heads.zeroshot import template_indices
from .protocol import (
    CAPTION_RUNNERS,
    EvalConfig,
    Output,
    TaskArrays,
    batch_column,
    check_protocol,
    evaluate_task,
    task_config,
)
from .results import COLUMNS, PRED_COLUMNS, ResultsDir
from .store import IDENTITY_KEYS, ChannelArrays, EmbeddingStore, Run, RunArrays
from .tasks import derive_tasks, prompt_texts, resolve_task


def provenance_hash(run: Run) -> str:
    p = run.provenance
    # "perturbation" is absent from clean runs: left out, so results cached before it existed are found
    ident = {k: p.get(k) for k in IDENTITY_KEYS if k != "perturbation" or k in p}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Unit:
    """One independent piece of work with a cache key."""

    run: Run
    kind: str  # "captions" | "task"
    task_name: str
    key: str
    payload: Any = None
    arrays: RunArrays | None = None
    channel: str | None = None  # one channel's embeddings (a `--channel-mode each` run), or None: the rows'

    @property
    def model_name(self) -> str:
        """The model column of the results: the spec, with `#channel=NAME` for one channel's view."""
        return self.run.model_spec + (f"#channel={self.channel}" if self.channel is not None else "")


@dataclass
class EvaluationResult:
    table: pd.DataFrame
    predictions: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    computed: int = 0
    skipped: int = 0
    results_dir: Path | None = None
    note_kinds: list[str] = field(default_factory=list)  # one per note (protocol.NOTE_KINDS)
    scored: int = 0  # result records of this evaluation's units (0: nothing could be evaluated)


@dataclass(frozen=True)
class UnitSpec:
    """A unit as a worker elsewhere needs it: where the run is, which unit, with which config."""

    store: str
    run: str
    kind: str
    task_name: str
    templates: tuple[str, ...]
    key: str
    cfg: EvalConfig
    channel: str | None = None  # one channel's embeddings (a `--channel-mode each` run)
    task: TaskSpec | None = None  # the task's definition (kind "task")


_WORKER_ARRAYS: dict[tuple[str, str, str | None], RunArrays] = {}  # a worker's last run and its channel views


def _worker_arrays(spec: UnitSpec) -> RunArrays:
    """The arrays of the spec's run (or channel), read once per worker and reused by its next units."""
    key, base_key = (spec.store, spec.run, spec.channel), (spec.store, spec.run, None)
    if key not in _WORKER_ARRAYS:
        if base_key not in _WORKER_ARRAYS:
            _WORKER_ARRAYS.clear()  # one run's arrays at a time per worker
            node = EmbeddingStore(spec.store)._open(spec.run)
            if not isinstance(node, Run):
                raise node.error()
            _WORKER_ARRAYS[base_key] = RunArrays(node)
        base = _WORKER_ARRAYS[base_key]
        if spec.channel is not None:
            _WORKER_ARRAYS[key] = ChannelArrays(base, base.run.channel_labels.index(spec.channel))
    return _WORKER_ARRAYS[key]


def compute_unit(spec: UnitSpec) -> tuple[str, Output, float]:
    """Compute one unit in a worker process (a loky worker, a Ray task, a Slurm job): (key, output, seconds)."""
    t0 = time.perf_counter()
    arrays = _worker_arrays(spec)
    payload: Any = None
    if spec.kind == "task":
        if spec.task is None:
            raise UsageError(f"unit {spec.task_name} has no task definition")
        payload = (resolve_task(spec.task, arrays.meta), list(spec.templates))
    elif spec.kind == "robustness":  # the twins are found again in the store (robustness.py)
        task = resolve_task(spec.task, arrays.meta) if spec.task is not None else None
        payload = (task, list(spec.templates), robustness.ready_twins(EmbeddingStore(spec.store), arrays.run)[0])
    unit = Unit(arrays.run, spec.kind, spec.task_name, spec.key, payload, arrays, spec.channel)
    return spec.key, run_unit(unit, spec.cfg), time.perf_counter() - t0


def _spec(store: EmbeddingStore, unit: Unit, cfg: EvalConfig) -> UnitSpec:
    templates = tuple(unit.payload[1]) if unit.kind in ("task", "robustness") else ()
    task = unit.payload[0].spec if unit.kind in ("task", "robustness") and unit.payload[0] is not None else None
    return UnitSpec(
        str(store.path), unit.run.path, unit.kind, unit.task_name, templates, unit.key, cfg, unit.channel, task
    )


def _elsewhere(
    specs: list[UnitSpec], jobs: int, launcher: str | None, launch: dict[str, Any]
) -> Iterator[tuple[str, Output, float]]:
    """Results of the units as they finish, from worker processes, Ray tasks or a Slurm job array."""
    from .engines import Resources, launch_ray, launch_slurm

    resources = launch.get("resources") or Resources()
    if launcher == "ray":
        yield from launch_ray(
            compute_unit, specs, resources, launch.get("address"), stream=True, label=lambda s: s.task_name
        )
    elif launcher == "slurm":
        started = launch_slurm(
            compute_unit, specs, resources, launch.get("log_dir"), launch.get("cluster", "slurm"), "probe-evaluate"
        )
        yield from started.as_completed()
    else:
        from joblib import Parallel, delayed

        yield from Parallel(n_jobs=jobs, backend="loky", return_as="generator_unordered")(
            delayed(compute_unit)(s) for s in specs
        )


def unit_key(
    run: Run,
    name: str,
    cfg: EvalConfig,
    templates: Sequence[str],
    channel: str | None = None,
    task: TaskSpec | None = None,
) -> str:
    """The results cache key of one unit: what decides its numbers, not where or how fast it runs."""
    parts: list[Any] = [provenance_hash(run), name, cfg.cache_dict(), list(templates)]
    if channel is not None:
        parts.append({"channel": channel})
    if task is not None:
        parts.append({"task": task.as_dict()})
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def pixel_size_bins(meta: pd.DataFrame) -> pd.DataFrame:
    """Add a `pixel_size` column binning `microns_per_pixel` by powers of two ("0.25-0.5 um/px"),
    so results can be read per physical scale; rows without a size stay out of every bin."""
    if "microns_per_pixel" not in meta.columns or "pixel_size" in meta.columns:
        return meta
    mpp = pd.to_numeric(meta["microns_per_pixel"], errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(mpp) & (mpp > 0)
    if not ok.any():
        return meta
    lo = np.zeros_like(mpp)
    lo[ok] = np.exp2(np.floor(np.log2(mpp[ok])))
    labels = np.array(
        [f"{a:g}-{2 * a:g} um/px" if good else None for a, good in zip(lo, ok, strict=True)], dtype=object
    )
    return meta.assign(pixel_size=labels)


def _task_arrays(
    run: Run,
    x: np.ndarray,
    valid: np.ndarray,
    meta: pd.DataFrame,
    task,
    templates: Sequence[str],
    texts: list[str] | None,
    text_emb: np.ndarray | None,
) -> TaskArrays:
    keep = valid[task.rows]
    rows = task.rows[keep]
    prompt_emb = None
    if texts is not None and text_emb is not None:
        try:
            idx = template_indices(texts, prompt_texts(task.classes, templates))
        except KeyError as exc:
            if task.kind == "custom":  # a user's label column: its class prompts were never extracted
                missing = f"the store has no class prompts for {task.column!r} (e.g. {exc.args[0]!r})"
                return _arrays(task, rows, x, meta, None, templates, missing)
            raise StoreError(
                f"the store has no text embedding for the prompt {exc.args[0]!r} of {task.name} "
                f"({run.model_spec}). Run `probe extract --model {run.model_spec} "
                f"--dataset {run.provenance.get('dataset_spec')} --templates YOUR_FILE` to add these prompts"
            ) from None
        prompt_emb = text_emb[idx]
    return _arrays(task, rows, x, meta, prompt_emb, templates)


def _arrays(task, rows, x, meta, prompt_emb, templates, prompt_note=None) -> TaskArrays:
    keep = np.isin(task.rows, rows)
    every = len(rows) == len(x) and bool((rows == np.arange(len(x))).all())
    xs = x if every else x[rows]  # a task over every row shares the run's array (no copy)
    return TaskArrays(
        task,
        rows,
        xs,
        task.y[keep],
        meta.iloc[rows].reset_index(drop=True),
        prompt_emb,
        tuple(templates),
        prompt_note,
    )


def plan_units(
    store: EmbeddingStore,
    cfg: EvalConfig,
    models: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
) -> tuple[list[Unit], list[str]]:
    """Every (model, unit) to evaluate, with the arrays each needs loaded lazily, and notes.

    A model or task pattern that matches nothing is an error listing what the store has. Runs
    still being extracted are skipped with a note naming them and their progress, so a store
    can be evaluated while other models are still running; if nothing is complete, that is an
    error naming the command that finishes them.
    """
    scanned = store.runs(perturbed=True)  # one scan: the clean runs, and the twins of each below
    all_runs = [r for r in scanned if r.perturbation is None]
    runs = [r for r in all_runs if not models or any(m in (r.model_spec, r.path.split("/")[0]) for m in models)]
    unknown = [m for m in models or [] if not any(m in (r.model_spec, r.path.split("/")[0]) for r in all_runs)]
    if not runs or unknown:
        have = ", ".join(sorted({r.model_spec for r in all_runs})) or "none"
        raise StoreError(f"no extracted model matches {unknown or list(models or [])} in {store.path} (have: {have})")
    units: list[Unit] = []
    notes: list[str] = []
    available: set[str] = set()
    partial = [r for r in runs if not r.complete]
    for run in partial:
        done = run.done_mask()
        texts = "" if run.texts_done else ", texts pending"
        notes.append(
            f"{run.model_spec}: skipped, still being extracted ({int(done.sum())}/{done.size} chunks{texts}); "
            f"finish it with `probe extract --model {run.model_spec} ...` (the same command as before)"
        )
    if len(partial) == len(runs):
        raise StoreError(f"no complete run to evaluate in {store.path}: " + "; ".join(notes))
    for run in runs:
        if run in partial:
            continue
        tmpl = list(templates) if templates else list(run.prompts().get("templates", []))
        arrays = RunArrays(run)
        check_protocol(arrays.meta, cfg)
        run_tasks = derive_tasks(arrays.meta, min_classes=1, specs=cfg.tasks or None)
        for task in run_tasks:
            if task.n_classes < 2:
                if cfg.tasks:  # a user's task that selects too little is worth a word; built-in ones are not
                    notes.append(f"{task.name}: skipped, {task.n_classes} class(es) in {len(task.rows)} matching rows")
                continue
            check_protocol(arrays.meta, task_config(cfg, task))
        run_tasks = [t for t in run_tasks if t.n_classes >= 2]
        caption_heads = {s.name for s in heads_of("captions")} & set(cfg.heads)
        if cfg.tasks:
            caption_heads = set()  # user-defined tasks replace the built-in ones, the μ-Bench captions too
        if run.has_text and run.caption_keys() and caption_heads:
            available.add("mubench")
        views: list[tuple[str | None, RunArrays]] = [(None, arrays)]
        views += [(label, ChannelArrays(arrays, k)) for k, label in enumerate(run.channel_labels)]
        for channel, view in views:
            if run.has_text and caption_heads and run.caption_keys() and _wanted("mubench", tasks):
                key = unit_key(run, "mubench", cfg, [], channel)
                units.append(Unit(run, "captions", "mubench", key, arrays=view, channel=channel))
            for task in run_tasks:
                available.add(task.name)
                if _wanted(task.name, tasks):
                    key = unit_key(run, task.name, cfg, tmpl, channel, task.spec)
                    units.append(Unit(run, "task", task.name, key, (task, tmpl), view, channel))
        twins, twin_notes = robustness.ready_twins(store, run, scanned)  # perturbed twins: robustness/<task> units
        notes += twin_notes
        captioned = [None] if twins and run.has_text and caption_heads and run.caption_keys() else []
        for twin_task in [*captioned, *(run_tasks if twins else [])]:
            name = robustness.PREFIX + (twin_task.name if twin_task is not None else "mubench")
            available.add(name)
            if _wanted(name, tasks):
                tag = json.dumps([tmpl, [[t.perturbation, provenance_hash(t)] for t in twins]])
                key = unit_key(run, name, cfg, [tag], None, twin_task.spec if twin_task is not None else None)
                units.append(Unit(run, "robustness", name, key, (twin_task, tmpl, twins), arrays))
    unmatched = [p for p in tasks or [] if not any(_wanted(name, [p]) for name in available)]
    if unmatched:
        raise UsageError(f"no task matches {unmatched}; tasks in {store.path}: {', '.join(sorted(available))}")
    return units, notes


def task_table(store: EmbeddingStore, cfg: EvalConfig, models: Sequence[str] | None = None) -> pd.DataFrame:
    """The tasks a store supports under `cfg` (its user tasks, or the built-in ones), per dataset.

    One row per (dataset, task): label column, rows, classes, the confounder (batch) column and its
    number of values, how folds are grouped and the protocol. Read from the metadata of one
    complete run per dataset (every model of a dataset shares its rows)."""

    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    runs = [r for r in store.runs() if r.complete and (not models or r.model_spec in models)]
    if not runs:
        raise StoreError(f"no complete run in {store.path} to list tasks from")
    for run in runs:
        dataset = run.path.split("/")[1]
        if dataset in seen:
            continue
        seen.add(dataset)
        meta = run.meta()
        batch = batch_column(meta, cfg)
        for task in derive_tasks(meta, min_classes=1, specs=cfg.tasks or None):
            tcfg = task_config(cfg, task)
            sub = meta.iloc[task.rows]
            rows.append(
                {
                    "dataset": dataset,
                    "task": task.name,
                    "kind": task.kind,
                    "label": task.column,
                    "rows": len(task.rows),
                    "classes": task.n_classes,
                    "where": " ".join(task.spec.where) if task.spec else "",
                    "group_by": task.group_by or "",
                    "batch": batch or "",
                    "batches": int(sub[batch].astype(str).nunique()) if batch else 0,
                    "protocol": tcfg.protocol,
                    "evaluated": task.n_classes >= 2,
                }
            )
    return pd.DataFrame(rows)


def _wanted(name: str, patterns: Sequence[str] | None) -> bool:
    if not patterns:
        return True
    return any(fnmatch.fnmatch(name, p) or name.startswith(p) or p in name for p in patterns)


def run_unit(unit: Unit, cfg: EvalConfig) -> Output:
    """Compute one unit from its run's arrays (read from the store on first use, then shared)."""
    run = unit.run
    a = unit.arrays or RunArrays(run)
    x, valid, meta, texts, text_emb = a.x, a.valid, pixel_size_bins(a.meta), a.texts, a.text_emb
    if unit.kind == "captions":
        if text_emb is None:
            raise StoreError(f"{run.path}: caption units need the run's text embeddings")
        caps = {k: run.captions(k) for k in run.caption_keys()}
        out = Output()
        for spec in heads_of("captions"):
            if spec.name in cfg.heads:
                out.extend(CAPTION_RUNNERS[spec.name](x, text_emb, caps, meta, valid, cfg))
        return out
    if unit.kind == "robustness":  # heads trained on clean rows, scored on perturbed twins (robustness.py)
        task, templates, twins = unit.payload
        valid, shifted = robustness.twin_arrays(twins, valid)
        if task is None:
            if text_emb is None:
                raise StoreError(f"{run.path}: caption units need the run's text embeddings")
            caps = {k: run.captions(k) for k in run.caption_keys()}
            return robustness.evaluate_caption_twins(x, text_emb, caps, meta, valid, shifted, cfg)
        arrays = _task_arrays(run, x, valid, meta, task, templates, texts, text_emb)
        return robustness.evaluate_twins(arrays, shifted, cfg)
    task, templates = unit.payload
    arrays = _task_arrays(run, x, valid, meta, task, templates, texts, text_emb)
    return evaluate_task(arrays, cfg)


def _frame(out: Output, unit: Unit) -> tuple[pd.DataFrame, pd.DataFrame]:
    model = unit.model_name
    dataset = unit.run.path.split("/")[1]
    table = pd.DataFrame(out.records) if out.records else pd.DataFrame(columns=COLUMNS)
    if len(table):
        table.insert(0, "model", model)
        table.insert(1, "dataset", dataset)
        table["provenance"] = provenance_hash(unit.run)
        table["unit"] = unit.key
        table = table[list(COLUMNS)]
    preds = pd.concat(out.predictions, ignore_index=True) if out.predictions else pd.DataFrame(columns=PRED_COLUMNS)
    if len(preds):
        preds.insert(0, "model", model)
        preds.insert(1, "dataset", dataset)
        preds["unit"] = unit.key
    return table, preds


def evaluate_store(
    store: str | Path | EmbeddingStore,
    cfg: EvalConfig | None = None,
    *,
    models: Sequence[str] | None = None,
    tasks: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    results_dir: str | Path | None = None,
    force: bool = False,
    jobs: int = 1,
    progress: Callable[[Unit, int, int], None] | None = None,
    launcher: str | None = None,
    launch: dict[str, Any] | None = None,
) -> EvaluationResult:
    """Evaluate every extracted model in the store; results are saved after each unit.

    `progress(unit, done, total)` is called after each computed unit. `jobs` > 1 computes units
    in worker processes, `launcher` ("ray", "slurm") on a cluster (`launch`: resources, address,
    log_dir, cluster as for `engines.launch_ray` / `launch_slurm`); see the module docstring.
    """
    from . import allocator

    allocator.tune()  # folds, bootstrap and FAISS batches reuse heap memory instead of re-mapping it
    cfg = cfg or EvalConfig()
    if launcher not in (None, "local", "ray", "slurm"):
        raise UsageError(f"--launcher for evaluate must be local, ray or slurm, not {launcher!r}")
    st = store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)
    units, plan_notes = plan_units(st, cfg, models, tasks, templates)
    rd = ResultsDir(results_dir) if results_dir else None
    # the folder's committed state; a unit is done only with its results and predictions (results.py).
    # With --force the old rows stay committed until the unit's new rows replace them.
    table, preds = rd.load() if rd else (pd.DataFrame(columns=COLUMNS), pd.DataFrame(columns=PRED_COLUMNS))
    done_keys = set() if force or not rd else rd.done
    todo = [u for u in units if u.key not in done_keys]
    t0 = time.perf_counter()
    notes: list[str] = [*plan_notes, *(rd.notes if rd else [])]
    kinds: list[str] = ["skipped"] * len(plan_notes) + ["other"] * (len(notes) - len(plan_notes))
    timings: dict[str, float] = {}
    record = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + f".{time.time_ns() % 10**9:09d}",
        "config": cfg.as_dict(),
        "store": str(st.path),
        "python": platform.python_version(),
        "versions": _versions(),
        "models": sorted({u.run.model_spec for u in units}),
    }

    def finish(unit: Unit, out: Output, seconds: float) -> None:
        nonlocal table, preds
        t, p = _frame(out, unit)
        if len(table):  # rows of this unit read from the folder (forced, incomplete, or another writer's)
            table = table[table["unit"] != unit.key]
        if len(preds):
            preds = preds[preds["unit"] != unit.key]
        table = pd.concat([table, t], ignore_index=True) if len(table) else t
        preds = pd.concat([preds, p], ignore_index=True) if len(preds) else p
        notes.extend(f"{unit.model_name}: {n}" for n in out.notes)
        kinds.extend(out.kinds())
        timings[f"{unit.model_name} {unit.task_name}"] = round(seconds, 3)
        if rd:
            table, preds = rd.save(
                table,
                preds,
                {
                    **record,
                    "notes": notes,
                    "note_kinds": kinds,
                    "timings_s": timings,
                    "elapsed_s": round(time.perf_counter() - t0, 3),
                },
                fresh={unit.key},
            )
        if progress:
            progress(unit, len(timings), len(todo))

    if launcher in ("ray", "slurm") or (jobs > 1 and len(todo) > 1):
        by_key = {u.key: u for u in todo}
        for key, out, secs in _elsewhere([_spec(st, u, cfg) for u in todo], jobs, launcher, launch or {}):
            finish(by_key[key], out, secs)
    else:
        for unit in todo:
            s = time.perf_counter()
            finish(unit, run_unit(unit, cfg), time.perf_counter() - s)
    if rd:  # the invocation is recorded even when every unit came from the cache
        rd.save_record(
            {
                **record,
                "notes": notes,
                "note_kinds": kinds,
                "timings_s": timings,
                "computed": len(todo),
                "skipped": len(units) - len(todo),
                "elapsed_s": round(time.perf_counter() - t0, 3),
            }
        )
    mine = {u.key for u in units}
    return EvaluationResult(
        table.reset_index(drop=True),
        preds.reset_index(drop=True),
        notes,
        computed=len(todo),
        skipped=len(units) - len(todo),
        results_dir=rd.path if rd else None,
        note_kinds=kinds,
        scored=int(table["unit"].isin(mine).sum()) if len(table) else 0,
    )


def _versions() -> dict[str, str]:
    from .config import package_versions

    return package_versions()
