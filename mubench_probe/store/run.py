"""A run group: its identity, checked reads and chunk writes (`Run`), a run whose zarr.json is
broken (`BrokenRun`), and the memo of a run's arrays shared by evaluation (`RunArrays`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from ..errors import CorruptChunkError, StoreDamageError, StoreError
from ..locations import LocalLocation, Location
from .arrays import (
    _CAPTIONS_FORGED,
    _DAMAGE,
    _META_FORGED,
    _STR,
    _UNBOUND,
    _WRITE,
    _array_at,
    _attr,
    _backup,
    _digested,
    _get,
    _layout_metadata,
    _record_ok,
    _row_key,
    _str_array,
    _to_str,
)
from .checks import RunChecks
from .integrity import (
    CHUNK_DIGEST,
    REPAIR_MARK,
    captions_digests,
    chunk_digest,
    columns_digest,
    decode_record,
    encode_record,
    legacy_note,
    metadata_difference,
)
from .layout import Damage, RunLayout, _why, repair_hint
from .vectors import l2_normalize, normalize_rows

READ_BLOCK_BYTES = 64 << 20  # embeddings are read and normalised this much stored data at a time


class Run(RunChecks):
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
        return dict(_attr(self.group, "provenance"))  # present: provenance_ok checked its digest

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
            arr = _array_at(self.group, "image_emb")
            want = _layout_metadata("image_emb", lay)
        except (*_DAMAGE, StoreError):
            return True
        stored: dict[str, Any] = arr.metadata.to_dict()
        return metadata_difference(stored, want) is None and tuple(stored["shape"]) == tuple(want["shape"])

    def record(self) -> dict[str, Any] | None:
        """Provenance, prompt plan and texts digest if they pass the digest: from the group, else its copy."""
        attrs = self.group.attrs.asdict()
        if _record_ok(attrs):
            return _backup(attrs)
        return self.backup_record()

    def backup_record(self) -> dict[str, Any] | None:
        try:
            copy = _attr(self.group["done"], "backup")
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
            return _array_at(self.group, name)
        except _DAMAGE as exc:
            what = "is missing" if isinstance(exc, KeyError) else f"has an unreadable zarr.json ({_why(exc)})"
            raise StoreDamageError(f"{self.file(name)} {what}; {repair_hint(self.store_path)}") from None

    def _read(self, name: str, sel: Any = slice(None)) -> np.ndarray:
        """Read an array; a damaged chunk is named in a CorruptChunkError, never a codec traceback."""
        arr = self._array(name)
        try:
            return _get(arr, sel)
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
        stored = [(str(name), self._read(f"meta/{name}")) for name in _attr(g, "columns", [])]
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
        return sorted(_attr(self.group, "caption_keys") or [])

    def captions(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(options (N, K) text indices with -1 padding, answer (N,) with -1 for null entries)."""
        self.require_intact()
        options, answer = (
            np.asarray(self._read(f"captions/{key}/options")),
            np.asarray(self._read(f"captions/{key}/answer")),
        )
        want = (_attr(self.group, "captions_sha256") or {}).get(key) if self.digested else None
        if want is not None and captions_digests({key: (options, answer)})[key] != want:
            raise StoreDamageError(f"{self.file('captions', key)} {_CAPTIONS_FORGED}; {repair_hint(self.store_path)}")
        return options, answer

    def prompts(self) -> dict[str, Any]:
        return dict(_attr(self.group, "prompts", {}))

    @property
    def perturbation(self) -> str | None:
        """The canonical key of a perturbed run (`blur:1`, see perturb.py); None for a clean run."""
        p = self.provenance.get("perturbation")
        return str(p["key"]) if isinstance(p, Mapping) and "key" in p else None


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
            copy = _attr(zarr.open_array(self.store, path=f"{self.path}/done", mode="r", zarr_format=3), "backup")
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
    and keeping every read of the store in this package keeps the I/O in one place.
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
    def valid(self) -> np.ndarray:
        return self.base.valid

    @property
    def meta(self) -> pd.DataFrame:
        return self.base.meta

    @property
    def texts(self) -> list[str] | None:
        return self.base.texts

    @property
    def text_emb(self) -> np.ndarray | None:
        return self.base.text_emb
