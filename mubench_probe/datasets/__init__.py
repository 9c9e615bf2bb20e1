"""Dataset registry: the bundled sample, HF (hub / disk / parquet / arrow), image folders, CSV."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import DatasetUnavailableError
from .base import CaptionItem, DatasetFormat, ImageReader, LoadedDataset, reads_planes, row_source, slug
from .bioio import BioioCsvFormat, BioioFolderFormat
from .files import CsvFormat, FolderFormat
from .hf import MUBENCH_ID, MUBENCH_REVISION, MUBENCH_SPLIT, DiskFormat, FilesFormat, HubFormat
from .wds import WebDatasetFormat


def sample_path() -> Path:
    """The bundled μ-Bench-format BCCD sample (package data)."""
    return Path(str(resources.files("mubench_probe") / "data" / "sample"))


class SampleFormat:
    name = "sample"
    help = "the bundled 450-image μ-Bench-format sample of BCCD blood-cell crops"

    def matches(self, spec: str) -> bool:
        return spec == "sample"

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset:
        ds = DiskFormat().load(str(sample_path()), split, revision)
        ds.spec, ds.key = "sample", "sample"
        ds.identity = {**ds.identity, "format": "sample", "id": "mubench_probe:sample", "name": "sample"}
        return ds


FORMATS: list[DatasetFormat] = [
    SampleFormat(),
    DiskFormat(),
    FilesFormat(),
    WebDatasetFormat(),
    BioioCsvFormat(),  # before the plain CSV and folder formats: they would take these files as bytes
    CsvFormat(),
    BioioFolderFormat(),
    FolderFormat(),
    HubFormat(),
]


def load_dataset(
    spec: str = MUBENCH_ID,
    split: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
    scene: str | None = None,
) -> LoadedDataset:
    """Resolve a dataset spec through the registry; `scene` keeps one scene of multi-scene
    microscopy files (an index or a name), then `limit` keeps the first rows."""
    split = split or MUBENCH_SPLIT
    for fmt in FORMATS:
        if fmt.matches(spec):
            return fmt.load(spec, split, revision).select_scene(scene).head(limit)
    raise DatasetUnavailableError(
        f"cannot tell what dataset {spec!r} is: not 'sample', a save_to_disk folder, parquet/arrow "
        "files, WebDataset .tar shards, a CSV manifest, an image folder, or a Hub id ORG/NAME (does the path exist?)"
    )


__all__ = [
    "FORMATS",
    "MUBENCH_ID",
    "MUBENCH_REVISION",
    "CaptionItem",
    "DatasetFormat",
    "ImageReader",
    "LoadedDataset",
    "load_dataset",
    "reads_planes",
    "row_source",
    "sample_path",
    "slug",
]
