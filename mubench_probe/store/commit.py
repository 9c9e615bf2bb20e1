"""Atomic creation of a run: built under `.creating/` and renamed into place, or (object stores)
built in memory, uploaded and committed by a conditional put of its zarr.json."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zarr
import zarr.storage

from ..claims import DEFAULT_CLAIM_TIMEOUT, HOST
from ..locations import Location
from .arrays import (
    _backup,
    _create_row_array,
    _digested,
    _group_attrs,
    _now,
    _write_meta,
    _write_row_index,
    _write_texts,
    drain_writes,
    texts_digest,
)
from .integrity import (
    CHUNK_DIGEST,
    captions_digests,
)
from .layout import CLAIMS, CREATING, RunSpec
from .run import BrokenRun, Run

_BUILDING: set[str] = set()  # .creating folders this process is building right now
CREATE_WAIT_S = 0.25  # how often a writer looks again at a run another writer is creating (object stores)


def _creating_name(p: Any) -> str:
    return f"{CREATING}/{p.name}" if isinstance(p, Path) else str(p)


class RunCommits:
    """Creating a run atomically; mixed into `EmbeddingStore`, whose location and group helpers it uses."""

    loc: Location
    path: Any  # a Path for a folder, the URL string for an object store

    if TYPE_CHECKING:  # what `EmbeddingStore` provides (declared for the type checker only)

        def _ensure_group(self, rel: str, strict: bool = False) -> None: ...
        def _open(self, path: str) -> Run | BrokenRun: ...
        def _creating(self, path: str) -> bool: ...

    def _create(self, spec: RunSpec, replace: bool) -> Run | None:
        """Build the run under .creating/ and rename it into place; None if another writer won."""
        if self.loc.remote:
            return self._publish(spec, replace)
        scratch = self.path / CREATING / f"{HOST}@{os.getpid()}.{uuid.uuid4().hex[:12]}"
        scratch.parent.mkdir(parents=True, exist_ok=True)
        _BUILDING.add(scratch.name)
        try:
            return self._build_and_rename(scratch, spec, replace)
        finally:
            _BUILDING.discard(scratch.name)

    def _build_and_rename(self, scratch: Path, spec: RunSpec, replace: bool) -> Run | None:
        try:
            g = zarr.open_group(str(scratch), mode="w", zarr_format=3)
            build_run(g, _stamped(spec))
            parts = spec.path.split("/")
            for i in range(1, len(parts)):
                self._ensure_group("/".join(parts[:i]), strict=True)
        except BaseException:
            drain_writes()  # writes zarr still has in flight would recreate the folder after it is removed
            shutil.rmtree(scratch, ignore_errors=True)  # a leftover is removed on the next run
            raise
        target = self.path / spec.path
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
        run = self._open(spec.path)
        if isinstance(run, BrokenRun):
            raise run.error()
        return run

    def _wait_for_creator(self, path: str) -> None:
        """Object stores: while another writer is creating `path`, wait for its commit (then join it)."""
        while not self.loc.exists(f"{path}/zarr.json") and self._creating(path):
            time.sleep(CREATE_WAIT_S)

    def _publish(self, spec: RunSpec, replace: bool) -> Run | None:
        """Object stores: build the run in memory, upload it, commit with a conditional put of its
        zarr.json (first writer wins); all under the run's `create` claim. None if another writer won."""
        path, commit = spec.path, f"{spec.path}/zarr.json"
        with self.loc.claims(f"{CLAIMS}/{path}", DEFAULT_CLAIM_TIMEOUT) as claims:
            while not claims.try_claim("create"):
                if self.loc.exists(commit) and not replace:
                    return None
                time.sleep(CREATE_WAIT_S)
            if self.loc.exists(commit) and not replace:
                return None  # committed by another writer meanwhile: join it
            self.loc.rmtree(path)  # a replaced run, or what a creator that died left uncommitted
            built: dict[str, Any] = {}  # the in-memory store's objects: key -> zarr Buffer
            build_run(zarr.open_group(zarr.storage.MemoryStore(built), mode="w", zarr_format=3), _stamped(spec))
            parts = path.split("/")
            for i in range(1, len(parts)):
                self._ensure_group("/".join(parts[:i]), strict=True)
            files = {f"{path}/{k}": v.to_bytes() for k, v in sorted(built.items())}
            group_json, backup = files.pop(commit), files.pop(f"{path}/done/zarr.json")
            self.loc.write_many(files)
            self.loc.write_bytes(f"{path}/done/zarr.json", backup)
            if not self.loc.create(commit, group_json):
                return None
        run = self._open(path)
        if isinstance(run, BrokenRun):
            raise run.error()
        return run


def _stamped(spec: RunSpec) -> RunSpec:
    """The spec with its creation time in the provenance (not an identity key: joins ignore it)."""
    return dataclasses.replace(spec, provenance={**spec.provenance, "created": _now()})


def build_run(g: zarr.Group, spec: RunSpec) -> None:
    """Every array of a new run, then its attributes (the group is renamed into place after).

    Public as the seam between building and committing: tests wrap it to hold concurrent creators
    between the two (both builders finish before either commits)."""
    layout, captions = spec.layout, spec.captions
    optional = (
        *(("features",) if layout.feature_dim is not None else ()),
        *(("channel_emb",) if layout.channels else ()),
    )
    digested = _digested(spec.provenance)
    for name in ("image_emb", *optional, "done", "failure", *((CHUNK_DIGEST,) if digested else ())):
        arr = _create_row_array(g, name, layout)
        if name == "done":
            arr[:] = False  # every flag gets a file: a deleted flag is then detected, not read as False
    _write_row_index(g, layout)
    _write_meta(g, spec.meta, layout)
    _write_texts(g, spec.texts, captions, layout)
    keys = sorted(captions)
    attrs = _group_attrs(spec.provenance, spec.prompts, keys, False, captions_digests(captions) if digested else None)
    attrs["texts_sha256"] = texts_digest(spec.texts, spec.prompts, keys)
    g["done"].attrs["backup"] = _backup(attrs)
    g.attrs.update(attrs)
