"""Outgrowing one machine: shards, launchers (local processes, submitit, Ray) and object stores.

Every path runs for real here: two `probe extract --shard` processes, `--launcher local`, a
Slurm job array through submitit's local executor (the same code path without Slurm), a local
Ray cluster, and an S3 emulator (moto in server mode, started by the test) that two shard
processes fill. Each time the store must equal a single-process extraction byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.claims import HOST, ObjectChunkClaims, key_name
from mubench_probe.cli import app
from mubench_probe.config import parse_shard, shard_of
from mubench_probe.datasets import load_dataset
from mubench_probe.errors import UsageError
from mubench_probe.locations import location
from mubench_probe.store import CLAIMS, EmbeddingStore

from .conftest import TINY

GROUP = "mubench-tiny-vit_random/sample/test"
ROWS, CHUNK = 96, 16  # 6 chunks
OPTS = ("--dataset", "sample", "--limit", ROWS, "--model", TINY, "--chunk-rows", CHUNK, "--workers", 0)
OPTS += ("--batch-size", 16)
STAMPED = ("zarr.json", f"{GROUP}/zarr.json", f"{GROUP}/done/zarr.json")  # hold creation times


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def contents(store: str | Path) -> dict[str, bytes]:
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
def reference(tmp_path_factory) -> dict[str, bytes]:
    """One process, no shards."""
    path = tmp_path_factory.mktemp("ref") / "one.zarr"
    api.extract(TINY, load_dataset("sample", limit=ROWS), store=path, num_workers=0, chunk_rows=CHUNK, batch_size=16)
    files = contents(path)
    assert len([k for k in files if k.startswith(f"{GROUP}/image_emb/c/")]) == ROWS // CHUNK
    return files


def _shard_proc(store: str, shard: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mubench_probe.cli", "extract", *map(str, OPTS), "--store", store, "--shard", shard],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _shard_procs(store: str, env: dict | None = None, shards: int = 2) -> list[subprocess.Popen]:
    return [_shard_proc(store, f"{i}/{shards}", env) for i in range(shards)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return outs


def _written(store: str | Path) -> list[tuple[str, int]]:
    claims = EmbeddingStore(store).runs()[0].claims()
    return [(key_name(k), pid) for k, _, pid in claims.written()]


def test_the_shard_assignment_is_fixed_and_parsed():
    assert [shard_of(c, 3) for c in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) is None
    for bad in ("4/4", "x/2", "1", "-1/2"):
        with pytest.raises(UsageError):
            parse_shard(bad)
    os.environ.update(RANK="1", WORLD_SIZE="3")  # as torchrun sets them
    try:
        assert parse_shard("auto") == (1, 3)
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert api.shard_rows(100, 16, (0, 2)) == 52 and api.shard_rows(100, 16, (1, 2)) == 48


@pytest.mark.cluster
def test_two_shard_processes_fill_one_store_byte_identical(tmp_path, reference):
    """Two real processes started together: one creates the run, the other joins; each computes
    its own chunks only; a shard run again computes nothing; the store equals one process's."""
    store = str(tmp_path / "two.zarr")
    outs = _finish(_shard_procs(store))
    assert all("3 chunks written, 0 already done" in o for o in outs), outs
    log = _written(store)
    pids = {k: pid for k, pid in log}
    assert sorted(k for k, _ in log) == sorted([*(f"chunk-{i}" for i in range(6)), "texts"]), log
    assert pids["chunk-0"] == pids["chunk-2"] == pids["chunk-4"] == pids["texts"] != pids["chunk-1"], log
    assert contents(store) == reference
    again = _run("extract", *OPTS, "--store", store, "--shard", "1/2")
    assert again.exit_code == 0 and "0 chunks written, 3 already done" in again.output, again.output
    r = _run("status", store, "--json")
    assert r.exit_code == 0, r.output
    (run,) = json.loads(r.output)["runs"]
    assert run["status"] == "complete" and run["shards"] == 2
    assert [(s["done"], s["total"]) for s in run["per_shard"]] == [(3, 3), (3, 3)]


@pytest.mark.cluster
def test_a_killed_shard_is_rerun_and_a_shard_run_twice_splits_its_chunks(tmp_path, reference):
    store = str(tmp_path / "s.zarr")
    _finish([_shard_proc(store, "0/2")])  # shard 0 only
    (run,) = EmbeddingStore(store).runs()
    assert run.done_mask().tolist() == [True, False, True, False, True, False]
    r = _run("status", store)
    assert "0: 3/3  1: 0/3" in r.output and "incomplete" in r.output, r.output
    # a stale claim of a dead shard-1 process (killed mid-chunk) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = Path(store) / CLAIMS / GROUP / "chunk-3.claim"
    claim.write_text(json.dumps({"host": HOST, "pid": int(dead.stdout), "token": "dead"}))
    assert "1 stale" in _run("status", store).output
    procs = [_shard_proc(store, "1/2") for _ in range(2)]  # shard 1, twice at once
    _finish(procs)
    chunks = [k for k, _ in _written(store) if k.startswith("chunk-")]
    assert sorted(chunks) == [f"chunk-{i}" for i in range(6)], "each chunk computed once, the rerun shard's too"
    assert contents(store) == reference


@pytest.mark.cluster
def test_local_launcher_runs_one_process_per_shard(tmp_path, reference):
    store = str(tmp_path / "local.zarr")
    r = _run("extract", *OPTS, "--store", store, "--launcher", "local", "--shards", 2, "--log-dir", tmp_path / "logs")
    assert r.exit_code == 0, r.output
    for i in range(2):
        assert f"shard {i}/2 {TINY}: 3 chunks written" in r.output, r.output
    assert len({pid for _, pid in _written(store)}) == 2, "two processes"
    assert contents(store) == reference


@pytest.mark.cluster
def test_torchrun_runs_one_shard_per_rank(tmp_path, reference):
    """The documented multi-GPU path on one node: torchrun starts K ranks, `--shard auto` reads
    RANK/WORLD_SIZE (here on CPU; on a GPU node each rank adds --device cuda:$LOCAL_RANK)."""
    store = str(tmp_path / "torchrun.zarr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "mubench_probe.cli", "extract", *map(str, OPTS), "--store", store, "--shard", "auto"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert len({pid for _, pid in _written(store)}) == 2, "two ranks"
    assert contents(store) == reference


def test_each_local_shard_sees_its_own_gpus(monkeypatch):
    from mubench_probe.engines import visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert [visible_gpus(i, 1) for i in range(5)] == ["0", "1", "2", "3", "0"]
    assert [visible_gpus(i, 2) for i in range(2)] == ["0,1", "2,3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr("subprocess.run", lambda *a, **k: (_ for _ in ()).throw(OSError("no nvidia-smi")))
    assert visible_gpus(0, 1) == ""  # no GPU: nothing to restrict


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch):
    import torch

    from mubench_probe.encoders.base import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert select_device("auto") == torch.device("cuda")
    for rank, index in (("0", 0), ("1", 1), ("3", 1)):
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert select_device("auto") == torch.device("cuda", index)
    assert select_device("cpu") == torch.device("cpu")  # an explicit device is kept


@pytest.mark.cluster
def test_slurm_job_array_through_submitit_local_executor(tmp_path, reference):
    """The whole --launcher slurm path (submitit job array) with submitit's local executor."""
    pytest.importorskip("submitit")  # a test dependency: installed by the `test` extra
    store = str(tmp_path / "slurm.zarr")
    r = _run(
        "extract", *OPTS, "--store", store, "--launcher", "slurm", "--shards", 2, "--submitit-cluster", "local",
        "--log-dir", tmp_path / "jobs", "--cpus-per-shard", 1, "--mem", "2G", "--time", "00:10:00",
        "--array-parallelism", 2,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "submitted job array" in r.output and f"shard 1/2 {TINY}: 3 chunks written" in r.output, r.output
    assert contents(store) == reference
    assert any((tmp_path / "jobs").rglob("*_log.out")), "submitit wrote its job logs"


def test_slurm_launcher_without_slurm_is_one_line(tmp_path):
    r = _run("extract", *OPTS, "--store", tmp_path / "s.zarr", "--launcher", "slurm", "--shards", 2)
    assert r.exit_code != 0 and "no Slurm here" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.cluster
def test_ray_tasks_on_a_local_cluster(tmp_path, reference):
    ray = pytest.importorskip("ray")  # a test dependency: installed by the `test` extra
    from mubench_probe.engines import Resources

    store = str(tmp_path / "ray.zarr")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        done = api.launch_extract(
            [TINY], "sample", store=store, launcher="ray", shards=2, resources=Resources(cpus_per_shard=1),
            limit=ROWS, num_workers=0, chunk_rows=CHUNK, batch_size=16,
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert [r[0]["chunks_written"] for r in done.results] == [3, 3]
    assert len({r[0]["pid"] for r in done.results}) == 2, "two Ray worker processes"
    assert contents(store) == reference


def test_a_missing_engine_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    r = _run("extract", *OPTS, "--store", tmp_path / "s.zarr", "--launcher", "ray")
    assert r.exit_code == 2 and "--launcher ray needs ray: pip install 'mubench-probe[ray]'" in r.output, r.output


# ---- object stores -------------------------------------------------------------------------------


def test_object_claims_are_exclusive_expire_and_are_taken_over_once():
    loc = location("memory://claims-test/store")
    a, b = ObjectChunkClaims(loc, ".claims/run", 1.0), ObjectChunkClaims(loc, ".claims/run", 1.0)
    assert a.try_claim(0) and not b.try_claim(0) and a.owns(0) and not b.owns(0)
    # another host's claim: live until its heartbeat is older than the timeout
    body = {"host": "elsewhere", "pid": 1, "token": "t", "beat": time.time()}
    loc.write_bytes(".claims/run/chunk-1.claim", json.dumps(body).encode())
    assert not b.try_claim(1) and b.owners()[1].live
    loc.write_bytes(".claims/run/chunk-1.claim", json.dumps({**body, "beat": time.time() - 5}).encode())
    assert b.stale() == [1]
    c = ObjectChunkClaims(loc, ".claims/run", 1.0)
    assert b.try_claim(1) and not c.try_claim(1), "of two contenders for a stale claim, one wins"
    assert c.owners()[1].token == b.token
    a.close()
    b.close()
    assert not [n for n in loc.files(".claims/run") if n.endswith(".claim")], "closing releases every claim"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A local S3 emulator (moto in server mode) for this module; the environment points fsspec at it."""
    pytest.importorskip("s3fs")  # test dependencies: installed by the `test` extra
    server_mod = pytest.importorskip("moto.server")
    import boto3

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="probe")
    client = boto3.client("s3")
    client.put_object(Bucket="probe", Key="probe-check", Body=b"1", IfNoneMatch="*")
    with pytest.raises(client.exceptions.ClientError, match="PreconditionFailed"):
        client.put_object(Bucket="probe", Key="probe-check", Body=b"2", IfNoneMatch="*")  # conditional writes work
    yield env
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.cluster
@pytest.mark.s3
def test_two_shards_fill_an_s3_store_and_every_command_reads_it(s3, tmp_path, reference, monkeypatch):
    store = "s3://probe/two.zarr"
    outs = _finish(_shard_procs(store, env={**os.environ, **s3}))
    assert all("3 chunks written" in o for o in outs), outs
    assert contents(store) == reference, "the object store holds exactly the single-process bytes"
    assert sorted(k for k, _ in _written(store)) == sorted([*(f"chunk-{i}" for i in range(6)), "texts"])
    for args in (("info", store), ("verify", store), ("status", store)):
        r = _run(*args)
        assert r.exit_code == 0 and "Traceback" not in r.output, (args, r.output)
    r = _run("search", store, "--model", TINY, "--row", 0, "-k", 3, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["hits"][0]["row"] == 0, r.output
    monkeypatch.chdir(tmp_path)
    r = _run("evaluate", store, "--head", "lp", "--head", "zs_caption", "--bootstrap", 10, "--shots", 1)
    assert r.exit_code == 0 and (tmp_path / "results" / "two" / "results.parquet").exists(), r.output
    # damage on the object store is named, and the same command repairs it
    loc = location(store)
    loc.delete(f"{GROUP}/image_emb/c/2/0")
    r = _run("verify", store)
    assert r.exit_code != 0 and "image_emb chunk 2.0 (file image_emb/c/2/0) is missing" in r.output, r.output
    r = _run("extract", *OPTS, "--store", store)
    assert r.exit_code == 0 and "1 chunks written" in r.output and "repaired:" in r.output, r.output
    assert contents(store) == reference


@pytest.mark.s3
def test_s3_run_creation_commits_last_and_an_abandoned_creation_is_removed(s3, monkeypatch):
    from mubench_probe.locations import FsspecLocation

    store = "s3://probe/abandoned.zarr"
    ds = load_dataset("sample", limit=32)
    real = FsspecLocation.write_bytes

    def die_before_commit(self, rel, data):
        if rel.endswith("done/zarr.json"):
            raise OSError("connection lost")
        return real(self, rel, data)

    with monkeypatch.context() as m:
        m.setattr(FsspecLocation, "write_bytes", die_before_commit)
        with pytest.raises(OSError, match="connection lost"):
            api.extract(TINY, ds, store=store, num_workers=0, chunk_rows=CHUNK)
    st = EmbeddingStore(store)
    assert st.runs() == [], "an uncommitted run is absent"
    assert location(store).exists(f"{GROUP}/image_emb/zarr.json"), "its arrays were uploaded"
    assert [d.fix for d in st.check()] == ["creating"], st.check()
    r = api.extract(TINY, ds, store=store, num_workers=0, chunk_rows=CHUNK)
    assert r.chunks_written == 2 and st.check(deep=True) == []
    # two writers create one run at the same moment: the second looked for the run just before the
    # first committed it, so it goes on to create it too; under the create claim it finds the commit
    # and joins the first writer's run instead of replacing it
    st2 = EmbeddingStore("s3://probe/race.zarr", create=True)
    args = _synthetic_args()
    first = st2.prepare_run(*args)
    first.write_chunk(0, np.ones((3, 4), dtype=np.float32), [""] * 3)
    real_exists, missed = FsspecLocation.exists, []

    def not_yet_there(self, rel):
        if rel == args[0] and not missed:
            missed.append(rel)
            return False
        return real_exists(self, rel)

    with monkeypatch.context() as m:
        m.setattr(FsspecLocation, "exists", not_yet_there)
        second = EmbeddingStore("s3://probe/race.zarr").prepare_run(*args)
    assert missed and second.provenance == first.provenance, "the second creator joins"
    (run,) = st2.runs()
    assert run.check(deep=True) == []
    assert np.array_equal(run.done_mask(), [True, False, False]), "the first writer's run was not replaced"


def _synthetic_args():
    import pandas as pd

    from mubench_probe.store import RunLayout

    meta = pd.DataFrame({"label_name": list("abababab"), "dataset": "synth"})
    prov = {"model_spec": "synthetic:random", "backend": "test", "weights_hash": "0", "has_text": False}
    return ("synthetic_random/synth/test", prov, RunLayout(8, 4, 3, "float32"), meta, [], {}, {})


def test_a_store_root_is_created_on_a_filesystem_without_conditional_writes(monkeypatch):
    """One creator needs no conditional put: the root is written plainly (claims still refuse to race)."""
    from mubench_probe.errors import StoreError
    from mubench_probe.locations import FsspecLocation

    def refuse(self, rel, data):
        raise StoreError("this filesystem cannot write a file only if it is absent")

    monkeypatch.setattr(FsspecLocation, "create", refuse)
    url = f"memory://no-conditional-{os.getpid()}.zarr"
    EmbeddingStore(url, create=True)
    assert EmbeddingStore(url).runs() == [] and location(url).exists("zarr.json")
