"""Hostile options, caches and claims: each input a hostile tester tried is refused in one line
before any work, or survived (a cache or a claim that cannot be read is rebuilt or taken over).

Rerun alone: `python -m pytest -q tests/test_hostile_options.py`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.claims import LocalChunkClaims, ObjectChunkClaims
from mubench_probe.cli import app
from mubench_probe.config import EvalConfig, ExtractConfig, parse_shard
from mubench_probe.errors import StoreError, UsageError
from mubench_probe.index import IndexCache
from mubench_probe.locations import location
from mubench_probe.store import CLAIMS, EmbeddingStore, l2_normalize

from .conftest import TINY

GROUP = "mubench-tiny-vit_random/sample/test"
GARBAGE = b"\xff\xfe\xff\x00\xff garbage \xc3\x28"  # no encoding decodes this into a claim


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _one_line_error(r) -> str:
    """The command failed with exactly one `error:` line and no traceback; returns that line."""
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    return errors[0]


# ---- --shard '' ----------------------------------------------------------------------------------


def test_an_explicitly_empty_shard_is_a_usage_error_before_any_work(tmp_path):
    for empty in ("", "  "):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(empty)
        with pytest.raises(UsageError, match="--shard"):
            ExtractConfig(shard=empty)
    assert parse_shard(None) is None and ExtractConfig().shard is None, "an absent option still means no sharding"
    with pytest.raises(UsageError, match="at least 1"):
        parse_shard("0/0")
    with pytest.raises(UsageError, match="--shard"):
        ExtractConfig(shard=("a", "b"))  # type: ignore[arg-type]
    store = tmp_path / "s.zarr"
    r = _run("extract", "--dataset", "sample", "--limit", 16, "--model", TINY, "--workers", 0, "--store", store,
             "--shard", "")  # fmt: skip
    assert r.exit_code == 2 and "--shard" in _one_line_error(r), r.output
    assert not store.exists(), "refused before any work"


# ---- s3:// without credentials -------------------------------------------------------------------


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """An environment where botocore finds no credentials anywhere, pointed at a closed loopback port."""
    pytest.importorskip("s3fs")
    for var in list(os.environ):
        if var.startswith("AWS_") or var.startswith("FSSPEC_S3"):
            monkeypatch.delenv(var)
    with socket.socket() as s:  # a port nobody listens on: nothing can leave this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup either


@pytest.mark.slow
def test_an_s3_store_without_credentials_is_one_line_saying_how_to_provide_them(no_aws_credentials, tmp_path):
    from botocore.exceptions import NoCredentialsError

    with pytest.raises(StoreError, match="no credentials") as caught:
        location("s3://bucket/x.zarr").exists("zarr.json")  # the real botocore error, mapped
    assert isinstance(caught.value.__context__, NoCredentialsError)
    for args in (
        ("info", "s3://bucket/x.zarr"),
        ("status", "s3://bucket/x.zarr"),
        ("extract", "--dataset", "sample", "--limit", 16, "--model", TINY, "--workers", 0, "--store", "s3://bucket/x"),
    ):
        line = _one_line_error(_run(*args))
        assert "no credentials" in line and "AWS_ACCESS_KEY_ID" in line and "AWS_PROFILE" in line, (args, line)


# ---- a corrupt cached index ----------------------------------------------------------------------


def test_a_corrupt_cached_index_is_rebuilt_with_a_note(tmp_path):
    rng = np.random.default_rng(3)
    x = l2_normalize(rng.normal(size=(40, 8))).astype(np.float32)
    cache = IndexCache(tmp_path / "s.zarr")
    index, _, built = cache.get("m/d/test", "image", x)
    assert built and not cache.notes
    ref = index.search(x[:3], 5)[1]
    fpath, jpath = cache.paths("m/d/test", "image", "Flat")
    for damage in (GARBAGE, fpath.read_bytes()[:50], b""):  # garbage, truncated, empty
        fpath.write_bytes(damage)
        cache = IndexCache(tmp_path / "s.zarr")
        index, _, built = cache.get("m/d/test", "image", x)
        assert built and np.array_equal(index.search(x[:3], 5)[1], ref)
        assert len(cache.notes) == 1 and "unreadable" in cache.notes[0] and "rebuilt" in cache.notes[0], cache.notes
        assert not IndexCache(tmp_path / "s.zarr").get("m/d/test", "image", x)[2], "the rebuilt index was saved"
    jpath.write_bytes(GARBAGE)  # its attributes too
    cache = IndexCache(tmp_path / "s.zarr")
    assert cache.get("m/d/test", "image", x)[2] and len(cache.notes) == 1
    # an index file of another gallery (valid FAISS, wrong size) is not trusted either
    import faiss

    faiss.write_index(IndexCache(tmp_path / "t.zarr").get("other", "image", x[:10])[0], str(fpath))
    cache = IndexCache(tmp_path / "s.zarr")
    index, _, built = cache.get("m/d/test", "image", x)
    assert built and index.ntotal == len(x) and cache.notes


def test_search_survives_a_corrupt_index_beside_the_store(tiny_store_copy):
    r = _run("search", tiny_store_copy, "--model", TINY, "--row", 3, "-k", 2)
    assert r.exit_code == 0, r.output
    (faiss_file,) = Path(f"{tiny_store_copy}.indexes").glob("*.faiss")
    faiss_file.write_bytes(GARBAGE)
    r = _run("search", tiny_store_copy, "--model", TINY, "--row", 3, "-k", 2, "--json")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    notes = [ln for ln in r.output.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "rebuilt" in notes[0], r.output
    payload = json.loads(r.output[r.output.index("{") : r.output.rindex("}") + 1])
    assert payload["hits"][0]["row"] == 3 and payload["notes"] == [notes[0].removeprefix("note: ")]


# ---- --knn-index bogus ---------------------------------------------------------------------------


def test_a_bad_faiss_factory_is_refused_up_front_naming_it(tiny_store, tmp_path):
    from mubench_probe.faiss_factory import check_factory

    for good in ("Flat", "IVF4096,Flat:nprobe=32", "HNSW32", "HNSW32:efSearch=256", "IVF4096,SQ8:nprobe=64"):
        check_factory(good)
        assert EvalConfig(knn_index=good).knn_index == good
    for bad, why in (("bogus", "could not parse"), ("IVF64,Flat:bogus=1", "bogus"), ("HNSW32:efSearch", "efSearch")):
        with pytest.raises(UsageError, match="--knn-index") as caught:
            EvalConfig(knn_index=bad)
        assert repr(bad) in str(caught.value) and why in str(caught.value) and "\n" not in str(caught.value)
    out = tmp_path / "res"
    t0 = time.perf_counter()
    r = _run("evaluate", tiny_store, "--head", "knn", "--knn-index", "bogus", "--out", out)
    line = _one_line_error(r)
    assert r.exit_code == 2 and "'bogus'" in line and "Error in" not in line, r.output
    assert not out.exists() and time.perf_counter() - t0 < 10, "refused before any work"


# ---- unreadable claims ---------------------------------------------------------------------------


def test_a_claim_that_cannot_be_read_is_stale_not_fatal(tmp_path):
    folder = tmp_path / "claims"
    folder.mkdir()
    (folder / "chunk-0.claim").write_bytes(GARBAGE)
    (folder / "shards").write_bytes(GARBAGE)
    (folder / "written.log").write_bytes(GARBAGE + b"\nchunk-1 host 12 2024-01-01T00:00:00Z\n")
    claims = LocalChunkClaims(folder)
    assert claims.stale() == [0] and not claims.owners()[0].live
    assert claims.shards_noted() is None and claims.written() == [(1, "host", 12)]
    assert claims.try_claim(0) and claims.owns(0), "an unreadable claim is taken over"
    claims.close()
    # the same on an object store (conditional writes in memory://)
    loc = location(f"memory://hostile-claims-{os.getpid()}/store")
    loc.write_bytes(".claims/run/chunk-0.claim", GARBAGE)
    loc.write_bytes(".claims/run/shards", GARBAGE)
    remote = ObjectChunkClaims(loc, ".claims/run")
    assert remote.stale() == [0] and remote.shards_noted() is None
    assert remote.try_claim(0) and remote.owns(0)
    remote.close()


def test_extraction_and_status_go_on_over_a_garbage_claim(tiny_store_copy, sample):
    (run,) = EmbeddingStore(tiny_store_copy).runs()
    run.clear_done(3)  # the last chunk: 66 rows to extract again
    folder = tiny_store_copy / CLAIMS / GROUP
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "chunk-3.claim").write_bytes(GARBAGE)
    (folder / "shards").write_bytes(GARBAGE)
    r = _run("status", tiny_store_copy)
    assert r.exit_code == 0 and "stale" in r.output, r.output
    report = api.extract(TINY, sample, store=tiny_store_copy, num_workers=0, chunk_rows=128, batch_size=32)
    assert report.chunks_written == 1
    (run,) = EmbeddingStore(tiny_store_copy).runs()
    assert run.done_mask().all() and not (folder / "chunk-3.claim").exists()


# ---- a query longer than the model's context -----------------------------------------------------


def test_a_query_longer_than_the_context_says_how_much_was_kept(tiny_store):
    words = "a micrograph of a white blood cell stained with giemsa".split()
    text = " ".join(words[i % len(words)] for i in range(20000))[:100_000]
    res = api.search(tiny_store, TINY, text=text, k=3)
    assert res.query["tokens"] > 20000 and res.query["tokens_kept"] == 32, res.query
    assert len(res.notes) == 1 and f"kept 32 of {res.query['tokens']} tokens" in res.notes[0], res.notes
    short = api.search(tiny_store, TINY, text="a platelet", k=3)
    assert short.notes == [] and short.query["tokens"] == short.query["tokens_kept"] < 32
    r = _run("search", tiny_store, "--model", TINY, "--text", text, "-k", 3, "--format", "csv")
    assert r.exit_code == 0, r.output[-2000:]
    notes = [ln for ln in r.output.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and f"kept 32 of {res.query['tokens']} tokens" in notes[0], notes
