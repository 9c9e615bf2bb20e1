"""What the store relies on in zarr beyond its public API, checked so a zarr upgrade fails here, loudly.

The store runs coroutines on zarr's own event loop through one function, `on_zarr_loop` (it uses
`zarr.core.sync.sync`, not public): to list the keys under a prefix (a missing chunk file is found
from the listing, never read as a fill value), to delete one key, and to wait for chunk writes zarr
still has in flight after a failed batch. Object stores are built in a `MemoryStore` over a dict the
store passes in (public), whose values are zarr Buffers. If one of these tests fails after a zarr
upgrade, adapt `mubench_probe/store/arrays.py` (`on_zarr_loop` and its callers) before anything else.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import zarr
import zarr.storage

from mubench_probe.store.arrays import delete_key, delete_node, drain_writes, on_zarr_loop, stored_keys


def _array(path, name: str = "a") -> tuple[zarr.Group, zarr.Array]:
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = g.create_array(name, shape=(6, 2), chunks=(2, 2), dtype="float32", config={"write_empty_chunks": True})
    arr[:] = np.zeros((6, 2), dtype=np.float32)
    return g, arr


def test_zarr_still_has_the_internal_sync_the_store_uses():
    from zarr.core.sync import sync  # the internal `on_zarr_loop` wraps

    async def answer() -> int:
        return 42

    assert callable(sync)
    assert on_zarr_loop(answer()) == 42


def test_listing_names_every_written_chunk_and_not_a_deleted_one(tmp_path):
    g, arr = _array(tmp_path / "s.zarr")
    keys = stored_keys(arr)
    assert keys == {"zarr.json", "c/0/0", "c/1/0", "c/2/0"}, keys
    delete_key(g, "a/c/1/0")
    assert stored_keys(arr) == {"zarr.json", "c/0/0", "c/2/0"}
    assert not (tmp_path / "s.zarr" / "a" / "c" / "1" / "0").exists()


def test_a_node_with_an_unreadable_zarr_json_is_deleted_whole(tmp_path):
    g, _ = _array(tmp_path / "s.zarr")
    (tmp_path / "s.zarr" / "a" / "zarr.json").write_text("{ not json")
    delete_node(g, "a")
    assert not (tmp_path / "s.zarr" / "a").exists()


def test_zarr_does_its_store_io_on_the_loop_the_store_awaits_and_drains():
    """`drain_writes` waits for every task on zarr's loop: that must be the loop zarr writes chunks on."""
    seen: set[int] = set()

    class Spy(zarr.storage.MemoryStore):
        async def set(self, key, value, byte_range=None) -> None:  # type: ignore[override]
            seen.add(id(asyncio.get_running_loop()))
            await super().set(key, value)

    g = zarr.open_group(Spy(), mode="w", zarr_format=3)
    g.create_array("a", shape=(4,), chunks=(1,), dtype="int32")[:] = np.arange(4, dtype=np.int32)

    async def running_loop() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    loop = on_zarr_loop(running_loop())
    assert seen == {id(loop)}, "zarr no longer runs its store I/O on the loop `on_zarr_loop` uses"

    finished = threading.Event()

    async def slow_write() -> None:
        await asyncio.sleep(0.3)
        finished.set()

    asyncio.run_coroutine_threadsafe(slow_write(), loop)
    time.sleep(0.05)  # the task is scheduled on zarr's loop
    drain_writes()
    assert finished.is_set(), "drain_writes returned while a task on zarr's loop was still in flight"


def test_a_memory_store_over_our_dict_holds_buffers_keyed_by_path():
    """Object stores: a run is built in `MemoryStore(built)` and its objects uploaded from `built`."""
    built: dict = {}
    g = zarr.open_group(zarr.storage.MemoryStore(built), mode="w", zarr_format=3)
    g.require_group("m").create_array("x", shape=(2,), chunks=(2,), dtype="int8")[:] = np.ones(2, dtype=np.int8)
    assert {"zarr.json", "m/zarr.json", "m/x/zarr.json", "m/x/c/0"} <= set(built), sorted(built)
    assert all(isinstance(v.to_bytes(), bytes) for v in built.values())
