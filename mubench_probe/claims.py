"""Per-chunk claims, so that several `probe extract` processes on one run split the work.

A writer claims a chunk right before computing it and releases it after the chunk (and its
`done` flag) is written; a chunk claimed by a live writer is skipped. The interface is small on
purpose: `ObjectChunkClaims` (at the end) implements it for object stores with conditional
writes (S3 `If-None-Match: *`) and the same staleness rule, and sharded extraction builds on it.

The local implementation keeps one file per claim in `<store>/.claims/<run>/` (a folder that is
not a Zarr node). A claim is created atomically and exclusively with a hard link of a fully
written temporary file (safe on NFS, where O_EXCL historically is not), holds the owner's host,
pid, process start time and a random token, and its mtime is the heartbeat, refreshed by a
background thread while the claim is held.

Staleness: a claim by a process on this host is stale as soon as that pid is dead (or was
reused by another process); a claim from another host is stale once its heartbeat is older
than `timeout` seconds. A stale claim is taken over by renaming it aside first, so that only
one of several contenders wins.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .config import DEFAULT_CLAIM_TIMEOUT

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Key = int | str  # a row-chunk index, or "texts" for the text table


def key_name(key: Key) -> str:
    return f"chunk-{key}" if isinstance(key, int) else str(key)


def _parse_key(name: str) -> Key:
    return int(name[6:]) if name.startswith("chunk-") and name[6:].isdigit() else name


def process_start(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot, to tell a reused pid from the claim's owner.

    Since boot, not since the epoch: another process must compute the same value, and the epoch
    value moves with every step of the wall clock. In ticks (Linux's /proc/PID/stat starttime), as
    claims have always recorded it. None where it cannot be told."""
    try:
        since_boot = psutil.Process(pid).create_time() - psutil.boot_time()
    except (psutil.Error, OSError):
        return None
    return str(round(since_boot * _CLOCK_TICKS))


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (owned by any user)."""
    return psutil.pid_exists(pid)


HOST = socket.gethostname()


@dataclass(frozen=True)
class ClaimInfo:
    """Who holds a claim, and whether that owner still counts as alive."""

    key: Key
    host: str
    pid: int
    token: str
    age_s: float
    live: bool

    def describe(self) -> str:
        where = "this host" if self.host == HOST else f"host {self.host}"
        return f"pid {self.pid} on {where} (heartbeat {self.age_s:.0f} s ago)"


class ChunkClaims(ABC):
    """Exclusive, expiring claims on the chunks of one run."""

    timeout: float = DEFAULT_CLAIM_TIMEOUT  # seconds without heartbeat before another host's claim is stale

    @abstractmethod
    def try_claim(self, key: Key) -> bool:
        """Claim `key` for this writer; False if a live writer holds it. Takes over stale claims."""

    @abstractmethod
    def release(self, key: Key) -> None:
        """Give a claim back (only if it is still ours)."""

    @abstractmethod
    def owns(self, key: Key) -> bool:
        """Whether this writer still holds `key` (checked again right before writing)."""

    @abstractmethod
    def owners(self) -> dict[Key, ClaimInfo]:
        """Every current claim, ours included, with its owner and liveness."""

    def stale(self) -> list[Key]:
        """Claims whose owner is gone: the next `try_claim` on them takes them over."""
        return [k for k, c in self.owners().items() if not c.live]

    def record_written(self, key: Key) -> None:  # noqa: B027 - optional audit hook
        """Note that this writer wrote `key` (an audit log; backends may ignore it)."""

    def note_shards(self, count: int) -> None:  # noqa: B027 - optional, for `probe status`
        """Record that the run is being filled by `count` shards (last writer wins)."""

    def shards_noted(self) -> int | None:
        """The shard count last recorded by `note_shards` (None: not sharded, or not recorded)."""
        return None

    def close(self) -> None:  # noqa: B027 - nothing to do for backends without state
        """Release every claim still held and stop heartbeats."""

    def __enter__(self) -> ChunkClaims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HeartbeatClaims(ChunkClaims):
    """What both backends share: this writer's identity, the keys it holds, and the thread that
    refreshes their heartbeat every timeout/4 seconds (at most 30 s) until `close`."""

    _held: Any  # the keys this writer holds (iterating gives the keys), per backend

    def _init_writer(self, timeout: float) -> None:
        if timeout <= 0:
            raise ValueError("claim timeout must be positive")
        self.timeout = float(timeout)
        self.token = uuid.uuid4().hex
        self.pid = os.getpid()
        self._start = process_start(self.pid)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @abstractmethod
    def _refresh(self, key: Key) -> None:
        """Renew the heartbeat of a claim this writer holds."""

    def _start_heartbeat(self) -> None:
        if self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="claims-heartbeat", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        interval = max(0.05, min(self.timeout / 4, 30.0))
        while not self._stop.wait(interval):
            with self._lock:
                keys = list(self._held)
            for key in keys:
                self._refresh(key)

    def close(self) -> None:
        self._stop.set()
        for key in list(self._held):
            self.release(key)
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        self._stop = threading.Event()


class LocalChunkClaims(_HeartbeatClaims):
    """Claim files in a local (or NFS) folder; see the module docstring for the rules."""

    def __init__(self, folder: Path, timeout: float = DEFAULT_CLAIM_TIMEOUT) -> None:
        self._init_writer(timeout)
        self.folder = Path(folder)
        self._held: dict[Key, Path] = {}

    # ---- files -----------------------------------------------------------------------------
    def _path(self, key: Key) -> Path:
        return self.folder / f"{key_name(key)}.claim"

    def _create(self, path: Path) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        body = {"host": HOST, "pid": self.pid, "start": self._start, "token": self.token, "claimed": time.time()}
        tmp = self.folder / f".{path.name}.{self.token}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(body))
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self, path: Path) -> ClaimInfo | None:
        """The claim at `path`; None if it vanished. A claim whose bytes are not a claim (garbage, not
        UTF-8, not JSON) is stale: claims are written whole, so no live writer leaves one like that.
        One this process may not read (another user's) is live while its heartbeat (mtime) is fresh."""
        key = _parse_key(path.name.removesuffix(".claim"))
        try:
            age = max(0.0, time.time() - path.stat().st_mtime)
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:  # permissions: judge it by its heartbeat, as a claim from another host
            return ClaimInfo(key, "?", -1, "", age, age <= self.timeout)
        try:
            body = json.loads(raw)  # bytes: undecodable ones raise UnicodeDecodeError, a ValueError
            host, pid, token, start = str(body["host"]), int(body["pid"]), str(body["token"]), body.get("start")
        except (ValueError, KeyError, TypeError):
            return ClaimInfo(key, "?", -1, "", age, False)
        if host == HOST:
            live = pid_alive(pid) and (start is None or process_start(pid) in (None, start))
        else:
            live = age <= self.timeout
        return ClaimInfo(key, host, pid, token, age, live)

    # ---- interface -------------------------------------------------------------------------
    def try_claim(self, key: Key) -> bool:
        path = self._path(key)
        for _ in range(3):
            if self._create(path):
                with self._lock:
                    self._held[key] = path
                self._start_heartbeat()
                return True
            info = self._read(path)
            if info is None:
                continue  # released meanwhile: try again
            if info.token == self.token:
                return True
            if info.live:
                return False
            # Stale: move it aside under a unique name; only one contender can move a given file.
            aside = path.with_name(f".{path.name}.stale.{uuid.uuid4().hex}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = self._read(aside)
            if moved is not None and moved.token != info.token and moved.live:
                # Someone took it over between our read and our rename: give it back.
                with contextlib.suppress(FileExistsError):
                    os.link(aside, path)
                aside.unlink(missing_ok=True)
                return False
            aside.unlink(missing_ok=True)
        return False

    def release(self, key: Key) -> None:
        with self._lock:
            path = self._held.pop(key, None)
        if path is None:
            return
        info = self._read(path)
        if info is not None and info.token == self.token:
            path.unlink(missing_ok=True)

    def owns(self, key: Key) -> bool:
        info = self._read(self._path(key))
        return info is not None and info.token == self.token

    def owners(self) -> dict[Key, ClaimInfo]:
        if not self.folder.is_dir():
            return {}
        out = {}
        for path in sorted(self.folder.glob("*.claim")):
            info = self._read(path)
            if info is not None:
                out[info.key] = info
        return out

    def record_written(self, key: Key) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = f"{key_name(key)} {HOST} {self.pid} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n"
        fd = os.open(self.folder / "written.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())  # one short O_APPEND write: lines of concurrent writers never interleave
        finally:
            os.close(fd)

    def note_shards(self, count: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".shards.{self.token}"
        tmp.write_text(str(int(count)))
        os.replace(tmp, self.folder / "shards")

    def shards_noted(self) -> int | None:
        try:
            raw = (self.folder / "shards").read_bytes().strip()
        except FileNotFoundError:
            return None
        return int(raw) if raw.isdigit() else None  # garbage: not recorded

    def written(self) -> list[tuple[Key, str, int]]:
        """The audit log: (key, host, pid) per chunk written, oldest first (unreadable lines skipped)."""
        try:
            text = (self.folder / "written.log").read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[2].isdigit():
                out.append((_parse_key(parts[0]), parts[1], int(parts[2])))
        return out

    def _refresh(self, key: Key) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._path(key))  # the heartbeat is the claim file's mtime


class ObjectChunkClaims(_HeartbeatClaims):
    """Claims as objects in an object store (S3, GCS, ...; any fsspec location), for stores that
    machines without a shared filesystem fill together.

    A claim is created with a conditional write (`If-None-Match: *`: exactly one of several
    writers creates it). Its body holds host, pid, process start, token and `beat`, the time of
    its last heartbeat, rewritten by a background thread while the claim is held (every
    timeout / 4 seconds); liveness follows the local rules (same host: the pid; another host: a
    heartbeat younger than `timeout`, so the machines' clocks must agree to well within it, as
    NTP keeps them). A stale claim is taken over by first creating the marker
    `<claim>.takeover.<token>.<beat>` conditionally: of several contenders for the same stale
    claim, only the one that creates the marker rewrites the claim. Objects cannot be renamed,
    so this replaces the local rename-aside.
    """

    def __init__(self, loc: object, prefix: str, timeout: float = DEFAULT_CLAIM_TIMEOUT) -> None:
        self._init_writer(timeout)
        self.loc: Any = loc
        self.prefix = prefix.rstrip("/")
        self._held: set[Key] = set()

    def _rel(self, key: Key) -> str:
        return f"{self.prefix}/{key_name(key)}.claim"

    def _body(self) -> bytes:
        now = time.time()
        body = {"host": HOST, "pid": self.pid, "start": self._start, "token": self.token, "claimed": now, "beat": now}
        return json.dumps(body).encode()

    def _parse(self, key: Key, raw: bytes | None) -> tuple[ClaimInfo, float] | None:
        if raw is None:
            return None
        try:
            body = json.loads(raw)
            host, pid, token, start = str(body["host"]), int(body["pid"]), str(body["token"]), body.get("start")
            beat = float(body["beat"])
        except (ValueError, KeyError, TypeError):
            return ClaimInfo(key, "?", -1, "", float("inf"), False), 0.0
        age = max(0.0, time.time() - beat)
        if host == HOST:
            live = pid_alive(pid) and (start is None or process_start(pid) in (None, start))
        else:
            live = age <= self.timeout
        return ClaimInfo(key, host, pid, token, age, live), beat

    def _read(self, key: Key) -> tuple[ClaimInfo, float] | None:
        return self._parse(key, self.loc.read_bytes(self._rel(key)))

    def try_claim(self, key: Key) -> bool:
        rel = self._rel(key)
        for _ in range(3):
            if self.loc.create(rel, self._body()):
                self._hold(key)
                return True
            found = self._read(key)
            if found is None:
                continue  # released meanwhile
            info, beat = found
            if info.token == self.token:
                return True
            if info.live:
                return False
            if not self.loc.create(f"{rel}.takeover.{info.token or 'unreadable'}.{beat:.6f}", b""):
                return False  # another writer is taking this stale claim over
            self.loc.write_bytes(rel, self._body())
            self._hold(key)
            return True
        return False

    def _hold(self, key: Key) -> None:
        with self._lock:
            self._held.add(key)
        self._start_heartbeat()

    def release(self, key: Key) -> None:
        with self._lock:
            if key not in self._held:
                return
            self._held.discard(key)
        found = self._read(key)
        if found is not None and found[0].token == self.token:
            self.loc.delete(self._rel(key))

    def owns(self, key: Key) -> bool:
        found = self._read(key)
        return found is not None and found[0].token == self.token

    def owners(self) -> dict[Key, ClaimInfo]:
        out = {}
        for name in self.loc.files(self.prefix):
            if name.endswith(".claim"):
                key = _parse_key(name.removesuffix(".claim"))
                found = self._read(key)
                if found is not None:
                    out[key] = found[0]
        return out

    def record_written(self, key: Key) -> None:
        stamp = f"{time.time_ns()}"
        self.loc.write_bytes(f"{self.prefix}/written/{key_name(key)}@{HOST}@{self.pid}@{stamp}", b"")

    def written(self) -> list[tuple[Key, str, int]]:
        """The audit log: (key, host, pid) per chunk written, oldest first."""
        rows = []
        for name in self.loc.files(f"{self.prefix}/written"):
            parts = name.rsplit("@", 3)
            if len(parts) == 4 and parts[2].isdigit() and parts[3].isdigit():  # anything else: not ours
                key, host, pid, stamp = parts
                rows.append((int(stamp), _parse_key(key), host, int(pid)))
        return [(k, h, p) for _, k, h, p in sorted(rows, key=lambda r: r[0])]

    def note_shards(self, count: int) -> None:
        self.loc.write_bytes(f"{self.prefix}/shards", str(int(count)).encode())

    def shards_noted(self) -> int | None:
        raw = self.loc.read_bytes(f"{self.prefix}/shards")
        return int(raw) if raw and raw.strip().isdigit() else None

    def _refresh(self, key: Key) -> None:
        found = self._read(key)
        if found is not None and found[0].token == self.token:  # the heartbeat is the time in the claim
            self.loc.write_bytes(self._rel(key), self._body())
