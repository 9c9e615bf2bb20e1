"""The two configurations: what `extract` and `evaluate` do, validated once, on creation.

Light on purpose (no torch, no scikit-learn): the CLI builds these for `--help` and for commands
that never load a model, and `probe info` / `probe evaluate --help` start in well under 2 s.
`ExtractConfig` is shared by `probe extract`, `probe interpolate`, `probe verify --repair` and the
Python API; `EvalConfig` hashes into the results cache key.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError
from .faiss_factory import check_factory
from .head_specs import C_GRID_HEADS, HEADS

# ---- defaults shared with the heads (kept here so that reading them imports nothing heavy) --------
DEFAULT_KS = (1, 5, 10, 20)
TEMPERATURE = 0.07
DEFAULT_CS = tuple(float(10.0**e) for e in (-2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4))
DEFAULT_PATIENCE = 2
# How the probe's C is chosen on validation rows (heads/linear.py: validation_score). Accuracy
# (and balanced accuracy) on held-out sources, plates or patients is often flat in C, and ties
# go to the smallest C: a majority-class probe. Log-loss is continuous and does not tie; measured
# in benchmarks/probe_selection.py (docs/benchmarks.md, "Choosing C under a class-mix shift").
PROBE_SELECTS = ("accuracy", "balanced_accuracy", "log_loss")
DEFAULT_PROBE_SELECT = "log_loss"
# With one example per class nothing can be held out. Measured on hard cone data
# (benchmarks/evaluate_speed.py --one-shot), 1-shot accuracy is flat in C up to ~1, where the
# strongly regularised solution is the centred class prototype, and falls slightly beyond.
FALLBACK_C = 0.1
DEFAULT_BOOTSTRAP = 1000
CI_METHODS = ("percentile", "basic")

# kfold: stratified (grouped by the task's group column where it has one); split: the `split`
# column; transfer: --train-where / --test-where; loso: leave one batch out (--batch).
PROTOCOLS = ("kfold", "split", "transfer", "loso")
TEMPLATE_CHOICES = ("both", "0", "1")
# `pixel_size` is derived at evaluation from `microns_per_pixel` (power-of-two bins, see evaluation.py)
STRATA = ("dataset", "domain", "subdomain", "modality", "submodality", "stain", "pixel_size")

# μ-Bench's Table 1, as far as the paper, its released scripts and its CI widths tell:
MUBENCH_TABLE1 = {
    "heads": ("zs_caption",),
    "fine_templates": "1",  # the released evaluation script scores one classification template
    "coarse_templates": "both",  # coarse: both sentence templates, all datasets
    "fine_exclude_datasets": ("eulenberg_et_al_2017_darkfield", "eulenberg_et_al_2017_epifluorescence"),
    "pooling": "micro",
    "ci_method": "basic",  # scipy.stats.bootstrap(method="basic")
    "n_boot": 9999,
}
PRESETS: dict[str, dict[str, Any]] = {"mubench-table1": MUBENCH_TABLE1}

# ---- extraction defaults ------------------------------------------------------------------------
DEFAULT_TEMPLATES = (
    "a microscopy image of {}.",
    "a micrograph of {}.",
    "a microscopy image showing {}.",
    "an image of {} under the microscope.",
    "a photomicrograph of {}.",
    "a high-magnification microscopy image of {}.",
)
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = ("float16", "float32")
INTENSITY_POLICIES = ("percentile", "minmax", "dtype")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS)
# Per-file read limit, checked from the file's size before a byte is read. 1 GiB is above the
# largest image the default pixel limit accepts stored uncompressed (8 bytes per allowed pixel:
# 716 MB), so it fails no image that limit lets through, and bounds a worker's read to 1 GiB.
DEFAULT_MAX_FILE_BYTES = 1 << 30
CHANNEL_MODES = ("rgb", "each", "composite")
PROJECTIONS = ("max", "mean", "middle")  # and index:K
DEFAULT_CLAIM_TIMEOUT = 300.0
LAUNCHERS = ("local", "slurm", "ray")
PROBE_BACKENDS = ("auto", "sklearn", "torch")


PACKAGES = ("mubench-probe", "torch", "open_clip_torch", "timm", "zarr", "numpy", "datasets", "pillow", "scikit-learn")


def package_versions() -> dict[str, str]:
    """Versions recorded with every store run and results folder (read from metadata: imports nothing)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def parse_where(conditions: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """COLUMN=VALUE conditions -> {column: values}; values of one column are alternatives.

    COLUMN!=VALUE conditions are exclusions and are keyed as `COLUMN!` (see `parse_conditions`)."""
    include, exclude = parse_conditions(conditions)
    return {**include, **{f"{c}!": v for c, v in exclude.items()}}


def parse_conditions(conditions: Sequence[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """COLUMN=VALUE and COLUMN!=VALUE conditions -> (included values, excluded values) per column.

    A row matches when, for every column, its value is one of that column's `=` values (they are
    alternatives) and none of its `!=` values: `--where plate!=ctrl --where dataset=a --where dataset=b`.
    """
    include: dict[str, tuple[str, ...]] = {}
    exclude: dict[str, tuple[str, ...]] = {}
    for cond in conditions:
        col, sep, val = str(cond).partition("=")
        target = include
        if col.endswith("!"):
            col, target = col[:-1], exclude
        if not sep or not col.strip():
            raise UsageError(f"expected COLUMN=VALUE or COLUMN!=VALUE, not {cond!r}")
        target[col.strip()] = (*target.get(col.strip(), ()), val.strip())
    return include, exclude


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`I/N` (0 <= I < N) -> (I, N); `auto` takes the rank from torchrun (RANK, WORLD_SIZE) or a
    Slurm job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT); None (no option) -> no sharding.

    An explicitly empty value is refused: `--shard "$RANK/$N"` with unset variables must not
    silently make one process compute every chunk."""
    import os

    if text is None:
        return None
    text = str(text).strip()
    if not text:
        raise UsageError("--shard is empty: give I/N (e.g. 0/4) or auto, or leave the option out")
    if text == "auto":
        env = os.environ
        for rank, size in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")):
            if env.get(rank, "").isdigit() and env.get(size, "").isdigit():
                return check_shard((int(env[rank]), int(env[size])))
        raise UsageError("--shard auto: no RANK/WORLD_SIZE (torchrun) or SLURM_ARRAY_TASK_ID/COUNT in the environment")
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit():
        raise UsageError(f"--shard takes I/N (e.g. 0/4) or auto, not {text!r}")
    return check_shard((int(i), int(n)))


def check_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    """(I, N) as given in Python (ExtractConfig(shard=...)): two integers with 0 <= I < N."""
    if shard is None:
        return None
    try:
        i, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise UsageError(f"--shard takes I/N (two integers, e.g. 0/4) or auto, not {shard!r}") from None
    if n < 1:
        raise UsageError(f"--shard {i}/{n}: the number of shards must be at least 1")
    if not 0 <= i < n:
        raise UsageError(f"--shard {i}/{n}: the shard index must be in 0..{n - 1}")
    return (i, n)


def shard_of(chunk: int, shards: int) -> int:
    """The fixed assignment of row chunks to shards: chunk ci belongs to shard ci mod N.

    Chunk-aligned (a shard writes whole chunks only) and interleaved, so every shard gets the
    same number of chunks (+-1) and the same mix of easy and hard rows along the dataset.
    """
    return chunk % shards


def gpu_present() -> bool:
    """Whether this machine has an NVIDIA GPU that torch can use (checked without importing torch first)."""
    import os

    if not os.path.exists("/proc/driver/nvidia/version") and not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def resolve_backend(backend: str, device: str | None = None) -> str:
    """auto -> torch on a GPU (`device` cuda, or auto with a GPU present), else sklearn."""
    if backend != "auto":
        return backend
    if device and str(device).startswith("cuda"):
        return "torch"
    return "torch" if device in (None, "auto") and gpu_present() else "sklearn"


def read_templates(path: str | Path | None) -> tuple[str, ...]:
    """One template per line with a `{}` for the class name; blank lines and # comments skipped."""
    if path is None:
        return DEFAULT_TEMPLATES
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"templates file {p} does not exist")
    lines = [ln.strip() for ln in p.read_text().splitlines()]
    return check_templates(tuple(ln for ln in lines if ln and not ln.startswith("#")), str(p))


def parse_channels(value: str | Sequence[str | int] | None) -> tuple[str, ...] | None:
    """`0,2,4` or `DNA,Mito` (or a sequence) -> a tuple of tokens; digits are indices, else names."""
    if value is None:
        return None
    tokens = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    out = tuple(t.strip() for t in tokens if t.strip())
    if not out:
        raise UsageError(f"--channels takes comma-separated channel indices or names, not {value!r}")
    if len(set(out)) != len(out):
        raise UsageError(f"--channels names a channel twice: {value!r}")
    return out


def parse_projection(value: str | None, option: str = "--z") -> tuple[str, int] | None:
    """max | mean | middle | index:K -> (kind, K); None keeps single planes only (stacks are refused)."""
    if value is None:
        return None
    kind, _, k = value.partition(":")
    if kind in PROJECTIONS and not k:
        return kind, -1
    if kind == "index" and k.isdigit():
        return "index", int(k)
    raise UsageError(f"{option} must be max, mean, middle or index:K (K >= 0), not {value!r}")


def check_templates(templates: Sequence[str], where: str = "templates") -> tuple[str, ...]:
    out = tuple(templates)
    bad = [t for t in out if "{}" not in t]
    if not out or bad:
        raise UsageError(f"{where}: every template needs a '{{}}' for the class name (bad: {bad[:3]})")
    return out


TASK_KINDS = ("fine", "coarse", "custom")


@dataclass(frozen=True)
class TaskSpec:
    """A task as data: which rows, which label column, how folds are grouped, and how it is scored.

    The built-in μ-Bench tasks are instances (`fine/<dataset>`: `label_name` where `dataset` is
    that source; `coarse/<attribute>`: that attribute, folds grouped by `dataset`); `--label`
    and `--tasks FILE.yaml` make others. `protocol`, `train_where`, `test_where` and `heads`
    override the evaluation's settings for this task alone (None / empty: the evaluation's).
    """

    name: str
    label: str
    where: tuple[str, ...] = ()
    group: str | None = None  # folds hold out whole values of this column (source, plate, patient)
    protocol: str | None = None
    train_where: tuple[str, ...] = ()
    test_where: tuple[str, ...] = ()
    heads: tuple[str, ...] | None = None
    kind: str = "custom"

    def __post_init__(self) -> None:
        for name in ("where", "train_where", "test_where"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(str(v) for v in value))
        if isinstance(self.heads, str):
            object.__setattr__(self, "heads", (self.heads,))
        elif self.heads is not None:
            object.__setattr__(self, "heads", tuple(self.heads))
        if not str(self.name).strip() or not str(self.label).strip():
            raise UsageError("a task needs a name and a label column")
        if self.kind not in TASK_KINDS:
            raise UsageError(f"task kind must be one of {', '.join(TASK_KINDS)}, not {self.kind!r}")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise UsageError(f"task {self.name}: protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
        bad = sorted(set(self.heads or ()) - set(HEADS))
        if bad:
            raise UsageError(f"task {self.name}: unknown head(s) {bad}; choose from {', '.join(HEADS)}")
        parse_conditions((*self.where, *self.train_where, *self.test_where))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "task") -> TaskSpec:
        """From a mapping (a YAML entry); unknown keys are a usage error naming the known ones."""
        if not isinstance(data, dict):
            raise UsageError(f"{where}: each task must be a mapping with at least 'label', not {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
        if "label" not in data:
            raise UsageError(f"{where}: a task needs 'label' (the metadata column holding the classes)")
        values = dict(data)
        values.setdefault("name", values["label"])
        name = str(values["name"])
        values["name"] = name if name.startswith(("custom/", "fine/", "coarse/")) else f"custom/{name}"
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def read_task_file(path: str | Path) -> tuple[TaskSpec, ...]:
    """Task definitions from a YAML file: a list of mappings, or {tasks: [...]} (see TaskSpec)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"tasks file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        raise UsageError(f"tasks file {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and "tasks" in data:
        data = data["tasks"]
    if not isinstance(data, list) or not data:
        raise UsageError(f"tasks file {p}: expected a list of tasks (or 'tasks:' with a list)")
    specs = tuple(TaskSpec.from_dict(d, f"{p} task {i + 1}") for i, d in enumerate(data))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"tasks file {p}: task names must be unique ({', '.join(names)})")
    return specs


class _Config:
    """Shared behaviour: a validated, frozen record that can be copied with changes."""

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed (validated again); unknown names are a usage error."""
        names = {f.name for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        unknown = sorted(set(changes) - names)
        if unknown:
            raise UsageError(f"unknown setting(s) {unknown}; known: {', '.join(sorted(names))}")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]


@dataclass(frozen=True)
class ExtractConfig(_Config):
    """How `probe extract` (and interpolate, and repair) turns images into stored embeddings.

    Everything but the model and the dataset: forward-pass settings (batch, workers, device,
    precision), what is stored (dtype, chunk size, pre-projection features), how raw intensities
    become RGB (`intensity`, `max_pixels`, `max_file_bytes`), which class prompts are embedded (`templates`),
    and how concurrent writers coordinate (`claim_timeout`, and `shard`: which chunks this
    process computes when N processes fill one store).

    Multi-dimensional images: `channels` selects channels (indices or names from the file's
    metadata), `channel_mode` maps them to an RGB model (rgb: up to three to R, G, B; each: one
    grayscale image and one stored embedding per channel; composite: a fixed colour per channel,
    summed), `z` / `t` project stacks (max, mean, middle, index:K), and `target_mpp` resamples
    every image to that many µm per pixel first. All default to the single-image behaviour.
    """

    batch_size: int = 64
    num_workers: int = 2
    device: str | None = None  # None / "auto": cuda, then mps, then cpu
    precision: str = "fp32"
    dtype: str = "float16"
    chunk_rows: int = 256
    features: bool = False
    intensity: str = "percentile"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT
    channels: tuple[str, ...] | None = None
    channel_mode: str = "rgb"
    z: str | None = None
    t: str | None = None
    target_mpp: float | None = None
    shard: tuple[int, int] | None = None  # (I, N): only the chunks ci with ci % N == I (see shard_of)
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES  # larger image files are failed rows, never read
    perturb: tuple[str, ...] = ()  # perturbation keys (perturb.py), each its own run beside the clean one

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "shard", parse_shard(self.shard) if isinstance(self.shard, str) else check_shard(self.shard)
        )
        object.__setattr__(self, "channels", parse_channels(self.channels))
        if self.channel_mode not in CHANNEL_MODES:
            raise UsageError(f"--channel-mode must be one of {', '.join(CHANNEL_MODES)}, not {self.channel_mode!r}")
        if self.channel_mode == "rgb" and self.channels and len(self.channels) > 3:
            raise UsageError(
                f"--channel-mode rgb maps at most three channels to R, G, B ({len(self.channels)} given); "
                "use --channel-mode each or composite"
            )
        if self.channel_mode == "each" and not self.channels:
            raise UsageError("--channel-mode each needs --channels (which channels to embed one by one)")
        parse_projection(self.z, "--z")
        parse_projection(self.t, "--t")
        if self.target_mpp is not None and not self.target_mpp > 0:
            raise UsageError("--target-mpp must be a positive number of micrometres per pixel")
        if isinstance(self.templates, str | Path):  # a templates file
            object.__setattr__(self, "templates", read_templates(self.templates))
        else:
            object.__setattr__(self, "templates", check_templates(self.templates))
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1")
        if self.num_workers < 0:
            raise UsageError("--workers must be 0 or more")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be {' or '.join(DTYPES)}, not {self.dtype!r}")
        if self.chunk_rows < 1:
            raise UsageError("--chunk-rows must be at least 1")
        if self.intensity not in INTENSITY_POLICIES:
            raise UsageError(
                f"unknown intensity policy {self.intensity!r}; choose one of {', '.join(INTENSITY_POLICIES)}"
            )
        if self.max_pixels < 1:
            raise UsageError("--max-pixels must be at least 1")
        if self.max_file_bytes < 1:
            raise UsageError("--max-file-bytes must be at least 1")
        if self.claim_timeout <= 0:
            raise UsageError("--claim-timeout must be positive")
        from .perturb import parse_perturbations  # numpy is imported when a config is made, not with the CLI

        perturb = (self.perturb,) if isinstance(self.perturb, str) else tuple(self.perturb or ())
        object.__setattr__(self, "perturb", tuple(p.key for p in parse_perturbations(perturb)))

    @classmethod
    def from_provenance(
        cls, provenance: Mapping[str, Any], templates: Sequence[str] | None = None, base: ExtractConfig | None = None
    ) -> ExtractConfig:
        """The settings a run was extracted with, read back from its provenance, so that a repair or a
        rerun stores exactly what the run holds; the one inverse of what extraction records.

        `templates` are the run's class-prompt templates (kept beside the provenance, in its prompt
        plan; None: the defaults). Settings that change no stored value (device, precision, batch
        size, workers, claims, shard) come from `base`."""
        p = provenance
        pixels = p.get("pixels") or {}
        return (base or cls()).replace(
            intensity=str(p.get("intensity_policy", "percentile")).split(":")[0],
            templates=tuple(templates or DEFAULT_TEMPLATES),
            chunk_rows=int(p["chunk_rows"]),
            dtype=str(p["dtype"]),
            features=bool(p.get("features")),
            overwrite=False,
            max_pixels=int(p.get("max_pixels", DEFAULT_MAX_PIXELS)),
            max_file_bytes=int(p.get("max_file_bytes", DEFAULT_MAX_FILE_BYTES)),
            channels=tuple(pixels["channels"]) if pixels.get("channels") else None,
            channel_mode=pixels.get("channel_mode", "rgb"),
            z=pixels.get("z"),
            t=pixels.get("t"),
            target_mpp=pixels.get("target_mpp"),
            perturb=(str(p["perturbation"]["key"]),) if isinstance(p.get("perturbation"), Mapping) else (),
        )


@dataclass(frozen=True)
class EvalConfig(_Config):
    """Everything that changes a number; its hash keys the results cache. Validated on creation."""

    heads: tuple[str, ...] = HEADS
    folds: int = 5
    seed: int = 0
    protocol: str = "kfold"  # kfold | split (the `split` column) | transfer (train_where / test_where)
    train_where: tuple[str, ...] = ()
    test_where: tuple[str, ...] = ()
    ks: tuple[int, ...] = DEFAULT_KS
    temperature: float = TEMPERATURE
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    fewshot_seeds: int = 5
    n_boot: int = DEFAULT_BOOTSTRAP
    ci_method: str = "percentile"  # or "basic"
    cs: tuple[float, ...] = DEFAULT_CS
    patience: int = DEFAULT_PATIENCE
    fallback_c: float = FALLBACK_C
    caption_templates: str = "both"  # both, 0 (first template) or 1 (second), for both groups ...
    fine_templates: str | None = None  # ... unless overridden per group
    coarse_templates: str | None = None
    pooling: str = "micro"  # pooled accuracy over all answers, or "macro": mean over caption keys
    exclude_datasets: tuple[str, ...] = ()  # left out of both caption groups ...
    fine_exclude_datasets: tuple[str, ...] = ()  # ... or of one group only
    coarse_exclude_datasets: tuple[str, ...] = ()
    strata: tuple[str, ...] = STRATA
    knn_index: str = "Flat"  # a FAISS factory[:params] for kNN candidates (exact re-scoring either way)
    probe_backend: str = "auto"  # the linear probe's solver: sklearn, torch, or auto (torch on a GPU)
    device: str = "auto"  # where the probe (torch) and FAISS indexes run: auto, cpu, cuda, cuda:1
    probe_select: str = DEFAULT_PROBE_SELECT  # how the probe's C is chosen on validation rows
    batch: str | None = None  # the confounder column (plate, site, patient); None: `dataset` where present
    batch_k: int = 10  # neighbours of the batch-effect index
    map_permutations: int = 1000  # permutation null of the phenotypic mAP
    tasks: tuple[TaskSpec, ...] = ()  # user-defined tasks (--label / --tasks); empty: the built-in ones

    def __post_init__(self) -> None:
        if self.probe_select not in PROBE_SELECTS:
            raise UsageError(f"--probe-select must be one of {', '.join(PROBE_SELECTS)}, not {self.probe_select!r}")
        if self.batch is not None and not str(self.batch).strip():
            raise UsageError("--batch needs a metadata column name")
        object.__setattr__(
            self, "tasks", tuple(t if isinstance(t, TaskSpec) else TaskSpec.from_dict(t) for t in self.tasks)
        )
        if self.batch_k < 1 or self.map_permutations < 1:
            raise UsageError("the batch-effect k and the mAP permutations must be at least 1")
        if self.probe_backend not in PROBE_BACKENDS:
            raise UsageError(f"--probe-backend must be one of {', '.join(PROBE_BACKENDS)}, not {self.probe_backend!r}")
        if not self.knn_index.strip():
            raise UsageError("--knn-index needs a FAISS factory string (Flat, IVF4096,Flat, HNSW32, ...)")
        check_factory(self.knn_index)  # a typo is refused here, not after every unit loaded its data
        bad = sorted(set(self.heads) - set(HEADS))
        if bad or not self.heads:
            raise UsageError(f"unknown head(s) {bad}; choose from {', '.join(HEADS)}")
        if self.protocol not in PROTOCOLS:
            raise UsageError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {self.protocol!r}")
        if (self.protocol == "transfer") != bool(self.train_where and self.test_where):
            raise UsageError("--protocol transfer needs --train-where and --test-where (and they need it)")
        parse_conditions((*self.train_where, *self.test_where))
        for name in ("caption_templates", "fine_templates", "coarse_templates"):
            value = getattr(self, name)
            if value is not None and value not in TEMPLATE_CHOICES:
                raise UsageError(f"{name.replace('_', '-')} must be both, 0 or 1, not {value!r}")
        if self.pooling not in ("micro", "macro"):
            raise UsageError(f"pooling must be micro or macro, not {self.pooling!r}")
        if self.ci_method not in CI_METHODS:
            raise UsageError(f"CI method must be one of {', '.join(CI_METHODS)}, not {self.ci_method!r}")
        if self.folds < 2 or self.fewshot_seeds < 1 or self.n_boot < 0 or self.patience < 1:
            raise UsageError("folds must be >= 2, few-shot seeds and patience >= 1, bootstrap >= 0")
        if not self.ks or min(self.ks) < 1 or (self.shots and min(self.shots) < 1):
            raise UsageError("kNN k values and few-shot shots must be positive integers")
        if not self.cs or min(self.cs) <= 0 or list(self.cs) != sorted(self.cs):
            raise UsageError("the probe's C grid must be positive and increasing")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> EvalConfig:
        """A named configuration (see PRESETS); explicit overrides win."""
        if name not in PRESETS:
            raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def cache_dict(self) -> dict[str, Any]:
        """What keys the results cache: every field, minus where the work runs (`device`), with the
        probe backend resolved; settings at their single-machine defaults are left out, so results
        computed before these settings existed are still found."""
        d = self.as_dict()
        d.pop("device")
        d.pop("tasks")  # each unit's key holds its own task's definition
        probes = C_GRID_HEADS & set(self.heads)
        d["probe_backend"] = resolve_backend(self.probe_backend, self.device) if probes else "sklearn"
        for key, default in (
            ("knn_index", "Flat"),
            ("probe_backend", "sklearn"),
            ("batch", None),
            ("batch_k", 10),
            ("map_permutations", 1000),
        ):
            if d[key] == default:
                d.pop(key)
        return d

    def templates_for(self, group: str) -> str:
        own = self.fine_templates if group == "fine" else self.coarse_templates
        return own or self.caption_templates

    def excluded_for(self, group: str) -> tuple[str, ...]:
        own = self.fine_exclude_datasets if group == "fine" else self.coarse_exclude_datasets
        return (*self.exclude_datasets, *own)
