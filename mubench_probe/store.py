"""All Zarr I/O: one group per (model, dataset, split) under a store directory.

Layout of a run group `MODEL/DATASET/SPLIT`:
  image_emb (N, D)   raw projector output (float16 by default); normalised on read
  features  (N, F)   optional pre-projection features
  channel_emb (N, K, D) with `--channel-mode each`: one embedding per selected channel
  done      (chunks,) one flag per row chunk, set only after that chunk's arrays are written
  failure   (N,)     "" or the reason a row's image could not be used
  row_index (N,)     position of the row in the source dataset
  meta/<column>      label and metadata columns ("" / NaN for missing)
  captions/<key>/options (N, K) indices into texts (-1 = padding), captions/<key>/answer (N,)
  texts (T,), text_emb (T, D) every unique text the heads need (caption options, class prompts)
  chunk_digest (chunks,) per row chunk, digests binding its arrays' values to their position

Integrity. Every chunk is zstd-compressed with a frame checksum and guarded by CRC32C, and every
written chunk has a file (empty chunks are written too), so a chunk flagged done must exist:
its absence is detected from the store's listing, never read as Zarr's fill value. The group
attributes hold the provenance with its sha256 digest and a digest of the text table and prompt
plan; `done/zarr.json` keeps a copy of both, from which a damaged group `zarr.json` is rebuilt.
Checksums prove bytes, not place or meaning: the per-chunk digests, the metadata digest in the
provenance and the caption digests (see `store_integrity.py`) catch swapped chunks and metadata
rewritten through Zarr; runs written before them verify with a note. When the group's provenance
and its copy disagree, the one that matches the arrays and the reloaded model and dataset wins.
A repair marks each chunk it clears in `chunk_digest` first, so a killed repair stays reported;
temporary `.partial` files of killed writes are reported and removed.
A run is created under `.creating/` and renamed into place, so it appears complete or not at
all. Claims of concurrent writers live in `.claims/` (see `claims.py`); neither is a Zarr node.

Object stores (`s3://...`, any fsspec URL; see `locations.py`) have no rename. There a run is
built in memory, its objects are uploaded under the run's prefix with the two metadata
documents last (`done/zarr.json`, the provenance copy, then the group `zarr.json`), and the group
`zarr.json` is written with a conditional put (`If-None-Match: *`): it is the commit, the first
writer wins and the others join. The upload happens under the run's `create` claim, so two
creators never interleave. A prefix without a committed `zarr.json` is absent while its creator
is alive; afterwards it is a damaged run if its provenance copy made it (repaired from it like a
local run), else an abandoned creation, flagged by verify and removed by the next writer.
Every other guarantee is the same: chunk files are listed (never read as fill values), checked
against their checksums and digests, and repaired the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
import zarr.codecs as zc
import zarr.errors
import zarr.storage
from zarr.core.sync import sync

from .claims import DEFAULT_CLAIM_TIMEOUT, HOST, ChunkClaims, pid_alive
from .errors import CorruptChunkError, ProvenanceMismatchError, StoreDamageError, StoreError
from .locations import LocalLocation, Location, location
from .store_integrity import (
    CHUNK_DIGEST,
    DIGESTS_VERSION,
    REPAIR_MARK,
    captions_digests,
    chunk_digest,
    columns_digest,
    creator_pid,
    decode_record,
    encode_record,
    group_problem,
    is_partial,
    legacy_note,
    meta_columns,
    meta_digest,
    metadata_difference,
    old_enough,
    partial_target,
    repair_record,
    started_after,
)

FORMAT_VERSION = 2
DEFAULT_STORE = Path("stores") / "default.zarr"
CREATING = ".creating"  # runs being built, renamed into place when complete
CLAIMS = ".claims"  # per-chunk claims of concurrent writers
ROW_ARRAYS = ("image_emb", "features", "failure", "channel_emb")  # chunked like the rows; one chunk per done flag
_PER_CHUNK = (*ROW_ARRAYS, CHUNK_DIGEST)  # arrays with one chunk file per done row chunk
# Keys of the provenance that must agree before new rows join an existing group.
IDENTITY_KEYS = (
    "model_spec",
    "backend",
    "weights_hash",
    "preprocess",
    "intensity_policy",
    "max_pixels",
    "max_file_bytes",  # only when not the default: files over it are failed rows (like max_pixels)
    "dataset_format",
    "dataset_id",
    "dataset_revision",
    "dataset_fingerprint",
    "dataset_limit",
    "n_rows",
    "embed_dim",
    "dtype",
    "chunk_rows",
    "features",
    "pixels",  # channels, channel mode, z / t projection, target pixel size (None: single 2-D images)
    "dataset_scene",
)
_BUILDING: set[str] = set()  # .creating folders this process is building right now
CREATE_WAIT_S = 0.25  # how often a writer looks again at a run another writer is creating (object stores)
READ_BLOCK_BYTES = 64 << 20  # embeddings are read and normalised this much stored data at a time
_WRITE = {"write_empty_chunks": True}  # every written chunk gets a file, so absence means loss
# What zarr, its JSON metadata parser and its codecs raise on a damaged or missing file.
_DAMAGE = (ValueError, LookupError, TypeError)


def _compressors() -> list[Any]:
    return [zc.ZstdCodec(level=3, checksum=True), zc.Crc32cCodec()]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-normalise in float32; zero rows (failed images) stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def normalize_rows(x: np.ndarray) -> None:
    """`l2_normalize` in place, for float32 x (the same values, without a second array)."""
    n = np.linalg.norm(x, axis=1, keepdims=True)
    ok = n > 0
    np.divide(x, n, out=x, where=ok)
    x[~ok[:, 0]] = 0.0


def digest(obj: Any) -> str:
    """sha256 of canonical JSON: equal content gives an equal digest after any JSON round trip."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def repair_hint(store: Path | str) -> str:
    return f"repair with `probe verify --repair {store}` (or rerun the same `probe extract`)"


def _why(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "checksum" in text.lower():  # the codec's message goes on with raw checksum bytes
        return "checksum does not match"
    return f"{type(exc).__name__}: {text}"[:240]


@dataclass(frozen=True)
class RunLayout:
    """Shape decisions fixed when a run group is created."""

    n_rows: int
    embed_dim: int
    chunk_rows: int = 256
    dtype: str = "float16"
    feature_dim: int | None = None
    channels: int = 0  # per-channel embeddings stored (channel_emb), 0 = none

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // self.chunk_rows)

    def chunk_slice(self, ci: int) -> slice:
        return slice(ci * self.chunk_rows, min((ci + 1) * self.chunk_rows, self.n_rows))


@dataclass(frozen=True)
class Damage:
    """One integrity problem: where it is, what is wrong, and which repair fixes it.

    `fix` is one of: provenance (group zarr.json / digest), backup (the copy in done/zarr.json),
    array (an array's zarr.json), chunk (a row chunk or done flag: re-extract it), row_index,
    meta, texts (rewritten from the dataset, text embeddings re-encoded), parent (an intermediate
    group's zarr.json), creating (a half-created run).
    """

    node: str
    what: str
    fix: str
    array: str | None = None
    chunk: int | None = None

    def __str__(self) -> str:
        return f"{self.node} {self.what}"


_STR = np.dtypes.StringDType()


def _str_array(values: Sequence[Any]) -> np.ndarray:
    """Variable-length strings (Zarr's vlen-utf8); None and NaN become ""."""
    return np.array(["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values], dtype=_STR)


def _to_str(values: np.ndarray) -> np.ndarray:
    return np.array(values.tolist(), dtype=object)


async def _alist(store: Any, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


def _stored_keys(arr: zarr.Array) -> set[str]:
    """Chunk keys that exist in the store (its listing: a missing chunk is not read as fill value)."""
    prefix = arr.store_path.path + "/"
    return {k[len(prefix) :] for k in sync(_alist(arr.store_path.store, prefix))}


def _chunk_grid(arr: zarr.Array) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...]]]:
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.chunks, strict=True)]
    for idx in np.ndindex(*grid):
        yield idx, tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks, strict=True))


async def _await_others() -> None:
    current = asyncio.current_task()
    await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not current), return_exceptions=True)


def _drain_writes() -> None:
    """Wait for every write zarr still has in flight: when one chunk write fails, zarr raises at
    once while writes of the same batch go on in its event loop, and could land after cleanup."""
    with contextlib.suppress(RuntimeError):  # no loop running: nothing in flight
        sync(_await_others())


def _delete(group: zarr.Group, name: str) -> None:
    """Remove a child node (array or group) even when its zarr.json is unreadable."""
    sync((group.store_path / name).delete_dir())


def _delete_key(group: zarr.Group, key: str) -> None:
    sync((group.store_path / key).delete())


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


class Run:
    """One (model, dataset, split) group: embeddings, texts, labels and provenance."""

    def __init__(self, group: zarr.Group, store_path: Path | str, loc: Location | None = None) -> None:
        self.group = group
        self.loc = loc or LocalLocation(store_path)
        self.store_path = self.loc.path  # a Path for a folder, the URL for an object store
        self.repairs: list[str] = []  # what prepare_run repaired when it reopened this run
        self._intact = False
        self._records: dict[int, dict[str, str]] | None = None  # digests of done chunks, read once

    # ---- identity -------------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.group.path

    def file(self, *parts: str) -> Any:
        """A file of the run (a Path in a folder store, a URL in an object store), for messages."""
        return self.loc.display(self.path, *parts)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def provenance_ok(self) -> bool:
        return _record_ok(self.group.attrs.asdict())

    @property
    def provenance(self) -> dict[str, Any]:
        """The provenance, refused if it does not match its digest (someone edited zarr.json)."""
        if not self.provenance_ok:
            raise StoreDamageError(
                f"{self.file('zarr.json')}: the run's provenance does not match its sha256 digest "
                f"(edited or damaged); {repair_hint(self.store_path)}"
            )
        return dict(self.group.attrs["provenance"])

    @property
    def raw_provenance(self) -> dict[str, Any]:
        """The provenance as stored, unchecked (for display of a damaged run)."""
        p = self.group.attrs.get("provenance")
        return dict(p) if isinstance(p, Mapping) else {}

    @property
    def model_spec(self) -> str:
        return self.provenance.get("model_spec", "")

    @property
    def digested(self) -> bool:
        """Whether this run records chunk, metadata and caption digests (runs written before do not)."""
        return _digested(self.provenance)

    def notes(self) -> list[str]:
        """What verify says without failing the run: a run written before the digests."""
        return [] if not self.provenance_ok or self.digested else [legacy_note(self.path)]

    @property
    def has_text(self) -> bool:
        return bool(self.provenance.get("has_text"))

    @property
    def layout(self) -> RunLayout:
        p = self.provenance
        return RunLayout(
            p["n_rows"], p["embed_dim"], p["chunk_rows"], p["dtype"], p.get("feature_dim"), p.get("channel_emb") or 0
        )

    def fits(self, provenance: Mapping[str, Any]) -> bool:
        """Whether the stored image_emb array has the layout this provenance gives (True if it cannot tell)."""
        p = provenance
        try:
            lay = RunLayout(p["n_rows"], p["embed_dim"], p["chunk_rows"], p["dtype"], p.get("feature_dim"))
            arr = self.group["image_emb"]
            want = _layout_metadata("image_emb", lay)
        except (*_DAMAGE, StoreError):
            return True
        stored = arr.metadata.to_dict()
        return metadata_difference(stored, want) is None and tuple(stored["shape"]) == tuple(want["shape"])

    def record(self) -> dict[str, Any] | None:
        """Provenance, prompt plan and texts digest if they pass the digest: from the group, else its copy."""
        attrs = self.group.attrs.asdict()
        if _record_ok(attrs):
            return _backup(attrs)
        return self.backup_record()

    def backup_record(self) -> dict[str, Any] | None:
        try:
            copy = self.group["done"].attrs.get("backup")
        except _DAMAGE:
            return None
        return dict(copy) if _record_ok(copy) else None

    def reload(self) -> None:
        """Re-read the group metadata (another writer may have changed its attributes)."""
        self.group = zarr.open_group(self.group.store, path=self.path, mode="r+", zarr_format=3)
        self._records = None

    def _update_attrs(self, **kw: Any) -> None:
        self.reload()
        self.group.attrs.update(kw)

    # ---- low-level reads ------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except _DAMAGE as exc:
            what = "is missing" if isinstance(exc, KeyError) else f"has an unreadable zarr.json ({_why(exc)})"
            raise StoreDamageError(f"{self.file(name)} {what}; {repair_hint(self.store_path)}") from None

    def _read(self, name: str, sel: Any = slice(None)) -> np.ndarray:
        """Read an array; a damaged chunk is named in a CorruptChunkError, never a codec traceback."""
        arr = self._array(name)
        try:
            return arr[sel]
        except _DAMAGE as exc:
            bad = self._damaged_chunks(arr, name)
            if not bad:
                raise StoreDamageError(
                    f"{self.file(name)} cannot be read ({_why(exc)}); {repair_hint(self.store_path)}"
                ) from None
            raise CorruptChunkError(
                f"{self.store_path}/{bad[0]}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                + f"; {repair_hint(self.store_path)}"
            ) from None

    def _damaged_chunks(
        self,
        arr: zarr.Array,
        name: str,
        only: set[tuple[int, ...]] | None = None,
        records: Mapping[int, Mapping[str, str]] | None = None,
    ) -> list[Damage]:
        """Chunks that fail their checksum, or (row arrays, with `records`) the digest of their position."""
        out = []
        present = _stored_keys(arr)
        for idx, sel in _chunk_grid(arr):
            key = arr.metadata.encode_chunk_key(idx)
            if key not in present or (only is not None and idx not in only):
                continue
            try:
                values = arr[sel]
                want = records.get(idx[0]) if records is not None and name in ROW_ARRAYS else None
                if want is not None and want.get(name) != chunk_digest(self.path, name, key, values):
                    what = f"chunk {'.'.join(map(str, idx))} (file {name}/{key}) " + _UNBOUND
                    out.append(Damage(f"{self.path}/{name}", what, "chunk", name, idx[0]))
            except _DAMAGE as exc:
                fix, chunk = _fix_for(name), (idx[0] if name in (*ROW_ARRAYS, "done") else None)
                out.append(
                    Damage(
                        f"{self.path}/{name}",
                        f"chunk {'.'.join(map(str, idx))} (file {name}/{key}) is damaged: {_why(exc)}",
                        "chunk" if chunk is not None else fix,
                        name,
                        chunk,
                    )
                )
        return out

    # ---- progress -------------------------------------------------------------------------
    def done_mask(self) -> np.ndarray:
        return np.asarray(self._read("done"), dtype=bool)

    def chunk_done(self, ci: int) -> bool:
        return bool(self._read("done", slice(ci, ci + 1))[0])

    def missing_chunks(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    @property
    def texts_done(self) -> bool:
        return bool(self.group.attrs.get("texts_done")) or not self.has_text

    @property
    def complete(self) -> bool:
        """Every chunk and the texts extracted; a damaged run is refused here, not called incomplete."""
        self.require_intact()
        return self.texts_done and not self.missing_chunks()

    # ---- writes ---------------------------------------------------------------------------
    def _writable(self, name: str) -> zarr.Array:
        return self._array(name).with_config(_WRITE)

    def write_chunk(
        self,
        ci: int,
        emb: np.ndarray,
        failures: Sequence[str],
        features: np.ndarray | None = None,
        channel_emb: np.ndarray | None = None,
    ) -> None:
        """Write one whole row chunk, then its digests, then flag it done (a crash before the flag redoes it)."""
        lay = self.layout
        sl = lay.chunk_slice(ci)
        if emb.shape[0] != sl.stop - sl.start:
            raise StoreError(f"chunk {ci} expects {sl.stop - sl.start} rows, got {emb.shape[0]}")
        if (channel_emb is None) != (lay.channels == 0):
            raise StoreError(f"chunk {ci}: per-channel embeddings are {'missing' if channel_emb is None else 'extra'}")
        rows = {"image_emb": emb.astype(lay.dtype)}
        if features is not None and "features" in self.group:
            rows["features"] = features.astype(lay.dtype)
        if channel_emb is not None:
            rows["channel_emb"] = channel_emb.astype(lay.dtype)
        rows["failure"] = _str_array(list(failures))
        digested, digests = self.digested, {}
        self._records = None  # the digests read for evaluation, if any, are read again
        for name, values in rows.items():
            arr = self._writable(name)
            arr[sl] = values
            if digested:
                digests[name] = chunk_digest(self.path, name, _row_key(arr, ci), values)
        if digested:
            self._writable(CHUNK_DIGEST)[ci] = encode_record(digests)
        self._writable("done")[ci] = True

    def clear_done(self, ci: int) -> None:
        """Mark a chunk for re-extraction (its data were found missing or damaged)."""
        self._writable("done")[ci] = False

    def _clear_for_repair(self, ci: int, why: str) -> None:
        """Clear a damaged chunk's flag, marking it first in chunk_digest: until it is extracted again
        the run is damaged, not merely incomplete, even if this process is killed right after."""
        if self.digested:
            arr = self._writable(CHUNK_DIGEST)
            current = None
            with contextlib.suppress(*_DAMAGE):  # an unreadable entry is simply replaced
                current = decode_record(_to_str(arr[ci : ci + 1])[0])
            if not (current and REPAIR_MARK in current):  # a repair resumed keeps the first reason
                arr[ci] = repair_record(why)
        self.clear_done(ci)

    def write_text_embeddings(self, emb: np.ndarray) -> None:
        if emb.shape[0] != self._array("texts").shape[0]:
            raise StoreError("text embeddings do not match the stored text table")
        self._writable("text_emb")[:] = emb.astype(self.layout.dtype)
        self._update_attrs(texts_done=True)

    # ---- reads (checked: a damaged run is refused in one line) -----------------------------
    def require_intact(self) -> None:
        """Refuse a run with a missing or damaged chunk, array or digest (cheap: listing, not checksums)."""
        if self._intact:
            return
        problems = self.check()
        if problems:
            first = problems[0]
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            cls = CorruptChunkError if first.fix == "chunk" else StoreDamageError
            raise cls(f"{self.store_path}/{first}{more}; {repair_hint(self.store_path)}")
        self._intact = True

    def image_embeddings(self, normalize: bool = True) -> np.ndarray:
        """The (N, D) float32 embeddings, L2-normalised: read and normalised a block of chunks at a
        time into one float32 array, so reading holds that array plus one block (not the stored
        float16 array, a float32 copy and a normalised copy at once)."""
        self.require_intact()
        return self._read_rows("image_emb", (), normalize)

    def _read_rows(self, name: str, tail: tuple, normalize: bool) -> np.ndarray:
        """Array `name` (rows first, `tail` selecting the rest down to (N, D)) as float32, by blocks."""
        arr = self._array(name)
        n, d = arr.shape[0], arr.shape[-1]
        out = np.empty((n, d), dtype=np.float32)
        cr = max(arr.chunks[0], 1)
        step = max(cr, READ_BLOCK_BYTES // max(d * arr.dtype.itemsize, 1) // cr * cr)
        for s in range(0, n, step):
            block = out[s : s + step]
            raw = self._read(name, (slice(s, s + step), *tail))
            if not tail:  # whole chunks: check each against the digest of its position
                self._check_rows(name, s, raw)
            block[:] = raw
            if normalize:
                normalize_rows(block)
        return out

    def _chunk_records(self) -> dict[int, dict[str, str]]:
        """The recorded digests of every done chunk (read once; empty for runs written before them)."""
        if self._records is None:
            records: dict[int, dict[str, str]] = {}
            if self.digested:
                entries = _to_str(self._read(CHUNK_DIGEST))
                for ci in np.flatnonzero(self.done_mask()):
                    record = decode_record(entries[ci])
                    if record is not None and REPAIR_MARK not in record:
                        records[int(ci)] = record
            self._records = records
        return self._records

    def _check_rows(self, name: str, start: int, values: np.ndarray) -> None:
        """Refuse rows read for evaluation whose chunk is not the one extracted at that position."""
        records = self._chunk_records()
        if not records:
            return
        arr, cr = self._array(name), self.layout.chunk_rows
        for ci in range(start // cr, -(-(start + len(values)) // cr)):
            want, key = records.get(ci, {}).get(name), _row_key(arr, ci)
            rows = values[ci * cr - start : (ci + 1) * cr - start]
            if want is not None and chunk_digest(self.path, name, key, rows) != want:
                raise CorruptChunkError(
                    f"{self.store_path}/{self.path}/{name} chunk {ci}.{'.'.join(['0'] * (arr.ndim - 1))} "
                    f"(file {name}/{key}) {_UNBOUND}; {repair_hint(self.store_path)}"
                )

    @property
    def channel_labels(self) -> list[str]:
        """The channels with their own stored embeddings (`--channel-mode each`), as selected."""
        pixels = self.provenance.get("pixels") or {}
        return [str(c) for c in pixels.get("channels") or []] if self.layout.channels else []

    def channel_embeddings(self, k: int, normalize: bool = True) -> np.ndarray:
        """The (N, D) embeddings of the k-th selected channel (only `--channel-mode each` runs)."""
        if not self.layout.channels:
            raise StoreError(f"{self.path} has no per-channel embeddings (extract with --channel-mode each)")
        self.require_intact()
        return self._read_rows("channel_emb", (k,), normalize)

    def features(self) -> np.ndarray | None:
        self.require_intact()
        if "features" not in self.group:
            return None
        raw = self._read("features")
        self._check_rows("features", 0, raw)
        return np.asarray(raw, np.float32)

    def failures(self) -> dict[int, str]:
        self.require_intact()
        return self.failures_unchecked()

    def failures_unchecked(self) -> dict[int, str]:
        """Failure reasons without the integrity check (the extraction report of a run being written)."""
        f = _to_str(self._read("failure"))
        return {int(i): str(f[i]) for i in np.flatnonzero(f != "")}

    def valid_mask(self) -> np.ndarray:
        """Rows that were extracted and whose image was readable."""
        self.require_intact()
        failure = self._read("failure")
        self._check_rows("failure", 0, failure)
        ok = _to_str(failure) == ""
        done = np.repeat(self.done_mask(), self.layout.chunk_rows)[: self.layout.n_rows]
        return ok & done

    def texts(self) -> list[str]:
        self.require_intact()
        return self.texts_unchecked()

    def texts_unchecked(self) -> list[str]:
        return [str(t) for t in _to_str(self._read("texts"))]

    def text_embeddings(self, normalize: bool = True) -> np.ndarray:
        if not self.has_text:
            raise StoreError(f"{self.model_spec} is image-only: no text embeddings")
        if not self.texts_done:
            raise StoreError(f"{self.path}: text embeddings are not extracted yet")
        self.require_intact()
        x = np.asarray(self._read("text_emb"), dtype=np.float32)
        return l2_normalize(x) if normalize else x

    def meta(self) -> pd.DataFrame:
        self.require_intact()
        g = self.group["meta"]
        cols: dict[str, Any] = {}
        stored = [(str(name), self._read(f"meta/{name}")) for name in g.attrs.get("columns", [])]
        if self.digested and columns_digest(stored) != self.provenance.get("meta_sha256"):
            raise StoreDamageError(f"{self.file('meta')} {_META_FORGED}; {repair_hint(self.store_path)}")
        for name, values in stored:
            if values.dtype == _STR or str(values.dtype).startswith("Str"):
                s = pd.Series(_to_str(values), dtype=object)
                cols[name] = s.where(s != "", None)
            else:
                cols[name] = np.asarray(values)
        return pd.DataFrame(cols)

    def caption_keys(self) -> list[str]:
        return sorted(self.group.attrs.get("caption_keys") or [])

    def captions(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(options (N, K) text indices with -1 padding, answer (N,) with -1 for null entries)."""
        self.require_intact()
        options, answer = (
            np.asarray(self._read(f"captions/{key}/options")),
            np.asarray(self._read(f"captions/{key}/answer")),
        )
        want = (self.group.attrs.get("captions_sha256") or {}).get(key) if self.digested else None
        if want is not None and captions_digests({key: (options, answer)})[key] != want:
            raise StoreDamageError(f"{self.file('captions', key)} {_CAPTIONS_FORGED}; {repair_hint(self.store_path)}")
        return options, answer

    def prompts(self) -> dict[str, Any]:
        return dict(self.group.attrs.get("prompts", {}))

    # ---- integrity ------------------------------------------------------------------------
    def _expected(self) -> dict[str, tuple[tuple[int | None, ...], tuple[int, ...] | None]]:
        """Every array the run must hold: name -> (shape, chunks); None = not fixed by the layout."""
        lay = self.layout
        n, d, cr = lay.n_rows, lay.embed_dim, lay.chunk_rows
        out: dict[str, tuple[tuple[int | None, ...], tuple[int, ...] | None]] = {
            "image_emb": ((n, d), (cr, d)),
            "done": ((lay.n_chunks,), (1,)),
            "failure": ((n,), (cr,)),
            "row_index": ((n,), (max(n, 1),)),
            "texts": ((None,), None),
            "text_emb": ((None, d), None),
        }
        if lay.feature_dim is not None:
            out["features"] = ((n, lay.feature_dim), (cr, lay.feature_dim))
        if lay.channels:
            out["channel_emb"] = ((n, lay.channels, d), (cr, lay.channels, d))
        if self.digested:
            out[CHUNK_DIGEST] = ((lay.n_chunks,), (1,))
        for col in self.provenance.get("meta_columns", []):
            out[f"meta/{col}"] = ((n,), (max(n, 1),))
        for key in self.caption_keys():
            out[f"captions/{key}/options"] = ((n, None), None)
            out[f"captions/{key}/answer"] = ((n,), None)
        return out

    def check(self, deep: bool = False) -> list[Damage]:
        """Every integrity problem of the run. Cheap by default (metadata, digests, the listing of
        chunk files against the done flags); `deep` also reads every chunk to test its checksum and
        the digest of its position, the metadata and caption digests, and lists leftover files."""
        if not self.provenance_ok:
            return [Damage(self.path, "zarr.json: provenance does not match its sha256 digest (edited?)", "provenance")]
        out: list[Damage] = []
        arrays: dict[str, zarr.Array] = {}
        for name, (shape, chunks) in self._expected().items():
            node = f"{self.path}/{name}"
            try:
                arr = self.group[name]
            except _DAMAGE as exc:
                missing = isinstance(exc, KeyError) and not self.loc.exists(f"{self.path}/{name}/zarr.json")
                what = "is missing" if missing else f"zarr.json is unreadable ({_why(exc)})"
                out.append(Damage(node, what, _fix_for(name), name))
                continue
            if any(w is not None and w != s for w, s in zip(shape, arr.shape, strict=False)) or (
                len(shape) != arr.ndim or (chunks is not None and arr.chunks != chunks)
            ):
                what = f"zarr.json does not match the run's layout (shape {arr.shape}, chunks {arr.chunks})"
                out.append(Damage(node, what, _fix_for(name), name))
                continue
            differs = self._metadata_difference(name, arr)
            if differs:
                out.append(Damage(node, f"zarr.json does not match the run's layout ({differs})", _fix_for(name), name))
                continue
            arrays[name] = arr
        try:
            if self.group["meta"].attrs.get("columns") != self.provenance.get("meta_columns"):
                out.append(
                    Damage(f"{self.path}/meta", "zarr.json: the column list differs from the provenance", "meta")
                )
            elif why := group_problem(self.loc.read_bytes(f"{self.path}/meta/zarr.json"), attributes=True):
                out.append(Damage(f"{self.path}/meta", f"zarr.json {why}", "meta"))
        except _DAMAGE as exc:
            out.append(Damage(f"{self.path}/meta", f"zarr.json is unreadable ({_why(exc)})", "meta"))
        out += self._check_groups()
        done = np.zeros(self.layout.n_chunks, dtype=bool)
        if "done" in arrays:
            done, bad = self._check_done(arrays["done"])
            out += bad
            if self.backup_record() != _backup(self.group.attrs.asdict()):
                out.append(Damage(f"{self.path}/done", "zarr.json: the copy of the provenance differs", "backup"))
        records, bad = self._check_records(arrays, done, deep)
        out += bad
        out += self._check_listing(arrays, done)
        if "texts" in arrays and "text_emb" in arrays:
            out += self._check_texts(arrays, deep)
        if deep:
            for name, arr in arrays.items():
                if name in ("done", CHUNK_DIGEST):
                    continue  # read chunk by chunk above
                only = (
                    {(int(ci),) + (0,) * (arr.ndim - 1) for ci in np.flatnonzero(done)} if name in ROW_ARRAYS else None
                )
                out += self._damaged_chunks(arr, name, only, records if self.digested else None)
            out += self._check_rows_digests(arrays)
            out += self._leftovers()
        return out

    def _metadata_difference(self, name: str, arr: zarr.Array) -> str | None:
        """How an array's data type or codecs differ from what the provenance's layout gives."""
        if name in (*ROW_ARRAYS, "done", CHUNK_DIGEST):
            return metadata_difference(arr.metadata.to_dict(), _layout_metadata(name, self.layout))
        want = {"text_emb": np.dtype(self.layout.dtype).name, "row_index": "int64"}.get(name)
        got = str(arr.metadata.to_dict().get("data_type"))
        return f"data_type {got}, provenance says {want}" if want is not None and got != want else None

    def _check_groups(self) -> list[Damage]:
        """The caption groups (captions, one per caption key) must be plain group metadata."""
        keys = self.caption_keys()
        out = []
        for rel in ["captions", *(f"captions/{k}" for k in keys)] if keys else []:
            why = group_problem(self.loc.read_bytes(f"{self.path}/{rel}/zarr.json"), attributes=True)
            if why is not None:
                out.append(Damage(f"{self.path}/{rel}", f"zarr.json {why}", "texts"))
        return out

    def _check_records(
        self, arrays: Mapping[str, zarr.Array], done: np.ndarray, deep: bool
    ) -> tuple[dict[int, dict[str, str]], list[Damage]]:
        """The digests recorded for done chunks (deep), and the chunks an interrupted repair cleared.

        Cheap: only the entries of chunks that are not done are read (none in a complete run)."""
        if not self.digested or CHUNK_DIGEST not in arrays:
            return {}, []
        arr, node = arrays[CHUNK_DIGEST], f"{self.path}/{CHUNK_DIGEST}"
        present, records, out = _stored_keys(arr), {}, []
        for ci in range(self.layout.n_chunks):
            key = arr.metadata.encode_chunk_key((ci,))
            if key not in present or (done[ci] and not deep):
                continue  # a missing entry of a done chunk is reported from the listing
            try:
                entry = decode_record(_to_str(arr[ci : ci + 1])[0])
            except _DAMAGE as exc:
                what = f"chunk {ci} (file {CHUNK_DIGEST}/{key}) is damaged: {_why(exc)}"
                out.append(Damage(node, what, "chunk", CHUNK_DIGEST, ci))
                continue
            if entry is not None and REPAIR_MARK in entry:
                what = (
                    f"chunk {ci} was cleared by an interrupted repair ({entry[REPAIR_MARK]}), not extracted again yet"
                )
                out.append(Damage(f"{self.path}/done", what, "chunk", "done", ci))
            elif done[ci] and entry is None:
                what = f"chunk {ci} (file {CHUNK_DIGEST}/{key}) holds no digest although its done flag is set"
                out.append(Damage(node, what, "chunk", CHUNK_DIGEST, ci))
            elif done[ci] and entry is not None:
                records[ci] = entry
        return records, out

    def interrupted_repairs(self, done: np.ndarray) -> list[int]:
        """Chunks a killed repair cleared and nothing extracted since (cheap: only entries of chunks not done)."""
        try:
            arrays = {CHUNK_DIGEST: self.group[CHUNK_DIGEST]} if self.digested else {}
        except _DAMAGE:  # reported by check()
            return []
        return [
            int(d.chunk)
            for d in self._check_records(arrays, done, False)[1]
            if d.array == "done" and d.chunk is not None
        ]

    def _check_rows_digests(self, arrays: Mapping[str, zarr.Array]) -> list[Damage]:
        """Deep: the metadata columns and caption tables against their digests, row_index against 0..N-1."""
        out = []
        # A chunk that cannot be read is named by the checksum pass: here it only skips the comparison.
        with contextlib.suppress(*_DAMAGE):
            if "row_index" in arrays and not np.array_equal(arrays["row_index"][:], np.arange(self.layout.n_rows)):
                what = "does not hold the row positions 0..N-1 (edited)"
                out.append(Damage(f"{self.path}/row_index", what, "row_index"))
        if not self.digested:
            return out
        cols = [f"meta/{c}" for c in self.provenance.get("meta_columns", [])]
        with contextlib.suppress(*_DAMAGE):
            if all(c in arrays for c in cols):
                stored = [(c.removeprefix("meta/"), arrays[c][:]) for c in cols]
                if columns_digest(stored) != self.provenance.get("meta_sha256"):
                    out.append(Damage(f"{self.path}/meta", _META_FORGED, "meta"))
        recorded = self.group.attrs.get("captions_sha256") or {}
        for key in self.caption_keys():
            parts = (f"captions/{key}/options", f"captions/{key}/answer")
            with contextlib.suppress(*_DAMAGE):
                if all(p in arrays for p in parts):
                    have = captions_digests({key: (arrays[parts[0]][:], arrays[parts[1]][:])})[key]
                    if have != recorded.get(key):
                        out.append(Damage(f"{self.path}/captions/{key}", _CAPTIONS_FORGED, "texts"))
        return out

    def _leftovers(self) -> list[Damage]:
        """Temporary files of writes that were killed midway (never those of a write in flight).

        A row chunk is written only under its claim: its temporary file is a leftover once no live
        writer holds that chunk. Other files (metadata, flags cleared by a repair) are written
        unclaimed but in milliseconds: leftovers once no writer is live and they are a few seconds old.
        """
        keys = [k for k in sync(_alist(self.group.store_path.store, self.path + "/")) if is_partial(k)]
        if not keys:
            return []
        owners = self.claims().owners()
        live = {k for k, c in owners.items() if c.live}
        out = []
        for key in keys:
            parts = partial_target(key[len(self.path) + 1 :]).split("/")
            chunk = int(parts[2]) if parts[0] in ROW_ARRAYS and len(parts) > 2 and parts[2].isdigit() else None
            gone = chunk not in live if chunk is not None else not live and old_enough(_mtime(self.loc, key))
            if gone:
                out.append(Damage(key, "is left over from an interrupted write", "partial"))
        return out

    def _check_done(self, arr: zarr.Array) -> tuple[np.ndarray, list[Damage]]:
        """The done mask (unreadable flags count as not done) and one Damage per missing/damaged flag."""
        out, present = [], _stored_keys(arr)
        done = np.zeros(arr.shape[0], dtype=bool)
        for (ci,), sel in _chunk_grid(arr):
            key = arr.metadata.encode_chunk_key((ci,))
            if key not in present:
                out.append(Damage(f"{self.path}/done", f"chunk {ci} (file done/{key}) is missing", "chunk", "done", ci))
                continue
            try:
                done[ci] = bool(arr[sel][0])
            except _DAMAGE as exc:
                what = f"chunk {ci} (file done/{key}) is damaged: {_why(exc)}"
                out.append(Damage(f"{self.path}/done", what, "chunk", "done", ci))
        return done, out

    def _check_listing(self, arrays: Mapping[str, zarr.Array], done: np.ndarray) -> list[Damage]:
        """Chunk files that must exist: those of done row chunks, and every chunk of the other arrays."""
        out = []
        texts_done = bool(self.group.attrs.get("texts_done"))
        for name, arr in arrays.items():
            if name == "done" or (name == "text_emb" and not texts_done):
                continue
            present = _stored_keys(arr)
            for idx, _ in _chunk_grid(arr):
                if name in _PER_CHUNK and not done[idx[0]]:
                    continue
                key = arr.metadata.encode_chunk_key(idx)
                if key in present:
                    continue
                row = name in _PER_CHUNK
                what = f"chunk {'.'.join(map(str, idx))} (file {name}/{key}) is missing"
                what += " although its done flag is set" if row else ""
                out.append(
                    Damage(
                        f"{self.path}/{name}", what, "chunk" if row else _fix_for(name), name, idx[0] if row else None
                    )
                )
        return out

    def _check_texts(self, arrays: Mapping[str, zarr.Array], deep: bool) -> list[Damage]:
        texts, text_emb = arrays["texts"], arrays["text_emb"]
        if text_emb.shape[0] != texts.shape[0]:
            return [Damage(f"{self.path}/text_emb", "does not match the text table's length", "texts", "text_emb")]
        try:
            values = [str(t) for t in _to_str(texts[:])]
        except _DAMAGE as exc:  # a deep check names the damaged chunk itself
            return [] if deep else [Damage(f"{self.path}/texts", f"cannot be read ({_why(exc)})", "texts", "texts")]
        want = self.group.attrs.get("texts_sha256")
        if texts_digest(values, self.prompts(), self.caption_keys()) != want:
            return [Damage(f"{self.path}/texts", "does not match the run's texts digest (edited or damaged)", "texts")]
        return []

    def verify(self) -> list[str]:
        """Read every chunk of every array; one line per problem (missing, damaged, edited)."""
        return [str(d) for d in self.check(deep=True)]

    def size_bytes(self) -> int:
        return self.loc.size(self.path)

    def claims(self, timeout: float = DEFAULT_CLAIM_TIMEOUT) -> ChunkClaims:
        """The claims of concurrent writers on this run (files under `.claims/`, not a Zarr node)."""
        return self.loc.claims(f"{CLAIMS}/{self.path}", timeout)

    # ---- repair ---------------------------------------------------------------------------
    def repair(
        self,
        layout: RunLayout,
        meta: pd.DataFrame,
        texts: Sequence[str],
        captions: Mapping[str, tuple[np.ndarray, np.ndarray]],
        prompts: Mapping[str, Any],
    ) -> list[str]:
        """Fix what can be fixed without the model; clear the done flag of every damaged or missing
        row chunk (extraction recomputes them). Returns one line per problem repaired.

        Texts are also rewritten when the requested text table or prompt plan differs (other
        templates): finished image chunks are never touched by that.
        """
        problems = self.check(deep=True)
        fixed = [str(d) for d in problems]
        structural = [d for d in problems if d.fix in ("array", "backup")]
        for d in structural:
            if d.fix == "array" and d.array:
                self._recreate(d.array, layout)
        if any(d.fix == "backup" for d in structural) or any(d.array == "done" for d in structural):
            self._writable("done").attrs["backup"] = _backup(self.group.attrs.asdict())
        if structural:
            problems = self.check(deep=True)
            fixed += [str(d) for d in problems if str(d) not in fixed]
        fixes = {d.fix for d in problems}
        if "meta" in fixes:
            _delete(self.group, "meta")
            _write_meta(self.group, meta, layout)
        if "row_index" in fixes:
            _delete(self.group, "row_index")
            _write_row_index(self.group, layout)
        keys = sorted(captions)
        want = texts_digest(texts, prompts, keys)
        if "texts" in fixes or self.group.attrs.get("texts_sha256") != want:
            _write_texts(self.group, texts, captions, layout)
            digests = {"captions_sha256": captions_digests(captions)} if self.digested else {}
            self._update_attrs(prompts=dict(prompts), caption_keys=keys, texts_sha256=want, **digests, texts_done=False)
            self._writable("done").attrs["backup"] = _backup(self.group.attrs.asdict())
        cleared: set[int] = set()
        for d in problems:
            if d.fix == "chunk" and d.chunk is not None and d.chunk not in cleared:
                cleared.add(d.chunk)
                self._clear_for_repair(d.chunk, d.what[:200])
            elif d.fix == "partial":
                self.loc.delete(d.node)
        self._intact, self._records = False, None
        return fixed

    def _recreate(self, name: str, layout: RunLayout) -> None:
        """Rewrite an array's zarr.json from the layout; its chunk files stay (and are checked after)."""
        if name == "row_index" or name.startswith(("meta", "texts", "text_emb", "captions")):
            return  # rewritten whole from the dataset instead
        _delete_key(self.group, f"{name}/zarr.json")
        _create_row_array(self.group, name, layout)


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


def _restore(run: Run, record: Mapping[str, Any]) -> None:
    """Rewrite a run's group attributes from a record (texts re-encoded: nothing says they were done)."""
    captions = record.get("captions_sha256")
    attrs = _group_attrs(record["provenance"], record["prompts"] or {}, record["caption_keys"] or [], False, captions)
    attrs["texts_sha256"] = record["texts_sha256"]
    run.group.attrs.put(attrs)
    run.reload()


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
        _delete(g, name)
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


@dataclass
class BrokenRun:
    """A run folder whose group zarr.json is missing or unreadable."""

    path: str
    store_path: Any
    reason: str
    store: Any = None
    loc: Location | None = None

    def check(self, deep: bool = False) -> list[Damage]:
        return [Damage(self.path, f"zarr.json {self.reason}", "provenance")]

    def backup_record(self) -> dict[str, Any] | None:
        try:
            copy = zarr.open_array(self.store, path=f"{self.path}/done", mode="r", zarr_format=3).attrs.get("backup")
        except _DAMAGE:
            return None
        return dict(copy) if _record_ok(copy) else None

    record = backup_record

    def error(self) -> StoreDamageError:
        return StoreDamageError(
            f"{self.store_path}/{self.path}/zarr.json {self.reason}; {repair_hint(self.store_path)}"
        )

    def size_bytes(self) -> int:
        return (self.loc or LocalLocation(self.store_path)).size(self.path)


class RunArrays:
    """A run's arrays, read from the store once and shared by all of that run's units.

    It lives here, beside `Run`, because it is nothing but a memo of `Run`'s checked reads (the
    integrity check runs on the first one): evaluation, search and compare all read through it,
    and keeping every read of the store in this module keeps the I/O in one place.
    """

    def __init__(self, run: Run) -> None:
        self.run = run

    @cached_property
    def x(self) -> np.ndarray:
        return self.run.image_embeddings()

    @cached_property
    def valid(self) -> np.ndarray:
        return self.run.valid_mask()

    @cached_property
    def meta(self) -> pd.DataFrame:
        return self.run.meta()

    @cached_property
    def texts(self) -> list[str] | None:
        return self.run.texts() if self.run.has_text else None

    @cached_property
    def text_emb(self) -> np.ndarray | None:
        return self.run.text_embeddings() if self.run.has_text else None


class ChannelArrays(RunArrays):
    """One channel's view of a `--channel-mode each` run: its own embeddings, the run's other arrays."""

    def __init__(self, base: RunArrays, k: int) -> None:
        super().__init__(base.run)
        self.base, self.k = base, k

    @cached_property
    def x(self) -> np.ndarray:
        return self.run.channel_embeddings(self.k)

    @property
    def valid(self) -> np.ndarray:  # type: ignore[override]
        return self.base.valid

    @property
    def meta(self) -> pd.DataFrame:  # type: ignore[override]
        return self.base.meta

    @property
    def texts(self) -> list[str] | None:  # type: ignore[override]
        return self.base.texts

    @property
    def text_emb(self) -> np.ndarray | None:  # type: ignore[override]
        return self.base.text_emb


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def identity_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (old.get(k), new.get(k)) for k in IDENTITY_KEYS if old.get(k) != new.get(k)}


def _dirs(loc: Location, rel: str = "") -> list[str]:
    """Child folders that can be Zarr nodes (dot-folders hold claims and runs being created), as paths."""
    return [f"{rel}/{name}" if rel else name for name in loc.dirs(rel) if not name.startswith(".")]


class EmbeddingStore:
    """A directory of run groups; the only code in the package that touches Zarr."""

    def __init__(self, path: str | Path, create: bool = False, repair: bool = False) -> None:
        self.loc = location(path)
        self.path = self.loc.path  # a Path for a folder, the URL string for an object store
        self.repaired: list[str] = []  # what opening with repair=True fixed
        marker = self.loc.display("zarr.json")
        zstore = self.loc.zarr_store()
        if not self.loc.exists("zarr.json") and not (repair and self.loc.is_dir("")):
            if not create:
                raise StoreError(f"no store at {self.path} (run `probe extract --store {self.path}`)")
            self._create_root()
            self.root = zarr.open_group(zstore, mode="r+", zarr_format=3)
            return
        try:
            self.root = zarr.open_group(zstore, mode="r+", zarr_format=3)
        except _DAMAGE as exc:
            if not repair:
                raise StoreDamageError(
                    f"{marker} is unreadable ({_why(exc)}); repair with `probe verify --repair {self.path}`"
                ) from None
            self.repaired.append(f"{marker} was unreadable ({_why(exc)}): rewritten")
            self.loc.delete("zarr.json")
            self.root = zarr.open_group(zstore, mode="a", zarr_format=3)
            self.root.attrs.update({"mubench_probe_store": FORMAT_VERSION, "created": _now()})
        version = self.root.attrs.get("mubench_probe_store")
        if version is None:
            raise StoreError(f"{self.path} is a Zarr store but not one written by probe extract")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{self.path} was written by another version of probe (store format {version}; this probe "
                f"reads format {FORMAT_VERSION}): extract again into a new --store"
            )

    def _create_root(self) -> None:
        """Write the root's zarr.json whole, marker attribute included, only if it is absent.

        A writer opening the store at the same moment then sees either no store or a complete,
        marked one (never a group without its attribute, or a half-written file); the first
        exclusive create wins (a hard link on a filesystem, a conditional put on an object store)
        and the others use it.
        """
        meta = {
            "attributes": {"mubench_probe_store": FORMAT_VERSION, "created": _now()},
            "zarr_format": 3,
            "node_type": "group",
        }
        data = json.dumps(meta, indent=2).encode()
        try:
            self.loc.create("zarr.json", data)
        except StoreError:  # a filesystem without conditional writes: one creator (see "Running at scale")
            if not self.loc.exists("zarr.json"):
                self.loc.write_bytes("zarr.json", data)

    # ---- listing ----------------------------------------------------------------------------
    def _open(self, path: str) -> Run | BrokenRun:
        try:
            g = zarr.open_group(self.root.store, path=path, mode="r+", zarr_format=3)
        except _DAMAGE as exc:
            reason = "is unreadable" if self.loc.exists(f"{path}/zarr.json") else "is missing"
            if not isinstance(exc, zarr.errors.GroupNotFoundError):
                reason += f" ({_why(exc)})"
            return BrokenRun(path, self.path, reason, self.root.store, self.loc)
        return Run(g, self.path, self.loc)

    def _run_paths(self) -> list[str]:
        return [s for m in _dirs(self.loc) for d in _dirs(self.loc, m) for s in _dirs(self.loc, d)]

    def scan(self) -> list[Run | BrokenRun]:
        """Every run folder `MODEL/DATASET/SPLIT`, readable or not (for info, verify and repair).

        In an object store, a run prefix without a committed zarr.json is left out while its
        creator is alive, and when nothing can restore it (an abandoned creation, see `check`).
        """
        out: list[Run | BrokenRun] = []
        for path in self._run_paths():
            if self.loc.remote and not self.loc.exists(f"{path}/zarr.json") and self._uncommitted(path) is not None:
                continue
            out.append(self._open(path))
        return out

    def _uncommitted(self, path: str) -> str | None:
        """Object stores: why a run prefix without zarr.json is not (yet) a run; None if it is a damaged run."""
        if self._creating(path):
            return "being created"
        if BrokenRun(path, self.path, "", self.root.store, self.loc).backup_record() is None:
            return "abandoned"
        return None

    def _creating(self, path: str) -> bool:
        claims = self.loc.claims(f"{CLAIMS}/{path}", DEFAULT_CLAIM_TIMEOUT)
        info = claims.owners().get("create")
        return info is not None and info.live

    def runs(self) -> list[Run]:
        """Every run, refusing the store in one line if a run's zarr.json or provenance is damaged."""
        out = []
        for node in self.scan():
            if isinstance(node, BrokenRun):
                raise node.error()
            node.provenance  # noqa: B018 - raises when the digest does not match
            out.append(node)
        return out

    def find(self, model: str | None = None, dataset: str | None = None, split: str | None = None) -> list[Run]:
        """Runs matching a model spec or key, a dataset key and a split (None = any)."""
        found = []
        for r in self.runs():
            mk, dk, sk = r.path.split("/")
            if model is not None and model not in (mk, r.model_spec):
                continue
            if dataset is not None and dataset not in (dk, r.provenance.get("dataset_spec")):
                continue
            if split is not None and split != sk:
                continue
            found.append(r)
        return found

    # ---- integrity --------------------------------------------------------------------------
    def check(self, deep: bool = False, timeout: float = DEFAULT_CLAIM_TIMEOUT) -> list[Damage]:
        """Every problem in the store: intermediate groups, runs, half-created runs."""
        out = self._parent_damage()
        for node in self.scan():
            out += node.check(deep)
        out += [Damage(_creating_name(p), what, "creating") for p, what in self._abandoned(timeout)]
        return out

    def _parent_damage(self) -> list[Damage]:
        """Intermediate groups whose zarr.json is not the plain group metadata probe writes, and
        temporary files of killed writes at the root and in those groups."""
        out = []
        for m in _dirs(self.loc):
            for rel in (m, *_dirs(self.loc, m)):
                try:
                    zarr.open_group(self.root.store, path=rel, mode="r", zarr_format=3)
                except _DAMAGE as exc:
                    out.append(Damage(rel, f"zarr.json is missing or unreadable ({_why(exc)})", "parent"))
                    continue
                why = group_problem(self.loc.read_bytes(f"{rel}/zarr.json"), attributes=False)
                if why is not None:
                    out.append(Damage(rel, f"zarr.json {why}", "parent"))
        for rel in ("", *(d for m in _dirs(self.loc) for d in (m, *_dirs(self.loc, m)))):
            for name in self.loc.files(rel):
                key = f"{rel}/{name}" if rel else name
                pid = creator_pid(name)
                gone = (not pid_alive(pid)) if pid is not None else old_enough(_mtime(self.loc, key))
                if is_partial(name) and gone:
                    out.append(Damage(key, "is left over from an interrupted write", "partial"))
        return out

    def notes(self) -> list[str]:
        """What verify says without failing the store: runs written before the digests."""
        return [note for node in self.scan() if isinstance(node, Run) for note in node.notes()]

    def _abandoned(self, timeout: float) -> list[tuple[Any, str]]:
        """Folders under .creating left by a creator that is gone (same host: dead pid; else old).

        In an object store: run prefixes whose creator is gone before its provenance copy was
        written (nothing can restore them; the data they hold was never committed)."""
        if self.loc.remote:
            return [
                (path, "is a half-created run left by an interrupted `probe extract`")
                for path in self._run_paths()
                if not self.loc.exists(f"{path}/zarr.json") and self._uncommitted(path) == "abandoned"
            ]
        folder = self.path / CREATING
        out = []
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            host, _, rest = p.name.rpartition("@")
            pid = int(rest.split(".")[0]) if rest.split(".")[0].isdigit() else -1
            if host != HOST:
                gone = time.time() - p.stat().st_mtime > timeout
            elif pid == os.getpid():  # ours: gone unless being built (a failed build can leave late writes)
                gone = p.name.removesuffix(".old") not in _BUILDING
            else:  # dead, or its pid now belongs to a process younger than the folder
                gone = not pid_alive(pid) or started_after(pid, p.stat().st_mtime)
            if gone:
                out.append((p, f"is a half-created run left by an interrupted `probe extract` (pid {pid} on {host})"))
        return out

    def cleanup(self, timeout: float = DEFAULT_CLAIM_TIMEOUT) -> list[str]:
        """Remove half-created runs and rewrite damaged intermediate group zarr.json files."""
        done = []
        for p, what in self._abandoned(timeout):
            if isinstance(p, Path):
                shutil.rmtree(p, ignore_errors=True)
            else:
                self.loc.rmtree(p)
            done.append(f"{_creating_name(p)} {what}: removed")
        for d in self._parent_damage():
            if d.fix == "partial":
                self.loc.delete(d.node)
                done.append(f"{d}: removed")
            else:
                self._ensure_group(d.node, strict=True)
                done.append(f"{d}: rewritten")
        return done

    def _ensure_group(self, rel: str, strict: bool = False) -> None:
        """Make `rel` a readable group node; an unreadable zarr.json is replaced (no data lives in it).
        `strict` (intermediate groups): so is one that is not the plain metadata probe writes."""
        try:
            zarr.open_group(self.root.store, path=rel, mode="r", zarr_format=3)
            readable = True
        except _DAMAGE:
            readable = False
        if readable and (not strict or group_problem(self.loc.read_bytes(f"{rel}/zarr.json"), False) is None):
            return
        _delete_key(self.root, f"{rel}/zarr.json")
        try:
            zarr.open_group(self.root.store, path=rel, mode="a", zarr_format=3)
        except zarr.errors.ContainsGroupError:  # another writer created it at this moment
            zarr.open_group(self.root.store, path=rel, mode="r", zarr_format=3)

    # ---- creating and reopening runs ----------------------------------------------------------
    def prepare_run(
        self,
        path: str,
        provenance: dict[str, Any],
        layout: RunLayout,
        meta: pd.DataFrame,
        texts: Sequence[str],
        captions: Mapping[str, tuple[np.ndarray, np.ndarray]],
        prompts: Mapping[str, Any],
        overwrite: bool = False,
    ) -> Run:
        """Create the group atomically, or reopen it if its identity matches; refuse to mix otherwise.

        Reopening repairs what it finds damaged (see `Run.repair`): damaged or missing row chunks
        get their done flag cleared, so the extraction that follows recomputes exactly those.
        Texts and captions may change between runs (other prompt templates): they are rewritten
        without touching finished image chunks.
        """
        provenance = {
            **provenance,
            "n_rows": layout.n_rows,
            "embed_dim": layout.embed_dim,
            "dtype": layout.dtype,
            "chunk_rows": layout.chunk_rows,
            "feature_dim": layout.feature_dim,
            "features": layout.feature_dim is not None,
            "meta_columns": [str(c) for c in meta.columns],
            "meta_sha256": meta_digest(meta),
            "digests": DIGESTS_VERSION,
        }
        if layout.channels:  # absent otherwise: provenance of runs without it stays as it was
            provenance["channel_emb"] = layout.channels
        self.cleanup()
        args = (path, provenance, layout, meta, texts, captions, prompts)
        for _ in range(3):
            if self.loc.remote:
                self._wait_for_creator(path)
            if not self.loc.exists(path):
                created = self._create(*args, replace=False)
                if created is not None:
                    return created
                continue  # another writer created it at the same moment: join it
            node = self._open(path)
            restored = [str(d) for d in node.check()] if isinstance(node, BrokenRun) or not node.provenance_ok else []
            run = self._trusted(node, overwrite)
            if run is not None:
                restored += self._settle_copies(run, provenance)
                diff = identity_diff(run.provenance, provenance)
                if diff and not overwrite:
                    what = "; ".join(f"{k}: stored {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                    err = ProvenanceMismatchError(
                        f"{self.path}/{path} was extracted differently ({what}). Use another --store, "
                        "or pass --overwrite to discard it"
                    )
                    err.add_note(
                        "; ".join(f"{k}: the run records {a!r} but here it is {b!r}" for k, (a, b) in diff.items())
                    )
                    raise err
                if not diff:
                    run.repairs = restored + run.repair(layout, meta, texts, captions, prompts)
                    return run
            created = self._create(*args, replace=True)
            if created is not None:
                return created
        raise StoreError(f"could not create or open {self.path}/{path}: other writers keep replacing it")

    def _settle_copies(self, run: Run, provenance: Mapping[str, Any]) -> list[str]:
        """When the group's provenance and its copy in done/zarr.json both pass their digests but differ
        (one was edited, digest recomputed), the one that matches the model and dataset reloaded now
        wins; a tie keeps the group's (the copy is then rewritten from it by `Run.repair`)."""
        copy = run.backup_record()
        group = run.provenance
        if copy is None or copy["provenance"] == group:
            return []

        def distance(p: Mapping[str, Any]) -> int:
            return len(identity_diff(p, provenance)) + (p.get("meta_sha256") != provenance.get("meta_sha256"))

        if distance(copy["provenance"]) >= distance(group):
            return []
        other = copy["provenance"]
        fields = ", ".join(sorted(k for k in {*group, *other} if group.get(k) != other.get(k)))
        _restore(run, copy)
        return [
            f"{run.path} zarr.json: its provenance was edited ({fields} differ from its copy): restored from its "
            f"copy in done/zarr.json ({fields}), which matches this model and dataset"
        ]

    def repair_record(self, node: Run | BrokenRun) -> dict[str, Any] | None:
        """The record a repair rebuilds a run from: the group's, unless it and its copy in done/zarr.json
        disagree and only the copy fits the stored arrays (data type, shape, chunks)."""
        record = node.record()
        if not isinstance(node, Run) or not node.provenance_ok or record is None:
            return record
        copy = node.backup_record()
        if copy is None or copy["provenance"] == record["provenance"]:
            return record
        fits = [r for r in (record, copy) if node.fits(r["provenance"])]
        return fits[0] if len(fits) == 1 else record

    def _trusted(self, node: Run | BrokenRun, overwrite: bool) -> Run | None:
        """The run with a provenance that passes its digest, restored from its copy if needed."""
        if isinstance(node, Run) and node.provenance_ok:
            return node
        record = node.record()
        if record is None:
            if overwrite:
                return None
            raise StoreDamageError(
                f"{self.path}/{node.path}/zarr.json: the run's provenance is damaged and so is its copy in "
                "done/zarr.json; pass --overwrite to extract this run again"
            )
        self._ensure_group(node.path)
        run = self._open(node.path)
        if not isinstance(run, Run):
            raise run.error()
        _restore(run, record)
        return run

    def _create(
        self,
        path: str,
        provenance: dict[str, Any],
        layout: RunLayout,
        meta: pd.DataFrame,
        texts: Sequence[str],
        captions: Mapping[str, tuple[np.ndarray, np.ndarray]],
        prompts: Mapping[str, Any],
        replace: bool,
    ) -> Run | None:
        """Build the run under .creating/ and rename it into place; None if another writer won."""
        if self.loc.remote:
            return self._publish(path, provenance, layout, meta, texts, captions, prompts, replace)
        scratch = self.path / CREATING / f"{HOST}@{os.getpid()}.{uuid.uuid4().hex[:12]}"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        _BUILDING.add(scratch.name)
        try:
            return self._build_and_rename(scratch, path, provenance, layout, meta, texts, captions, prompts, replace)
        finally:
            _BUILDING.discard(scratch.name)

    def _build_and_rename(
        self,
        scratch: Path,
        path: str,
        provenance: dict[str, Any],
        layout: RunLayout,
        meta: pd.DataFrame,
        texts: Sequence[str],
        captions: Mapping[str, tuple[np.ndarray, np.ndarray]],
        prompts: Mapping[str, Any],
        replace: bool,
    ) -> Run | None:
        try:
            g = zarr.open_group(str(scratch), mode="w", zarr_format=3)
            _build_run(g, {**provenance, "created": _now()}, layout, meta, texts, captions, prompts)
            parts = path.split("/")
            for i in range(1, len(parts)):
                self._ensure_group("/".join(parts[:i]), strict=True)
        except BaseException:
            _drain_writes()  # writes zarr still has in flight would recreate the folder after it is removed
            shutil.rmtree(scratch, ignore_errors=True)  # a leftover is removed on the next run
            raise
        target = self.path / path
        old = None
        if replace and target.exists():
            old = scratch.with_name(scratch.name + ".old")
            os.rename(target, old)
        try:
            os.rename(scratch, target)
        except OSError as exc:
            shutil.rmtree(scratch, ignore_errors=True)
            if old is None and exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        run = self._open(path)
        if isinstance(run, BrokenRun):
            raise run.error()
        return run

    def _wait_for_creator(self, path: str) -> None:
        """Object stores: while another writer is creating `path`, wait for its commit (then join it)."""
        while not self.loc.exists(f"{path}/zarr.json") and self._creating(path):
            time.sleep(CREATE_WAIT_S)

    def _publish(
        self,
        path: str,
        provenance: dict[str, Any],
        layout: RunLayout,
        meta: pd.DataFrame,
        texts: Sequence[str],
        captions: Mapping[str, tuple[np.ndarray, np.ndarray]],
        prompts: Mapping[str, Any],
        replace: bool,
    ) -> Run | None:
        """Object stores: build the run in memory, upload it, commit with a conditional put of its
        zarr.json (first writer wins); all under the run's `create` claim. None if another writer won."""
        commit = f"{path}/zarr.json"
        with self.loc.claims(f"{CLAIMS}/{path}", DEFAULT_CLAIM_TIMEOUT) as claims:
            while not claims.try_claim("create"):
                if self.loc.exists(commit) and not replace:
                    return None
                time.sleep(CREATE_WAIT_S)
            if self.loc.exists(commit) and not replace:
                return None  # committed by another writer meanwhile: join it
            self.loc.rmtree(path)  # a replaced run, or what a creator that died left uncommitted
            mem = zarr.storage.MemoryStore()
            _build_run(
                zarr.open_group(mem, mode="w", zarr_format=3),
                {**provenance, "created": _now()},
                layout,
                meta,
                texts,
                captions,
                prompts,
            )
            parts = path.split("/")
            for i in range(1, len(parts)):
                self._ensure_group("/".join(parts[:i]), strict=True)
            files = {f"{path}/{k}": v.to_bytes() for k, v in sorted(mem._store_dict.items())}
            group_json, backup = files.pop(commit), files.pop(f"{path}/done/zarr.json")
            self.loc.write_many(files)
            self.loc.write_bytes(f"{path}/done/zarr.json", backup)
            if not self.loc.create(commit, group_json):
                return None
        run = self._open(path)
        if isinstance(run, BrokenRun):
            raise run.error()
        return run

    def size_bytes(self) -> int:
        return self.loc.size("")


def _build_run(
    g: zarr.Group,
    provenance: dict[str, Any],
    layout: RunLayout,
    meta: pd.DataFrame,
    texts: Sequence[str],
    captions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    prompts: Mapping[str, Any],
) -> None:
    """Every array of a new run, then its attributes (the group is renamed into place after)."""
    optional = (
        *(("features",) if layout.feature_dim is not None else ()),
        *(("channel_emb",) if layout.channels else ()),
    )
    digested = _digested(provenance)
    for name in ("image_emb", *optional, "done", "failure", *((CHUNK_DIGEST,) if digested else ())):
        arr = _create_row_array(g, name, layout)
        if name == "done":
            arr[:] = False  # every flag gets a file: a deleted flag is then detected, not read as False
    _write_row_index(g, layout)
    _write_meta(g, meta, layout)
    _write_texts(g, texts, captions, layout)
    keys = sorted(captions)
    attrs = _group_attrs(provenance, prompts, keys, False, captions_digests(captions) if digested else None)
    attrs["texts_sha256"] = texts_digest(texts, prompts, keys)
    g["done"].attrs["backup"] = _backup(attrs)
    g.attrs.update(attrs)


def describe(node: Run | BrokenRun) -> dict[str, Any]:
    """A JSON-ready summary of a run for `probe info`; the status is derived, never stored."""
    problems = node.check()
    if isinstance(node, BrokenRun) or not node.provenance_ok:
        p = node.raw_provenance if isinstance(node, Run) else {}
        return {
            "group": node.path,
            "model": p.get("model_spec"),
            "dataset": p.get("dataset_spec"),
            "split": node.path.split("/")[-1],
            "rows": p.get("n_rows"),
            "chunks_done": "?",
            "texts": 0,
            "failed_rows": None,
            "status": "damaged",
            "problems": [str(d) for d in problems],
            "complete": False,
            "size_bytes": node.size_bytes(),
            "provenance": p,
        }
    p = node.provenance
    try:
        done = node._check_done(node.group["done"])[0]
    except _DAMAGE:  # the done array's zarr.json is damaged: reported in problems
        done = np.zeros(node.layout.n_chunks, dtype=bool)
    complete = node.texts_done and bool(done.all())
    if problems:
        status = "damaged"
    elif complete:
        status = "complete"
    else:
        status = f"incomplete: {int(done.sum())}/{done.size} chunks" + ("" if node.texts_done else ", texts pending")
    return {
        "group": node.path,
        "model": p.get("model_spec"),
        "dataset": p.get("dataset_spec"),
        "split": node.path.split("/")[-1],
        "rows": p.get("n_rows"),
        "chunks_done": f"{int(done.sum())}/{done.size}",
        "texts": int(node.group["texts"].shape[0]) if node.has_text and "texts" in node.group else 0,
        "failed_rows": None if problems else len(node.failures_unchecked()),
        "status": status,
        "problems": [str(d) for d in problems],
        "complete": complete and not problems,
        "templates": node.prompts().get("templates", []),
        "size_bytes": node.size_bytes(),
        "provenance": p,
    }


def _creating_name(p: Any) -> str:
    return f"{CREATING}/{p.name}" if isinstance(p, Path) else str(p)


def run_status(node: Run | BrokenRun, shards: int | None = None) -> dict[str, Any]:
    """Progress of one run for `probe status`: chunks done / total, per shard, live and stale claims.

    Cheap (the done flags and the claims, no checksums). `shards` defaults to the count the
    shards recorded when they started (`ChunkClaims.note_shards`).
    """
    from .config import shard_of

    out: dict[str, Any] = {"group": node.path, "model": None, "dataset": None, "status": "damaged"}
    if isinstance(node, BrokenRun) or not node.provenance_ok:
        return {**out, "chunks_done": None, "chunks_total": None, "shards": None, "per_shard": [], "claims": []}
    p = node.provenance
    try:
        done = node._check_done(node.group["done"])[0]
    except _DAMAGE:
        done = np.zeros(node.layout.n_chunks, dtype=bool)
    claims = node.claims()
    owners = claims.owners()
    n = shards or claims.shards_noted()
    held = [
        {"key": str(k), "host": c.host, "pid": c.pid, "age_s": round(c.age_s, 1), "live": c.live}
        for k, c in sorted(owners.items(), key=lambda kv: str(kv[0]))
    ]
    per_shard = []
    for i in range(n or 0):
        mine = [c for c in range(done.size) if shard_of(c, n or 1) == i]
        per_shard.append(
            {
                "shard": i,
                "done": int(done[mine].sum()) if mine else 0,
                "total": len(mine),
                "live_claims": sum(1 for k, c in owners.items() if isinstance(k, int) and k in mine and c.live),
                "stale_claims": sum(1 for k, c in owners.items() if isinstance(k, int) and k in mine and not c.live),
            }
        )
    complete = bool(done.all()) and node.texts_done
    cleared = node.interrupted_repairs(done)
    return {
        **out,
        "model": p.get("model_spec"),
        "dataset": p.get("dataset_spec"),
        "status": "damaged" if cleared else "complete" if complete else "incomplete",
        "interrupted_repair": cleared,
        "chunks_done": int(done.sum()),
        "chunks_total": int(done.size),
        "texts_done": node.texts_done,
        "shards": n,
        "per_shard": per_shard,
        "claims": held,
    }
