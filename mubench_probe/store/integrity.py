"""Integrity beyond checksums: what binds a run's bytes to their place and to their record.

Zstd frame checksums and CRC32C codecs prove that a chunk's bytes are the bytes that were
written, not that they are at the right place or say the right thing: two chunk files swapped,
or labels rewritten through Zarr, pass every checksum. So a run also records, at extraction:

  chunk_digest (chunks,)  per row chunk, the sha256 of every row array's chunk bound to its
                          position (run path, array name, chunk key, dtype, shape, values),
                          written before the chunk's done flag; an entry `{"repair": ...}` marks
                          a chunk a repair cleared, so an interrupted repair is still reported
  provenance.meta_sha256  the per-row metadata columns as stored (set when the run is prepared)
  captions_sha256         per caption key, its tables (group attribute, beside texts_sha256)

Runs written before these digests (`provenance.digests` absent) still open and verify, with a
note (`legacy_note`). This module holds the digest definitions and the small file checks
(leftover `.partial` files, group metadata, reused pids), without Zarr I/O; `checks.py` and
`run.py` apply them.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd
import psutil

DIGESTS_VERSION = 1  # provenance["digests"]: this run records chunk, metadata and caption digests
CHUNK_DIGEST = "chunk_digest"  # the per-chunk digest array
REPAIR_MARK = "repair"  # key of a chunk_digest entry written by a repair that cleared the chunk
PARTIAL_GRACE_S = 5.0  # a temporary file younger than this may be a write in flight (unclaimed writes)
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # Zarr's LocalStore: `<file>.<uuid4 hex>.partial`
_CREATE_TMP = re.compile(r"^\.(.+)\.(\d+)\.[0-9a-f]{12}$")  # LocalLocation.create: `.<name>.<pid>.<hex>`
_GROUP_KEYS = {"zarr_format", "node_type", "attributes"}


def _payload(values: Any) -> tuple[str, memoryview]:
    """(kind, bytes) of an array as stored: little-endian numbers (not copied), or the strings as JSON."""
    a = np.asarray(values)
    if a.dtype.kind in "OTUS":
        return "str", memoryview(json.dumps([str(v) for v in a.reshape(-1).tolist()], ensure_ascii=False).encode())
    a = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
    return a.dtype.str, a.reshape(-1).view(np.uint8).data  # the array's own buffer, as a memoryview


def chunk_digest(run_path: str, name: str, key: str, values: Any) -> str:
    """sha256 of one chunk's values bound to where they belong (a swapped or moved chunk differs)."""
    kind, payload = _payload(values)
    head = json.dumps([run_path, name, key, kind, list(np.shape(values))], separators=(",", ":"))
    h = hashlib.sha256(head.encode() + b"\0")
    h.update(payload)
    return h.hexdigest()


def encode_record(digests: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(digests.items())), separators=(",", ":"))


def repair_record(why: str) -> str:
    return encode_record({REPAIR_MARK: why})


def decode_record(text: Any) -> dict[str, str] | None:
    """A chunk_digest entry: {array: sha256}, {"repair": why}, or None (empty or not a record)."""
    try:
        record = json.loads(str(text)) if text else None
    except ValueError:
        return None
    return record if isinstance(record, dict) and all(isinstance(v, str) for v in record.values()) else None


def meta_columns(meta: pd.DataFrame) -> Iterator[tuple[str, np.ndarray]]:
    """Each metadata column as it is stored: numbers as they are, anything else as strings ("" for missing)."""
    for col in meta.columns:
        values = meta[col].to_numpy()
        if values.dtype.kind in "biuf":
            yield str(col), values
        else:
            strings = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]
            yield str(col), np.array(strings, dtype=np.dtypes.StringDType())


def columns_digest(columns: Iterable[tuple[str, Any]]) -> str:
    """sha256 of named columns (metadata or caption tables), in order, values and dtypes included."""
    h = hashlib.sha256()
    for name, values in columns:
        kind, payload = _payload(values)
        h.update(json.dumps([name, kind, payload.nbytes]).encode() + b"\0")
        h.update(payload)
    return h.hexdigest()


def meta_digest(meta: pd.DataFrame) -> str:
    return columns_digest(meta_columns(meta))


def captions_digests(captions: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, str]:
    """Per caption key, the digest of its tables as stored (int32 option indices and answers)."""
    return {
        key: columns_digest((part, np.asarray(a, dtype=np.int32)) for part, a in (("options", o), ("answer", ans)))
        for key, (o, ans) in sorted(captions.items())
    }


def legacy_note(path: str) -> str:
    return (
        f"{path} was written before per-chunk and metadata digests: its checksums are verified, but a "
        "chunk moved to another position or metadata rewritten through Zarr cannot be told apart; "
        "extract it into a new store to record them"
    )


# ---- leftovers and group metadata ---------------------------------------------------------------


def is_partial(name: str) -> bool:
    """A temporary file of an atomic write (Zarr's `.partial`, or a `.name.pid.hex` of an exclusive create)."""
    return bool(_PARTIAL.search(name) or _CREATE_TMP.match(name.rsplit("/", 1)[-1]))


def partial_target(name: str) -> str:
    """The file a Zarr `.partial` was to become (`image_emb/c/2/0.<hex>.partial` -> `image_emb/c/2/0`)."""
    return _PARTIAL.sub("", name)


def creator_pid(name: str) -> int | None:
    m = _CREATE_TMP.match(name.rsplit("/", 1)[-1])
    return int(m.group(2)) if m else None


def old_enough(mtime: float | None, grace: float = PARTIAL_GRACE_S) -> bool:
    """Whether a temporary file is past the time any write in flight takes (unknown mtime: yes)."""
    return mtime is None or time.time() - mtime > grace


def group_problem(raw: bytes | None, attributes: bool) -> str | None:
    """Why a group's zarr.json is not what probe writes (None: it is). `attributes`: may it hold any."""
    if raw is None:
        return "is missing"
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        return f"is unreadable (JSONDecodeError: {exc})"
    ok = (
        isinstance(doc, dict)
        and set(doc) <= _GROUP_KEYS | {"consolidated_metadata"}
        and doc.get("zarr_format") == 3
        and doc.get("node_type") == "group"
        and isinstance(doc.get("attributes", {}), dict)
        and (attributes or not doc.get("attributes"))
        and doc.get("consolidated_metadata") is None
    )
    return None if ok else "is not the group metadata probe writes (edited or damaged)"


def started_after(pid: int, t: float, margin: float = 60.0) -> bool:
    """Whether process `pid` started after time `t`: then it did not create what was there before it,
    and its pid was reused (False where it cannot be told). The margin covers a process start time
    derived from a boot time and a wall clock that may have been stepped since."""
    try:
        return psutil.Process(pid).create_time() > t + margin
    except (psutil.Error, OSError):
        return False


def metadata_difference(stored: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """The first field of an array's metadata that differs from what the layout gives, as 'field stored,
    provenance says expected' (attributes are not compared)."""
    for key in ("data_type", "fill_value", "codecs", "chunk_key_encoding", "storage_transformers", "dimension_names"):
        a, b = _plain(stored.get(key)), _plain(expected.get(key))
        if a != b:
            return f"{key} {_short(a)}, provenance says {_short(b)}"
    return None


def _plain(x: Any) -> Any:
    """Tuples as lists and NaN as a string, so two metadata documents compare by value."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, float) and np.isnan(x):
        return "NaN"
    return x


def _short(x: Any) -> str:
    text = x if isinstance(x, str) else json.dumps(x, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
