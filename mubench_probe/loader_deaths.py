"""Loader workers that die: which row each was decoding, and one line that says so.

A worker killed by the out-of-memory killer says nothing, and torch reports only its pid; the
extraction loop turns that into a `LoaderWorkerDiedError` naming the row and file (kept out of
extraction.py, which holds the hot loop)."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
from typing import Any

from torch.utils.data import get_worker_info

from .datasets.base import row_file_name


class WorkerRows:
    """Which row each loader worker is decoding, in memory shared with the workers: a worker
    killed by the out-of-memory killer says nothing, so the main process looks here to name
    the row it died on."""

    def __init__(self, workers: int) -> None:
        self.pids = multiprocessing.RawArray("q", max(1, workers))
        self.rows = multiprocessing.RawArray("q", max(1, workers))  # row + 1; 0: between rows

    def start(self, i: int) -> None:
        info = get_worker_info()
        if info is not None:
            self.pids[info.id], self.rows[info.id] = os.getpid(), int(i) + 1

    def finish(self) -> None:
        info = get_worker_info()
        if info is not None:
            self.rows[info.id] = 0

    def rows_of(self, pids: set[int]) -> list[int]:
        """The rows the workers with these pids were decoding when they stopped."""
        return sorted(self.rows[w] - 1 for w in range(len(self.pids)) if self.pids[w] in pids and self.rows[w])


_WORKER_DIED = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) (?:is )?([^.\n]*)")


def dead_workers(exc: RuntimeError) -> tuple[set[int], str] | None:
    """(pids, cause) from torch's report of dead loader workers; None if `exc` is something else."""
    m = _WORKER_DIED.search(str(exc))
    return None if m is None else ({int(p) for p in re.findall(r"\d+", m.group(1))}, m.group(2).strip())


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def worker_death(
    pids: set[int], cause: str, exit_codes: dict[int, int | None], rows: Any, in_flight: list[tuple[int, int]]
) -> str:
    """One line for dead loader workers: how they died, the row each died on and its file, and
    that a rerun resumes. A negative exit code is the signal (torch does not always say)."""
    signals = sorted({-c for p, c in exit_codes.items() if p in pids and c is not None and c < 0})
    if signals:
        cause = "killed by " + ", ".join(_signal_name(n) for n in signals)
    dead = rows.watch.rows_of(pids) if rows.watch is not None else []
    if dead:
        where = ", ".join(
            f"row {r} (file {name})" if (name := row_file_name(rows.reader, r)) else f"row {r}" for r in dead
        )
    elif in_flight:
        where = f"one of rows {in_flight[0][0]}-{in_flight[-1][1]}"
    else:
        where = "a row"
    oom = "the out-of-memory killer sends SIGKILL: fewer --workers or a smaller --batch-size need less memory; "
    return (
        f"a data loader worker (pid {', '.join(map(str, sorted(pids)))}) died ({cause}) while decoding {where}; "
        f"{oom if 'SIGKILL' in cause or 'Killed' in cause else ''}"
        "finished chunks are saved: rerun the same command to resume"
    )


def stop_workers(batches: Any) -> dict[int, int | None]:
    """Shut a DataLoader's workers down now, and return their exit codes by pid. Torch otherwise
    keeps watching the dead worker until the iterator is collected, and would raise its error
    again at every later child exit (`_shutdown_workers` and `_workers` are torch's own)."""
    stop = getattr(batches, "_shutdown_workers", None)
    if callable(stop):
        try:
            stop()
        except RuntimeError:  # another worker's exit re-reported the dead one; the workers are stopped by now
            pass
    return {w.pid: w.exitcode for w in getattr(batches, "_workers", ())}
