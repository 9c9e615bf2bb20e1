"""Bad input files: undecodable images, FIFOs, devices, sparse giants, BOMs, object-store manifests,
and loader workers that die. Each is a failed row with a stable reason, or a one-line error; never
a hang, a memory blow-up, or a stored value that differs between two runs of the same command.

Anything that could hang or eat memory on a regression runs in a subprocess with a timeout (and a
memory limit), so a regression fails this file instead of stalling the suite.
"""

from __future__ import annotations

import csv
import os
import resource
import shutil
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
from mubench_probe.config import DEFAULT_MAX_FILE_BYTES, ExtractConfig
from mubench_probe.datasets import load_dataset
from mubench_probe.datasets.base import fingerprint_strings
from mubench_probe.datasets.files import PathImageReader, join_entry
from mubench_probe.errors import DatasetUnavailableError, ProbeError, ProvenanceMismatchError, UsageError
from mubench_probe.store import EmbeddingStore

from .conftest import TINY

PACKAGE = Path(api.__file__).parent


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _files(store: Path) -> dict[str, bytes]:
    """Every file of a store but the claims and the zarr.json files that hold creation times."""
    out = {}
    for p in sorted(store.rglob("*")):
        rel = p.relative_to(store).as_posix()
        if p.is_file() and not rel.startswith(".claims/") and not rel.endswith("zarr.json"):
            out[rel] = p.read_bytes()
    return out


def _manifest(folder: Path, rows: list[tuple[str, str]], name: str = "m.csv", bom: bool = False) -> Path:
    path = folder / name
    with open(path, "w", newline="", encoding="utf-8-sig" if bom else "utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return path


# ---- stored failures are the same bytes in every run ---------------------------------------------


@pytest.mark.slow
def test_undecodable_rows_store_identical_failures_across_runs_and_resumes(tmp_path, real_crops):
    """PIL's 'cannot identify image file <_io.BytesIO object at 0x7f...>' carried a memory address
    into the store: two runs of one command stored different bytes. Reasons are now stable and
    name the file as the manifest does."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i, crop in enumerate(real_crops[:6]):
        (data / f"ok{i}.jpg").write_bytes(crop)
        rows.append((f"ok{i}.jpg", "ab"[i % 2]))
    (data / "text.png").write_bytes(b"this is not an image\n" * 20)
    (data / "trunc.jpg").write_bytes(real_crops[0][:100])
    (data / "empty.png").write_bytes(b"")
    rows[1:1] = [("text.png", "a")]
    rows[4:4] = [("trunc.jpg", "b"), ("missing.png", "a")]
    rows.append(("empty.png", "b"))
    csv_path = _manifest(data, rows)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    report = api.extract(TINY, str(csv_path), store=a, num_workers=0, chunk_rows=4, batch_size=2)
    api.extract(TINY, str(csv_path), store=b, num_workers=1, chunk_rows=4, batch_size=2)
    assert report.failures == {
        1: "ImageDecodeError: cannot decode image: cannot identify image file (file text.png)",
        4: report.failures[4],
        5: "ImageDecodeError: missing.png does not exist",
        9: "ImageDecodeError: empty image data (file empty.png)",
    }, report.failures
    assert report.failures[4].startswith("ImageDecodeError: cannot decode image: ") and report.failures[4].endswith(
        " (file trunc.jpg)"
    )
    assert not any("0x" in r or str(tmp_path) in r for r in report.failures.values()), report.failures
    assert _files(a) == _files(b), "two uninterrupted runs store the same bytes"
    (run,) = EmbeddingStore(a).runs()
    for ci in (0, 1, 2):  # resume: the chunks with failed rows computed again
        run.clear_done(ci)
    again = api.extract(TINY, str(csv_path), store=a, num_workers=1, chunk_rows=4, batch_size=2)
    assert again.chunks_written == 3 and _files(a) == _files(b), "a resume stores the same bytes"


# ---- FIFOs, devices and giant files: refused before a byte is read --------------------------------

READER = textwrap.dedent(
    """
    import resource, sys, time, types
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a regression fails here, not the machine
    for name, sub in (("mubench_probe", ""), ("mubench_probe.datasets", "/datasets")):
        package = types.ModuleType(name)  # no torch, no dataset registry in this process
        package.__path__ = [sys.argv[1] + sub]
        sys.modules[name] = package
    from mubench_probe.datasets.files import PathImageReader
    from mubench_probe.errors import ImageDecodeError
    paths, cap = sys.argv[2:-1], int(sys.argv[-1])
    names = [p if p.startswith("/dev/") else p.rsplit("/", 1)[-1] for p in paths]
    reader = PathImageReader(paths, names, max_bytes=cap)
    for i in range(len(paths)):
        before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
        try:
            print("read", len(reader.read(i)), end=" ")
        except ImageDecodeError as exc:
            print("refused:", exc, end=" ")
        growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(f"| {growth} {time.perf_counter() - t0:.3f}", flush=True)
    """
)


def _hostile_files(folder: Path) -> dict[str, Path]:
    """A FIFO, a 4 GiB and a 64 MiB sparse file (no disk used), a directory, all named like images."""
    folder.mkdir(exist_ok=True)
    fifo, huge, big, directory = (folder / n for n in ("fifo.png", "huge.png", "big.tif", "dir.png"))
    os.mkfifo(fifo)
    for path, size in ((huge, 4 << 30), (big, 64 << 20)):
        with open(path, "wb") as fh:
            fh.truncate(size)
    directory.mkdir()
    return {"fifo": fifo, "huge": huge, "big": big, "dir": directory}


def _read_in_subprocess(paths: list[str], cap: int) -> list[tuple[str, float, float]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", READER, str(PACKAGE), *paths, str(cap)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"reading hung (a FIFO or a device read to its end): {out[-2000:]}")
    lines = [ln for ln in out.splitlines() if " | " in ln]
    assert len(lines) == len(paths), out
    parsed = []
    for ln in lines:
        message, numbers = ln.rsplit(" | ", 1)
        growth, seconds = numbers.split()
        parsed.append((message, float(growth), float(seconds)))
    return parsed


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX only")
def test_fifo_devices_and_oversized_files_are_refused_without_being_read(tmp_path, real_crops):
    f = _hostile_files(tmp_path)
    ok = tmp_path / "ok.jpg"
    ok.write_bytes(real_crops[0])
    paths = [str(f["fifo"]), str(f["huge"]), str(f["big"]), str(f["dir"]), str(ok), "/dev/zero"]
    got = _read_in_subprocess(paths, DEFAULT_MAX_FILE_BYTES)
    assert got[0][0] == "refused: fifo.png is not a regular file (a FIFO): only regular files are read"
    assert got[1][0] == (
        f"refused: huge.png is 4,294,967,296 bytes, over the per-file limit of {DEFAULT_MAX_FILE_BYTES:,} "
        "(raise --max-file-bytes)"
    )
    assert got[2][0] == "read 67108864", "a file under the limit is read"
    assert got[3][0] == "refused: dir.png is not a regular file (a directory): only regular files are read"
    assert got[4][0] == f"read {len(real_crops[0])}"
    assert got[5][0] == "refused: /dev/zero is not a regular file (a character device): only regular files are read"
    for i in (0, 1, 3, 5):
        message, growth_kb, seconds = got[i]
        assert growth_kb < 20_000 and seconds < 1.0, (message, growth_kb, seconds)
    small = _read_in_subprocess([str(f["big"]), str(ok)], 1_000_000)  # a small configured limit
    assert small[0][0].startswith("refused: big.tif is 67,108,864 bytes, over the per-file limit of 1,000,000")
    assert small[0][1] < 20_000 and small[0][2] < 1.0, "refused from the file's size, without reading it"
    assert small[1][0] == f"read {len(real_crops[0])}"


@pytest.mark.slow
def test_max_file_bytes_is_validated_recorded_and_part_of_the_runs_identity(tmp_path, real_crops):
    assert DEFAULT_MAX_FILE_BYTES == 1 << 30
    with pytest.raises(UsageError, match="--max-file-bytes must be at least 1"):
        ExtractConfig(max_file_bytes=0)
    for i, crop in enumerate(real_crops[:3]):
        (tmp_path / f"{i}.jpg").write_bytes(crop)
    csv_path = _manifest(tmp_path, [(f"{i}.jpg", "ab"[i % 2]) for i in range(3)])
    small = min(len(c) for c in real_crops[:3]) + 1
    big = max(len(c) for c in real_crops[:3])
    default = api.extract(TINY, str(csv_path), store=tmp_path / "d.zarr", num_workers=0)
    assert default.failures == {}
    (run,) = EmbeddingStore(tmp_path / "d.zarr").runs()
    assert "max_file_bytes" not in run.provenance, "the default is not recorded: older stores still match"
    report = api.extract(TINY, str(csv_path), store=tmp_path / "s.zarr", num_workers=0, max_file_bytes=small)
    over = [i for i, c in enumerate(real_crops[:3]) if len(c) > small]
    assert sorted(report.failures) == over and over, report.failures
    assert f"over the per-file limit of {small:,} (raise --max-file-bytes)" in report.failures[over[0]]
    (run,) = EmbeddingStore(tmp_path / "s.zarr").runs()
    assert run.provenance["max_file_bytes"] == small
    with pytest.raises(ProvenanceMismatchError, match="max_file_bytes"):
        api.extract(TINY, str(csv_path), store=tmp_path / "s.zarr", num_workers=0, max_file_bytes=big)
    assert f"--max-file-bytes {small}" in api.extract_command(tmp_path / "s.zarr", run.record())
    (tmp_path / "s.zarr" / run.path / "image_emb" / "c" / "0" / "0").unlink()
    repaired = api.repair_store(tmp_path / "s.zarr", num_workers=0)
    assert repaired.remaining == [] and not repaired.commands, "the repair reuses the run's limit"


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="POSIX only")
def test_hostile_rows_in_a_manifest_are_failed_rows_of_a_real_extraction(tmp_path, real_crops):
    """`probe extract` in its own process (a loader worker reads the rows): the FIFO, /dev/zero and
    the over-limit file are failed rows with their reasons; the run completes."""
    f = _hostile_files(tmp_path / "data")
    for i, crop in enumerate(real_crops[:3]):
        (tmp_path / "data" / f"ok{i}.jpg").write_bytes(crop)
    rows = [("ok0.jpg", "a"), ("fifo.png", "b"), ("/dev/zero", "a"), ("ok1.jpg", "b"), ("big.tif", "a")]
    rows += [("ok2.jpg", "b")]
    csv_path = _manifest(tmp_path / "data", rows)
    store = tmp_path / "s.zarr"
    args = ["extract", "--dataset", csv_path, "--model", TINY, "--store", store, "--workers", 1]
    args += ["--batch-size", 2, "--max-file-bytes", 1_000_000]

    def limit_memory() -> None:  # a regression that reads /dev/zero stops at 4 GiB, in this process only
        resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))

    proc = subprocess.Popen(
        [sys.executable, "-m", "mubench_probe.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=limit_memory,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"extraction hung: {out[-2000:]}")
    assert proc.returncode == 0, out
    (run,) = EmbeddingStore(store).runs()
    assert run.complete and run.valid_mask().tolist() == [True, False, False, True, False, True]
    assert run.failures() == {
        1: "ImageDecodeError: fifo.png is not a regular file (a FIFO): only regular files are read",
        2: "ImageDecodeError: /dev/zero is not a regular file (a character device): only regular files are read",
        4: "ImageDecodeError: big.tif is 67,108,864 bytes, over the per-file limit of 1,000,000 "
        "(raise --max-file-bytes)",
    }
    assert "skipped row 1: ImageDecodeError: fifo.png is not a regular file" in out, out
    assert f["fifo"].exists()


# ---- manifests: a byte-order mark, object stores --------------------------------------------------


def test_csv_manifest_with_a_byte_order_mark(tmp_path, real_crops):
    """Excel's 'CSV UTF-8' starts with a BOM: the first column was read as '\\ufeffpath'."""
    for i, crop in enumerate(real_crops[:2]):
        (tmp_path / f"{i}.jpg").write_bytes(crop)
    plain = load_dataset(str(_manifest(tmp_path, [("0.jpg", "a"), ("1.jpg", "b")], "plain.csv")))
    ds = load_dataset(str(_manifest(tmp_path, [("0.jpg", "a"), ("1.jpg", "b")], "bom.csv", bom=True)))
    assert (tmp_path / "bom.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    assert list(ds.meta["path"]) == ["0.jpg", "1.jpg"] and list(ds.meta["label_name"]) == ["a", "b"]
    assert ds.reader.read(1) == real_crops[1]
    assert ds.identity["fingerprint"] == plain.identity["fingerprint"], "the BOM is encoding, not content"
    (tmp_path / "other.csv").write_text("file,class\n0.jpg,a\n")
    with pytest.raises(DatasetUnavailableError, match=r"at least 'path' and 'label' \(found: 'file', 'class'\)"):
        load_dataset(str(tmp_path / "other.csv"))


def test_csv_fingerprint_is_unchanged_for_existing_stores(tmp_path, real_crops):
    """dataset_fingerprint is part of a run's identity: the manifest reader's rewrite keeps it."""
    for i, crop in enumerate(real_crops[:2]):
        (tmp_path / f"{i}.jpg").write_bytes(crop)
    path = tmp_path / "m.csv"
    path.write_bytes(b"path,label\r\n0.jpg,a\r\n1.jpg,b\r\nmissing.jpg,c\r\n")
    sizes = fingerprint_strings([f"0.jpg:{len(real_crops[0])}", f"1.jpg:{len(real_crops[1])}", "missing.jpg:-1"])
    ds = load_dataset(str(path))
    assert ds.identity["fingerprint"] == fingerprint_strings([path.read_text(), sizes])
    assert ds.identity["id"] == str(path.resolve()) and ds.identity["name"] == "m"


@pytest.fixture
def memory_fs():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"probe-{os.getpid()}-{time.monotonic_ns()}"  # a bucket
    yield fs, root
    fs.rm(root, recursive=True)


def test_csv_manifest_on_an_object_store(tmp_path, real_crops, memory_fs, monkeypatch):
    """`--dataset s3://bucket/data/m.csv` went through a local Path ('s3:/bucket/...'). fsspec URLs
    now work for the manifest and for image paths relative to it (memory:// stands in for s3://)."""
    fs, root = memory_fs
    local = tmp_path / "bucket"
    (local / "data" / "cells").mkdir(parents=True)
    (local / "img").mkdir()
    rows = []
    for i, crop in enumerate(real_crops[:4]):
        rel = f"cells/{i}.jpg" if i % 2 else f"../img/{i}.jpg"
        (local / "data" / rel).write_bytes(crop)
        fs.pipe(f"{root}/{os.path.normpath(f'data/{rel}')}", crop)
        rows.append((rel, "ab"[i % 2]))
    rows.append(("cells/missing.jpg", "a"))
    _manifest(local / "data", rows)
    fs.pipe(f"{root}/data/m.csv", (local / "data" / "m.csv").read_bytes())
    url = f"memory://{root}/data/m.csv"
    ds = load_dataset(url)
    assert len(ds) == 5 and ds.reader.read(0) == real_crops[0] and ds.reader.read(1) == real_crops[1]
    assert ds.identity["id"] == url and ds.key == "m"
    monkeypatch.chdir(tmp_path)
    r = _run("extract", "--dataset", url, "--model", TINY, "--store", tmp_path / "url.zarr", "--workers", 0)
    assert r.exit_code == 0, r.output
    api.extract(TINY, str(local / "data" / "m.csv"), store=tmp_path / "local.zarr", num_workers=0)
    (remote_run,) = EmbeddingStore(tmp_path / "url.zarr").runs()
    (local_run,) = EmbeddingStore(tmp_path / "local.zarr").runs()
    np.testing.assert_array_equal(remote_run.image_embeddings(), local_run.image_embeddings())
    assert remote_run.failures() == local_run.failures() == {4: "ImageDecodeError: cells/missing.jpg does not exist"}
    assert remote_run.provenance["dataset_id"] == url
    assert remote_run.provenance["dataset_manifest_sha256"] == local_run.provenance["dataset_manifest_sha256"]
    r = _run("extract", "--dataset", f"memory://{root}/data/nope.csv", "--model", TINY, "--store", tmp_path / "x")
    assert r.exit_code != 0 and f"CSV manifest memory://{root}/data/nope.csv does not exist" in r.output, r.output
    assert join_entry("s3://bucket/data", "../img/a.png") == "s3://bucket/img/a.png"
    assert join_entry("s3://bucket/data", "/img/a.png") == "s3://bucket/img/a.png", "absolute: from the bucket's top"
    assert join_entry("s3://bucket/data", "gs://b/a.png") == join_entry("/local", "gs://b/a.png") == "gs://b/a.png"


@pytest.mark.s3
def test_csv_manifest_on_s3_read_by_loader_workers(tmp_path, real_crops, s3):
    """The reported command, `--dataset s3://bucket/data/m.csv`, against an S3 emulator; the
    images are read in a forked loader worker (the memory:// test above compares the embeddings)."""
    rows = []
    for i, crop in enumerate(real_crops[:3]):
        key = f"data/cells/{i}.jpg" if i else "img/0.jpg"
        s3.put_object(Bucket="bucket", Key=key, Body=crop)
        rows.append(f"{'cells/' + str(i) if i else '../img/0'}.jpg,{'ab'[i % 2]}\n")
    s3.put_object(Bucket="bucket", Key="data/m.csv", Body=("path,label\n" + "".join(rows)).encode())
    store = tmp_path / "s.zarr"
    r = _run("extract", "--dataset", "s3://bucket/data/m.csv", "--model", TINY, "--store", store, "--workers", 1)
    assert r.exit_code == 0, r.output
    (run,) = EmbeddingStore(store).runs()
    assert run.complete and run.failures() == {} and run.provenance["dataset_id"] == "s3://bucket/data/m.csv"
    assert np.all(np.linalg.norm(run.image_embeddings(), axis=1) > 0.99), "every row embedded"


# ---- a loader worker killed (the out-of-memory killer) ---------------------------------------------

KILL_ROW, ROWS, CHUNK = 40, 48, 16


@pytest.mark.faults
def test_a_killed_loader_worker_is_one_line_naming_its_row_and_a_rerun_resumes(tmp_path, real_crops, monkeypatch):
    """A worker SIGKILLed while decoding row 40 (chunk 2) surfaced as torch's RuntimeError traceback.
    Now: one line naming the row and its file, the finished chunks kept, and the rerun completes
    the run byte-identical to an uninterrupted one."""
    from torch.utils.data import get_worker_info

    data = tmp_path / "data"
    data.mkdir()
    for i in range(ROWS):
        (data / f"{i}.jpg").write_bytes(real_crops[i % len(real_crops)])
    csv_path = _manifest(data, [(f"{i}.jpg", "ab"[i % 2]) for i in range(ROWS)])
    args = ("extract", "--dataset", csv_path, "--model", TINY, "--workers", 1, "--batch-size", 8)
    args += ("--chunk-rows", CHUNK)
    reference, store = tmp_path / "ref.zarr", tmp_path / "killed.zarr"
    assert _run(*args, "--store", reference).exit_code == 0
    written = store / ".claims" / "mubench-tiny-vit_random" / "m" / "test" / "written.log"
    read = PathImageReader.read

    def oom_killed(self, i):
        if int(i) == KILL_ROW and get_worker_info() is not None:
            deadline = time.time() + 60  # let chunk 1 be written first, so the test knows what is kept
            while "chunk-1 " not in (written.read_text() if written.exists() else "") and time.time() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, i)

    monkeypatch.setattr(PathImageReader, "read", oom_killed)
    r = _run(*args, "--store", store)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert "loader worker" in line and "(killed by SIGKILL)" in line and "out-of-memory killer" in line, line
    assert f"while decoding row {KILL_ROW} (file {KILL_ROW}.jpg)" in line, line
    assert "finished chunks are saved: rerun the same command to resume" in line, line
    (run,) = EmbeddingStore(store).runs()
    assert run.done_mask().tolist() == [True, True, False], "the chunks finished before the death are kept"
    subprocess.run([sys.executable, "-c", "pass"], check=True)  # torch no longer watches the dead worker
    time.sleep(0.2)
    monkeypatch.setattr(PathImageReader, "read", read)
    r = _run(*args, "--store", store)
    assert r.exit_code == 0 and "1 chunks written, 2 already done" in r.output, r.output
    assert _files(store) == _files(reference)


def test_a_killed_loader_worker_is_a_probe_error_in_the_api(tmp_path, real_crops, monkeypatch):
    from torch.utils.data import get_worker_info

    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(real_crops[i])
    csv_path = _manifest(tmp_path, [(f"{i}.jpg", "ab"[i % 2]) for i in range(4)])
    read = PathImageReader.read

    def killed(self, i):
        if get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return read(self, i)

    monkeypatch.setattr(PathImageReader, "read", killed)
    with pytest.raises(ProbeError, match=r"while decoding row 0 \(file 0\.jpg\)") as exc:
        api.extract(TINY, str(csv_path), store=tmp_path / "s.zarr", num_workers=1, batch_size=2)
    assert "\n" not in str(exc.value)
    shutil.rmtree(tmp_path / "s.zarr")
