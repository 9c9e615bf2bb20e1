"""Indexes and search, retrieval metrics, representation similarity, paired tests and the report."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from mubench_probe import api
from mubench_probe.cli import app
from mubench_probe.comparison import pairwise_tests
from mubench_probe.errors import ProvenanceMismatchError, UsageError
from mubench_probe.heads.ann import recall
from mubench_probe.heads.knn import search
from mubench_probe.heads.retrieval import caption_retrieval, ranking_metrics
from mubench_probe.index import IndexCache, build_index
from mubench_probe.similarity import linear_cka, mcnemar, mutual_knn
from mubench_probe.store import EmbeddingStore, l2_normalize

from .conftest import TINY, forge_provenance


def _numpy_topk(x, q, k):
    sims = q @ x.T
    return np.stack([np.lexsort((np.arange(len(r)), -r))[:k] for r in sims])


def test_faiss_search_equals_numpy_topk_with_ties():
    rng = np.random.default_rng(0)
    x = l2_normalize(rng.normal(size=(300, 24))).astype(np.float32)
    x = np.concatenate([x, x[:40]])  # exact duplicates tie
    q = np.concatenate([l2_normalize(rng.normal(size=(20, 24))), x[:5]]).astype(np.float32)
    assert (search(x, q, 10)[1] == _numpy_topk(x, q, 10)).all()


def test_ann_recall_on_a_known_case():
    rng = np.random.default_rng(1)
    x = l2_normalize(rng.normal(size=(500, 16))).astype(np.float32)
    exact, info = build_index(x, "Flat")
    assert info.recall_at_10 is None
    assert recall(exact.search, x, x[:50]) == 1.0

    class Half:  # returns the true top-10's first 5 plus 5 wrong items
        def search(self, q, k):
            true = search(x, q, k)[1]
            wrong = np.array([[j for j in range(500) if j not in set(r)][:5] for r in true])
            return None, np.concatenate([true[:, :5], wrong], axis=1)

    assert recall(Half().search, x, x[:20]) == pytest.approx(0.5)
    _, hnsw = build_index(x, "HNSW32,Flat", recall_sample=100)
    assert 0.5 < hnsw.recall_at_10 <= 1.0 and hnsw.recall_queries == 100
    with pytest.raises(UsageError):
        build_index(x, "NotAFactory")


def test_stale_index_is_detected_and_rebuilt(tmp_path):
    rng = np.random.default_rng(2)
    x = l2_normalize(rng.normal(size=(50, 8))).astype(np.float32)
    cache = IndexCache(tmp_path / "s.zarr")
    _, info1, built1 = cache.get("m/d/test", "image", x)
    _, info2, built2 = cache.get("m/d/test", "image", x)
    assert built1 and not built2 and info1.embeddings_hash == info2.embeddings_hash
    x2 = x.copy()
    x2[3] = -x2[3]
    _, info3, built3 = cache.get("m/d/test", "image", x2)
    assert built3 and info3.embeddings_hash != info1.embeddings_hash


def test_text_image_and_row_queries_round_trip(tiny_store, sample):
    text = "a microscopy image of white blood cell."
    res = api.search(tiny_store, TINY, text=text, k=5)
    assert len(res.hits) == 5 and res.hits[0]["rank"] == 1
    scores = [h["score"] for h in res.hits]
    assert scores == sorted(scores, reverse=True)
    (run,) = EmbeddingStore(tiny_store).runs()
    # the stored prompt's embedding is what a fresh encoding of the text gives
    t_idx = run.texts().index(text)
    ref = run.image_embeddings() @ run.text_embeddings()[t_idx]
    assert res.hits[0]["row"] == int(np.argmax(ref))
    # image query: a stored image, re-encoded from its bytes, finds itself first
    img_path = tiny_store.parent / "q.jpg"
    img_path.write_bytes(sample.reader.read(17))
    hit = api.search(tiny_store, TINY, image=img_path, k=3).hits[0]
    assert hit["row"] == 17 and hit["score"] > 0.99
    by_row = api.search(tiny_store, TINY, row=17, k=3)
    assert by_row.hits[0]["row"] == 17
    to_text = api.search(tiny_store, TINY, row=17, to="text", k=4)
    sims = run.text_embeddings() @ run.image_embeddings()[17]
    assert to_text.hits[0]["text"] == run.texts()[int(np.argmax(sims))]
    filtered = api.search(tiny_store, TINY, row=17, where=["label_name=platelet"], k=500)
    assert {h["label_name"] for h in filtered.hits} == {"platelet"} and len(filtered.hits) == 150


def test_search_where_values_of_one_column_are_alternatives(tiny_store):
    """--where has one meaning everywhere (config.parse_conditions): values of one column are
    alternatives, COLUMN!=VALUE excludes."""
    either = api.search(tiny_store, TINY, row=17, where=["label_name=platelet", "label_name=red blood cell"], k=500)
    assert {h["label_name"] for h in either.hits} == {"platelet", "red blood cell"} and len(either.hits) == 300
    not_platelet = api.search(tiny_store, TINY, row=17, where=["label_name!=platelet"], k=500)
    assert {h["label_name"] for h in not_platelet.hits} == {"red blood cell", "white blood cell"}
    with pytest.raises(UsageError, match="no metadata column 'colour'"):
        api.search(tiny_store, TINY, row=17, where=["colour=red"])


def test_search_refuses_a_model_that_does_not_match(tiny_store_copy):
    (run,) = EmbeddingStore(tiny_store_copy).runs()
    forge_provenance(run, weights_hash="something else")
    with pytest.raises(ProvenanceMismatchError, match="weights_hash"):
        api.search(tiny_store_copy, TINY, text="a platelet")
    assert api.search(tiny_store_copy, TINY, row=0, k=2).hits  # stored rows still work


def test_retrieval_metrics_hand_computed():
    sims = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    rel = np.array([[False, False, True], [True, False, True]])
    m = ranking_metrics(sims, rel, ks=(1, 2))
    # query 0: ranking 0,2,1 -> first hit at rank 2 -> AP 1/2 ; query 1: ranking 1,2,0 -> hits at 2,3 -> AP (1/2+2/3)/2
    assert m["R@1"] == 0 and m["R@2"] == 1
    assert m["mAP"] == pytest.approx((0.5 + (0.5 + 2 / 3) / 2) / 2)
    img = np.array([[1.0, 0], [0.9, 0.1], [0, 1]])
    text = np.array([[1.0, 0], [0, 1]])
    r = caption_retrieval(img, text, np.array([0, 1, 1]), ks=(1,))
    assert r["image_to_text"]["R@1"] == pytest.approx(2 / 3)  # image 1 prefers text 0
    assert r["text_to_image"]["R@1"] == 1.0


def test_cka_and_mutual_knn_properties():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 12))
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)
    assert linear_cka(x, rng.normal(size=(200, 12))) < 0.3
    assert mutual_knn(x, x, k=10) == 1.0
    assert mutual_knn(x, 2 * x, k=10) == 1.0


def test_paired_tests_hand_computed():
    # model a right on rows 0-7, model b right on rows 0-4 and 8: a-only = 3, b-only = 1
    rows = np.arange(10)
    y = np.zeros(10, int)
    pa = np.where(rows < 8, 0, 1)
    pb = np.where((rows < 5) | (rows == 8), 0, 1)
    preds = pd.concat(
        [
            pd.DataFrame({"model": m, "task": "t", "head": "lp", "row": rows, "y_true": y, "y_pred": p})
            for m, p in (("a", pa), ("b", pb))
        ]
    )
    r = pairwise_tests(preds, n_boot=200).iloc[0]
    assert (r.a_only, r.b_only) == (3, 1) and r.difference == pytest.approx(0.2)
    # exact two-sided binomial: 2 * P(X <= 1 | n=4, p=1/2) = 2 * 5/16
    assert r.p_mcnemar == pytest.approx(0.625)
    assert mcnemar(np.ones(5, bool), np.ones(5, bool))["p_value"] == 1.0


@pytest.mark.slow
def test_compare_report_on_the_sample(tiny_store, effnet_store, tmp_path):
    import shutil

    store = tmp_path / "both.zarr"
    shutil.copytree(tiny_store, store)
    for sub in ("efficientnet-lite0_imagenet",):
        shutil.copytree(effnet_store / sub, store / sub)
    cfg = api.EvalConfig(n_boot=100, shots=(1,), fewshot_seeds=1)
    api.evaluate(store, cfg, results_dir=tmp_path / "res")
    res = api.compare(tmp_path / "res", report=tmp_path / "report.html", n_boot=100)
    assert set(res.cka.index) == {TINY, "efficientnet-lite0:imagenet"}
    assert res.cka.loc[TINY, TINY] == pytest.approx(1.0)
    assert {"lp", "proto"} <= set(res.pairwise["head"])
    page = (tmp_path / "report.html").read_text()
    names = {p.name for p in res.figures}
    maps = {"map_0_0.png", "map_1_0.png"}  # named by position, never by user text
    assert {"zs_vs_lp.png", "heatmap.png", "cka.png", "mutual_knn.png", *maps} <= names
    assert page.count("data:image/png;base64,") == len(res.figures)
    r = CliRunner().invoke(app, ["compare", str(tmp_path / "res")])
    assert r.exit_code == 0 and "McNemar" in r.output and "CKA" in r.output


def test_cli_search_json_and_sheet(tiny_store, tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "search",
            str(tiny_store),
            "--model",
            TINY,
            "--row",
            "3",
            "-k",
            "4",
            "--json",
            "--sheet",
            str(tmp_path / "sheet.png"),
        ],
    )
    assert r.exit_code == 0, r.output
    payload = json.loads(r.output[: r.output.rindex("}") + 1])
    assert [h["rank"] for h in payload["hits"]] == [1, 2, 3, 4]
    assert (tmp_path / "sheet.png").stat().st_size > 1000
    r = CliRunner().invoke(app, ["search", str(tiny_store), "--model", TINY])
    assert r.exit_code == 2 and "exactly one of" in r.output
