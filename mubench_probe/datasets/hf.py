"""Hugging Face datasets: hub ids (pinned revision), `save_to_disk` folders, parquet/arrow files.

Rows with a `captions` column are read with the μ-Bench schema; any other HF dataset needs an
image column and a label column (ClassLabel or strings).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from ..errors import DatasetUnavailableError
from .base import CaptionItem, LoadedDataset, slug

MUBENCH_ID = "jnirschl/uBench"
MUBENCH_REVISION = "3f2c5b590bc7a208d5b60f3527ce4c76a331aa2b"
MUBENCH_SPLIT = "test"
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
NESTED = ("captions", "questions")
# The per-row metadata columns of μ-Bench's test split (besides `image` and the NESTED dicts), in
# its order: what the bundled sample reproduces (scripts/make_sample.py) and the tests check.
MUBENCH_METADATA_COLUMNS = (
    "image_id",
    "label",
    "label_name",
    "dataset",
    "domain",
    "subdomain",
    "modality",
    "submodality",
    "stain",
    "ncbitaxon_name",
    "microns_per_pixel",
    "split",
    "synthetic",
    "license",
)


@dataclass
class ArrowImageReader:
    """Reads encoded bytes (decode=False) so that our intensity policy, not PIL, sees raw data.

    Rows are read from a one-column view: indexing a whole μ-Bench row formats every column
    (captions, questions, metadata) and took 150 µs per image, ten times the image column alone.
    """

    ds: Any
    column: str

    def __post_init__(self) -> None:
        self.ds = self.ds.select_columns([self.column])

    def __len__(self) -> int:
        return len(self.ds)

    def read(self, i: int) -> bytes:
        item = self.ds[int(i)][self.column]
        if item is None:
            return b""
        if item.get("bytes"):
            return item["bytes"]
        if item.get("path"):
            return Path(item["path"]).read_bytes()
        return b""


def _image_column(ds: Any) -> str:
    for name in IMAGE_COLUMNS:
        if name in ds.column_names:
            return name
    raise DatasetUnavailableError(
        f"no image column found (looked for {', '.join(IMAGE_COLUMNS)}; columns: {ds.column_names})"
    )


def _parse_captions(ds: Any) -> dict[str, list[CaptionItem | None]]:
    if "captions" not in ds.column_names:
        return {}
    rows = ds.select_columns(["captions"])["captions"]
    keys: list[str] = sorted({k for r in rows if r for k in r})
    out: dict[str, list[CaptionItem | None]] = {k: [] for k in keys}
    for r in rows:
        for k in keys:
            entry = (r or {}).get(k)
            if entry and entry.get("options") and entry.get("answer_idx") is not None:
                out[k].append(CaptionItem(tuple(entry["options"]), int(entry["answer_idx"])))
            else:
                out[k].append(None)
    return out


def from_hf(ds: Any, spec: str, split: str, identity: dict[str, str | None]) -> LoadedDataset:
    """Turn a `datasets.Dataset` into a LoadedDataset (μ-Bench schema or image+label)."""
    import datasets

    col = _image_column(ds)
    ds = ds.cast_column(col, datasets.Image(decode=False))
    keep = [c for c in ds.column_names if c != col and c not in NESTED]
    meta = ds.select_columns(keep).to_pandas() if keep else pd.DataFrame(index=range(len(ds)))
    label_feature = ds.features.get("label")
    if "label_name" not in meta.columns:
        if isinstance(label_feature, datasets.ClassLabel):
            meta["label_name"] = [label_feature.int2str(int(v)) for v in meta["label"]]
        elif "label" in meta.columns:
            meta["label_name"] = meta["label"].astype(str)
        else:
            raise DatasetUnavailableError(f"{spec}: no 'label' or 'label_name' column; columns: {keep}")
    if "dataset" not in meta.columns:
        meta["dataset"] = identity.get("name") or slug(spec)
    identity = {**identity, "fingerprint": getattr(ds, "_fingerprint", None), "rows": str(len(ds))}
    return LoadedDataset(
        spec=spec,
        key=slug(identity.get("name") or spec),
        split=split,
        identity=identity,
        meta=meta.reset_index(drop=True),
        reader=ArrowImageReader(ds, col),
        captions=_parse_captions(ds),
    )


class HubFormat:
    """`ORG/NAME[@REVISION]` on the Hugging Face Hub; μ-Bench is pinned by default."""

    name = "hub"
    help = "Hugging Face Hub id ORG/NAME[@REVISION] (default revision pinned for μ-Bench)"

    def matches(self, spec: str) -> bool:
        return "/" in spec and not Path(spec.split("@")[0]).exists() and not spec.startswith((".", "/"))

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset:
        import datasets

        repo, _, pinned = spec.partition("@")
        rev = pinned or revision or (MUBENCH_REVISION if repo == MUBENCH_ID else None)
        try:
            ds = datasets.load_dataset(repo, split=split, revision=rev)
        except Exception as exc:  # network, auth, bad split: all end as one clear message
            raise DatasetUnavailableError(
                f"could not load {repo} (split {split!r}, revision {rev or 'latest'}) from the "
                f"Hugging Face Hub: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
                "Without network, download it elsewhere with `datasets.load_dataset(...)"
                ".save_to_disk(DIR)` and pass --dataset DIR"
            ) from exc
        return from_hf(ds, spec, split, {"format": "hub", "id": repo, "revision": rev, "name": repo})


class DiskFormat:
    """A folder written by `Dataset.save_to_disk` (or a DatasetDict's, one subfolder per split)."""

    name = "disk"
    help = "local folder written by datasets' save_to_disk"

    def matches(self, spec: str) -> bool:
        p = Path(spec)
        return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset:
        import datasets

        p = Path(spec)
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as exc:
            raise DatasetUnavailableError(f"cannot read dataset folder {p}: {exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DatasetUnavailableError(f"{p} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
        return from_hf(ds, spec, split, {"format": "disk", "id": str(p.resolve()), "revision": None, "name": p.name})


class FilesFormat:
    """Parquet or Arrow files (one file, or a folder of them)."""

    name = "files"
    help = "parquet/arrow file, or a folder of them"
    _suffixes: ClassVar[dict[str, str]] = {".parquet": "parquet", ".arrow": "arrow"}

    def _files(self, spec: str) -> list[Path]:
        p = Path(spec)
        if p.is_file():
            return [p] if p.suffix in self._suffixes else []
        if p.is_dir():
            return sorted(f for f in p.iterdir() if f.suffix in self._suffixes)
        return []

    def matches(self, spec: str) -> bool:
        return bool(self._files(spec))

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset:
        import datasets

        files = self._files(spec)
        kind = self._suffixes[files[0].suffix]
        try:
            ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
        except Exception as exc:
            raise DatasetUnavailableError(f"cannot read {kind} files at {spec}: {exc}") from exc
        return from_hf(
            ds,
            spec,
            split,
            {"format": kind, "id": str(Path(spec).resolve()), "revision": None, "name": Path(spec).stem},
        )
