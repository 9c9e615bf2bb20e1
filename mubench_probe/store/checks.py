"""The integrity checks and repairs of a run group (`Run` inherits them): what `probe verify` reports."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import zarr

from ..claims import DEFAULT_CLAIM_TIMEOUT, ChunkClaims
from ..locations import Location
from .arrays import (
    _CAPTIONS_FORGED,
    _DAMAGE,
    _META_FORGED,
    _UNBOUND,
    _array_at,
    _attr,
    _backup,
    _chunk_grid,
    _create_row_array,
    _fix_for,
    _get,
    _layout_metadata,
    _listed,
    _mtime,
    _to_str,
    _write_meta,
    _write_row_index,
    _write_texts,
    delete_key,
    delete_node,
    stored_keys,
    texts_digest,
)
from .integrity import (
    CHUNK_DIGEST,
    REPAIR_MARK,
    captions_digests,
    chunk_digest,
    columns_digest,
    decode_record,
    group_problem,
    is_partial,
    metadata_difference,
    old_enough,
    partial_target,
    repair_record,
)
from .layout import _PER_CHUNK, CLAIMS, ROW_ARRAYS, Damage, RunLayout, _why


class RunChecks:
    """Checks and repairs of a run; mixed into `Run`, whose state and reads they use."""

    group: zarr.Group
    loc: Location
    _intact: bool  # the cheap check passed (reads skip it from then on)
    _records: dict[int, dict[str, str]] | None  # digests of done chunks, read once

    if TYPE_CHECKING:  # what `Run` provides (declared here for the type checker only: Run's own definitions run)

        @property
        def path(self) -> str: ...
        @property
        def provenance_ok(self) -> bool: ...
        @property
        def provenance(self) -> dict[str, Any]: ...
        @property
        def digested(self) -> bool: ...
        @property
        def layout(self) -> RunLayout: ...
        def backup_record(self) -> dict[str, Any] | None: ...
        def caption_keys(self) -> list[str]: ...
        def prompts(self) -> dict[str, Any]: ...
        def clear_done(self, ci: int) -> None: ...
        def _writable(self, name: str) -> zarr.Array: ...
        def _update_attrs(self, **kw: Any) -> None: ...

    def _damaged_chunks(
        self,
        arr: zarr.Array,
        name: str,
        only: set[tuple[int, ...]] | None = None,
        records: Mapping[int, Mapping[str, str]] | None = None,
    ) -> list[Damage]:
        """Chunks that fail their checksum, or (row arrays, with `records`) the digest of their position."""
        out = []
        present = stored_keys(arr)
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

    def _clear_for_repair(self, ci: int, why: str) -> None:
        """Clear a damaged chunk's flag, marking it first in chunk_digest: until it is extracted again
        the run is damaged, not merely incomplete, even if this process is killed right after."""
        if self.digested:
            arr = self._writable(CHUNK_DIGEST)
            current = None
            with contextlib.suppress(*_DAMAGE):  # an unreadable entry is simply replaced
                current = decode_record(_to_str(_get(arr, slice(ci, ci + 1)))[0])
            if not (current and REPAIR_MARK in current):  # a repair resumed keeps the first reason
                arr[ci] = repair_record(why)
        self.clear_done(ci)

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
                arr = _array_at(self.group, name)
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
        present, records, out = stored_keys(arr), {}, []
        for ci in range(self.layout.n_chunks):
            key = arr.metadata.encode_chunk_key((ci,))
            if key not in present or (done[ci] and not deep):
                continue  # a missing entry of a done chunk is reported from the listing
            try:
                entry = decode_record(_to_str(_get(arr, slice(ci, ci + 1)))[0])
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
            arrays = {CHUNK_DIGEST: _array_at(self.group, CHUNK_DIGEST)} if self.digested else {}
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
        recorded = _attr(self.group, "captions_sha256") or {}
        for key in self.caption_keys():
            parts = (f"captions/{key}/options", f"captions/{key}/answer")
            with contextlib.suppress(*_DAMAGE):
                if all(p in arrays for p in parts):
                    have = captions_digests({key: (_get(arrays[parts[0]]), _get(arrays[parts[1]]))})[key]
                    if have != recorded.get(key):
                        out.append(Damage(f"{self.path}/captions/{key}", _CAPTIONS_FORGED, "texts"))
        return out

    def _leftovers(self) -> list[Damage]:
        """Temporary files of writes that were killed midway (never those of a write in flight).

        A row chunk is written only under its claim: its temporary file is a leftover once no live
        writer holds that chunk. Other files (metadata, flags cleared by a repair) are written
        unclaimed but in milliseconds: leftovers once no writer is live and they are a few seconds old.
        """
        keys = [k for k in _listed(self.group, self.path + "/") if is_partial(k)]
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
        out, present = [], stored_keys(arr)
        done = np.zeros(arr.shape[0], dtype=bool)
        for (ci,), sel in _chunk_grid(arr):
            key = arr.metadata.encode_chunk_key((ci,))
            if key not in present:
                out.append(Damage(f"{self.path}/done", f"chunk {ci} (file done/{key}) is missing", "chunk", "done", ci))
                continue
            try:
                done[ci] = bool(_get(arr, sel)[0])
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
            present = stored_keys(arr)
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
            values = [str(t) for t in _to_str(_get(texts))]
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
            delete_node(self.group, "meta")
            _write_meta(self.group, meta, layout)
        if "row_index" in fixes:
            delete_node(self.group, "row_index")
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
        delete_key(self.group, f"{name}/zarr.json")
        _create_row_array(self.group, name, layout)
