"""Microscopy files read with bioio: OME-TIFF, OME-Zarr, plain TIFF; CZI, ND2, LIF with `.[formats]`.

An image folder (`ROOT/<class>/<file>`) or a CSV manifest (`path,label[,metadata...]`) whose files
are microscopy formats. Each file is opened once at load (its metadata only: scenes, physical pixel
size, channel names), and every scene of a multi-scene file becomes a row (`--scene` keeps one).
Pixels are read later, in the DataLoader workers, one plane at a time, in the dimension order the
file's metadata declares (bioio's TCZYX), never guessed.

Which bioio plugin reads a file is a registry keyed by suffix (`PLUGINS`), so a missing plugin is
one line naming what to install. Files with other suffixes (PNG, JPEG) in the same folder or
manifest are decoded as usual.
"""

from __future__ import annotations

import importlib
import math
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DatasetUnavailableError, ImageDecodeError
from .base import LoadedDataset, fingerprint_strings, slug
from .files import IMAGE_SUFFIXES, read_manifest

PREFIX = "bioio:"  # `bioio:PATH` reads a folder or manifest with bioio whatever its files' suffixes


@dataclass(frozen=True)
class Plugin:
    """A bioio reader plugin: the suffixes it reads, its module, its package and the extra that has it."""

    suffixes: tuple[str, ...]
    module: str
    package: str
    extra: str | None = None  # None: installed with mubench-probe
    trusted_pixel_size: bool = True  # plain TIFF resolution tags default to 1 (no unit): not a size


PLUGINS: list[Plugin] = [
    Plugin((".ome.tif", ".ome.tiff", ".ome.tf2", ".ome.tf8", ".ome.btf"), "bioio_ome_tiff", "bioio-ome-tiff"),
    Plugin((".ome.zarr", ".zarr"), "bioio_ome_zarr", "bioio-ome-zarr"),
    Plugin((".czi",), "bioio_czi", "bioio-czi", "formats"),
    Plugin((".nd2",), "bioio_nd2", "bioio-nd2", "formats"),
    Plugin((".lif",), "bioio_lif", "bioio-lif", "formats"),
    Plugin((".tif", ".tiff"), "bioio_tifffile", "bioio-tifffile", trusted_pixel_size=False),
]
# A folder or manifest with one of these is read with bioio (plain TIFFs alone only with `bioio:`).
MICROSCOPY_SUFFIXES = tuple(s for p in PLUGINS if p.module != "bioio_tifffile" for s in p.suffixes)


def plugin_for(path: str) -> Plugin | None:
    name = path.rstrip("/").lower()
    for p in PLUGINS:
        if name.endswith(p.suffixes):
            return p
    return None


def reader_class(plugin: Plugin) -> Any:
    """The plugin's Reader class; a missing plugin is one line naming what to install."""
    try:
        return importlib.import_module(plugin.module).Reader
    except ImportError:
        how = f"pip install 'mubench-probe[{plugin.extra}]'" if plugin.extra else f"pip install {plugin.package}"
        raise DatasetUnavailableError(
            f"reading {plugin.suffixes[0]} files needs the bioio plugin {plugin.package}: {how}"
        ) from None


_OPEN: OrderedDict[tuple[int, str], Any] = OrderedDict()  # per process: readers are not shared over a fork
_OPEN_MAX = 8


def _open(path: str, plugin: Plugin) -> Any:
    key = (os.getpid(), path)
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    cls = reader_class(plugin)
    try:
        reader = cls(path)
    except Exception as exc:  # any reader failure: this file is unreadable, not the whole run
        raise ImageDecodeError(f"{plugin.package} cannot open {path}: {type(exc).__name__}: {exc}") from exc
    _OPEN[key] = reader
    while len(_OPEN) > _OPEN_MAX:
        _OPEN.popitem(last=False)
    return reader


BLOCK_BYTES = 64 << 20  # planes are read in blocks of at most this many bytes (one dask compute each)


class BioioSource:
    """One scene of a bioio reader as a (T, C, Z, Y, X) PlaneSource.

    A scene of at most `BLOCK_BYTES` is read whole, at once, with the plugin's NumPy reader. In
    a larger one, each dask compute costs milliseconds whatever its size, so planes are not read
    one by one: the planes `render` asks for next (the selected channels, consecutive z) are read as one block
    of at most `BLOCK_BYTES` (or one plane per selected channel, when that is larger), and the
    block is kept until a plane outside it is asked for. RGB files (bioio's S dimension) with a
    single channel expose their samples as channels.
    """

    def __init__(self, reader: Any, scene: int) -> None:
        try:
            if reader.current_scene_index != scene:
                reader.set_scene(scene)
            dims = reader.dims
            order = dims.order
            size = {a: (getattr(dims, a) if a in order else 1) for a in "TCZYXS"}
            self._samples = size["S"] > 1 and size["C"] == 1
            n_c = size["S"] if self._samples else size["C"]
            self.shape = (size["T"], n_c, size["Z"], size["Y"], size["X"])
            self.dtype = np.dtype(reader.dtype)
            names = [] if self._samples else list(reader.channel_names or [])
        except ImageDecodeError:
            raise
        except Exception as exc:
            raise ImageDecodeError(f"cannot read the metadata: {type(exc).__name__}: {exc}") from exc
        self.channel_names = tuple(str(n) for n in names)
        self._reader, self._order = reader, order
        self._wanted: tuple[int, ...] = ()
        self._block: tuple[int, int, int, tuple[int, ...], np.ndarray] | None = None
        self._whole: np.ndarray | None = None

    def select(self, channels: list[int]) -> None:
        """The channels `render` will read (a hint: they are then read together)."""
        self._wanted = tuple(channels)

    def plane(self, t: int, c: int, z: int) -> np.ndarray:
        if math.prod(self.shape) * self.dtype.itemsize <= BLOCK_BYTES:  # small: one immediate read, no dask
            if self._whole is None:
                self._whole = self._read_whole()
            return self._whole[t, c, z]
        chans = self._wanted if c in self._wanted else (c,)
        blk = self._block
        if blk is None or blk[0] != t or blk[3] != chans or not blk[1] <= z < blk[2]:
            n_z, height, width = self.shape[2:]
            per_z = height * width * self.dtype.itemsize * len(chans)
            z1 = min(n_z, z + max(1, BLOCK_BYTES // max(per_z, 1)))
            blk = self._block = (t, z, z1, chans, self.read_planes(t, chans, z, z1))
        return blk[4][chans.index(c), z - blk[1]]

    def _read_whole(self) -> np.ndarray:
        """The whole scene as (T, C, Z, Y, X) through the plugin's immediate (NumPy) reader."""
        try:
            xr = self._reader.xarray_data
            if self._samples:
                xr = xr.isel(C=0) if "C" in xr.dims else xr
            axis = "S" if self._samples else "C"
            order = [a for a in ("T", axis, "Z", "Y", "X") if a in xr.dims]
            data = np.asarray(xr.transpose(*order).data)
        except Exception as exc:
            raise ImageDecodeError(f"cannot read the image: {type(exc).__name__}: {exc}") from exc
        return data.reshape(self.shape)

    def read_planes(self, t: int, chans: tuple[int, ...], z0: int, z1: int) -> np.ndarray:
        """(channels, z1 - z0, Y, X) in one compute, through bioio's labelled (xarray) view: the one
        place planes are read from a file, so what a render costs in reads can be counted here."""
        try:
            xr = self._reader.xarray_dask_data
            sel: dict[str, Any] = {"T": t, "Z": slice(z0, z1)}
            sel["S" if self._samples else "C"] = list(chans)
            if self._samples:
                sel["C"] = 0
            xr = xr.isel({k: v for k, v in sel.items() if k in xr.dims})
            axis = "S" if self._samples else "C"
            order = [a for a in (axis, "Z", "Y", "X") if a in xr.dims]
            data = np.asarray(xr.transpose(*order).data.compute(scheduler="synchronous"))
        except Exception as exc:
            raise ImageDecodeError(
                f"cannot read planes t={t} c={list(chans)} z={z0}..{z1 - 1}: {type(exc).__name__}: {exc}"
            ) from exc
        shape = (len(chans), z1 - z0, self.shape[3], self.shape[4])
        return data.reshape(shape)


@dataclass
class BioioReader:
    """Rows -> (file, scene); pixels through the file's bioio plugin, other files decoded as bytes."""

    paths: list[str]
    scenes: list[int]
    plugins: list[str | None] = field(default_factory=list)  # plugin module per row (None: bytes)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> bytes:
        p = Path(self.paths[int(i)])
        if p.is_dir():
            raise ImageDecodeError(f"{p} is a folder (OME-Zarr): it has no bytes to decode, only planes")
        return p.read_bytes()

    def source(self, i: int, max_pixels: int) -> Any:
        from ..imaging import decode_source

        i = int(i)
        module = self.plugins[i]
        if module is None:
            return decode_source(self.read(i), max_pixels)
        plugin = next(p for p in PLUGINS if p.module == module)
        return BioioSource(_open(self.paths[i], plugin), self.scenes[i])


def _index_file(path: str, plugin: Plugin | None) -> list[dict[str, Any]]:
    """One record per scene: its name, index, pixel size (µm, NaN if unknown) and channel names.

    Reads metadata only. A file its plugin cannot open is one row that fails at extraction."""
    if plugin is None:
        return [{"scene": "", "scene_index": 0, "microns_per_pixel": np.nan, "channel_names": ""}]
    reader_class(plugin)  # a missing plugin fails the load, in one line
    try:
        reader = reader_class(plugin)(path)
        out = []
        for i, name in enumerate(reader.scenes):
            reader.set_scene(i)
            size = reader.physical_pixel_sizes.X if plugin.trusted_pixel_size else None
            names = "|".join(str(n) for n in (reader.channel_names or []))
            mpp = float(size) if size is not None and np.isfinite(size) and size > 0 else np.nan
            out.append({"scene": str(name), "scene_index": i, "microns_per_pixel": mpp, "channel_names": names})
        return out or [{"scene": "", "scene_index": 0, "microns_per_pixel": np.nan, "channel_names": ""}]
    except Exception:  # unreadable file: one row, whose extraction names the reader's error
        return [{"scene": "", "scene_index": 0, "microns_per_pixel": np.nan, "channel_names": ""}]


def _entry_size(p: Path) -> str:
    if p.is_dir():  # OME-Zarr: the names and sizes of its metadata files
        meta = sorted(f for f in p.rglob("*") if f.name in ("zarr.json", ".zattrs", ".zarray", ".zgroup"))
        return ",".join(f"{f.relative_to(p)}={f.stat().st_size}" for f in meta)
    return str(p.stat().st_size) if p.exists() else "-1"


def _load(
    spec: str,
    split: str,
    fmt: str,
    root: Path,
    rels: list[str],
    meta: pd.DataFrame,
    ident: dict[str, str | None],
    key: str,
) -> LoadedDataset:
    """Index every file (threads: metadata reads wait on disk), expand scenes into rows."""
    paths = [str(root / r) for r in rels]
    plugins = [plugin_for(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        records = list(pool.map(_index_file, paths, plugins))
    rows, sources = [], []
    for i, recs in enumerate(records):
        for rec in recs:
            rows.append(i)
            sources.append(rec)
    out = meta.iloc[rows].reset_index(drop=True)
    extra = pd.DataFrame(sources)
    if "microns_per_pixel" in out.columns:  # the manifest's value wins over the file's metadata
        given = pd.to_numeric(out["microns_per_pixel"], errors="coerce")
        extra["microns_per_pixel"] = given.where(given.notna(), extra["microns_per_pixel"]).to_numpy()
        out = out.drop(columns=["microns_per_pixel"])
    for col in ("scene", "scene_index", "microns_per_pixel", "channel_names"):
        out[col] = extra[col].to_numpy()
    parts = [
        f"{rels[r]}:{_entry_size(Path(paths[r]))}:{s['scene']}:{s['microns_per_pixel']}"
        for r, s in zip(rows, sources, strict=True)
    ]
    ident = {**ident, "format": fmt, "fingerprint": fingerprint_strings([ident.get("fingerprint") or "", *parts])}
    ident["rows"] = str(len(out))
    reader = BioioReader(
        [paths[r] for r in rows],
        [int(s["scene_index"]) for s in sources],
        [plugins[r].module if plugins[r] is not None else None for r in rows],  # type: ignore[union-attr]
    )
    return LoadedDataset(spec, key, split, ident, out, reader)


def _strip(spec: str) -> str:
    return spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec


def _readable(name: str) -> bool:
    return plugin_for(name) is not None or Path(name).suffix.lower() in IMAGE_SUFFIXES


class BioioFolderFormat:
    """`ROOT/<class>/<file>` where the files are OME-TIFF, OME-Zarr, CZI, ND2, LIF (or `bioio:ROOT`)."""

    name = "bioio-folder"
    help = (
        "image folder (one subfolder per class) of OME-TIFF / OME-Zarr / CZI / ND2 / LIF files, read with bioio "
        "(prefix bioio: to read plain TIFFs this way)"
    )

    def _entries(self, root: Path) -> list[Path]:
        return sorted(f for c in root.iterdir() if c.is_dir() for f in c.iterdir() if _readable(f.name))

    def matches(self, spec: str) -> bool:
        root = Path(_strip(spec))
        if not root.is_dir() or not (spec.startswith(PREFIX) or any(c.is_dir() for c in root.iterdir())):
            return False
        if spec.startswith(PREFIX):
            return True
        return any(
            f.name.lower().endswith(MICROSCOPY_SUFFIXES) for c in root.iterdir() if c.is_dir() for f in c.iterdir()
        )

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset:
        root = Path(_strip(spec))
        entries = self._entries(root) if root.is_dir() else []
        if not entries:
            raise DatasetUnavailableError(f"{root}: no microscopy files or images found in class subfolders")
        rels = [str(f.relative_to(root)) for f in entries]
        meta = pd.DataFrame({"path": rels, "label_name": [Path(r).parts[0] for r in rels], "dataset": root.name})
        ident: dict[str, str | None] = {"id": str(root.resolve()), "revision": None, "name": root.name}
        return _load(spec, split, "bioio-folder", root, rels, meta, ident, slug(root.name))


class BioioCsvFormat:
    """A CSV manifest (`path,label[,metadata...]`) whose files are microscopy formats (or `bioio:FILE.csv`).

    A `microns_per_pixel` column, where filled, wins over the files' metadata."""

    name = "bioio-csv"
    help = "CSV manifest whose paths are OME-TIFF / OME-Zarr / CZI / ND2 / LIF files, read with bioio"

    def matches(self, spec: str) -> bool:
        path = Path(_strip(spec))
        if not path.name.lower().endswith(".csv") or not path.is_file():
            return False
        if spec.startswith(PREFIX):
            return True
        try:
            meta, _ = read_manifest(path)
        except DatasetUnavailableError:
            return False
        return any(str(p).lower().rstrip("/").endswith(MICROSCOPY_SUFFIXES) for p in meta["path"])

    def load(self, spec: str, split: str, revision: str | None) -> LoadedDataset:
        path = Path(_strip(spec))
        meta, ident = read_manifest(path)
        return _load(spec, split, "bioio-csv", path.parent, list(meta["path"]), meta, ident, slug(path.stem))
