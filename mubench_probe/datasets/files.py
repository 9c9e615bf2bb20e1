"""Plain files: an image folder (one subfolder per class) and a CSV manifest (path,label[,meta]).

A manifest may be a local file or an fsspec URL (`s3://bucket/data/m.csv`); its relative paths
are relative to its own folder, wherever that is. Image files are read by `read_file`: only
regular files, and only under a per-file size limit checked before a byte is read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import pandas as pd

from ..config import DEFAULT_MAX_FILE_BYTES
from ..errors import DatasetUnavailableError, ImageDecodeError
from ..locations import is_url
from .base import LoadedDataset, fingerprint_strings, slug

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _require_regular(name: str, st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a plain file")
        raise ImageDecodeError(f"{name} is not a regular file ({kind}): only regular files are read")
    _check_size(name, st.st_size, max_bytes)


def _check_size(name: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageDecodeError(
            f"{name} is {size:,} bytes, over the per-file limit of {max_bytes:,} (raise --max-file-bytes)"
        )


def _check_length(name: str, data: bytes, size: int) -> bytes:
    if len(data) != size:
        raise ImageDecodeError(f"{name} changed while it was read ({size:,} bytes when opened, then {len(data):,})")
    return data


def read_file(path: str, name: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of one image file (a local path or an fsspec URL); ImageDecodeError naming it
    as `name` otherwise.

    A FIFO blocks its reader forever, /dev/zero never ends, and a sparse file declares any size
    for free: only regular files are read, and only when their size is within `max_bytes`. A
    local path is checked before it is opened (opening a device can have effects of its own),
    opened without blocking and checked again on the open descriptor (the path may have been
    swapped meanwhile), then read to the size checked and no further.
    """
    if is_url(path):
        return _read_url(path, name, max_bytes)
    path = path.removeprefix("file://")
    try:
        _require_regular(name, os.stat(path), max_bytes)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            _require_regular(name, st, max_bytes)
            data = fh.read(st.st_size + 1)  # one byte more: a file that grew since is noticed
    except FileNotFoundError:
        raise ImageDecodeError(f"{name} does not exist") from None
    except OSError as exc:
        raise ImageDecodeError(f"{name} cannot be read: {exc.strerror or type(exc).__name__}") from None
    return _check_length(name, data, st.st_size)


def _read_url(url: str, name: str, max_bytes: int) -> bytes:
    """`read_file` for an object store: the object's listed type and size are checked first."""
    import fsspec.core

    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
        if info.get("type") != "file":
            kind = "a directory" if info.get("type") == "directory" else f"type {info.get('type')}"
            raise ImageDecodeError(f"{name} is not a regular file ({kind}): only regular files are read")
        size = int(info.get("size") or 0)
        _check_size(name, size, max_bytes)
        with fs.open(path, "rb") as fh:
            data = fh.read(size + 1)
    except FileNotFoundError:
        raise ImageDecodeError(f"{name} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ImageDecodeError(f"{name} cannot be read: {exc}") from None
    return _check_length(name, data, size)


@dataclass
class PathImageReader:
    """Row i -> the bytes of file `paths[i]` (a local path or an fsspec URL), through `read_file`.

    `names` are the files as the dataset names them (a manifest's `path` entries): messages use
    them, so a stored failure reason is the same on every machine and in every run.
    """

    paths: list[str]
    names: list[str] | None = None
    max_bytes: int = DEFAULT_MAX_FILE_BYTES

    def __len__(self) -> int:
        return len(self.paths)

    def file_name(self, i: int) -> str:
        return (self.names or self.paths)[int(i)]

    def read(self, i: int) -> bytes:
        return read_file(self.paths[int(i)], self.file_name(i), self.max_bytes)

    def with_max_bytes(self, max_bytes: int) -> PathImageReader:
        return replace(self, max_bytes=max_bytes)


def join_entry(root: str, entry: str) -> str:
    """A manifest entry as a path or URL: URLs as they are; relative paths (`..` included) from
    the manifest's folder `root`; absolute ones as they are locally, and from the top of the
    bucket (or host) when the manifest is a URL."""
    if "://" in entry:
        return entry
    if not is_url(root):
        return str(Path(root) / entry)
    protocol, _, rest = root.partition("://")
    joined = rest.split("/", 1)[0] + entry if entry.startswith("/") else f"{rest}/{entry}"
    return f"{protocol}://{posixpath.normpath(joined).lstrip('/')}"


def _local_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _url_size(url: str) -> int:
    import fsspec.core

    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except (OSError, ValueError):
        return -1
    return int(info.get("size") or 0) if info.get("type") == "file" else -1


def _sizes(paths: list[str]) -> list[int]:
    """Each file's size (-1: missing); objects are asked for in parallel (one request each)."""
    if not any(is_url(p) for p in paths):
        return [_local_size(p) for p in paths]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda p: _url_size(p) if is_url(p) else _local_size(p), paths))


def _identity(fmt: str, root: str, rels: list[str]) -> dict[str, str | None]:
    sizes = _sizes([join_entry(root, r) for r in rels])
    parts = [f"{r}:{s}" for r, s in zip(rels, sizes, strict=True)]
    return {
        "format": fmt,
        "id": root if is_url(root) else str(Path(root).resolve()),
        "revision": None,
        "name": PurePosixPath(root).name if is_url(root) else Path(root).name,
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
            _identity("folder", str(root), rels),
            meta,
            PathImageReader([str(root / r) for r in rels], rels),
        )


def _parent(spec: str) -> str:
    return spec.rsplit("/", 1)[0] if is_url(spec) else str(Path(spec).parent)


def _stem(spec: str) -> str:
    return PurePosixPath(spec).stem if is_url(spec) else Path(spec).stem


class CsvFormat:
    """`path,label[,metadata...]`; extra columns kept.

    A path may be relative to the CSV's folder (`..` included), absolute, or a URL: that is how
    users point a manifest at data that lives elsewhere. The manifest itself may be a URL
    (`s3://bucket/data/m.csv`). Its sha256 goes into the provenance, and its text (with every
    image's size) into the dataset fingerprint.
    """

    name = "csv"
    help = "CSV manifest with columns path,label[,metadata...] (a local file or an fsspec URL)"

    def matches(self, spec: str) -> bool:
        return spec.lower().endswith(".csv")

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset:
        meta, ident = read_manifest(spec)
        location = spec.removeprefix("file://")
        rels = [str(r) for r in meta["path"]]
        reader = PathImageReader([join_entry(_parent(location), r) for r in rels], rels)
        return LoadedDataset(spec, slug(_stem(location)), split, ident, meta, reader)


def _manifest_bytes(spec: str) -> bytes:
    """The manifest file's bytes; a missing or unreadable manifest is a DatasetUnavailableError."""
    try:
        if is_url(spec):
            import fsspec.core

            fs, path = fsspec.core.url_to_fs(spec)
            if not fs.isfile(path):
                raise DatasetUnavailableError(f"CSV manifest {spec} does not exist")
            return fs.cat_file(path)
        path = Path(spec)
        if not path.exists():
            raise DatasetUnavailableError(f"CSV manifest {spec} does not exist")
        if not path.is_file():
            raise DatasetUnavailableError(f"CSV manifest {spec} is not a regular file")
        return path.read_bytes()
    except (OSError, ValueError, ImportError) as exc:  # ImportError: fsspec names the package a protocol needs
        raise DatasetUnavailableError(f"cannot read CSV manifest {spec}: {exc}") from exc


def read_manifest(path: str | Path) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """A CSV manifest's rows (label -> label_name, a `dataset` column added) and its identity.

    UTF-8, with or without a byte-order mark (Excel's "CSV UTF-8" writes one): the mark is
    encoding, not content, so it is neither a column name nor part of the fingerprint.
    """
    spec = str(path).removeprefix("file://")
    data = _manifest_bytes(spec)
    try:
        text = data.decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise DatasetUnavailableError(f"cannot read CSV manifest {spec}: {exc}") from exc
    header = reader.fieldnames or []
    if not {"path", "label"} <= set(header):
        found = f" (found: {', '.join(map(repr, header))})" if header else " (the file is empty)"
        raise DatasetUnavailableError(f"{spec}: needs a header with at least 'path' and 'label'{found}")
    if not rows:
        raise DatasetUnavailableError(f"{spec}: the manifest has a header but no rows")
    meta = pd.DataFrame(rows).rename(columns={"label": "label_name"})
    if "dataset" not in meta.columns:
        meta["dataset"] = _stem(spec)
    ident = _identity("csv", _parent(spec), [str(r) for r in meta["path"]])
    universal = text.replace("\r\n", "\n").replace("\r", "\n")  # as Path.read_text gave it: fingerprints unchanged
    ident.update(
        id=spec if is_url(spec) else str(Path(spec).resolve()),
        name=_stem(spec),
        fingerprint=fingerprint_strings([universal, ident["fingerprint"] or ""]),
        manifest_sha256=hashlib.sha256(data).hexdigest(),
    )
    return meta, ident
