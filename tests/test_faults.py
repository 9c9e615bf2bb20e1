"""Fault injection: kills, damaged files, full disks, concurrent writers and hostile inputs.

Every test damages a real store or feeds a real input, then checks that the store is either
repaired by one command or refused in one line, never silently wrong. A maintainer can rerun
this file alone: `python -m pytest -q tests/test_faults.py`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr.storage
from PIL import Image
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app
from mubench_probe.datasets import load_dataset
from mubench_probe.errors import ImageDecodeError, ProvenanceMismatchError, StoreDamageError
from mubench_probe.imaging import DEFAULT_MAX_PIXELS, get_policy, load_rgb
from mubench_probe.store import CLAIMS, CREATING, EmbeddingStore, RunLayout
from mubench_probe.store import commit as store_module

from .conftest import TINY, forge_provenance

GROUP = "mubench-tiny-vit_random/sample/test"
ROWS, CHUNK = 64, 16
EXTRACT = ("extract", "--dataset", "sample", "--model", TINY, "--chunk-rows", CHUNK, "--workers", 0, "--batch-size", 16)
EVALUATE = ("--head", "lp", "--head", "zs_caption", "--bootstrap", 20, "--shots", 1, "--fewshot-seeds", 1)


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(r) -> str:
    """The command failed with exactly one `error:` line and no traceback; returns that line."""
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    return errors[0]


def _files(store: Path, group: str = GROUP, timestamps: bool = True) -> dict[str, bytes]:
    """Every file of a store but the claims; without the zarr.json files that hold creation times
    when `timestamps` is False (to compare two independent extractions)."""
    stamped = {"zarr.json", f"{group}/zarr.json", f"{group}/done/zarr.json"}
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if p.is_file() and not rel.startswith(f"{CLAIMS}/") and (timestamps or rel not in stamped):
            out[rel] = p.read_bytes()
    return out


def _extract(store: Path, rows: int = ROWS, **kw):
    return api.extract(
        TINY, load_dataset("sample", limit=rows), store=store, num_workers=0, chunk_rows=CHUNK, batch_size=16, **kw
    )


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> Path:
    """64 sample rows in 4 chunks of 16 (read-only; copy it to damage it)."""
    path = tmp_path_factory.mktemp("faults") / "small.zarr"
    _extract(path)
    return path


@pytest.fixture
def damaged(small_store, tmp_path) -> Path:
    dst = tmp_path / "s.zarr"
    shutil.copytree(small_store, dst)
    return dst


# ---- damaged files: named by verify, refused by readers, repaired by one command ---------------


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete(p: Path) -> None:
    p.unlink()


def _edit_provenance(p: Path) -> None:
    doc = json.loads(p.read_text())
    doc["attributes"]["provenance"].update(model_spec="ViT-B-32:openai", weights_hash="0" * 64)
    p.write_text(json.dumps(doc, indent=2))


def _edit_texts(p: Path) -> None:
    """Rewrite one text through Zarr itself: valid checksums, so only the texts digest can tell."""
    arr = zarr.open_array(p.parent.parent, mode="r+")
    arr[0] = "a microscopy image of an edited class."


def _edit_layout(p: Path) -> None:
    doc = json.loads(p.read_text())
    doc["chunk_grid"]["configuration"]["chunk_shape"][0] = 8
    p.write_text(json.dumps(doc, indent=2))


# (file, damage, what verify says, whether evaluate and search read it)
DAMAGE = {
    "image_emb chunk deleted": ("image_emb/c/1/0", _delete, "image_emb chunk 1.0 (file image_emb/c/1/0) is missing", 1),
    "image_emb chunk flipped": ("image_emb/c/2/0", _flip, "image_emb chunk 2.0 (file image_emb/c/2/0) is damaged", 1),
    "image_emb chunk truncated": (
        "image_emb/c/0/0",
        _truncate,
        "image_emb chunk 0.0 (file image_emb/c/0/0) is damaged",
        1,
    ),
    "failure chunk deleted": ("failure/c/3", _delete, "failure chunk 3 (file failure/c/3) is missing", 1),
    "done flag deleted": ("done/c/2", _delete, "done chunk 2 (file done/c/2) is missing", 1),
    "done flag flipped": ("done/c/1", _flip, "done chunk 1 (file done/c/1) is damaged", 1),
    "array zarr.json truncated": ("image_emb/zarr.json", _truncate, "image_emb zarr.json is unreadable", 1),
    "done zarr.json truncated": ("done/zarr.json", _truncate, "done zarr.json is unreadable", 1),
    "group zarr.json truncated": ("zarr.json", _truncate, "test zarr.json is unreadable", 1),
    "provenance edited": ("zarr.json", _edit_provenance, "provenance does not match its sha256 digest", 1),
    "texts flipped": ("texts/c/0", _flip, "texts chunk 0 (file texts/c/0) is damaged", 1),
    "texts edited": ("texts/c/0", _edit_texts, "texts does not match the run's texts digest", 1),
    "array layout edited": (
        "image_emb/zarr.json",
        _edit_layout,
        "image_emb zarr.json does not match the run's layout",
        1,
    ),
    "text_emb deleted": ("text_emb/c/0/0", _delete, "text_emb chunk 0.0 (file text_emb/c/0/0) is missing", 1),
    "meta column deleted": ("meta/label_name/c/0", _delete, "meta/label_name chunk 0 (file meta/label_name/c/0)", 1),
    "meta zarr.json truncated": ("meta/zarr.json", _truncate, "meta zarr.json is unreadable", 1),
    "captions deleted": ("captions/modality/options/c/0/0", _delete, "captions/modality/options chunk 0.0", 1),
    "row_index flipped": ("row_index/c/0", _flip, "row_index chunk 0 (file row_index/c/0) is damaged", 0),
    "model group zarr.json truncated": (
        "../../zarr.json",
        _truncate,
        "mubench-tiny-vit_random zarr.json is missing",
        0,
    ),
}


QUICK_DAMAGE = ("image_emb chunk flipped",)  # the rest: slow


@pytest.mark.parametrize("case", [c if c in QUICK_DAMAGE else pytest.param(c, marks=pytest.mark.slow) for c in DAMAGE])
def test_damage_is_named_refused_and_repaired_byte_identical(case, damaged, small_store, tmp_path):
    rel, damage, needle, read_by_heads = DAMAGE[case]
    damage((damaged / GROUP / rel).resolve())
    r = _run("verify", damaged)
    line = _one_line_error(r)
    assert needle in r.output and f"probe verify --repair {damaged}" in line, r.output
    if read_by_heads:
        for args in (
            ("evaluate", damaged, "--out", tmp_path / "res", *EVALUATE),
            ("search", damaged, "--model", TINY, "--row", 0),
        ):
            line = _one_line_error(_run(*args))
            assert str(damaged) in line and "repair" in line, line
        assert not (tmp_path / "res" / "results.parquet").exists(), "no result was computed from a damaged run"
    r = _run("verify", damaged, "--repair", "--workers", 0, "--device", "cpu")
    assert r.exit_code == 0 and "repaired:" in r.output, r.output
    assert _files(damaged) == _files(small_store), "the repaired store equals the undamaged one, byte for byte"
    assert _run("verify", damaged).exit_code == 0


def test_rerunning_extract_repairs_exactly_the_damaged_chunks(damaged, small_store):
    (damaged / GROUP / "image_emb/c/1/0").unlink()
    _flip(damaged / GROUP / "failure/c/3")
    r = _run(*EXTRACT, "--limit", ROWS, "--store", damaged)
    assert r.exit_code == 0, r.output
    assert "2 chunks written, 2 already done" in r.output and r.output.count("repaired:") == 2, r.output
    assert _files(damaged) == _files(small_store)


@pytest.mark.slow
def test_damaged_zarr_json_is_one_line_for_every_command(damaged, tmp_path):
    """Truncated group- and array-level zarr.json: info, verify, evaluate, search refuse in one line
    naming the file; extract repairs it (the same arguments are the repair command)."""
    for rel in ("zarr.json", "text_emb/zarr.json"):
        work = tmp_path / rel.replace("/", "_")
        shutil.copytree(damaged, work)
        _truncate(work / GROUP / rel)
        for args in (
            ("info", work),
            ("verify", work),
            ("evaluate", work, "--out", tmp_path / "res", *EVALUATE),
            ("search", work, "--model", TINY, "--text", "a platelet"),
        ):
            r = _run(*args)
            line = _one_line_error(r)
            assert "zarr.json" in line or ("damaged run" in line and "zarr.json is unreadable" in r.output), (
                args,
                line,
            )
        r = _run(*EXTRACT, "--limit", ROWS, "--store", work)
        assert r.exit_code == 0 and "repaired:" in r.output and "zarr.json" in r.output, r.output
        assert _run("verify", work).exit_code == 0


def test_damaged_store_root_is_refused_then_repaired(damaged, small_store, tmp_path):
    _truncate(damaged / "zarr.json")
    for args in (
        ("info", damaged),
        ("verify", damaged),
        ("evaluate", damaged, "--out", tmp_path / "res"),
        ("search", damaged, "--model", TINY, "--row", 0),
        (*EXTRACT, "--limit", ROWS, "--store", damaged),
    ):
        line = _one_line_error(_run(*args))
        assert f"{damaged}/zarr.json is unreadable" in line and "probe verify --repair" in line, line
    assert _run("verify", damaged, "--repair", "--workers", 0).exit_code == 0
    assert {k: v for k, v in _files(damaged).items() if k != "zarr.json"} == {
        k: v for k, v in _files(small_store).items() if k != "zarr.json"
    }


def test_repair_without_the_model_names_the_extract_command(damaged):
    (run,) = EmbeddingStore(damaged).runs()
    forge_provenance(run, model_spec="mubench-tiny-vit:/no/such/weights.pt")
    (damaged / GROUP / "image_emb/c/1/0").unlink()
    r = _run("verify", damaged, "--repair", "--workers", 0)
    line = _one_line_error(r)
    assert "problem(s) remain" in line
    want = (
        f"run: probe extract --store {damaged} --model mubench-tiny-vit:/no/such/weights.pt --dataset sample "
        f"--split test --limit {ROWS} --intensity percentile --dtype float16 --chunk-rows {CHUNK}"
    )
    assert "not repaired:" in r.output and want in r.output, r.output


def test_repair_refuses_a_model_that_is_not_the_runs(damaged):
    (run,) = EmbeddingStore(damaged).runs()
    forge_provenance(run, weights_hash="f" * 64)  # as if made by other weights under the same spec
    (damaged / GROUP / "image_emb/c/1/0").unlink()
    r = _run("verify", damaged, "--repair", "--workers", 0)
    _one_line_error(r)
    assert "differs from the run's" in r.output and "weights_hash" in r.output, r.output
    assert not (damaged / GROUP / "image_emb/c/1/0").exists(), "nothing was written with the wrong model"


@pytest.mark.slow
def test_features_chunk_loss_is_repaired(tmp_path):
    ref, work = tmp_path / "ref.zarr", tmp_path / "work.zarr"
    _extract(ref, rows=32, features=True)
    shutil.copytree(ref, work)
    (work / GROUP / "features/c/1/0").unlink()
    r = _run("verify", work)
    _one_line_error(r)
    assert "features chunk 1.0 (file features/c/1/0) is missing although its done flag is set" in r.output
    assert _run("verify", work, "--repair", "--workers", 0).exit_code == 0
    assert _files(work) == _files(ref)


def test_a_store_of_another_format_is_refused_in_one_line(damaged):
    root = json.loads((damaged / "zarr.json").read_text())
    root["attributes"]["mubench_probe_store"] = 1
    (damaged / "zarr.json").write_text(json.dumps(root))
    line = _one_line_error(_run("info", damaged))
    assert "another version of probe (store format 1; this probe reads format 2)" in line, line


@pytest.mark.slow
def test_provenance_and_its_copy_both_lost(damaged):
    _truncate(damaged / GROUP / "zarr.json")
    _truncate(damaged / GROUP / "done" / "zarr.json")
    r = _run("verify", damaged, "--repair", "--workers", 0)
    _one_line_error(r)
    assert "nothing says how it was made" in r.output, r.output
    line = _one_line_error(_run(*EXTRACT, "--limit", ROWS, "--store", damaged))
    assert "its copy in done/zarr.json" in line and "--overwrite" in line
    r = _run(*EXTRACT, "--limit", ROWS, "--store", damaged, "--overwrite")
    assert r.exit_code == 0 and "4 chunks written" in r.output, r.output
    assert _run("verify", damaged).exit_code == 0


def test_damaged_chunk_during_evaluate_and_compare_is_one_line(damaged, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # compare caches its evaluation in ./results
    _flip(damaged / GROUP / "image_emb/c/3/0")  # present, so only the read finds it
    for args in (
        ("evaluate", damaged, "--out", tmp_path / "res", *EVALUATE),
        ("compare", damaged),
    ):
        line = _one_line_error(_run(*args))
        assert "image_emb chunk 3.0 (file image_emb/c/3/0) is damaged" in line, line


# ---- SIGKILL at chosen points, then the same command resumes -------------------------------------

# A real `probe` process that pauses right after writing a file matching PROBE_FAULT_PAUSE (or after
# saving results, with PROBE_FAULT_RESULTS), signals it with PROBE_FAULT_MARK, and waits to be killed.
CHILD = textwrap.dedent(
    """
    import os, re, sys, time
    import zarr.storage
    from mubench_probe import results

    mark = os.environ["PROBE_FAULT_MARK"]

    def pause():
        open(mark, "w").close()
        time.sleep(600)

    if os.environ.get("PROBE_FAULT_PAUSE"):
        pattern = re.compile(os.environ["PROBE_FAULT_PAUSE"])
        original = zarr.storage.LocalStore.set

        async def set(self, key, value, *args, **kwargs):
            await original(self, key, value, *args, **kwargs)
            if pattern.search(f"{self.root}/{key}"):
                pause()

        zarr.storage.LocalStore.set = set
    if os.environ.get("PROBE_FAULT_RESULTS"):
        save = results.ResultsDir.save

        def saved(self, *args, **kwargs):
            save(self, *args, **kwargs)
            pause()

        results.ResultsDir.save = saved
    from mubench_probe.cli import main

    sys.argv = ["probe", *sys.argv[1:]]
    main()
    """
)


def _kill_at(tmp_path: Path, args: tuple, **fault: str) -> None:
    """Run `probe ARGS` in a real process and SIGKILL it once it reaches the fault point."""
    mark = tmp_path / f"mark-{time.monotonic_ns()}"
    env = {**os.environ, "PROBE_FAULT_MARK": str(mark), **fault}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 180
    while not mark.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"never reached the fault point {fault}: {proc.communicate()[0].decode()[-2000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.faults
def test_sigkill_during_creation_texts_and_chunks_resumes_byte_identical(tmp_path, small_store):
    store = tmp_path / "killed.zarr"
    args = (*EXTRACT, "--limit", ROWS, "--store", store)
    # 1. mid-creation: the run is not visible; verify flags the half-created run
    _kill_at(tmp_path, args, PROBE_FAULT_PAUSE=rf"/{CREATING}/[^/]+/texts/zarr\.json$")
    assert EmbeddingStore(store).runs() == []
    r = _run("verify", store)
    _one_line_error(r)
    assert "half-created run left by an interrupted `probe extract`" in r.output, r.output
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    r = _run("verify", copy, "--repair")
    assert r.exit_code == 0 and "removed" in r.output and not any((copy / CREATING).iterdir()), r.output
    # 2. after the text embeddings were written, before the flag that says so
    _kill_at(tmp_path, args, PROBE_FAULT_PAUSE=rf"{GROUP}/text_emb/c/0/0$")
    assert not (store / CREATING).exists() or not any((store / CREATING).iterdir()), "the leftover was cleaned up"
    (run,) = EmbeddingStore(store).runs()
    assert not run.texts_done and run.done_mask().sum() == 0
    # 3. mid-chunk: image_emb of chunk 2 written, its done flag not (its claim is left behind by a dead pid)
    _kill_at(tmp_path, args, PROBE_FAULT_PAUSE=rf"{GROUP}/image_emb/c/2/0$")
    (run,) = EmbeddingStore(store).runs()
    assert run.done_mask().tolist() == [True, True, False, False] and run.texts_done
    assert (store / CLAIMS / GROUP / "chunk-2.claim").exists()
    assert _run("verify", store).exit_code == 0, "an interrupted run is incomplete, not damaged"
    r = _run(*args)
    assert r.exit_code == 0 and "2 chunks written, 2 already done, 0 texts encoded" in r.output, r.output
    assert _files(store, timestamps=False) == _files(small_store, timestamps=False)


@pytest.mark.faults
def test_killed_evaluate_resumes_to_identical_results(small_store, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    _kill_at(tmp_path, ("evaluate", small_store, "--out", killed, *EVALUATE), PROBE_FAULT_RESULTS="1")
    first = pd.read_parquet(killed / "results.parquet")
    assert first["unit"].nunique() == 1, "killed after the first of two units"
    r = _run("evaluate", small_store, "--out", killed, *EVALUATE)
    assert r.exit_code == 0 and "1 units computed, 1 already in" in r.output, r.output
    assert _run("evaluate", small_store, "--out", whole, *EVALUATE).exit_code == 0
    key = ["unit", "task", "head", "metric", "stratum", "seed"]
    got, want = (
        pd.read_parquet(d / "results.parquet").sort_values(key).reset_index(drop=True) for d in (killed, whole)
    )
    pd.testing.assert_frame_equal(got, want)


# ---- a full disk -------------------------------------------------------------------------------


class DiskFull:
    """Zarr writes fail with ENOSPC once `budget` bytes were written or `writes` writes were made."""

    def __init__(self, monkeypatch, budget: int | None = None, writes: int | None = None) -> None:
        self.bytes, self.calls, self.keys = 0, 0, []
        original = zarr.storage.LocalStore.set

        async def set(store, key, value, *args, **kwargs):
            if (writes is not None and self.calls >= writes) or (
                budget is not None and self.bytes + len(value) > budget
            ):
                raise OSError(errno.ENOSPC, "No space left on device", key)
            self.calls, self.bytes = self.calls + 1, self.bytes + len(value)
            self.keys.append((key, self.bytes))
            await original(store, key, value, *args, **kwargs)

        monkeypatch.setattr(zarr.storage.LocalStore, "set", set)


def _synthetic_run_args():
    meta = pd.DataFrame({"label_name": list("abababab"), "dataset": "synth", "size": np.arange(8.0)})
    captions = {"modality": (np.array([[0, 1]] * 8), np.array([0, 1] * 4))}
    return (
        "synthetic_random/synth/test",
        {"model_spec": "synthetic:random", "backend": "test", "weights_hash": "0", "has_text": True},
        RunLayout(8, 4, 3, "float32"),
        meta,
        ["an a", "a b"],
        captions,
        {"templates": ["a {}"], "tasks": {"fine/synth": ["a", "b"]}},
    )


@pytest.mark.slow
def test_run_creation_interrupted_at_every_write_is_resumed(tmp_path, monkeypatch):
    args = _synthetic_run_args()
    ref = EmbeddingStore(tmp_path / "ref.zarr", create=True)
    with monkeypatch.context() as m:
        counter = DiskFull(m)
        ref.prepare_run(*args)
    writes = counter.calls
    assert writes > 20
    for n in range(writes):
        st = EmbeddingStore(tmp_path / f"s{n}.zarr", create=True)
        with monkeypatch.context() as m:
            DiskFull(m, writes=n)
            with pytest.raises(OSError, match="No space left"):
                st.prepare_run(*args)
        assert st.runs() == [], f"write {n}: a run appears whole or not at all"
        assert {d.fix for d in st.check()} <= {"creating"}, "at most a half-created run, flagged by verify"
        run = st.prepare_run(*args)  # space freed: the same call again
        assert run.check(deep=True) == [] and st.check() == [], n
        assert _files(st.path, args[0], timestamps=False) == _files(ref.path, args[0], timestamps=False), n


@pytest.mark.slow
def test_disk_full_during_extraction_is_one_line_and_resumes_byte_identical(small_store, tmp_path, monkeypatch):
    with monkeypatch.context() as m:  # where the bytes go, in order
        counter = DiskFull(m)
        _extract(tmp_path / "measure.zarr")
    targets = ("texts/zarr.json", f"{GROUP}/text_emb/c/0/0", f"{GROUP}/image_emb/c/2/0", f"{GROUP}/done/c/3")
    for target in targets:
        store = tmp_path / f"full-{target.replace('/', '_')}.zarr"
        budget = next(total for key, total in counter.keys if key.endswith(target)) - 1  # that write fails
        with monkeypatch.context() as m:
            DiskFull(m, budget=budget)
            line = _one_line_error(_run(*EXTRACT, "--limit", ROWS, "--store", store))
        assert "No space left on device" in line, line
        r = _run(*EXTRACT, "--limit", ROWS, "--store", store)
        assert r.exit_code == 0, r.output
        assert _files(store, timestamps=False) == _files(small_store, timestamps=False), target


# ---- concurrent writers ------------------------------------------------------------------------

CONCURRENT_ROWS = 160  # 10 chunks of 16


def _writer(store: Path) -> subprocess.Popen:
    args = (*EXTRACT, "--limit", CONCURRENT_ROWS, "--store", store)
    return subprocess.Popen(
        [sys.executable, "-m", "mubench_probe.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(condition, what: str, procs=(), timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
            pytest.fail(f"timed out or a writer failed waiting for {what}")
        time.sleep(0.01)


def _written(store: Path) -> list[tuple[str, int]]:
    log = store / CLAIMS / GROUP / "written.log"
    return [(ln.split()[0], int(ln.split()[2])) for ln in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def concurrent_reference(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("conc") / "one.zarr"
    _extract(path, rows=CONCURRENT_ROWS)
    return path


def _claim_owner(claims: Path) -> int | None:
    """The pid holding some chunk claim, if any."""
    owners = [_claim_owner_of(p) for p in claims.glob("chunk-*.claim")]
    return next((pid for pid in owners if pid is not None), None)


@pytest.mark.faults
def test_two_writers_split_the_chunks_and_wait_for_each_other(tmp_path, concurrent_reference):
    """Two real `probe extract` processes started together on an empty store: one creates the run,
    the other joins it. The first to hold a chunk is then frozen (alive, holding its claim): the
    other computes every other chunk, says it waits for the frozen one, and both end cleanly."""
    store = tmp_path / "two.zarr"
    procs = {p.pid: p for p in (_writer(store), _writer(store))}
    claims = store / CLAIMS / GROUP
    _wait_for(lambda: _claim_owner(claims) is not None, "a first claim", procs.values())
    a = procs[_claim_owner(claims) or -1]
    os.kill(a.pid, signal.SIGSTOP)  # A holds a chunk and is alive, but makes no progress
    try:
        (b,) = (p for pid, p in procs.items() if pid != a.pid)
        held_by_a = {p.name.removesuffix(".claim") for p in claims.glob("chunk-*.claim") if _claim_owner_of(p) == a.pid}
        everything = {f"chunk-{i}" for i in range(CONCURRENT_ROWS // CHUNK)}
        _wait_for(lambda: {k for k, _ in _written(store)} | held_by_a >= everything, "B to finish the rest", [b])
        time.sleep(1.0)  # B now waits for A's chunk (and says so)
        assert held_by_a and b.poll() is None, "B waits for the chunk A holds"
    finally:
        os.kill(a.pid, signal.SIGCONT)
    out_a, out_b = a.communicate(timeout=180)[0], b.communicate(timeout=180)[0]
    assert a.returncode == 0 and b.returncode == 0, out_a + out_b
    first = min(held_by_a, key=lambda k: int(k[6:]))[6:]
    assert f"waiting for other writers: chunk(s) {first}" in out_b and f"pid {a.pid}" in out_b, out_b
    log = _written(store)
    assert sorted(k for k, _ in log) == sorted([*everything, "texts"]), "every chunk was computed exactly once"
    assert {pid for _, pid in log} == {a.pid, b.pid}, "both writers did part of the work"
    assert "written by another writer" in out_a + out_b
    assert not any((store / CREATING).iterdir())
    assert _files(store, timestamps=False) == _files(concurrent_reference, timestamps=False)


def _claim_owner_of(path: Path) -> int | None:
    try:  # a claim may be released or taken over while we read it
        return int(json.loads(path.read_text())["pid"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def test_simultaneous_creation_in_two_threads_joins_one_run(tmp_path, monkeypatch):
    """Both builders finish their scratch copy before either renames it into place."""
    args = _synthetic_run_args()
    barrier = threading.Barrier(2, timeout=30)
    build = store_module.build_run

    def build_then_wait(*a, **k):
        build(*a, **k)
        barrier.wait()

    monkeypatch.setattr(store_module, "build_run", build_then_wait)
    runs, errors = [], []

    def create() -> None:
        try:
            runs.append(EmbeddingStore(tmp_path / "s.zarr", create=True).prepare_run(*args))
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(runs) == 2, errors
    st = EmbeddingStore(tmp_path / "s.zarr")
    (run,) = st.runs()
    assert run.check(deep=True) == [] and not any((st.path / CREATING).iterdir())
    assert runs[0].provenance == runs[1].provenance == run.provenance, "the loser joined the winner's run"


def test_claims_of_dead_writers_are_taken_over_and_live_ones_respected(tmp_path):
    from mubench_probe.claims import HOST, LocalChunkClaims

    folder = tmp_path / "claims"
    mine, other = LocalChunkClaims(folder), LocalChunkClaims(folder, timeout=1.0)
    assert mine.try_claim(0) and not other.try_claim(0) and other.owners()[0].pid == os.getpid()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / "chunk-1.claim").write_text(json.dumps({"host": HOST, "pid": int(dead.stdout), "token": "x"}))
    (folder / "chunk-2.claim").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))
    assert set(other.stale()) == {1}, "same host, dead pid: stale at once; another host: not before the timeout"
    assert other.try_claim(1) and not other.try_claim(2)
    old = time.time() - 5
    os.utime(folder / "chunk-2.claim", (old, old))
    assert other.try_claim(2), "another host's claim without heartbeat for longer than the timeout"
    other.close()
    mine.close()
    assert not list(folder.glob("*.claim")), "closing releases every claim"


@pytest.mark.slow
def test_a_live_writer_on_another_host_is_named_then_taken_over_when_silent(damaged, small_store):
    (run,) = EmbeddingStore(damaged).runs()
    run.clear_done(3)
    claim = damaged / CLAIMS / GROUP / "chunk-3.claim"
    claim.write_text(json.dumps({"host": "other-machine", "pid": 4242, "token": "t"}))
    notes: list[str] = []
    t0 = time.perf_counter()
    report = _extract(damaged, claim_timeout=1.5, notify=notes.append)
    assert report.chunks_written == 1 and time.perf_counter() - t0 >= 1.0, "waited for the heartbeat to age"
    assert len(notes) == 1 and "chunk(s) 3 held by live writer pid 4242 on host other-machine" in notes[0], notes
    assert "silent for 2 s is taken over (--claim-timeout)" in notes[0], notes
    assert _files(damaged) == _files(small_store)


# ---- hostile inputs ----------------------------------------------------------------------------


def _tiff_bomb() -> bytes:
    """A real zlib-compressed 20000 x 20000 uint16 TIFF of zeros (800 MB decoded) in under 1 MB."""
    tile = zlib.compress(np.zeros((2048, 2048), np.uint16).tobytes(), 9)
    n = -(-20000 // 2048)
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, (tile for _ in range(n * n)), shape=(20000, 20000), dtype=np.uint16, tile=(2048, 2048), compression="zlib"
    )
    return buf.getvalue()


def test_tiff_bomb_is_refused_before_decoding_in_little_memory(tmp_path):
    bomb = tmp_path / "bomb.tif"
    bomb.write_bytes(_tiff_bomb())
    assert bomb.stat().st_size < 1_000_000
    code = textwrap.dedent(
        """
        import resource, sys, time, types
        package = types.ModuleType("mubench_probe")  # only imaging and errors: no torch in this process
        package.__path__ = [sys.argv[2]]
        sys.modules["mubench_probe"] = package
        from mubench_probe.errors import ImageDecodeError
        from mubench_probe.imaging import get_policy, load_rgb
        data = open(sys.argv[1], "rb").read()
        before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        try:
            load_rgb(data, get_policy("percentile"))
            print("decoded")
        except ImageDecodeError as exc:
            print("refused:", exc)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, time.perf_counter() - t0)
        """
    )
    package = Path(api.__file__).parent
    out = subprocess.run([sys.executable, "-c", code, str(bomb), package], capture_output=True, text=True, timeout=120)
    message, numbers = out.stdout.strip().splitlines()
    growth_kb, seconds = float(numbers.split()[0]), float(numbers.split()[1])
    assert message.startswith("refused: image of 20000 x 20000 = 400,000,000 pixels is over the limit"), out
    assert growth_kb < 50_000 and seconds < 5, (growth_kb, seconds)


def test_png_bomb_and_a_lower_limit_are_refused(real_crops):
    buf = io.BytesIO()
    Image.new("1", (20000, 12000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1_000_000
    with pytest.raises(ImageDecodeError, match="240,000,000 pixels is over the limit of 89,478,485"):
        load_rgb(buf.getvalue(), get_policy("percentile"))
    with pytest.raises(ImageDecodeError, match="over the limit of 100"):
        load_rgb(real_crops[0], get_policy("percentile"), max_pixels=100)


@pytest.mark.slow
def test_bomb_row_fails_with_its_reason_csv_paths_point_anywhere(tmp_path, real_crops):
    data = tmp_path / "elsewhere"
    data.mkdir()
    for i, crop in enumerate(real_crops[:3]):
        (data / f"img{i}.jpg").write_bytes(crop)
    (data / "bomb.tif").write_bytes(_tiff_bomb())
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    csv = manifests / "cells.csv"
    rows = [str(data / "img0.jpg"), "../elsewhere/img1.jpg", str(data / "bomb.tif"), "../elsewhere/img2.jpg"]
    csv.write_text("path,label\n" + "".join(f"{p},{'ab'[i % 2]}\n" for i, p in enumerate(rows)))
    t0 = time.perf_counter()
    report = api.extract(TINY, str(csv), store=tmp_path / "s.zarr", num_workers=1, batch_size=2)
    assert time.perf_counter() - t0 < 60
    assert list(report.failures) == [2] and "20000 x 20000 = 400,000,000 pixels" in report.failures[2]
    (run,) = EmbeddingStore(tmp_path / "s.zarr").runs()
    prov = run.provenance
    assert prov["max_pixels"] == DEFAULT_MAX_PIXELS
    assert prov["dataset_manifest_sha256"] == hashlib.sha256(csv.read_bytes()).hexdigest()
    assert run.valid_mask().tolist() == [True, True, False, True]
    # the failed row is refused as a query, with its reason
    line = _one_line_error(_run("search", tmp_path / "s.zarr", "--model", TINY, "--row", 2))
    assert "row 2 has no embedding: ImageDecodeError: image of 20000 x 20000" in line
    # another limit is another extraction: refused in the same run, used in another store
    with pytest.raises(ProvenanceMismatchError, match="max_pixels"):
        api.extract(TINY, str(csv), store=tmp_path / "s.zarr", num_workers=0, max_pixels=1000)
    r = _run("extract", "--dataset", csv, "--model", TINY, "--store", tmp_path / "low.zarr", "--max-pixels", 1000)
    assert r.exit_code == 0 and r.output.count("over the limit of 1,000") == 4, r.output


def test_bad_queries_and_filters_are_errors_listing_what_exists(small_store):
    line = _one_line_error(_run("evaluate", small_store, "--task", "nope/*"))
    assert "no task matches ['nope/*']" in line and "fine/bccd" in line and "mubench" in line
    line = _one_line_error(_run("evaluate", small_store, "--model", TINY, "--model", "nope"))
    assert "no extracted model matches ['nope']" in line and TINY in line
    line = _one_line_error(_run("evaluate", small_store, "--head", "bogus"))
    assert "unknown head" in line
    line = _one_line_error(_run("search", small_store, "--model", TINY, "--text", " "))
    assert "--text is empty" in line


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ("NoSuchArch:random", "unknown open_clip architecture"),
        (
            "ViT-B-32:laion2b_s34b_b79kk",
            "unknown open_clip tag 'laion2b_s34b_b79kk' for ViT-B-32; closest: laion2b_s34b_b79k",
        ),
    ],
)
def test_failed_model_load_is_one_line_and_leaves_no_store(tmp_path, model, needle):
    store = tmp_path / "never.zarr"
    line = _one_line_error(_run("extract", "--dataset", "sample", "--limit", 4, "--model", model, "--store", store))
    assert needle in line, line
    r = _run("extract", "--dataset", "sample", "--limit", 4, "--model", model, "--store", store)
    assert "ERROR:root" not in r.output and r.output.count("\n") < 6, r.output
    assert not store.exists(), "nothing is left behind"


def test_info_status_is_derived_from_the_done_mask(damaged):
    (run,) = EmbeddingStore(damaged).runs()
    run.clear_done(3)  # as if the last chunk had never been written
    r = _run("info", damaged, "--json")
    assert r.exit_code == 0 and '"status": "incomplete: 3/4 chunks"' in r.output and '"complete": false' in r.output
    (damaged / GROUP / "done/c/1").unlink()
    r = _run("info", damaged)
    line = _one_line_error(r)
    assert "1 damaged run(s)" in line and "damaged: mubench-tiny-vit_random/sample/test/done chunk 1" in r.output, (
        r.output
    )
    with pytest.raises(StoreDamageError, match="done chunk 1"):
        EmbeddingStore(damaged).runs()[0].complete  # noqa: B018
