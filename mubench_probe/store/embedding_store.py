"""The store: a directory (or object-store prefix) of run groups, listed, checked and opened here."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
import zarr.errors

from ..claims import DEFAULT_CLAIM_TIMEOUT, HOST, pid_alive
from ..errors import ProvenanceMismatchError, StoreDamageError, StoreError
from ..locations import Location, location
from .arrays import _DAMAGE, _group_attrs, _mtime, _now, delete_key
from .commit import _BUILDING, RunCommits, _creating_name
from .integrity import (
    DIGESTS_VERSION,
    creator_pid,
    group_problem,
    is_partial,
    meta_digest,
    old_enough,
    started_after,
)
from .layout import CLAIMS, CREATING, FORMAT_VERSION, PERTURBED, Damage, RunLayout, RunSpec, _why, identity_diff
from .run import BrokenRun, Run


def _dirs(loc: Location, rel: str = "") -> list[str]:
    """Child folders that can be Zarr nodes (dot-folders hold claims and runs being created), as paths."""
    return [f"{rel}/{name}" if rel else name for name in loc.dirs(rel) if not name.startswith(".")]


def _restore(run: Run, record: Mapping[str, Any]) -> None:
    """Rewrite a run's group attributes from a record (texts re-encoded: nothing says they were done)."""
    captions = record.get("captions_sha256")
    attrs = _group_attrs(record["provenance"], record["prompts"] or {}, record["caption_keys"] or [], False, captions)
    attrs["texts_sha256"] = record["texts_sha256"]
    run.group.attrs.put(attrs)
    run.reload()


def _severity_order(run: Run) -> tuple[str, float]:
    p = run.provenance["perturbation"]
    return str(p.get("name")), float(p.get("severity"))  # float("inf") for noise's identity


class EmbeddingStore(RunCommits):
    """A directory of run groups; with the rest of this package, the only code that touches Zarr."""

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

    def runs(self, perturbed: bool = False) -> list[Run]:
        """Every clean run (with `perturbed`, the perturbed runs too), refusing the store in one line
        if a run's zarr.json or provenance is damaged. Perturbed runs are left out by default so that
        search, compare and evaluate see what they saw before perturbations existed; `twins` finds them."""
        out = []
        for node in self.scan():
            if isinstance(node, BrokenRun):
                raise node.error()
            node.provenance  # noqa: B018 - raises when the digest does not match
            if perturbed or node.perturbation is None:
                out.append(node)
        return out

    def twins(self, run: Run, among: Sequence[Run] | None = None) -> list[Run]:
        """The perturbed runs of `run`'s model, dataset and split, by perturbation name then severity.

        `among`: the runs of one `runs(perturbed=True)` scan, when the caller asks for the twins of
        many runs (each scan reads and checks every run's provenance)."""
        _, *rest = run.path.split("/")
        top = run.path.split("/")[0].split(PERTURBED)[0]
        found = [
            r
            for r in (self.runs(perturbed=True) if among is None else among)
            if r.perturbation is not None
            and r.path.split("/")[0].split(PERTURBED)[0] == top
            and r.path.split("/")[1:] == rest
            and r.model_spec == run.model_spec
        ]
        return sorted(found, key=_severity_order)

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
        delete_key(self.root, f"{rel}/zarr.json")
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
        spec = RunSpec(path, provenance, layout, meta, texts, captions, prompts)
        for _ in range(3):
            if self.loc.remote:
                self._wait_for_creator(path)
            if not self.loc.exists(path):
                created = self._create(spec, replace=False)
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
            created = self._create(spec, replace=True)
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

    def size_bytes(self) -> int:
        return self.loc.size("")
