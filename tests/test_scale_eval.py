"""Evaluation that holds at a million rows: bounded memory, approximate kNN with its recall, the
torch probe backend, and units computed in other processes, on Ray and as a Slurm job array.

Each fast path is compared with the plain one on the same data; the memory bound is measured on
a real `evaluate` in a fresh process (the benchmark `benchmarks/scale.py` measures it at 10^6 rows).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest

from mubench_probe import api
from mubench_probe.config import EvalConfig
from mubench_probe.errors import UsageError
from mubench_probe.heads import KNNHead, LinearProbe, PrototypeHead, scoring
from mubench_probe.heads.scoring import RowView
from mubench_probe.results import ResultsDir
from mubench_probe.store import EmbeddingStore, l2_normalize
from mubench_probe.testing import Source, hard_embeddings, multi_source_store, write_run

SOURCES = (
    Source("histo_a", 5, 150, "light microscopy", "H&E", "pathology"),
    Source("fluo_a", 4, 120, "fluorescence microscopy", "DAPI", "cell biology"),
)
KEY = ["model", "task", "head", "metric", "stratum", "seed"]


@pytest.fixture(scope="module")
def small_multi(tmp_path_factory):
    return multi_source_store(tmp_path_factory.mktemp("multi") / "m.zarr", dim=64, sources=SOURCES, chunk_rows=32)


def _sorted(t: pd.DataFrame) -> pd.DataFrame:
    return t.drop(columns=["unit"]).sort_values(KEY).reset_index(drop=True)


def test_embeddings_are_read_block_by_block_with_the_same_values(tiny_store, monkeypatch):
    (run,) = EmbeddingStore(tiny_store).runs()
    whole = l2_normalize(np.asarray(run.group["image_emb"][:], dtype=np.float32))
    assert np.array_equal(run.image_embeddings(), whole)
    from mubench_probe.store import run as store_module

    monkeypatch.setattr(store_module, "READ_BLOCK_BYTES", 1)  # one chunk at a time
    assert np.array_equal(run.image_embeddings(), whole)
    assert np.array_equal(run.image_embeddings(normalize=False), np.asarray(run.group["image_emb"][:], np.float32))


@pytest.mark.slow
def test_heads_on_row_views_equal_heads_on_copies(monkeypatch):
    x, y = hard_embeddings(n=1200, dim=96, classes=6, signal=0.3, seed=4)
    rows = np.flatnonzero(np.arange(len(y)) % 5 != 0)
    test = np.flatnonzero(np.arange(len(y)) % 5 == 0)
    monkeypatch.setattr(scoring, "GATHER_ROWS", 100)  # many blocks
    view = RowView(x, rows)
    a = PrototypeHead(6).fit(x[rows], y[rows])
    b = PrototypeHead(6).fit(view, y[rows])
    assert np.array_equal(a.weights_, b.weights_)
    ka, kb = KNNHead((1, 5, 10)).fit(x[rows], y[rows]), KNNHead((1, 5, 10)).fit(x, y[rows], rows=rows)
    sa, ia = ka.neighbours(x[test], 10)
    sb, ib = kb.neighbours(x[test], 10)
    assert np.array_equal(ia, ib) and np.array_equal(sa, sb), "exact search in blocks: the same neighbours"
    pa, pb = LinearProbe().fit(x[rows], y[rows]), LinearProbe().fit(view, y[rows])
    assert pa.C_ == pb.C_
    assert np.mean(pa.predict(x[test]) == pb.predict(x[test])) >= 0.99


def test_evaluate_with_every_array_viewed_equals_the_plain_evaluation(small_multi, monkeypatch):
    cfg = EvalConfig(heads=("proto", "knn", "zs_prompt"), n_boot=0, folds=3, strata=())
    plain = api.evaluate(small_multi, cfg).table
    monkeypatch.setattr(scoring, "LARGE_CELLS", 0)  # every fold's rows as a RowView
    monkeypatch.setattr(scoring, "GATHER_ROWS", 64)
    viewed = api.evaluate(small_multi, cfg).table
    pd.testing.assert_frame_equal(_sorted(plain), _sorted(viewed))


def test_approximate_knn_index_reports_its_recall(small_multi):
    x, y = hard_embeddings(n=3000, dim=64, classes=5, signal=0.4, seed=2)
    exact = KNNHead((10,)).fit(x[:2500], y[:2500])
    for spec in ("IVF16,Flat:nprobe=16", "HNSW16"):
        ann = KNNHead((10,), index=spec).fit(x[:2500], y[:2500])
        assert ann.recall(x[2500:], 10) >= 0.95, spec
        agree = np.mean(ann.predict(x[2500:]) == exact.predict(x[2500:]))
        assert agree >= 0.95, (spec, agree)
    weak = KNNHead((10,), index="IVF64,Flat:nprobe=1").fit(x[:2500], y[:2500])
    assert weak.recall(x[2500:], 10) < 0.9, "one list of 64: the recall shows it"
    cfg = EvalConfig(heads=("knn",), n_boot=0, folds=2, knn_index="IVF8,Flat", strata=())
    table = api.evaluate(small_multi, cfg).table
    rec = table[table["metric"] == "index_recall@10"]
    assert len(rec) and (rec["value"] > 0.9).all() and (rec["stratum"] == "index=IVF8,Flat").all(), rec
    with pytest.raises(UsageError, match="FAISS cannot build index"):
        KNNHead((10,), index="NoSuchIndex").fit(x, y)


@pytest.mark.slow
def test_torch_backend_picks_the_same_c_and_accuracy_on_hard_data():
    pytest.importorskip("torch")
    x, y = hard_embeddings(n=900, dim=768, classes=10, seed=1)  # tests/test_probe.py's hardest flat start
    test = np.arange(len(y)) % 4 == 0
    for select in ("accuracy", "log_loss"):
        sk = LinearProbe(backend="sklearn", select=select).fit(x[~test], y[~test])
        th = LinearProbe(backend="torch", device="cpu", select=select).fit(x[~test], y[~test])
        assert sk.C_ == th.C_ >= 100, (select, sk.C_, th.C_)
        assert abs(sk.score(x[test], y[test]) - th.score(x[test], y[test])) <= 0.005
        ours, theirs = [s for _, s in sk.val_curve_], [s for _, s in th.val_curve_]
        if select == "accuracy":  # counts of right answers: equal
            assert ours == theirs
        else:  # mean log-probabilities from two solvers of one problem (gradient tol 1e-7): far closer than C steps
            np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_the_cache_key_ignores_where_units_run():
    from mubench_probe.evaluation import unit_key

    class FakeRun:
        provenance: ClassVar[dict] = {}

    a = EvalConfig()
    assert unit_key(FakeRun(), "t", a, []) == unit_key(FakeRun(), "t", a.replace(device="cpu"), [])
    assert unit_key(FakeRun(), "t", a, []) != unit_key(FakeRun(), "t", a.replace(knn_index="HNSW32"), [])
    assert "knn_index" not in a.cache_dict() and "device" not in a.cache_dict()
    assert a.replace(probe_backend="torch").cache_dict()["probe_backend"] == "torch"


FAST = EvalConfig(heads=("proto", "lp", "zs_prompt"), n_boot=0, folds=2, strata=(), cs=(1.0, 100.0))


@pytest.mark.cluster
def test_units_in_processes_on_ray_and_in_a_slurm_job_array_give_the_same_results(small_multi, tmp_path):
    one = api.evaluate(small_multi, FAST, results_dir=tmp_path / "one").table
    procs = api.evaluate(small_multi, FAST, results_dir=tmp_path / "procs", jobs=2)
    assert procs.computed == len(set(one["unit"]))
    pd.testing.assert_frame_equal(_sorted(one), _sorted(procs.table))
    slurm = api.evaluate(
        small_multi, FAST, results_dir=tmp_path / "slurm", launcher="slurm", cluster="local", log_dir=tmp_path / "jobs"
    )
    pd.testing.assert_frame_equal(_sorted(one), _sorted(slurm.table))
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = api.evaluate(small_multi, FAST, results_dir=tmp_path / "ray", launcher="ray")
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(_sorted(one), _sorted(on_ray.table))
    saved = pd.read_parquet(tmp_path / "ray" / "results.parquet")
    assert not saved.duplicated(KEY).any() and set(saved["unit"]) == set(one["unit"])


def test_two_writers_of_one_results_folder_lose_and_duplicate_nothing(tmp_path):
    def rows(unit: str) -> pd.DataFrame:
        from mubench_probe.results import COLUMNS

        return pd.DataFrame([{c: (unit if c in ("unit", "task") else 0) for c in COLUMNS}])

    a, b = ResultsDir(tmp_path), ResultsDir(tmp_path)
    ta, pa = a.load()
    tb, pb = b.load()
    a.save(pd.concat([ta, rows("u1")]), pa, {})
    merged, _ = b.save(pd.concat([tb, rows("u2")]), pb, {})  # b never saw u1: it is merged, not lost
    assert sorted(merged["unit"]) == ["u1", "u2"]
    again, _ = a.save(pd.concat([ta, rows("u1"), rows("u3")]), pa, {})
    assert sorted(pd.read_parquet(tmp_path / "results.parquet")["unit"]) == ["u1", "u2", "u3"] == sorted(again["unit"])


@pytest.mark.slow
def test_evaluate_memory_grows_by_less_than_twice_the_float32_embeddings(tmp_path):
    """A real evaluate in a fresh process at two sizes: peak RSS grows with the rows by less than
    twice the float32 embeddings (fixed-size work buffers cancel out; at 10^6 rows they are a few
    percent, see benchmarks/scale.py). Every fold's rows are views, as at 10^6 rows by default."""
    dim, sizes, peaks = 768, (10_000, 30_000), []
    code = textwrap.dedent(
        """
        import json, sys
        from mubench_probe import api
        from mubench_probe.store import run as store
        from mubench_probe.config import EvalConfig
        from mubench_probe.heads import scoring
        import faiss, sklearn.linear_model  # imported before the baseline is taken
        scoring.LARGE_CELLS, scoring.GATHER_ROWS, store.READ_BLOCK_BYTES = 1 << 20, 2048, 1 << 22
        def status(key):  # VmHWM, not ru_maxrss: exec keeps the maxrss of the process that forked us
            return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
        base = status("VmRSS")
        api.evaluate(sys.argv[1], EvalConfig(heads=("proto", "knn"), n_boot=20, folds=2, strata=()))
        print(json.dumps(status("VmHWM") - base))
        """
    )
    for n in sizes:
        rng = np.random.default_rng(n)
        y = rng.integers(0, 8, n)
        x = l2_normalize(rng.normal(size=(n, dim)).astype(np.float32) + rng.normal(size=(8, dim))[y].astype(np.float32))
        meta = pd.DataFrame({"label_name": [f"c{c}" for c in y], "dataset": "synth"})
        write_run(tmp_path / f"m{n}.zarr", x, meta, chunk_rows=1024, dtype="float16")
        del x
        out = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / f"m{n}.zarr")], capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-2000:]
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
    slope = (peaks[1] - peaks[0]) / ((sizes[1] - sizes[0]) * dim * 4)
    assert 0 < slope <= 2.0, (slope, peaks)
