"""Repairing a damaged store from its own provenance (`probe verify --repair`).

A run's provenance says how it was made (`ExtractConfig.from_provenance`); a repair reloads its
model and dataset and does what a rerun of `probe extract` would. Where this machine cannot, the
report gives the `probe extract` command to run elsewhere.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import DEFAULT_MAX_PIXELS, DEFAULT_TEMPLATES, ExtractConfig
from .errors import DatasetUnavailableError, ModelUnavailableError, ProvenanceMismatchError
from .store import EmbeddingStore

if TYPE_CHECKING:
    from .extraction import ExtractReport, NotifyFn, ProgressFn


@dataclass
class RepairReport:
    repaired: list[str] = field(default_factory=list)  # one line per problem fixed
    remaining: list[str] = field(default_factory=list)  # problems still there after the repair
    commands: list[str] = field(default_factory=list)  # what to run where this machine could not repair
    reports: list[ExtractReport] = field(default_factory=list)


def _run_config(record: dict[str, Any], base: ExtractConfig | None = None) -> ExtractConfig:
    return ExtractConfig.from_provenance(record["provenance"], (record.get("prompts") or {}).get("templates"), base)


def extract_command(store: str | Path, record: dict[str, Any]) -> str:
    """The `probe extract` command that recreates or repairs a run, from its provenance."""
    p = record["provenance"]
    cfg = _run_config(record)
    q = shlex.quote
    cmd = [
        "probe extract",
        f"--store {q(str(store))}",
        f"--model {q(str(p.get('model_spec')))}",
        f"--dataset {q(str(p.get('dataset_spec')))}",
        f"--split {q(str(p.get('split')))}",
    ]
    if p.get("dataset_revision") and p.get("dataset_format") == "hub":
        cmd.append(f"--revision {q(str(p['dataset_revision']))}")
    if p.get("dataset_limit"):
        cmd.append(f"--limit {p['dataset_limit']}")
    if p.get("dataset_scene") is not None:
        cmd.append(f"--scene {q(str(p['dataset_scene']))}")
    cmd.append(f"--intensity {cfg.intensity}")
    cmd += [f"--dtype {cfg.dtype}", f"--chunk-rows {cfg.chunk_rows}"]
    if cfg.features:
        cmd.append("--features")
    if cfg.max_pixels != DEFAULT_MAX_PIXELS:
        cmd.append(f"--max-pixels {cfg.max_pixels}")
    if p.get("max_file_bytes") is not None:  # recorded only when not the default
        cmd.append(f"--max-file-bytes {cfg.max_file_bytes}")
    if cfg.channels:
        cmd.append(f"--channels {q(','.join(cfg.channels))}")
    if cfg.channel_mode != "rgb":
        cmd.append(f"--channel-mode {cfg.channel_mode}")
    for key in ("z", "t", "target_mpp"):
        if getattr(cfg, key) is not None:
            cmd.append(f"--{key.replace('_', '-')} {getattr(cfg, key)}")
    cmd += [f"--perturb {q(k)}" for k in cfg.perturb]
    if cfg.templates != DEFAULT_TEMPLATES:
        templates = list(cfg.templates)
        cmd.append(f"--templates FILE  (FILE: the run's {len(templates)} templates, one per line: {templates!r})")
    return " ".join(cmd)


def repair_store(
    path: str | Path,
    config: ExtractConfig,
    *,
    progress: Callable[[str, int], ProgressFn | None] | None = None,
    notify: NotifyFn | None = None,
) -> RepairReport:
    """Repair every damaged run from its own provenance (see `api.repair_store`).

    Only the forward-pass settings of `config` (device, precision, batch size, workers) are used."""
    from .datasets import load_dataset
    from .encoders import load_encoder
    from .extraction import extract_into

    st = EmbeddingStore(path, repair=True)
    report = RepairReport(repaired=st.repaired + st.cleanup())
    damaged = {"/".join(d.node.split("/")[:3]) for d in st.check(deep=True)}
    for node in st.scan():
        if node.path not in damaged:
            continue
        record = st.repair_record(node)
        if record is None:
            report.commands.append(
                f"{st.path}/{node.path}: its provenance is damaged and so is its copy in done/zarr.json, so "
                f"nothing says how it was made: delete {st.path}/{node.path} and extract it again"
            )
            continue
        p = record["provenance"]
        cmd = extract_command(st.path, record)
        try:
            ds = load_dataset(
                p.get("dataset_spec") or "sample",
                split=p.get("split"),
                revision=p.get("dataset_revision"),
                limit=int(p["dataset_limit"]) if p.get("dataset_limit") else None,
                scene=p.get("dataset_scene"),
            )
            encoder = load_encoder(p["model_spec"], device=config.device, precision=config.precision)
        except (ModelUnavailableError, DatasetUnavailableError) as exc:
            report.commands.append(f"{node.path}: cannot reload its model or dataset here ({exc}); run: {cmd}")
            continue
        try:
            bar = progress(p["model_spec"], len(ds)) if progress else None
            done = extract_into(st, encoder, ds, _run_config(record, config), bar, notify)
        except ProvenanceMismatchError as exc:
            what = "; ".join(getattr(exc, "__notes__", [])) or str(exc)
            report.commands.append(
                f"{node.path}: nothing was extracted: the model or dataset reloaded here differs from the run's: "
                f"{what} (the run's provenance was edited, or its model or dataset changed since extraction). "
                f"Make the run's model and dataset available here, or discard the run and extract it again: "
                f"{cmd} --overwrite"
            )
            continue
        report.reports.append(done)
        report.repaired += done.repaired
    report.remaining = [str(d) for d in st.check(deep=True)]
    return report
