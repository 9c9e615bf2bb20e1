"""Stop glibc from handing large buffers back to the OS after every batch.

glibc serves allocations above its mmap threshold (128 KiB at first, at most 32 MiB) with fresh
`mmap`s and returns freed memory at the top of the heap once more than 128 KiB are free. A
forward pass allocates and frees activation buffers of tens to hundreds of MB per layer per
batch, so every batch maps them again and touches every page for the first time: on a 2-core
machine EfficientNet-Lite0 spent more time in the kernel (sys 23-25 s, 8.3 M minor page faults
for 256 images) than computing. Raising the mmap threshold to its 32 MiB limit is not enough (the
largest buffers are bigger: 3.5 M faults remained). So large blocks come from the heap too
(`M_MMAP_MAX` = 0) and up to 2 GiB of freed heap is kept (`M_TRIM_THRESHOLD`), where the next
batch reuses it.

`tune()` does that through `mallopt` (ctypes) once per process, in the main process and in each
DataLoader worker; on a C library without `mallopt` (macOS, musl) it changes nothing and says so.
`MUBENCH_PROBE_ALLOCATOR=system` leaves the allocator as it is (for benchmarks and diagnosis).
The settings in force are recorded in every run's provenance.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of freed heap for reuse (mallopt takes a C int)
ENV = "MUBENCH_PROBE_ALLOCATOR"

_state: dict[str, Any] | None = None


def glibc() -> Any | None:
    """This process's C library if it is glibc (it has `mallopt`), else None: where `tune` applies."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def tune(again: bool = False) -> dict[str, Any]:
    """Raise glibc's mmap and trim thresholds in this process (idempotent); what is in force.

    `again` decides anew instead of returning this process's earlier answer (after the
    environment or the C library seen by `glibc` changed)."""
    global _state
    if not again and _state is not None and _state.get("pid") == os.getpid():
        return _state
    libc = glibc()
    if os.environ.get(ENV, "").lower() == "system":
        state: dict[str, Any] = {"allocator": "unchanged", "why": f"{ENV}=system"}
    elif libc is None:
        state = {"allocator": "unchanged", "why": "not glibc (no mallopt)"}
    else:
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        settings = {"M_MMAP_MAX": (M_MMAP_MAX, 0), "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, TRIM_THRESHOLD)}
        ok = all(libc.mallopt(opt, value) for opt, value in settings.values())
        state = {
            "allocator": f"glibc {libc.gnu_get_libc_version().decode()}",
            "mallopt": {name: value for name, (_, value) in settings.items()} if ok else "refused",
        }
    _state = {**state, "pid": os.getpid()}
    return _state


def describe() -> dict[str, Any]:
    """The settings in force, for provenance (without the pid)."""
    return {k: v for k, v in tune().items() if k != "pid"}


def worker_init(_: int = 0) -> None:
    """DataLoader workers: the same settings (a forked worker inherits them; a spawned one does not)."""
    tune()
