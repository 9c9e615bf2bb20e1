"""A repair killed on an object store is resumed, not forgotten (issue 22, the S3 case).

The same scenario as `test_store_integrity.py::test_sigkill_during_repair_then_repair_again_restores_the_run`,
on `s3://bucket/x.zarr` served by an S3 emulator (moto in server mode on loopback, started here):
a real `probe verify --repair` is SIGKILLed once it has cleared the damaged chunks' done flags,
before re-extracting them. The run must then read as damaged (not intact, not complete), and the
next `verify --repair` must restore it byte for byte. Run alone:
`python -m pytest -q tests/test_store_integrity_s3.py`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app
from mubench_probe.datasets import load_dataset
from mubench_probe.locations import location
from mubench_probe.store import EmbeddingStore

from .conftest import TINY

GROUP = "mubench-tiny-vit_random/sample/test"
STORE = "s3://bucket/x.zarr"
ROWS, CHUNK = 64, 16  # 4 chunks
EXTRACT = ("extract", "--dataset", "sample", "--limit", ROWS, "--model", TINY, "--chunk-rows", CHUNK)
EXTRACT += ("--workers", 0, "--batch-size", 16)
REPAIR = ("--repair", "--workers", 0, "--device", "cpu")
STAMPED = ("zarr.json", f"{GROUP}/zarr.json", f"{GROUP}/done/zarr.json")  # hold creation times


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(r) -> str:
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    return errors[0]


def _contents(store: str | Path) -> dict[str, bytes]:
    """Every file of a store (folder or URL) but the claims and the creation times."""
    loc = location(store)
    out: dict[str, bytes] = {}

    def walk(rel: str) -> None:
        for name in loc.files(rel):
            key = f"{rel}/{name}" if rel else name
            if key not in STAMPED:
                out[key] = loc.read_bytes(key) or b""
        for name in loc.dirs(rel):
            if not name.startswith("."):
                walk(f"{rel}/{name}" if rel else name)

    walk("")
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same extraction into a local folder, uninterrupted."""
    path = tmp_path_factory.mktemp("ref") / "one.zarr"
    api.extract(TINY, load_dataset("sample", limit=ROWS), store=path, num_workers=0, chunk_rows=CHUNK, batch_size=16)
    return path


# A real `probe` process that pauses once an object matching PAUSE is written through Zarr's
# FsspecStore, then waits to be killed (the object-store twin of the local test's child).
CHILD = textwrap.dedent(
    """
    import os, re, sys, time
    import zarr.storage

    mark, pattern = os.environ["MARK"], re.compile(os.environ["PAUSE"])
    original_set = zarr.storage.FsspecStore.set

    async def set(self, key, value, *args, **kwargs):
        await original_set(self, key, value, *args, **kwargs)
        if pattern.search(f"{self.path}/{key}"):
            open(mark, "w").close()
            time.sleep(600)

    zarr.storage.FsspecStore.set = set
    from mubench_probe.cli import main

    sys.argv = ["probe", *sys.argv[1:]]
    main()
    """
)


def _kill_at(tmp_path: Path, args: tuple, pause: str) -> None:
    mark = tmp_path / f"mark-{time.monotonic_ns()}"
    env = {**os.environ, "MARK": str(mark), "PAUSE": pause}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 180
    while not mark.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"never reached {pause}: {proc.communicate()[0].decode()[-2000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def _status(store: str) -> dict:
    r = _run("status", store, "--json")
    assert r.exit_code == 0, r.output
    (run,) = json.loads(r.output)["runs"]
    return run


@pytest.mark.faults
@pytest.mark.s3
def test_sigkill_during_repair_on_s3_then_repair_again_restores_the_run(s3, tmp_path, reference):
    r = _run(*EXTRACT, "--store", STORE)
    assert r.exit_code == 0, r.output
    files = _contents(reference)
    assert _contents(STORE) == files, "the object store holds the local extraction's bytes"
    loc = location(STORE)
    loc.delete(f"{GROUP}/image_emb/c/1/0")  # one chunk object deleted, one corrupted
    loc.write_bytes(f"{GROUP}/image_emb/c/3/0", b"garbage" + files[f"{GROUP}/image_emb/c/3/0"][7:])
    # killed once the repair has cleared both damaged chunks' done flags, before re-extracting them
    _kill_at(tmp_path, ("verify", STORE, *REPAIR), rf"{GROUP}/done/c/3$")
    status = _status(STORE)
    assert status["status"] == "damaged" and status["chunks_done"] == 2, status
    assert status["interrupted_repair"] == [1, 3], status
    r = _run("verify", STORE)
    _one_line_error(r)
    assert "verify: intact" not in r.output, r.output
    for i in (1, 3):
        assert f"done chunk {i} was cleared by an interrupted repair" in r.output, r.output
    r = _run("verify", STORE, *REPAIR)
    assert r.exit_code == 0 and "repaired:" in r.output, r.output
    assert _status(STORE)["status"] == "complete"
    assert _run("verify", STORE).exit_code == 0
    assert _contents(STORE) == files, "the repaired object store equals an uninterrupted extraction, byte for byte"
    (run,), (ref,) = EmbeddingStore(STORE).runs(), EmbeddingStore(reference).runs()
    assert run.complete and np.array_equal(run.image_embeddings(), ref.image_embeddings())
    assert run.failures() == ref.failures()
