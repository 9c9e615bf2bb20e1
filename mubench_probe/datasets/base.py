"""What every dataset format produces: per-row metadata, caption options and an image reader."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Protocol

import pandas as pd


@dataclass(frozen=True)
class CaptionItem:
    """One image's options for one caption key (μ-Bench `captions[key]`)."""

    options: tuple[str, ...]
    answer_idx: int


class ImageReader(Protocol):
    """Returns the raw encoded bytes of row i; must survive a fork into DataLoader workers."""

    def __len__(self) -> int: ...

    def read(self, i: int) -> bytes: ...


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


@dataclass
class _HeadReader:
    inner: ImageReader
    n: int

    def __len__(self) -> int:
        return self.n

    def read(self, i: int) -> bytes:
        return self.inner.read(i)


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
