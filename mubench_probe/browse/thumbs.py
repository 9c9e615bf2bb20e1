"""Images of store rows, rendered on demand with the run's own pixel policy and cached on disk.

A request decodes its row's image once (never more), renders it the way extraction saw it (the
run's intensity policy, z/t projection and channel rule, read back from its provenance) and
scales it down. Images with more than three channels, or a requested channel set, are shown as
a per-channel colour composite (Fiji's colours, one per channel) so each channel can be toggled.
PNG results are kept in a bounded on-disk cache (least recently used files go first); keys are
hashes, never request text.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..config import ExtractConfig
from ..errors import UsageError
from ..imaging import COMPOSITE_COLOURS, PixelSpec, decode_source, render
from .context import BrowseContext
from .web import endpoint, int_param

THUMB_SIZE = 160  # default longest side of a thumbnail
FULL_SIZE = 2048  # size=0 (the image page): full resolution, capped at this longest side
CACHE_BYTES = 256 * 1024 * 1024
MAX_CHANNELS = 64  # channel toggles the image page offers (and that a request may name)


class DiskCache:
    """PNG bytes by key in a folder, at most `max_bytes` in all: least recently read files are deleted."""

    def __init__(self, folder: Path, max_bytes: int = CACHE_BYTES) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self._lock = threading.Lock()
        self._size: int | None = None  # total bytes, scanned on first write
        self.hits = self.misses = 0

    def _path(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.png"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
            os.utime(path)  # recency for eviction
        except OSError:
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
            tmp.write_bytes(data)
            os.replace(tmp, path)  # readers see a whole file or none
        except OSError:
            return  # a read-only or full cache folder only costs speed
        with self._lock:
            if self._size is None:
                self._size = sum(p.stat().st_size for p in self.folder.rglob("*.png"))
            else:
                self._size += len(data)
            if self._size > self.max_bytes:
                self._trim()

    def _trim(self) -> None:
        files = []
        for p in self.folder.rglob("*.png"):
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, p))
        files.sort()
        total = sum(s for _, s, _ in files)
        for _, size, p in files:
            if total <= self.max_bytes * 0.8:
                break
            p.unlink(missing_ok=True)
            total -= size
        self._size = total

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.rglob("*.png")) if self.folder.exists() else 0


def pixel_spec(provenance: dict[str, Any]) -> PixelSpec:
    """How extraction turned this run's images into pixels (stacks shown at their middle plane)."""
    storage = {"chunk_rows": 1, "dtype": "float16"}  # required by the reader, irrelevant to pixels
    spec = PixelSpec.from_config(ExtractConfig.from_provenance({**storage, **provenance}))
    return replace(spec, z=spec.z or "middle", t=spec.t or "middle", target_mpp=None)


def render_image(
    data: bytes, spec: PixelSpec, size: int, channels: tuple[int, ...] | None = None
) -> tuple[Image.Image, int]:
    """(the rendered RGB image, the source's channel count) from one decode of `data`.

    `channels` None: the run's own rule (>3 channels: all as a composite); a tuple: those channels
    as a colour composite (empty: black). The longest side is scaled down to `size`."""
    src: Any = decode_source(data, spec.max_pixels)  # an ArraySource: a PlaneSource read-only
    n_c = src.shape[1]
    if channels is None and spec.channels is None and n_c <= 3:
        img = render(src, spec)[0]
    else:
        chans = channels if channels is not None else tuple(range(min(n_c, MAX_CHANNELS)))
        bad = [c for c in chans if c >= n_c]
        if bad:
            raise UsageError(f"channel {bad[0]} does not exist: the image has {n_c} channel(s)")
        if chans:
            img = render(src, replace(spec, channels=tuple(str(c) for c in chans), channel_mode="composite"))[0]
        else:
            img = Image.new("RGB", (src.shape[4], src.shape[3]))
    if max(img.size) > size:
        img = img.copy()
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
    return img, n_c


def channel_colours(n: int) -> list[dict[str, Any]]:
    """The composite colour of each of `n` channels (what the image page's toggles show)."""
    return [
        {"index": i, "colour": COMPOSITE_COLOURS[i % len(COMPOSITE_COLOURS)][0]} for i in range(min(n, MAX_CHANNELS))
    ]


def parse_channels(raw: str | None) -> tuple[int, ...] | None:
    """`channels=0,2,5` -> (0, 2, 5); absent -> None; anything else -> UsageError (400)."""
    if raw is None:
        return None
    if raw == "":
        return ()
    parts = raw.split(",")
    if len(parts) > MAX_CHANNELS or not all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts):
        raise UsageError(f"channels must be comma-separated channel indices (at most {MAX_CHANNELS})")
    return tuple(sorted({int(p) for p in parts}))


class Thumbnails:
    """Rendered rows of a context's runs: disk cache first, then one decode; channel counts remembered."""

    def __init__(self, ctx: BrowseContext, max_bytes: int = CACHE_BYTES) -> None:
        self.ctx = ctx
        self.cache = DiskCache(ctx.cache_dir / "thumbs", max_bytes)
        self._channels: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._specs: dict[str, PixelSpec] = {}

    def spec(self, run_id: str) -> PixelSpec:
        if run_id not in self._specs:
            self._specs[run_id] = pixel_spec(self.ctx.run(run_id).provenance)
        return self._specs[run_id]

    def png(self, run_id: str, row: int, size: int = THUMB_SIZE, channels: tuple[int, ...] | None = None) -> bytes:
        """The PNG of one row (from the cache when it was rendered before)."""
        run = self.ctx.check_row(run_id, row)
        chans = "all" if channels is None else ",".join(map(str, channels))
        key = f"{run.path}|{run.provenance.get('dataset_fingerprint')}|{row}|{size}|{chans}"
        data = self.cache.get(key)
        if data is not None:
            return data
        img, n_c = render_image(self.ctx.image_bytes(run_id, row), self.spec(run_id), size, channels)
        self._remember(run_id, row, n_c)
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False, compress_level=3)
        data = buf.getvalue()
        self.cache.put(key, data)
        return data

    def _remember(self, run_id: str, row: int, n_c: int) -> None:
        self._channels[(run_id, row)] = n_c
        while len(self._channels) > 4096:
            self._channels.popitem(last=False)

    def n_channels(self, run_id: str, row: int) -> int:
        """How many channels the row's image has (one decode the first time, remembered after)."""
        self.ctx.check_row(run_id, row)
        if (run_id, row) not in self._channels:
            src = decode_source(self.ctx.image_bytes(run_id, row), self.spec(run_id).max_pixels)
            self._remember(run_id, row, src.shape[1])
        return self._channels[(run_id, row)]


def thumbnails(ctx: BrowseContext) -> Thumbnails:
    """The context's one Thumbnails (shared by the thumbnail route and the image page)."""
    return ctx.cached("", "thumbnails", lambda: Thumbnails(ctx))


def routes(ctx: BrowseContext) -> list[BaseRoute]:
    thumbs = thumbnails(ctx)

    @endpoint
    def thumb(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        row = int_param(request, "row")
        size = int_param(request, "size", THUMB_SIZE, 0, FULL_SIZE) or FULL_SIZE
        channels = parse_channels(request.query_params.get("channels"))
        data = thumbs.png(run_id, row, max(size, 16), channels)
        return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=3600"})

    return [Route("/thumb/{run_id}/{row}.png", thumb, methods=["GET"])]
