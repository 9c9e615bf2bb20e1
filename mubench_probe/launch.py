"""Extraction as shards: what one shard runs, and how all of them are started on an engine.

A shard is a picklable `ShardJob` (models, dataset spec, store, ExtractConfig with
`shard=(I, N)`); every launcher runs the same `run_shard` on it, through the engines of
`mubench_probe.engines` (local processes, a Slurm job array via submitit, Ray tasks).

The shards coordinate only through the store: run creation is atomic (the first shard to get
there creates the run, the others join it) and chunk claims keep a shard that runs twice from
computing a chunk twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import LAUNCHERS, ExtractConfig
from .engines import Launch, NotifyFn, Resources, launch_local, launch_ray, launch_slurm
from .errors import UsageError

RERUN = " (rerun the same command: finished chunks are kept)"


@dataclass(frozen=True)
class ShardJob:
    """Everything one shard needs, picklable, so any engine can run it anywhere."""

    models: tuple[str, ...]
    dataset: str
    split: str | None
    revision: str | None
    limit: int | None
    store: str
    config: ExtractConfig
    scene: str | None = None  # which scene(s) of multi-scene files (see datasets.open_dataset)

    @property
    def shard(self) -> tuple[int, int]:
        assert self.config.shard is not None  # set by shard_jobs
        return self.config.shard

    def __call__(self) -> list[dict[str, Any]]:
        return run_shard(self)


def shard_jobs(
    models: Sequence[str],
    dataset: str,
    store: str | Path,
    config: ExtractConfig,
    shards: int,
    split: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
    scene: str | None = None,
) -> list[ShardJob]:
    """One job per shard 0..shards-1, in shard order."""
    if shards < 1:
        raise UsageError("--shards must be at least 1")
    return [
        ShardJob(
            tuple(models), str(dataset), split, revision, limit, str(store), config.replace(shard=(i, shards)), scene
        )
        for i in range(shards)
    ]


def run_shard(job: ShardJob) -> list[dict[str, Any]]:
    """Extract every model's chunks of this shard into the store (what each launched process runs).

    The same steps as `api.extract`: an existing store is opened before the model loads, a new
    one created only once it has loaded (a failed load leaves nothing behind)."""
    # torch-heavy layers are imported here, when a shard runs, not when jobs are only built
    from .datasets import load_dataset
    from .encoders import load_encoder
    from .extraction import extract_into
    from .locations import store_exists
    from .store import EmbeddingStore

    cfg = job.config
    ds = load_dataset(job.dataset, split=job.split, revision=job.revision, limit=job.limit, scene=job.scene)
    out = []
    for model in job.models:
        existing = EmbeddingStore(job.store) if store_exists(job.store) else None
        encoder = load_encoder(model, device=cfg.device, precision=cfg.precision)
        st = existing or EmbeddingStore(job.store, create=True)
        report = extract_into(st, encoder, ds, cfg, notify=lambda line: print(f"note: {line}", flush=True))
        for r in [report, *report.perturbed]:  # the clean run, then its --perturb runs
            out.append(
                {
                    "model": r.model,
                    "perturbation": r.perturbation,
                    "shard": list(job.shard),
                    "chunks_written": r.chunks_written,
                    "chunks_skipped": r.chunks_skipped,
                    "chunks_by_others": r.chunks_by_others,
                    "rows": r.rows,
                    "seconds": round(r.seconds, 3),
                    "host": os.uname().nodename,
                    "pid": os.getpid(),
                }
            )
    return out


def _label(job: ShardJob) -> str:
    return f"shard {job.shard[0]}/{job.shard[1]}"


Starter = Callable[..., Launch]


def _local(jobs: Sequence[ShardJob], resources: Resources, **how: Any) -> Launch:
    return launch_local(
        jobs, resources.gpus_per_shard, how["log_dir"], how["notify"], label=_label, name="shard", failure_hint=RERUN
    )


def _slurm(jobs: Sequence[ShardJob], resources: Resources, **how: Any) -> Launch:
    return launch_slurm(run_shard, jobs, resources, how["log_dir"], how["cluster"], name="probe-extract")


def _ray(jobs: Sequence[ShardJob], resources: Resources, **how: Any) -> Launch:
    return launch_ray(run_shard, jobs, resources, how["address"], how["notify"], label=_label)


STARTERS: dict[str, Starter] = {"local": _local, "slurm": _slurm, "ray": _ray}  # keys: config.LAUNCHERS


def launch_extract(
    jobs: Sequence[ShardJob],
    launcher: str,
    resources: Resources | None = None,
    *,
    address: str | None = None,
    log_dir: str | Path | None = None,
    cluster: str = "slurm",
    notify: NotifyFn | None = None,
) -> Launch:
    """Start every shard on `launcher` (one of config.LAUNCHERS); see `engines` for which ones wait."""
    if launcher not in LAUNCHERS:
        raise UsageError(f"--launcher must be one of {', '.join(LAUNCHERS)}, not {launcher!r}")
    return STARTERS[launcher](
        jobs, resources or Resources(), address=address, log_dir=log_dir, cluster=cluster, notify=notify
    )
