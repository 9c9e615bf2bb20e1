"""How a run's arrays and groups are created, written, listed and deleted in Zarr (no run state)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import zarr
import zarr.codecs as zc
import zarr.storage

from ..errors import StoreError
from ..locations import LocalLocation, Location
from .integrity import (
    CHUNK_DIGEST,
    DIGESTS_VERSION,
    meta_columns,
)
from .layout import ROW_ARRAYS, RunLayout
from .vectors import digest

if TYPE_CHECKING:  # the type zarr's public signatures name for `config=` (nothing imported at run time)
    from zarr.core.array_spec import ArrayConfigParams

_WRITE: ArrayConfigParams = {"write_empty_chunks": True}  # every written chunk gets a file, so absence means loss
# What zarr, its JSON metadata parser and its codecs raise on a damaged or missing file.
_DAMAGE = (ValueError, LookupError, TypeError)


def _compressors() -> list[Any]:
    return [zc.ZstdCodec(level=3, checksum=True), zc.Crc32cCodec()]


_STR = np.dtypes.StringDType()
T = TypeVar("T")


def _str_array(values: Sequence[Any]) -> np.ndarray:
    """Variable-length strings (Zarr's vlen-utf8); None and NaN become ""."""
    return np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values], dtype=_STR)


def _to_str(values: np.ndarray) -> np.ndarray:
    return np.array(values.tolist(), dtype=object)


def _array_at(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` of a group; a group found there instead is damage (TypeError, one of `_DAMAGE`)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{name} is a group, not an array")
    return node


def _get(arr: zarr.Array, sel: Any = slice(None)) -> np.ndarray:
    """`arr[sel]` as the ndarray zarr returns for a slice selection (np.asarray does not copy it)."""
    return np.asarray(arr[sel])


def _attr(node: zarr.Group | zarr.Array, key: str, default: Any = None) -> Any:
    """An attribute as stored JSON: its shape is checked where it is used (digests, `_record_ok`)."""
    return node.attrs.get(key, default)


def on_zarr_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on zarr's own event loop and return its result.

    The one place that uses a zarr internal (`zarr.core.sync.sync`): zarr's public API has no
    synchronous way to list the keys under a prefix, delete a single key, or wait for the chunk
    writes it still has in flight after a failed batch, and its stores must be awaited on zarr's
    loop (an fsspec store is bound to it). tests/test_store_zarr_internals.py fails loudly if a
    zarr upgrade moves or changes what this relies on.
    """
    from zarr.core.sync import sync  # not public: imported here only

    return sync(coro)


async def _alist(store: Any, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


def _listed(group: zarr.Group | zarr.Array, prefix: str) -> list[str]:
    """Every key stored under `prefix` of the node's store (the listing, never a read)."""
    return on_zarr_loop(_alist(group.store_path.store, prefix))


def stored_keys(arr: zarr.Array) -> set[str]:
    """Chunk keys that exist in the store (its listing: a missing chunk is not read as fill value)."""
    prefix = arr.store_path.path + "/"
    return {k[len(prefix) :] for k in _listed(arr, prefix)}


def _chunk_grid(arr: zarr.Array) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.chunks, strict=True)]
    for idx in np.ndindex(*grid):
        yield idx, tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks, strict=True))


async def _await_others() -> None:
    current = asyncio.current_task()
    await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not current), return_exceptions=True)


def drain_writes() -> None:
    """Wait for every write zarr still has in flight: when one chunk write fails, zarr raises at
    once while writes of the same batch go on in its event loop, and could land after cleanup."""
    with contextlib.suppress(RuntimeError):  # no loop running: nothing in flight
        on_zarr_loop(_await_others())


def delete_node(group: zarr.Group, name: str) -> None:
    """Remove a child node (array or group) even when its zarr.json is unreadable (the whole prefix)."""
    del group[name]


def delete_key(group: zarr.Group, key: str) -> None:
    """Remove one stored object (a node's zarr.json), below `group`."""
    on_zarr_loop((group.store_path / key).delete())


def _group_attrs(
    provenance: dict[str, Any],
    prompts: Mapping[str, Any],
    caption_keys: Sequence[str],
    texts_done: bool,
    captions_sha256: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The run group's attributes, always in this order (so a rebuilt zarr.json is byte-identical)."""
    attrs: dict[str, Any] = {
        "provenance": provenance,
        "provenance_sha256": digest(provenance),
        "prompts": dict(prompts),
        "caption_keys": list(caption_keys),
        "texts_sha256": None,
    }
    if captions_sha256 is not None:  # runs written before the caption digests have none
        attrs["captions_sha256"] = dict(captions_sha256)
    attrs["texts_done"] = texts_done
    return attrs


def texts_digest(texts: Sequence[str], prompts: Mapping[str, Any], caption_keys: Sequence[str]) -> str:
    return digest({"texts": list(texts), "prompts": dict(prompts), "caption_keys": list(caption_keys)})


def _record_ok(record: Any) -> bool:
    return (
        isinstance(record, Mapping)
        and isinstance(record.get("provenance"), Mapping)
        and record.get("provenance_sha256") == digest(record["provenance"])
    )


def _backup(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """What done/zarr.json keeps of the group attributes (everything but the texts_done flag)."""
    out = {k: attrs.get(k) for k in ("provenance", "provenance_sha256", "prompts", "caption_keys", "texts_sha256")}
    if "captions_sha256" in attrs:
        out["captions_sha256"] = attrs["captions_sha256"]
    return out


def _digested(provenance: Mapping[str, Any]) -> bool:
    """Whether a run records chunk, metadata and caption digests (runs written before them do not)."""
    return provenance.get("digests") == DIGESTS_VERSION


def _row_key(arr: zarr.Array, ci: int) -> str:
    """The key of row chunk `ci`'s file in a row array (every other dimension is one chunk)."""
    return arr.metadata.encode_chunk_key((ci,) + (0,) * (arr.ndim - 1))


_UNBOUND = "does not match the digest recorded for it at extraction (moved, swapped or rewritten)"
_META_FORGED = "does not match the digest recorded at extraction (labels or metadata rewritten)"
_CAPTIONS_FORGED = "does not match the digest recorded when its texts were written (caption tables rewritten)"


def _mtime(loc: Location, rel: str) -> float | None:
    try:
        return loc.mtime(rel) if isinstance(loc, LocalLocation) else None
    except OSError:
        return None


@functools.lru_cache(maxsize=64)
def _layout_metadata(name: str, layout: RunLayout) -> dict[str, Any]:
    """The metadata a row array (or done, chunk_digest) of this layout is created with."""
    return _create_row_array(
        zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3), name, layout
    ).metadata.to_dict()


def _fix_for(name: str) -> str:
    if name in (*ROW_ARRAYS, "done", CHUNK_DIGEST):
        return "array"
    if name == "row_index":
        return "row_index"
    if name.startswith("meta"):
        return "meta"
    return "texts"


def _create_row_array(g: zarr.Group, name: str, layout: RunLayout) -> zarr.Array:
    n, cr = layout.n_rows, layout.chunk_rows
    kw: dict[str, Any] = {"compressors": _compressors(), "config": _WRITE}
    if name == "image_emb":
        return g.create_array(
            name, shape=(n, layout.embed_dim), chunks=(cr, layout.embed_dim), dtype=layout.dtype, fill_value=0, **kw
        )
    if name == "features":
        fd = layout.feature_dim or 0
        return g.create_array(name, shape=(n, fd), chunks=(cr, fd), dtype=layout.dtype, fill_value=0, **kw)
    if name == "channel_emb":
        k, d = layout.channels, layout.embed_dim
        return g.create_array(name, shape=(n, k, d), chunks=(cr, k, d), dtype=layout.dtype, fill_value=0, **kw)
    if name == "done":
        return g.create_array(name, shape=(layout.n_chunks,), chunks=(1,), dtype=bool, fill_value=False, **kw)
    if name == "failure":
        return g.create_array(name, shape=(n,), chunks=(cr,), dtype=_STR, fill_value="", **kw)
    if name == CHUNK_DIGEST:
        return g.create_array(name, shape=(layout.n_chunks,), chunks=(1,), dtype=_STR, fill_value="", **kw)
    raise StoreError(f"unknown row array {name!r}")


def _write_row_index(g: zarr.Group, layout: RunLayout) -> None:
    n = layout.n_rows
    g.create_array(
        "row_index",
        data=np.arange(n, dtype=np.int64),
        chunks=(max(n, 1),),
        compressors=_compressors(),
        config=_WRITE,
    )


def _write_meta(g: zarr.Group, meta: pd.DataFrame, layout: RunLayout) -> None:
    mg = g.require_group("meta")
    for col, data in meta_columns(meta):  # as its digest (provenance meta_sha256) sees them
        mg.create_array(col, data=data, chunks=(max(layout.n_rows, 1),), compressors=_compressors(), config=_WRITE)
    mg.attrs["columns"] = [str(c) for c in meta.columns]


def _write_texts(
    g: zarr.Group, texts: Sequence[str], captions: Mapping[str, tuple[np.ndarray, np.ndarray]], layout: RunLayout
) -> None:
    comp = _compressors()
    t = max(len(texts), 1)
    for name in ("texts", "text_emb", "captions"):
        delete_node(g, name)
    g.create_array("texts", data=_str_array(list(texts)), chunks=(t,), compressors=comp, config=_WRITE)
    g.create_array(
        "text_emb",
        shape=(len(texts), layout.embed_dim),
        chunks=(t, layout.embed_dim),
        dtype=layout.dtype,
        compressors=comp,
        fill_value=0,
        config=_WRITE,
    )
    cg = g.require_group("captions")
    for key, (options, answer) in sorted(captions.items()):
        kg = cg.require_group(key)
        kg.create_array(
            "options",
            data=options.astype(np.int32),
            chunks=(max(options.shape[0], 1), max(options.shape[1], 1)),
            compressors=comp,
            config=_WRITE,
        )
        kg.create_array(
            "answer", data=answer.astype(np.int32), chunks=(max(answer.shape[0], 1),), compressors=comp, config=_WRITE
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
