"""Options shared by several commands, defined once.

Options that set a field of `ExtractConfig` or `EvalConfig` are `ConfigOption`s: their defaults,
and any default their help shows, are read from the dataclass field, so `--help` cannot drift from
config.py (tests/test_cli.py checks every one). `config_options` adds a group of them to a command.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from .. import api
from ..config import HEADS, EvalConfig, ExtractConfig
from .common import _ints, _numbers


def field_default(cls: type, name: str) -> Any:
    """The default of the dataclass field `name` of `cls` (the single source of every default)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def shown(value: Any) -> str:
    """A default as a help text shows it: tuples comma-separated."""
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class ConfigOption:
    """A command-line option that sets one config field.

    `to_config` turns the option's value into the field's (a comma-separated list into a tuple);
    `to_cli` turns the field's default into the option's default. `unset`: the option defaults to
    None, meaning the field's default (or a preset's value); its help names that default with
    `{default}` (formatted by `show`)."""

    config: type
    field: str
    type: Any
    help: str
    decls: tuple[str, ...] = ()
    limits: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    to_config: Callable[[Any], Any] = _same
    to_cli: Callable[[Any], Any] = _same
    unset: bool = False
    show: Callable[[Any], str] = shown

    @property
    def config_default(self) -> Any:
        """The config field's default (read each time: config.py is the one place it is written)."""
        return field_default(self.config, self.field)

    @property
    def default(self) -> Any:
        """The option's default: the field's, as the option takes it (None where `unset`)."""
        return None if self.unset else self.to_cli(self.config_default)

    @property
    def annotation(self) -> Any:
        """`Annotated[type, typer.Option(...)]`, for a command parameter."""
        text = self.help.format(default=self.show(self.config_default))
        return Annotated[self.type, typer.Option(*self.decls, help=text, **self.limits)]


def config_options(options: Mapping[str, ConfigOption], *names: str, after: str | None = None) -> Callable[[Any], Any]:
    """Add the named options (all of `options` when none are named) to a command as keyword
    parameters, after its parameter `after` (default: last); the command takes them as **kwargs."""

    def add(fn: Any) -> Any:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = len(own) if after is None else [p.name for p in own].index(after) + 1
        kind = inspect.Parameter.KEYWORD_ONLY
        new = [
            inspect.Parameter(n, kind, default=options[n].default, annotation=options[n].annotation)
            for n in (names or options)
        ]
        rest = [p.replace(kind=kind) for p in own[at:]]  # typer passes every parameter by name
        fn.__signature__ = sig.replace(parameters=[*own[:at], *new, *rest])
        return fn

    return add


def config_values(options: Mapping[str, ConfigOption], given: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields the given options (by parameter name) set; `unset` options not given set nothing."""
    return {
        options[n].field: options[n].to_config(v)
        for n, v in given.items()
        if n in options and not (options[n].unset and _empty(v))
    }


def _empty(value: Any) -> bool:
    """Not given: None (an empty list, for a repeatable option)."""
    return value is None or (isinstance(value, list | tuple) and not value)


def _extract(name: str, type_: Any, help: str, *decls: str, **limits: Any) -> ConfigOption:
    return ConfigOption(ExtractConfig, name, type_, help, decls, limits)


# ---- ExtractConfig: extract, interpolate (and verify --repair's forward-pass settings) -------------
EXTRACT_OPTIONS: dict[str, ConfigOption] = {
    "batch_size": _extract("batch_size", int, "Images per forward pass.", min=1),
    "workers": _extract("num_workers", int, "DataLoader worker processes (0 = in process).", "--workers", min=0),
    "device": _extract("device", str | None, "auto (cuda, then mps, then cpu; the default), cpu, cuda, cuda:1, mps."),
    "precision": _extract("precision", str, "fp32, fp16 (GPU) or bf16."),
    "dtype": _extract("dtype", str, "Stored embedding dtype: float16 or float32."),
    "chunk_rows": _extract("chunk_rows", int, "Rows per stored chunk (the resume unit).", min=1),
    "features": _extract("features", bool, "Also store pre-projection features."),
    "intensity": _extract("intensity", str, "Intensity policy: percentile, minmax, dtype."),
    "templates": ConfigOption(
        ExtractConfig, "templates", Path | None, "Prompt templates file, one per line with {{}}.", unset=True
    ),
    "overwrite": _extract("overwrite", bool, "Discard a group extracted differently."),
    "max_pixels": _extract(
        "max_pixels", int, "Larger images (width x height) are failed rows, checked before decoding.", min=1
    ),
    "max_file_bytes": _extract(
        "max_file_bytes", int, "Larger image files (and any non-regular file) are failed rows, never read.", min=1
    ),
    "claim_timeout": _extract(
        "claim_timeout", float, "Seconds without heartbeat after which another host's chunk claim is taken over.", min=1
    ),
    "channels": _extract(
        "channels", str | None, "Channels to use, by index or by the file's channel name: '0,2,4' or 'DNA,Mito'."
    ),
    "channel_mode": _extract(
        "channel_mode",
        str,
        "How channels reach an RGB model: rgb (up to 3 to R,G,B), each (one grayscale image and one stored "
        "embedding per channel), composite (a colour per channel, summed).",
    ),
    "z": _extract("z", str | None, "Z-stack projection: max, mean, middle or index:K.", "--z"),
    "t": _extract("t", str | None, "Time-series projection: max, mean, middle or index:K.", "--t"),
    "target_mpp": _extract(
        "target_mpp",
        float | None,
        "Resample every image to this many micrometres per pixel (from metadata or microns_per_pixel).",
    ),
    "shard": _extract(
        "shard",
        str | None,
        "Compute only shard I of N (I/N; chunk ci belongs to shard ci mod N), or auto (torchrun's "
        "RANK/WORLD_SIZE or a Slurm array's task id/count). N processes fill one store.",
    ),
    "perturb": ConfigOption(
        ExtractConfig,
        "perturb",
        list[str] | None,
        "Also extract perturbed runs, NAME:SEVERITY[,SEVERITY...] (repeatable; each severity its own run): blur, "
        "noise, gamma, exposure, stain, rotate, flip, scale, channel-drop, jpeg (see docs: perturbations).",
        ("--perturb",),
        to_config=lambda v: tuple(v or ()),
        to_cli=lambda d: None,
    ),
}


def _listed(value: Any) -> tuple[Any, ...]:
    return tuple(value or ())


def _c_grid(cs: tuple[float, ...]) -> str:
    return f"{len(cs)} values, {min(cs):g} to {max(cs):g}"


def _eval(name: str, type_: Any, help: str, *decls: str, **kw: Any) -> ConfigOption:
    limits = {k: kw.pop(k) for k in ("min",) if k in kw}
    return ConfigOption(EvalConfig, name, type_, help, decls, limits, **kw)


# ---- EvalConfig: evaluate (unset options: the field's default, or the --preset's value) ----------
EVAL_OPTIONS: dict[str, ConfigOption] = {
    "head": _eval("heads", list[str] | None, "Heads: " + ", ".join(HEADS), "--head", to_config=tuple, unset=True),
    "folds": _eval("folds", int, "k for stratified k-fold.", min=2),
    "seed": _eval("seed", int, "Seed for folds, few-shot draws and bootstrap."),
    "protocol": _eval(
        "protocol", str, "kfold; split (the dataset's split column); transfer (--train-where / --test-where)."
    ),
    "train_where": _eval(
        "train_where",
        list[str] | None,
        "transfer: training rows, COLUMN=VALUE (repeatable; values of one column are alternatives, columns "
        "must all match).",
        to_config=_listed,
        to_cli=lambda d: None,
    ),
    "test_where": _eval(
        "test_where",
        list[str] | None,
        "transfer: test rows, COLUMN=VALUE (repeatable).",
        to_config=_listed,
        to_cli=lambda d: None,
    ),
    "bootstrap": _eval("n_boot", int | None, "Bootstrap resamples for CIs (0 = none) [{default}].", min=0, unset=True),
    "ci_method": _eval("ci_method", str | None, "Bootstrap interval: percentile or basic [{default}].", unset=True),
    "shots": _eval(
        "shots", str, "Few-shot k per class, comma-separated.", to_config=lambda v: _ints(v, "--shots"), to_cli=shown
    ),
    "fewshot_seeds": _eval("fewshot_seeds", int, "Few-shot draws per k.", min=1),
    "knn_k": _eval(
        "ks",
        str,
        "k values for kNN, comma-separated.",
        "--knn-k",
        to_config=lambda v: _ints(v, "--knn-k"),
        to_cli=shown,
    ),
    "probe_cs": _eval(
        "cs",
        str | None,
        "The linear probe's C grid, comma-separated [{default}].",
        to_config=lambda v: _numbers(v, "--probe-cs"),
        unset=True,
        show=_c_grid,
    ),
    "caption_templates": _eval(
        "caption_templates", str | None, "μ-Bench captions: both, 0 or 1 [{default}].", unset=True
    ),
    "fine_templates": _eval(
        "fine_templates", str | None, "μ-Bench fine-grained captions only: both, 0 or 1.", unset=True
    ),
    "coarse_templates": _eval(
        "coarse_templates", str | None, "μ-Bench coarse captions only: both, 0 or 1.", unset=True
    ),
    "pooling": _eval("pooling", str | None, "μ-Bench coarse/fine pooling: micro or macro [{default}].", unset=True),
    "exclude_dataset": _eval(
        "exclude_datasets",
        list[str] | None,
        "Source datasets to leave out of the μ-Bench caption scores.",
        to_config=tuple,
        unset=True,
    ),
    "fine_exclude_dataset": _eval(
        "fine_exclude_datasets",
        list[str] | None,
        "... of the fine-grained caption scores only.",
        to_config=tuple,
        unset=True,
    ),
    "coarse_exclude_dataset": _eval(
        "coarse_exclude_datasets",
        list[str] | None,
        "... of the coarse caption scores only.",
        to_config=tuple,
        unset=True,
    ),
    "knn_index": _eval(
        "knn_index",
        str,
        "FAISS factory[:params] proposing kNN candidates (re-scored exactly), e.g. IVF4096,Flat:nprobe=32 "
        "or HNSW32; recall@10 vs exact search is reported. Flat = exact.",
    ),
    "probe_backend": _eval(
        "probe_backend", str, "Linear-probe solver: auto (torch on a GPU), sklearn, torch (same objective)."
    ),
    "device": _eval("device", str, "Device for the torch probe and FAISS: auto, cpu, cuda."),
    "probe_select": _eval(
        "probe_select", str, "How the probe's C is chosen on validation rows: accuracy, balanced_accuracy, log_loss."
    ),
    "batch": _eval(
        "batch",
        str | None,
        "Confounder column (plate, site, patient) for knn_nsb, the batch-effect index, mAP and loso "
        "[dataset where present].",
        "--batch",
    ),
}

# ---- plain options --------------------------------------------------------------------------------
StoreOpt = Annotated[str, typer.Option("--store", "-s", help="Zarr store: a directory or an fsspec URL (s3://...).")]
StoreArg = Annotated[str, typer.Argument(help="Zarr store: a directory or an fsspec URL (s3://...).")]
DEFAULT_STORE = str(api.DEFAULT_STORE)
FormatOpt = Annotated[str, typer.Option("--format", help="Output: table, csv or json.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Same as --format json.")]
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
# cluster resources (launch.Resources), shared by `extract --launcher` and `evaluate --launcher`
PartitionOpt = Annotated[str | None, typer.Option(help="slurm: partition.")]
MemOpt = Annotated[str | None, typer.Option(help="slurm: memory per shard, e.g. 32G.")]
TimeOpt = Annotated[str | None, typer.Option(help="slurm: time limit per shard, minutes or [D-]HH:MM:SS.")]
ParallelOpt = Annotated[int | None, typer.Option(help="slurm: shards running at once.", min=1)]
AddressOpt = Annotated[str | None, typer.Option(help="ray: cluster address (auto = the running cluster).")]
LogDirOpt = Annotated[Path | None, typer.Option(help="slurm/local: folder for job logs [probe-jobs].")]
ClusterOpt = Annotated[
    str, typer.Option(help="slurm: submitit cluster; 'local' runs the same job array here, without Slurm.")
]
# task definitions, shared by `evaluate` and `tasks`
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
ConfounderOpt = EVAL_OPTIONS["batch"].annotation
# verify --repair's forward-pass settings: ExtractConfig's, as extract takes them
DeviceOpt = EXTRACT_OPTIONS["device"].annotation
WorkersOpt = EXTRACT_OPTIONS["workers"].annotation
BatchOpt = EXTRACT_OPTIONS["batch_size"].annotation
