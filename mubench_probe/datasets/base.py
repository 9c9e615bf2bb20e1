"""What every dataset format produces: per-row metadata, caption options and an image reader."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from ..errors import DatasetUnavailableError


@dataclass(frozen=True)
class CaptionItem:
    """One image's options for one caption key (μ-Bench `captions[key]`)."""

    options: tuple[str, ...]
    answer_idx: int


class ImageReader(Protocol):
    """Returns the raw encoded bytes of row i; must survive a fork into DataLoader workers.

    A reader of files that are not one encoded image (bioio formats) also has
    `source(i, max_pixels) -> PlaneSource`: the row's pixels, read plane by plane (see
    `row_source`, which decodes the bytes of every other reader). A reader of files may also
    have `file_name(i) -> str` (row i's file as the dataset names it, for failure reasons; see
    `row_file_name`) and `with_max_bytes(n)` (a copy that refuses files over n bytes unread).
    """

    def __len__(self) -> int: ...

    def read(self, i: int) -> bytes: ...


def reads_planes(reader: ImageReader) -> bool:
    """Whether the reader underneath any row selection reads planes itself (bioio) instead of bytes."""
    while isinstance(reader, _HeadReader | _RowsReader):
        reader = reader.inner
    return getattr(reader, "source", None) is not None


def row_source(reader: ImageReader, i: int, max_pixels: int) -> Any:
    """Row i as a (T, C, Z, Y, X) PlaneSource: the reader's own, or its bytes decoded."""
    from ..imaging import decode_source

    own = getattr(reader, "source", None)
    return own(i, max_pixels) if own is not None else decode_source(reader.read(i), max_pixels)


def row_file_name(reader: ImageReader, i: int) -> str | None:
    """The file row i comes from, as the dataset names it (None for rows that are not files):
    failure reasons name it, so a user can find the file and every run stores the same text."""
    while isinstance(reader, _HeadReader | _RowsReader):
        if isinstance(reader, _RowsReader):
            i = reader.rows[int(i)]
        reader = reader.inner
    name = getattr(reader, "file_name", None)
    return name(int(i)) if callable(name) else None


def limit_file_size(reader: ImageReader, max_bytes: int) -> ImageReader:
    """The reader (under any row selection) refusing files over `max_bytes` before reading them;
    readers that do not read files are returned as they are."""
    if isinstance(reader, _HeadReader):
        return _HeadReader(limit_file_size(reader.inner, max_bytes), reader.n)
    if isinstance(reader, _RowsReader):
        return _RowsReader(limit_file_size(reader.inner, max_bytes), reader.rows)
    limited = getattr(reader, "with_max_bytes", None)
    return limited(max_bytes) if callable(limited) else reader


@dataclass
class LoadedDataset:
    """A dataset resolved to plain tables; rows are keyed by position, never by image_id."""

    spec: str
    key: str
    split: str
    identity: dict[str, str | None]
    meta: pd.DataFrame
    reader: ImageReader
    captions: dict[str, list[CaptionItem | None]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.meta)

    def head(self, n: int | None) -> LoadedDataset:
        """The first n rows (the `--limit` semantics); identity records the limit."""
        if n is None or n >= len(self):
            return self
        return LoadedDataset(
            spec=self.spec,
            key=self.key,
            split=self.split,
            identity={**self.identity, "limit": str(n)},
            meta=self.meta.iloc[:n].reset_index(drop=True),
            reader=_HeadReader(self.reader, n),
            captions={k: v[:n] for k, v in self.captions.items()},
        )

    def select_scene(self, scene: str | None) -> LoadedDataset:
        """Only the rows of one scene of multi-scene files (`--scene`: an index or a scene name);
        identity records it. Datasets without scenes refuse it."""
        if scene is None:
            return self
        if "scene" not in self.meta.columns:
            raise DatasetUnavailableError(
                f"--scene applies to microscopy files read with bioio (OME-TIFF, OME-Zarr, CZI, ND2, LIF); "
                f"{self.spec} has no scenes"
            )
        by_index = self.meta["scene_index"].astype(str) == scene if "scene_index" in self.meta else False
        keep = (self.meta["scene"].astype(str) == scene) | by_index
        rows = [int(i) for i in keep.to_numpy().nonzero()[0]]
        if not rows:
            have = ", ".join(sorted({str(v) for v in self.meta["scene"]})[:10])
            raise DatasetUnavailableError(f"no scene {scene!r} in {self.spec} (scenes: {have})")
        return LoadedDataset(
            spec=self.spec,
            key=self.key,
            split=self.split,
            identity={**self.identity, "scene": scene},
            meta=self.meta.iloc[rows].reset_index(drop=True),
            reader=_RowsReader(self.reader, rows),
            captions={k: [v[i] for i in rows] for k, v in self.captions.items()},
        )


@dataclass
class _HeadReader:
    inner: ImageReader
    n: int

    def __len__(self) -> int:
        return self.n

    def read(self, i: int) -> bytes:
        return self.inner.read(i)

    def source(self, i: int, max_pixels: int) -> Any:
        return row_source(self.inner, i, max_pixels)


@dataclass
class _RowsReader:
    inner: ImageReader
    rows: list[int]

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, i: int) -> bytes:
        return self.inner.read(self.rows[int(i)])

    def source(self, i: int, max_pixels: int) -> Any:
        return row_source(self.inner, self.rows[int(i)], max_pixels)


class DatasetFormat(Protocol):
    """A registry entry: recognises a dataset spec and loads it."""

    name: str
    help: str

    def matches(self, spec: str) -> bool: ...

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset: ...


def slug(text: str, max_len: int = 80) -> str:
    """A filesystem- and Zarr-safe group name that still reads like the original spec."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "x"
    if len(s) > max_len:
        s = s[: max_len - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return s


def fingerprint_strings(parts: list[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
