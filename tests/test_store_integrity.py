"""Store integrity against a hostile tester: nothing lost, nothing forged (issue 22).

Each test damages a copy of the tiny store the way a tester did (swapped chunk files, labels
rewritten through Zarr with valid checksums, garbage group metadata, a dead creator's leftovers,
an edited data type or provenance, a SIGKILL during a repair or in the middle of a write), then
checks that `probe verify` names the problem, readers refuse it in one line where it would
change a result, and one `probe verify --repair` (or the same `probe extract`) restores the
store byte for byte. Stores written before the per-chunk and metadata digests still open and
verify, with a note. Run alone: `python -m pytest -q tests/test_store_integrity.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from mubench_probe.claims import HOST
from mubench_probe.cli import app
from mubench_probe.errors import CorruptChunkError, StoreDamageError
from mubench_probe.store import CLAIMS, CREATING, EmbeddingStore, digest

from .conftest import TINY, forge_provenance

GROUP = "mubench-tiny-vit_random/sample/test"
EXTRACT = ("extract", "--dataset", "sample", "--model", TINY, "--chunk-rows", 128, "--workers", 0, "--batch-size", 32)
REPAIR = ("--repair", "--workers", 0, "--device", "cpu")
EVALUATE = ("--head", "lp", "--bootstrap", 20, "--shots", 1, "--fewshot-seeds", 1)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(r) -> str:
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    return errors[0]


def _files(store: Path, timestamps: bool = True) -> dict[str, bytes]:
    """Every file but the claims (and, unless `timestamps`, the zarr.json files holding creation times)."""
    stamped = {"zarr.json", f"{GROUP}/zarr.json", f"{GROUP}/done/zarr.json"}
    return {
        p.relative_to(store).as_posix(): p.read_bytes()
        for p in sorted(store.rglob("*"))
        if p.is_file()
        and not p.relative_to(store).as_posix().startswith(f"{CLAIMS}/")
        and (timestamps or p.relative_to(store).as_posix() not in stamped)
    }


def _repaired_byte_identical(store: Path, reference: Path) -> str:
    r = _run("verify", store, *REPAIR)
    assert r.exit_code == 0 and "repaired:" in r.output, r.output
    assert _files(store) == _files(reference), "the repaired store equals the undamaged one, byte for byte"
    assert _run("verify", store).exit_code == 0
    return r.output


def _evaluate_refused(store: Path, tmp_path: Path, needle: str) -> None:
    line = _one_line_error(_run("evaluate", store, "--out", tmp_path / "res", *EVALUATE))
    assert needle in line and "repair" in line, line
    assert not (tmp_path / "res" / "results.parquet").exists(), "no result was computed from a forged run"


# ---- nothing forged: position-bound chunk digests, metadata digests ----------------------------


def test_swapped_image_emb_chunks_are_named_refused_and_repaired(tiny_store_copy, tiny_store, tmp_path):
    """Every chunk still matches *a* checksum: only a digest bound to (array, chunk key) tells.
    (The last two chunks: their repair re-extracts 128 + 66 rows, not 256.)"""
    a, b = (tiny_store_copy / GROUP / f"image_emb/c/{i}/0" for i in (2, 3))
    a.rename(a.with_name("tmp"))
    b.rename(a)
    a.with_name("tmp").rename(b)
    r = _run("verify", tiny_store_copy)
    _one_line_error(r)
    for i in (2, 3):
        assert f"image_emb chunk {i}.0 (file image_emb/c/{i}/0) does not match the digest recorded" in r.output
    with pytest.raises(CorruptChunkError, match=r"image_emb chunk 2\.0 .* does not match the digest"):
        EmbeddingStore(tiny_store_copy).runs()[0].image_embeddings()
    _evaluate_refused(tiny_store_copy, tmp_path, "does not match the digest recorded")
    _repaired_byte_identical(tiny_store_copy, tiny_store)


@pytest.mark.slow
@pytest.mark.parametrize("column", ["label_name", "label"])
def test_labels_rewritten_through_zarr_are_refused_and_repaired(column, tiny_store_copy, tiny_store, tmp_path):
    arr = zarr.open_array(tiny_store_copy / GROUP / "meta" / column, mode="r+")
    values = arr[:]
    arr[:] = np.roll(values, 1)  # valid checksums: Zarr itself wrote the forged labels
    r = _run("verify", tiny_store_copy)
    _one_line_error(r)
    assert "meta does not match the digest recorded at extraction" in r.output, r.output
    with pytest.raises(StoreDamageError, match="meta does not match the digest"):
        EmbeddingStore(tiny_store_copy).runs()[0].meta()
    _evaluate_refused(tiny_store_copy, tmp_path, "meta does not match the digest")
    _repaired_byte_identical(tiny_store_copy, tiny_store)


# ---- nothing unreported: garbage group metadata, a dead creator's leftovers ----------------------


@pytest.mark.parametrize(
    "garbage",
    [
        "{}",
        '{"zarr_format": 2, "node_type": "group"}',
        '{"zarr_format": 3, "node_type": "group", "attributes": {"forged": 1}}',
    ],
)
@pytest.mark.slow
def test_garbage_intermediate_group_zarr_json_is_reported_and_rewritten(garbage, tiny_store_copy, tiny_store):
    (tiny_store_copy / "mubench-tiny-vit_random" / "zarr.json").write_text(garbage)
    r = _run("verify", tiny_store_copy)
    _one_line_error(r)
    assert "mubench-tiny-vit_random zarr.json is not the group metadata probe writes" in r.output, r.output
    out = _repaired_byte_identical(tiny_store_copy, tiny_store)
    assert "mubench-tiny-vit_random zarr.json" in out and "rewritten" in out, out


def test_half_created_run_whose_pid_was_reused_is_reported_and_removed(tiny_store_copy, tiny_store):
    """The creator died long ago and its pid now belongs to a younger process: still a leftover."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        left = tiny_store_copy / CREATING / f"{HOST}@{sleeper.pid}.0123456789ab"
        shutil.copytree(tiny_store / GROUP, left)
        hour_ago = time.time() - 3600
        for p in (left, *left.rglob("*")):
            os.utime(p, (hour_ago, hour_ago))
        r = _run("verify", tiny_store_copy)
        _one_line_error(r)
        assert f"{CREATING}/{left.name} is a half-created run left by an interrupted `probe extract`" in r.output
        r = _run("verify", tiny_store_copy, *REPAIR)
        assert r.exit_code == 0 and "removed" in r.output and not left.exists(), r.output
    finally:
        sleeper.kill()
        sleeper.wait()
    assert _files(tiny_store_copy) == _files(tiny_store)


# ---- repair restores what the provenance records ---------------------------------------------------


@pytest.mark.slow
def test_edited_array_dtype_is_restored_from_the_provenance(tiny_store_copy, tiny_store):
    meta = tiny_store_copy / GROUP / "image_emb" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["data_type"] = "float32"
    meta.write_text(json.dumps(doc))
    r = _run("verify", tiny_store_copy)
    _one_line_error(r)
    assert "image_emb zarr.json does not match the run's layout (data_type float32, provenance says float16)" in (
        r.output
    ), r.output
    _repaired_byte_identical(tiny_store_copy, tiny_store)
    (run,) = EmbeddingStore(tiny_store_copy).runs()
    assert run.group["image_emb"].dtype == np.float16


@pytest.mark.slow
@pytest.mark.parametrize(("field", "value"), [("weights_hash", "f" * 64), ("dtype", "float32")])
def test_provenance_edited_with_its_digest_recomputed_is_restored_from_its_copy(
    field, value, tiny_store_copy, tiny_store
):
    """Group zarr.json and its copy in done/zarr.json both pass their digests but disagree: the
    copy that matches the arrays and the reloaded model and dataset wins."""
    path = tiny_store_copy / GROUP / "zarr.json"
    doc = json.loads(path.read_text())
    prov = {**doc["attributes"]["provenance"], field: value}
    doc["attributes"].update(provenance=prov, provenance_sha256=digest(prov))
    path.write_text(json.dumps(doc, indent=2))
    r = _run("verify", tiny_store_copy)
    _one_line_error(r)
    assert "the copy of the provenance differs" in r.output, r.output
    out = _repaired_byte_identical(tiny_store_copy, tiny_store)
    assert f"restored from its copy in done/zarr.json ({field})" in out, out


def test_both_provenance_copies_forged_repair_says_what_and_how(tiny_store_copy):
    (run,) = EmbeddingStore(tiny_store_copy).runs()
    forge_provenance(run, weights_hash="f" * 64)
    (tiny_store_copy / GROUP / "image_emb/c/1/0").unlink()
    r = _run("verify", tiny_store_copy, *REPAIR)
    _one_line_error(r)
    assert "not repaired:" in r.output and "nothing was extracted" in r.output, r.output
    assert "differs from the run's: weights_hash: the run records 'ffff" in r.output, r.output
    assert f"probe extract --store {tiny_store_copy} --model {TINY}" in r.output and "--overwrite" in r.output
    assert "Use another --store" not in r.output, "the extract advice is not the repair advice"
    assert not (tiny_store_copy / GROUP / "image_emb/c/1/0").exists(), "nothing was written with the wrong model"


# ---- nothing lost: kills during a repair and in the middle of a write --------------------------

# A real `probe` process that pauses once a file matching PAUSE is written (MID=1: once its
# temporary `.partial` file is written, before Zarr renames it into place), then waits to be killed.
CHILD = textwrap.dedent(
    """
    import contextlib, os, re, sys, time, uuid
    import zarr.storage
    import zarr.storage._local as local

    mark, pattern = os.environ["MARK"], re.compile(os.environ["PAUSE"])

    def pause():
        open(mark, "w").close()
        time.sleep(600)

    if os.environ.get("MID") == "1":
        original_write = local._atomic_write

        @contextlib.contextmanager
        def atomic_write(path, mode, exclusive=False):
            if not pattern.search(path.as_posix()):
                with original_write(path, mode, exclusive) as f:
                    yield f
                return
            with path.with_suffix(f".{uuid.uuid4().hex}.partial").open(mode) as f:
                yield f
            pause()

        local._atomic_write = atomic_write
    else:
        original_set = zarr.storage.LocalStore.set

        async def set(self, key, value, *args, **kwargs):
            await original_set(self, key, value, *args, **kwargs)
            if pattern.search(f"{self.root}/{key}"):
                pause()

        zarr.storage.LocalStore.set = set
    from mubench_probe.cli import main

    sys.argv = ["probe", *sys.argv[1:]]
    main()
    """
)


def _kill_at(tmp_path: Path, args: tuple, pause: str, mid: bool = False) -> None:
    mark = tmp_path / f"mark-{time.monotonic_ns()}"
    env = {**os.environ, "MARK": str(mark), "PAUSE": pause, "MID": "1" if mid else "0"}
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


def _status(store: Path) -> dict:
    r = _run("status", store, "--json")
    assert r.exit_code == 0, r.output
    (run,) = json.loads(r.output)["runs"]
    return run


@pytest.mark.faults
def test_sigkill_during_repair_then_repair_again_restores_the_run(tiny_store_copy, tiny_store, tmp_path):
    for i in (1, 3):
        (tiny_store_copy / GROUP / f"image_emb/c/{i}/0").unlink()
    # killed once the repair has cleared both damaged chunks' done flags, before re-extracting them
    _kill_at(tmp_path, ("verify", tiny_store_copy, *REPAIR), rf"{GROUP}/done/c/3$")
    status = _status(tiny_store_copy)
    assert status["chunks_done"] == 2 and status["status"] == "damaged" and status["interrupted_repair"] == [1, 3]
    r = _run("verify", tiny_store_copy)
    _one_line_error(r)
    for i in (1, 3):
        assert f"done chunk {i} was cleared by an interrupted repair" in r.output, r.output
    line = _one_line_error(_run("evaluate", tiny_store_copy, "--out", tmp_path / "res", *EVALUATE))
    assert "interrupted repair" in line, line
    r = _run("verify", tiny_store_copy, *REPAIR)
    assert r.exit_code == 0 and "repaired:" in r.output, r.output
    assert _status(tiny_store_copy)["status"] == "complete"
    assert _files(tiny_store_copy) == _files(tiny_store)


@pytest.mark.faults
def test_partial_file_of_a_write_killed_midway_is_reported_and_removed(tmp_path, tiny_store):
    store = tmp_path / "killed.zarr"
    _kill_at(tmp_path, (*EXTRACT, "--store", store), rf"{GROUP}/image_emb/c/2/0$", mid=True)
    (partial,) = (store / GROUP / "image_emb/c/2").glob("0.*.partial")
    r = _run("verify", store)
    _one_line_error(r)
    assert f"image_emb/c/2/{partial.name} is left over from an interrupted write" in r.output, r.output
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    r = _run(*EXTRACT, "--store", store)  # the same command resumes and removes it
    assert r.exit_code == 0 and "repaired:" in r.output and partial.name in r.output, r.output
    assert _files(store, timestamps=False) == _files(tiny_store, timestamps=False)
    r = _run("verify", copy, *REPAIR)  # so does verify --repair
    assert r.exit_code == 0 and partial.name in r.output, r.output
    assert _files(copy, timestamps=False) == _files(tiny_store, timestamps=False)


# ---- compatibility ---------------------------------------------------------------------------------


def _as_written_before_digests(store: Path) -> None:
    """Make a run look as the previous format wrote it: no chunk digests, no metadata digests."""
    (run,) = EmbeddingStore(store).runs()
    prov = {k: v for k, v in run.provenance.items() if k not in ("meta_sha256", "digests")}
    attrs = {k: v for k, v in run.group.attrs.asdict().items() if k != "captions_sha256"}
    attrs.update(provenance=prov, provenance_sha256=digest(prov))
    run.group.attrs.put(attrs)
    backup = {k: v for k, v in run.group["done"].attrs["backup"].items() if k != "captions_sha256"}
    run.group["done"].attrs["backup"] = {**backup, "provenance": prov, "provenance_sha256": digest(prov)}
    shutil.rmtree(store / GROUP / "chunk_digest", ignore_errors=True)


def test_store_written_before_digests_opens_and_verifies_with_a_note(tiny_store_copy, tmp_path):
    _as_written_before_digests(tiny_store_copy)
    r = _run("verify", tiny_store_copy)
    assert r.exit_code == 0, r.output
    assert "note:" in r.output and "written before per-chunk and metadata digests" in r.output, r.output
    (run,) = EmbeddingStore(tiny_store_copy).runs()
    assert run.complete and run.image_embeddings().shape == (450, 32) and len(run.meta()) == 450
    assert run.check(deep=True) == []
    (tiny_store_copy / GROUP / "image_emb/c/3/0").unlink()  # still repaired like before (the last, 66-row chunk)
    r = _run("verify", tiny_store_copy, *REPAIR)
    assert r.exit_code == 0 and "image_emb chunk 3.0" in r.output, r.output
    assert not (tiny_store_copy / GROUP / "chunk_digest").exists(), "an old run keeps its format"
