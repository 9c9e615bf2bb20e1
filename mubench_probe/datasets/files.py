"""Plain files: an image folder (one subfolder per class) and a CSV manifest (path,label[,meta])."""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import DatasetUnavailableError
from .base import LoadedDataset, fingerprint_strings, slug

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}


@dataclass
class PathImageReader:
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        return Path(self.paths[int(i)]).read_bytes()


def _identity(fmt: str, root: Path, rels: list[str]) -> dict[str, str | None]:
    parts = [f"{r}:{(root / r).stat().st_size if (root / r).exists() else -1}" for r in rels]
    return {
        "format": fmt,
        "id": str(root.resolve()),
        "revision": None,
        "name": root.name,
        "fingerprint": fingerprint_strings(parts),
        "rows": str(len(rels)),
    }


class FolderFormat:
    """`ROOT/<class>/<image>`: the class is the subfolder name; files sorted for a stable order."""

    name = "folder"
    help = "image folder with one subfolder per class"

    def matches(self, spec: str) -> bool:
        p = Path(spec)
        return p.is_dir() and any(c.is_dir() for c in p.iterdir())

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset:
        root = Path(spec)
        rels = sorted(str(f.relative_to(root)) for f in root.glob("*/*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not rels:
            raise DatasetUnavailableError(f"{root}: no images found in class subfolders")
        labels = [Path(r).parts[0] for r in rels]
        meta = pd.DataFrame({"path": rels, "label_name": labels, "dataset": root.name})
        return LoadedDataset(
            spec,
            slug(root.name),
            split,
            _identity("folder", root, rels),
            meta,
            PathImageReader([str(root / r) for r in rels]),
        )


class CsvFormat:
    """`path,label[,metadata...]`; extra columns kept.

    A path may be relative to the CSV's folder (`..` included) or absolute: that is how users
    point a manifest at data that lives elsewhere. The manifest's own sha256 goes into the
    provenance, and its text (with every image's size) into the dataset fingerprint.
    """

    name = "csv"
    help = "CSV manifest with columns path,label[,metadata...]"

    def matches(self, spec: str) -> bool:
        return spec.lower().endswith(".csv")

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset:
        path = Path(spec)
        meta, ident = read_manifest(path)
        root = path.parent
        rels = list(meta["path"])
        return LoadedDataset(spec, slug(path.stem), split, ident, meta, PathImageReader([str(root / r) for r in rels]))


def read_manifest(path: Path) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """A CSV manifest's rows (label -> label_name, a `dataset` column added) and its identity."""
    if not path.is_file():
        raise DatasetUnavailableError(f"CSV manifest {path} does not exist")
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise DatasetUnavailableError(f"cannot read CSV manifest {path}: {exc}") from exc
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise DatasetUnavailableError(f"{path}: needs a header with at least 'path' and 'label'")
    meta = pd.DataFrame(rows).rename(columns={"label": "label_name"})
    if "dataset" not in meta.columns:
        meta["dataset"] = path.stem
    ident = _identity("csv", path.parent, list(meta["path"]))
    ident.update(
        id=str(path.resolve()),
        name=path.stem,
        fingerprint=fingerprint_strings([path.read_text(), ident["fingerprint"] or ""]),
        manifest_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
    )
    return meta, ident
