"""Results on disk: one long-format table (Parquet + CSV), per-sample predictions, a JSON run record.

The folder has one commit point, `manifest.json`. A save writes new, uniquely named data files
(`data/results-<id>.parquet`, `data/predictions-<id>.parquet`, `data/results-<id>.csv`), syncs
them to disk, then replaces `manifest.json` by an atomic rename. The manifest names the files of
that state with their sha256 and each unit's row counts; resuming trusts nothing else. A unit is
done only when its result rows *and* its prediction rows are in the committed state, in files that
match their checksums; so a kill at any point leaves the previous complete state, and damaged or
missing files are named in one note each and only the units they held are computed again.

`results.parquet`, `predictions.parquet` and `results.csv` (what users read) are byte copies of
the committed files, written after the commit. A copy that is missing, stale or damaged is rewritten
from the committed state by the next invocation; a damaged data file whose copy still matches the
checksum is read from, and restored from, that copy. A folder without a manifest (written by probe
before this format) is read from results.parquet and predictions.parquet (a unit with accuracy rows
but no predictions is not done) and committed in this format by the next invocation.

Writers hold the folder's lock (`.lock`, filelock) from reading the state to the commit and merge
the units another writer committed meanwhile (by unit: each unit's rows come from one writer), so
concurrent evaluations lose nothing and duplicate nothing. Readers take no lock: superseded data
files are removed under the lock, but those of the previous state are kept, and a reader whose
files vanish reads the newer manifest again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from filelock import FileLock

from .errors import ProbeError

COLUMNS = (
    "model",
    "dataset",
    "task",
    "head",
    "metric",
    "stratum",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "seed",
    "provenance",
    "unit",
)
PRED_COLUMNS = ("model", "dataset", "task", "head", "row", "y_true", "y_pred", "unit")

FORMAT = 1  # manifest.json's "format"; a newer one is refused rather than overwritten
MANIFEST = "manifest.json"
DATA = "data"
KINDS = ("results", "predictions", "csv")
COPIES = {"results": "results.parquet", "predictions": "predictions.parquet", "csv": "results.csv"}
_DATA_NAME = re.compile(r"^(results|predictions)-[0-9a-f]+\.(parquet|csv)$")
_RETRIES = 5  # a lock-free reader re-reads the manifest this often when a writer replaced its files


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _why(exc: BaseException) -> str:
    """A one-line reason from a parser's error (pyarrow's can span lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    frame.reset_index(drop=True).to_parquet(buf, index=False)
    return buf.getvalue()


def _parse(data: bytes, columns: tuple[str, ...]) -> tuple[pd.DataFrame | None, str]:
    """The frame in Parquet bytes, or None and why not (garbage is a damaged file, not a traceback)."""
    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:  # what pyarrow raises for bytes that are not Parquet
        return None, f"is unreadable ({_why(exc)})"
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        return None, f"is not a results file of probe (no column {', '.join(missing)})"
    return frame, ""


def _write_durable(path: Path, data: bytes) -> None:
    """Write a new file and sync it: the manifest may only name files that are on disk."""
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # some filesystems cannot sync a directory; the rename stays atomic
            os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes, durable: bool = False) -> None:
    """Put `data` at `path` by an atomic rename: readers see the old file or the new one, never part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        _fsync_dir(path.parent)


def _empty(columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame(columns=columns)


def _concat(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    if not len(b):
        return a.reset_index(drop=True)
    if not len(a):
        return b.reset_index(drop=True)
    return pd.concat([a, b], ignore_index=True)


def _units(frame: pd.DataFrame) -> set[str]:
    return set(frame["unit"]) if len(frame) else set()


def _valid_manifest(doc: Any) -> bool:
    if not isinstance(doc, dict) or not isinstance(doc.get("id"), str) or not isinstance(doc.get("files"), dict):
        return False
    for kind in KINDS:
        entry = doc["files"].get(kind)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            return False
        name = entry.get("name")
        if not isinstance(name, str) or not name.startswith(f"{DATA}/") or not _DATA_NAME.match(name[len(DATA) + 1 :]):
            return False
    units, incomplete = doc.get("units"), doc.get("incomplete", {})
    return (
        isinstance(units, dict)
        and all(isinstance(v, list) and len(v) == 2 and all(isinstance(n, int) for n in v) for v in units.values())
        and isinstance(incomplete, dict)
        and isinstance(doc.get("previous", {}), dict)
    )


@dataclass
class _State:
    """What a reader found: every readable row, which units are done, what was wrong."""

    table: pd.DataFrame
    preds: pd.DataFrame
    token: Any  # the manifest id, or the copies' stat when there is no manifest: "has the folder changed?"
    done: set[str] = field(default_factory=set)
    incomplete: dict[str, str] = field(default_factory=dict)  # unit -> why it is not done
    notes: list[str] = field(default_factory=list)


class ResultsDir:
    """The results folder of `probe evaluate --out`: see the module docstring for its layout."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.notes: list[str] = []  # what the last load found wrong, one line each
        self.done: set[str] = set()  # units whose results and predictions are both committed
        self._token: Any = None  # the state this process last read or committed
        self._incomplete: dict[str, str] = {}

    @property
    def table_path(self) -> Path:
        return self.path / COPIES["results"]

    @property
    def predictions_path(self) -> Path:
        return self.path / COPIES["predictions"]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(self.path / ".lock"):
            yield

    # ---- reading -------------------------------------------------------------------------------

    def load(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Every readable row of the committed state; `done` says which units are complete and
        `notes` what was damaged or missing (never an exception for a damaged file)."""
        state = self._read()
        self.notes, self.done, self._token, self._incomplete = state.notes, state.done, state.token, state.incomplete
        return state.table, state.preds

    def _manifest(self) -> tuple[dict | None, str]:
        """The committed manifest, or None and why (empty when there is none: a folder of the previous format)."""
        path = self.path / MANIFEST
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None, ""
        except (OSError, ValueError) as exc:
            return None, f"{path} is unreadable ({_why(exc)})"
        if isinstance(doc, dict) and isinstance(doc.get("format"), int) and doc["format"] > FORMAT:
            raise ProbeError(
                f"{self.path} was written by a newer probe (results format {doc['format']}; this probe writes "
                f"format {FORMAT}): use that version, or another --out"
            )
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or not _valid_manifest(doc):
            return None, f"{path} is unreadable (not a manifest of probe)"
        return doc, ""

    def _stamp(self) -> tuple:
        stamps: list[tuple[int, int, int] | None] = []
        for name in (MANIFEST, *COPIES.values()):
            try:
                st = (self.path / name).stat()
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    def _disk_token(self) -> Any:
        manifest, _ = self._manifest()
        return manifest["id"] if manifest else self._stamp()

    def _read(self) -> _State:
        attempt = 0
        while True:
            manifest, problem = self._manifest()
            if manifest is None:
                return self._read_previous_format(problem)
            state = self._read_committed(manifest, last=attempt >= _RETRIES)
            if state is not None:
                return state
            attempt += 1

    def _committed_bytes(self, manifest: dict, kind: str) -> tuple[bytes | None, str, bool]:
        """The bytes of a committed file (or of its copy, when that still matches the checksum),
        why the data file itself is not usable (empty if it is), and whether it vanished."""
        entry = manifest["files"][kind]
        rel = entry["name"]
        try:
            data = (self.path / rel).read_bytes()
            problem = "" if _sha256(data) == entry["sha256"] else "does not match its checksum in manifest.json"
        except FileNotFoundError:
            data, problem = None, "is missing"
        except OSError as exc:
            data, problem = None, f"is unreadable ({exc.strerror})"
        if not problem:
            return data, "", False
        try:
            copy = (self.path / COPIES[kind]).read_bytes()
        except OSError:
            copy = None
        if copy is not None and _sha256(copy) == entry["sha256"]:
            return copy, problem, False
        return None, problem, problem == "is missing"

    def _read_committed(self, manifest: dict, last: bool) -> _State | None:
        """The state the manifest names; None when a named file vanished because a writer
        committed a newer state meanwhile (the caller reads again)."""
        frames: dict[str, pd.DataFrame | None] = {}
        notes: list[str] = []
        expected: dict[str, list[int]] = manifest["units"]
        incomplete: dict[str, str] = {str(k): str(v) for k, v in manifest.get("incomplete", {}).items()}
        for kind, columns in (("results", COLUMNS), ("predictions", PRED_COLUMNS)):
            data, problem, vanished = self._committed_bytes(manifest, kind)
            if vanished and not last and self._disk_token() != manifest["id"]:
                return None
            rel = manifest["files"][kind]["name"]
            frame = None
            if data is not None:
                frame, why = _parse(data, columns)
                if frame is None:
                    problem = why
                elif problem:
                    notes.append(f"{self.path / rel} {problem}: read from its copy {COPIES[kind]} (same checksum)")
            frames[kind] = frame
            if frame is None:
                held = sorted(u for u, counts in expected.items() if counts[0 if kind == "results" else 1] > 0)
                notes.append(
                    f"{self.path / rel} {problem}: {len(held)} unit(s) it held are not counted as done "
                    "(computed again when selected)"
                )
        table = frames["results"] if frames["results"] is not None else _empty(COLUMNS)
        preds = frames["predictions"] if frames["predictions"] is not None else _empty(PRED_COLUMNS)
        known = set(expected) | set(incomplete)
        table = table[table["unit"].isin(known)] if len(table) else table
        preds = preds[preds["unit"].isin(known)] if len(preds) else preds
        n_t = table["unit"].value_counts().to_dict() if len(table) else {}
        n_p = preds["unit"].value_counts().to_dict() if len(preds) else {}
        done = {u for u, (n, m) in expected.items() if n_t.get(u, 0) == n and n_p.get(u, 0) == m}
        for u in set(expected) - done:
            incomplete.setdefault(u, "rows lost with a damaged file")
        keep = done | set(incomplete)
        state = _State(
            table[table["unit"].isin(keep)].reset_index(drop=True) if len(table) else table,
            preds[preds["unit"].isin(keep)].reset_index(drop=True) if len(preds) else preds,
            manifest["id"],
            done,
            incomplete,
            notes,
        )
        carried = set(incomplete) - set(expected)
        if carried:
            notes.append(
                f"{len(carried)} unit(s) in {self.path} are incomplete since an earlier invocation "
                f"({sorted(set(incomplete[u] for u in carried))[0]}): computed again when selected"
            )
        for kind, copy in COPIES.items():
            if self._copy_is_stale(manifest, kind):
                how = "was missing" if not (self.path / copy).exists() else "did not match the committed results"
                notes.append(f"{self.path / copy} {how} (manifest.json): rewritten from them")
        return state

    def _copy_is_stale(self, manifest: dict, kind: str) -> bool:
        entry = manifest["files"][kind]
        try:
            data = (self.path / COPIES[kind]).read_bytes()
        except OSError:
            return True
        return _sha256(data) != entry["sha256"]

    def _read_previous_format(self, problem: str) -> _State:
        """results.parquet + predictions.parquet as probe wrote them before manifest.json: a unit with
        results but no predictions (a kill between the two files) is not done."""
        notes = [f"{problem}: reading {COPIES['results']} and {COPIES['predictions']} instead"] if problem else []
        token = self._stamp()
        frames: dict[str, pd.DataFrame] = {}
        lost: dict[str, str] = {}
        for kind, columns in (("results", COLUMNS), ("predictions", PRED_COLUMNS)):
            path = self.path / COPIES[kind]
            frames[kind] = _empty(columns)
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                lost[kind] = f"{path} is unreadable ({exc.strerror})"
                continue
            frame, why = _parse(data, columns)
            if frame is None:
                lost[kind] = f"{path} {why}"
            else:
                frames[kind] = frame
        table, preds = frames["results"], frames["predictions"]
        with_preds = _units(preds)
        incomplete: dict[str, str] = {}
        if "results" in lost:
            notes.append(f"{lost['results']}: its units are not counted as done (computed again when selected)")
            incomplete.update({u: "results.parquet unreadable" for u in with_preds})
        if "predictions" in lost:
            notes.append(f"{lost['predictions']}: units with predictions are computed again when selected")
        done: set[str] = set()
        for key, rows in table.groupby("unit", sort=False) if len(table) else ():
            unit = str(key)  # unit ids are strings
            if unit in with_preds or not (rows["metric"] == "accuracy").any():  # retrieval units predict nothing
                done.add(unit)
            else:
                incomplete[unit] = "results without predictions"
        without = [u for u, why in incomplete.items() if why == "results without predictions"]
        if without and "predictions" not in lost:
            notes.append(
                f"{len(without)} unit(s) in {self.path / COPIES['results']} are without predictions in "
                f"{COPIES['predictions']} (an earlier probe was interrupted between the two files): "
                "computed again when selected"
            )
        return _State(table, preds, token, done, incomplete, notes)

    # ---- writing -------------------------------------------------------------------------------

    def save(
        self,
        table: pd.DataFrame,
        preds: pd.DataFrame,
        record: dict[str, Any],
        fresh: Collection[str] | None = None,
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Commit `table` and `preds` (this process's view of the folder plus the units in `fresh`,
        which it has just computed; None: every unit in `table`) and write run.json. Units another
        writer committed since this process last read the folder are merged in; for a unit both
        have, the committed rows win unless this process just computed it. Returns the frames as
        committed."""
        with self._locked():
            if self._disk_token() != self._token:
                disk = self._read()
                ours = (_units(table) | _units(preds)) if fresh is None else set(fresh)
                theirs = _units(disk.table) | _units(disk.preds) | set(disk.incomplete)
                mine_t = table[table["unit"].isin(ours) | ~table["unit"].isin(theirs)] if len(table) else table
                mine_p = preds[preds["unit"].isin(ours) | ~preds["unit"].isin(theirs)] if len(preds) else preds
                table = _concat(mine_t, disk.table[~disk.table["unit"].isin(ours)] if len(disk.table) else disk.table)
                preds = _concat(mine_p, disk.preds[~disk.preds["unit"].isin(ours)] if len(disk.preds) else disk.preds)
                self._incomplete = {
                    **{u: w for u, w in self._incomplete.items() if u not in theirs},
                    **disk.incomplete,
                }
            for unit in set(fresh) if fresh is not None else _units(table):
                self._incomplete.pop(unit, None)
            table, preds = self._commit(table.reset_index(drop=True), preds.reset_index(drop=True))
            self._write_record(record)
        return table, preds

    def _commit(self, table: pd.DataFrame, preds: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Write the data files, then the manifest that names them (the commit point), then the copies."""
        incomplete = {u: w for u, w in self._incomplete.items() if u in _units(table) | _units(preds)}
        keep = _units(table) | set(incomplete)
        if len(preds):  # predictions of a unit without results belong to no committed unit
            preds = preds[preds["unit"].isin(keep)].reset_index(drop=True)
        n_t = {str(u): int(n) for u, n in table["unit"].value_counts().items()} if len(table) else {}
        n_p = {str(u): int(n) for u, n in preds["unit"].value_counts().items()} if len(preds) else {}
        units = {u: [int(n_t[u]), int(n_p.get(u, 0))] for u in sorted(n_t) if u not in incomplete}
        blobs = {
            "results": _parquet_bytes(table),
            "predictions": _parquet_bytes(preds),
            "csv": table.to_csv(index=False).encode(),
        }
        cid = f"{time.time_ns():x}{secrets.token_hex(4)}"
        names = {
            "results": f"{DATA}/results-{cid}.parquet",
            "predictions": f"{DATA}/predictions-{cid}.parquet",
            "csv": f"{DATA}/results-{cid}.csv",
        }
        (self.path / DATA).mkdir(exist_ok=True)
        try:
            for kind in KINDS:
                _write_durable(self.path / names[kind], blobs[kind])
            _fsync_dir(self.path / DATA)
        except OSError:  # a full disk: the committed state is untouched; leave no half-written file behind
            for name in names.values():
                with contextlib.suppress(FileNotFoundError):
                    (self.path / name).unlink()
            raise
        old, _ = self._manifest()
        previous = {k: e["name"] for k, e in old["files"].items()} if old else {}
        manifest = {
            "format": FORMAT,
            "id": cid,
            "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": {k: {"name": names[k], "sha256": _sha256(blobs[k]), "bytes": len(blobs[k])} for k in KINDS},
            "previous": previous,
            "units": units,
            "incomplete": incomplete,
        }
        _replace(self.path / MANIFEST, json.dumps(manifest, indent=1).encode(), durable=True)  # the commit point
        self._token, self.done, self._incomplete = cid, set(units), incomplete
        for kind in KINDS:
            _replace(self.path / COPIES[kind], blobs[kind])
        self._cleanup(set(names.values()) | set(previous.values()))
        return table, preds

    def save_record(self, record: dict[str, Any]) -> None:
        """run.json: the latest invocation's record, plus `history`, one entry per invocation ever made
        into this folder (config, versions, timings, counts; identified by its `started` time).
        Also rewrites copies (results.parquet, ...) and data files that do not match the commit."""
        with self._locked():
            manifest, _ = self._manifest()
            if manifest is None:  # a folder of the previous format or with a damaged manifest: commit it now
                state = self._read()
                if len(state.table) or len(state.preds):
                    self._incomplete = state.incomplete
                    self._commit(state.table, state.preds)
            else:
                self._refresh(manifest)
            self._write_record(record)

    def _refresh(self, manifest: dict) -> None:
        for kind in KINDS:
            entry = manifest["files"][kind]
            data, problem, _ = self._committed_bytes(manifest, kind)
            if data is None:
                continue  # both the data file and its copy are damaged: the notes said so
            if problem:  # the copy still matched the checksum: restore the data file from it
                _replace(self.path / entry["name"], data, durable=True)
            if self._copy_is_stale(manifest, kind):
                _replace(self.path / COPIES[kind], data)
        previous = manifest.get("previous", {})
        self._cleanup({e["name"] for e in manifest["files"].values()} | set(previous.values()))

    def _cleanup(self, keep: set[str]) -> None:
        """Remove superseded data files and temporary files of dead writers (under the lock: no live
        writer has any). Best effort: a file that cannot be removed costs only disk space."""
        leftovers = list(self.path.glob(".*.tmp"))
        leftovers += [self.path / f"{n}.tmp" for n in (*COPIES.values(), "run.json")]  # the previous format's
        data = self.path / DATA
        if data.is_dir():
            leftovers += [
                p
                for p in data.iterdir()
                if f"{DATA}/{p.name}" not in keep and (_DATA_NAME.match(p.name) or p.name.endswith(".tmp"))
            ]
        for p in leftovers:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                p.unlink()

    def _write_record(self, record: dict[str, Any]) -> None:
        path = self.path / "run.json"
        try:
            old = json.loads(path.read_text()) if path.exists() else {}
        except ValueError:  # a damaged run.json loses its history, never the results
            old = {}
        past = old.get("history", []) if isinstance(old, dict) else []
        history = [h for h in past if isinstance(h, dict) and h.get("started") != record.get("started")]
        history.append({k: v for k, v in record.items() if k not in ("notes", "history")})
        _replace(path, json.dumps({**record, "history": history}, indent=2, default=str).encode())
