"""WebDataset tar shards: `path/shards-{000000..000099}.tar`, local paths or fsspec URLs.

Samples follow the WebDataset convention (webdataset's own key splitting: `KEY.EXT`, the key
up to the first dot of the file name): one image member (jpg, png, tif, webp, ...) and optional
label and metadata members: `cls` (class index, or a name; mapped through a `classnames.txt`
beside the shards when there is one), `json` (a dict whose scalar fields become metadata
columns; `label_name` or `label` in it is the label), `txt` (kept as the `caption` column).

Loading reads the tar headers and the small label/metadata members only, never an image: it
records each image's offset and size, so a row is one seek and one read. Every DataLoader
worker keeps its own open shard files, so the rows of a chunk (consecutive, mostly in one shard)
are read without re-reading any shard. Row order is the shards' order, then the members' order.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DatasetUnavailableError, ImageDecodeError
from .base import LoadedDataset, fingerprint_strings, slug

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp", "gif", "ppm", "pgm")
META_EXTS = ("cls", "json", "txt")
MAX_META_BYTES = 1 << 20  # a label/metadata member larger than this is not metadata


def _shards(spec: str) -> list[str]:
    from webdataset.shardlists import expand_urls

    return list(expand_urls(spec))


def _fs(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


_OPEN: OrderedDict[tuple[int, str], Any] = OrderedDict()  # per process: file handles are not shared over a fork
_OPEN_MAX = 4


def close_shards() -> None:
    """Close this process's open shard handles (the next read reopens what it needs)."""
    while _OPEN:
        _OPEN.popitem(last=False)[1].close()


def _handle(url: str) -> Any:
    key = (os.getpid(), url)
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    fs, path = _fs(url)
    fh = fs.open(path, "rb")
    _OPEN[key] = fh
    while len(_OPEN) > _OPEN_MAX:
        _OPEN.popitem(last=False)[1].close()
    return fh


@dataclass
class TarMemberReader:
    """Row i -> the bytes at (shard, offset, size): one seek and one read in an open shard."""

    urls: list[str]
    shard: np.ndarray  # int32 per row
    offset: np.ndarray  # int64 per row
    size: np.ndarray  # int64 per row

    def __len__(self) -> int:
        return len(self.shard)

    def read(self, i: int) -> bytes:
        i = int(i)
        try:
            fh = _handle(self.urls[int(self.shard[i])])
            fh.seek(int(self.offset[i]))
            data = fh.read(int(self.size[i]))
        except OSError as exc:
            raise ImageDecodeError(f"cannot read row {i} from {self.urls[int(self.shard[i])]}: {exc}") from exc
        if len(data) != int(self.size[i]):
            raise ImageDecodeError(f"{self.urls[int(self.shard[i])]} is shorter than its tar header says (row {i})")
        return data


def _meta_value(ext: str, data: bytes) -> dict[str, Any]:
    text = data.decode("utf-8", errors="replace").strip()
    if ext == "cls":
        return {"cls": text}
    if ext == "txt":
        return {"caption": text}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return (
        {str(k): v for k, v in doc.items() if v is None or isinstance(v, str | int | float | bool)}
        if isinstance(doc, dict)
        else {}
    )


def _index_shard(url: str) -> list[dict[str, Any]]:
    """Samples of one shard in member order: the image member's offset and size, and metadata."""
    from webdataset.tariterators import base_plus_ext

    fs, path = _fs(url)
    if not fs.exists(path):
        raise DatasetUnavailableError(f"WebDataset shard {url} does not exist")
    samples: dict[str, dict[str, Any]] = {}
    try:
        with fs.open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tf:
            for m in tf:  # headers only: tarfile seeks past each member's data
                if not m.isfile():
                    continue
                key, ext = base_plus_ext(m.name)
                if key is None or ext is None:
                    continue
                ext = ext.lower()
                sample = samples.setdefault(key, {"key": key})
                if ext in IMAGE_EXTS and "_offset" not in sample:
                    sample.update(_offset=m.offset_data, _size=m.size, image_ext=ext)
                elif ext in META_EXTS and m.size <= MAX_META_BYTES:
                    member = tf.extractfile(m)
                    if member is not None:
                        sample.update(_meta_value(ext, member.read()))
    except (tarfile.TarError, OSError) as exc:
        raise DatasetUnavailableError(f"cannot read WebDataset shard {url}: {exc}") from exc
    return [s for s in samples.values() if "_offset" in s]


def _classnames(first: str) -> list[str] | None:
    """`classnames.txt` beside the shards (CLIP_benchmark's layout): line i names class i."""
    parent = first.rsplit("/", 1)[0] if "/" in first else "."
    fs, path = _fs(f"{parent}/classnames.txt")
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        return [ln.strip() for ln in fh.read().decode().splitlines() if ln.strip()]


def _label(sample: dict[str, Any], classnames: list[str] | None) -> str | None:
    for col in ("label_name", "label"):
        if isinstance(sample.get(col), str) and sample[col]:
            return sample[col]
    cls = sample.get("cls", sample.get("label"))
    if cls is None or cls == "":
        return None
    text = str(cls)
    if classnames and text.lstrip("-").isdigit() and 0 <= int(text) < len(classnames):
        return classnames[int(text)]
    return text


class WebDatasetFormat:
    """Tar shards in the WebDataset layout, given as one brace pattern (`shards-{000..009}.tar`)."""

    name = "webdataset"
    help = "WebDataset tar shards 'DIR/shards-{000000..000099}.tar' (local paths or fsspec URLs)"

    def matches(self, spec: str) -> bool:
        return spec.split("::")[0].lower().endswith(".tar")

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset:
        urls = _shards(spec)
        missing = [u for u in urls if not (lambda fp: fp[0].exists(fp[1]))(_fs(u))]
        if missing:
            more = f" (and {len(missing) - 1} more of {len(urls)} shards)" if len(missing) > 1 else ""
            raise DatasetUnavailableError(f"WebDataset shard {missing[0]} does not exist{more}")
        rows: list[dict[str, Any]] = []
        for si, url in enumerate(urls):
            for s in _index_shard(url):
                rows.append({**s, "_shard": si, "shard": PurePosixPath(url).name})
        if not rows:
            raise DatasetUnavailableError(f"{spec}: no samples with an image ({', '.join(IMAGE_EXTS)}) in the shards")
        classnames = _classnames(urls[0])
        name = PurePosixPath(urls[0]).parent.name or slug(spec)
        meta = pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
        meta["label_name"] = [_label(r, classnames) for r in rows]
        if "dataset" not in meta.columns:
            meta["dataset"] = name
        meta = meta.astype({c: object for c in meta.columns if meta[c].dtype == bool})
        parts = [f"{urls[r['_shard']]}:{r['key']}:{r['_offset']}:{r['_size']}" for r in rows]
        parts += [json.dumps(meta.drop(columns=["shard"]).astype(str).to_dict("list"), sort_keys=True)]
        ident: dict[str, str | None] = {
            "format": "webdataset",
            "id": spec,
            "revision": None,
            "name": name,
            "fingerprint": fingerprint_strings(parts),
            "rows": str(len(rows)),
        }
        reader = TarMemberReader(
            urls,
            np.array([r["_shard"] for r in rows], dtype=np.int32),
            np.array([r["_offset"] for r in rows], dtype=np.int64),
            np.array([r["_size"] for r in rows], dtype=np.int64),
        )
        return LoadedDataset(spec, slug(name), split, ident, meta.reset_index(drop=True), reader)
