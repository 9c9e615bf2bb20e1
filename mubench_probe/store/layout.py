"""Names, shapes and identity keys a run is laid out with, and the damage report type (no Zarr I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .integrity import CHUNK_DIGEST

FORMAT_VERSION = 2
DEFAULT_STORE = Path("stores") / "default.zarr"
CREATING = ".creating"  # runs being built, renamed into place when complete
CLAIMS = ".claims"  # per-chunk claims of concurrent writers
ROW_ARRAYS = ("image_emb", "features", "failure", "channel_emb")  # chunked like the rows; one chunk per done flag
_PER_CHUNK = (*ROW_ARRAYS, CHUNK_DIGEST)  # arrays with one chunk file per done row chunk
# Keys of the provenance that must agree before new rows join an existing group.
IDENTITY_KEYS = (
    "model_spec",
    "backend",
    "weights_hash",
    "preprocess",
    "intensity_policy",
    "max_pixels",
    "max_file_bytes",  # only when not the default: files over it are failed rows (like max_pixels)
    "dataset_format",
    "dataset_id",
    "dataset_revision",
    "dataset_fingerprint",
    "dataset_limit",
    "n_rows",
    "embed_dim",
    "dtype",
    "chunk_rows",
    "features",
    "pixels",  # channels, channel mode, z / t projection, target pixel size (None: single 2-D images)
    "dataset_scene",
    "perturbation",  # perturbed runs only (see perturb.py): absent in clean runs and in stores made before it
)
PERTURBED = "~"  # a perturbed run's model folder is MODEL~PERTURBATION, e.g. tiny~blur_1


def model_dir(model_slug: str, perturbation_slug: str | None = None) -> str:
    """The first level of a run's path: the model, and for a perturbed run its perturbation key."""
    return model_slug if perturbation_slug is None else f"{model_slug}{PERTURBED}{perturbation_slug}"


def repair_hint(store: Path | str) -> str:
    return f"repair with `probe verify --repair {store}` (or rerun the same `probe extract`)"


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "checksum" in text.lower():  # the codec's message goes on with raw checksum bytes
        return "checksum does not match"
    return f"{type(exc).__name__}: {text}"[:240]


@dataclass(frozen=True)
class RunLayout:
    """Shape decisions fixed when a run group is created."""

    n_rows: int
    embed_dim: int
    chunk_rows: int = 256
    dtype: str = "float16"
    feature_dim: int | None = None
    channels: int = 0  # per-channel embeddings stored (channel_emb), 0 = none

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def chunk_slice(self, ci: int) -> slice:
        return slice(ci * self.chunk_rows, min((ci + 1) * self.chunk_rows, self.n_rows))


@dataclass(frozen=True)
class RunSpec:
    """Everything a new run group is built from, passed as one value from `prepare_run` to the
    creation and repair steps (instead of the same seven arguments at every step)."""

    path: str  # MODEL/DATASET/SPLIT
    provenance: dict[str, Any]
    layout: RunLayout
    meta: pd.DataFrame
    texts: Sequence[str]
    captions: Mapping[str, tuple[np.ndarray, np.ndarray]]
    prompts: Mapping[str, Any]


@dataclass(frozen=True)
class Damage:
    """One integrity problem: where it is, what is wrong, and which repair fixes it.

    `fix` is one of: provenance (group zarr.json / digest), backup (the copy in done/zarr.json),
    array (an array's zarr.json), chunk (a row chunk or done flag: re-extract it), row_index,
    meta, texts (rewritten from the dataset, text embeddings re-encoded), parent (an intermediate
    group's zarr.json), creating (a half-created run).
    """

    node: str
    what: str
    fix: str
    array: str | None = None
    chunk: int | None = None

    def __str__(self) -> str:
        return f"{self.node} {self.what}"


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (old.get(k), new.get(k)) for k in IDENTITY_KEYS if old.get(k) != new.get(k)}
