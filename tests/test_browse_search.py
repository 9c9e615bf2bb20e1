"""The Search page's API (`probe browse`), server level: a text query and a "more like this" query
rank exactly as `probe search` / `mubench_probe.search` do on the tiny store, and bad requests are
one-line errors with status codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient

from mubench_probe import api
from mubench_probe.browse.context import BrowseContext, run_id_for
from mubench_probe.testing import write_run
from tests.conftest import TINY


@pytest.fixture(scope="module")
def served(tiny_store):
    from mubench_probe.browse.app import create_app

    ctx = BrowseContext.open(tiny_store)
    (rid,) = list(ctx.runs)
    return TestClient(create_app(ctx)), rid, ctx


def _same(ours: dict, theirs) -> None:
    """Rows, ranks, scores (exactly) and metadata of every hit equal."""
    got = [{k: v for k, v in h.items() if k != "thumb"} for h in ours["hits"]]
    assert got == theirs.hits
    assert all(h["thumb"] == f"/thumb/{ours['run_id']}/{h['row']}.png" for h in ours["hits"])


@pytest.mark.slow  # loads the tiny model (a few seconds on two cores)
def test_text_query_ranks_exactly_like_probe_search(served, tiny_store):
    client, rid, _ = served
    text = "a micrograph of a white blood cell"
    ours = client.get(f"/api/search/{rid}/text", params={"q": text, "k": 7}).json()
    theirs = api.search(tiny_store, TINY, text=text, k=7)
    assert len(ours["hits"]) == 7
    _same(ours, theirs)
    assert ours["query"] == {k: v for k, v in theirs.query.items() if k != "model"}
    again = client.get(f"/api/search/{rid}/text", params={"q": "platelet", "k": 5}).json()  # the kept model
    _same(again, api.search(tiny_store, TINY, text="platelet", k=5))
    filtered = client.get(f"/api/search/{rid}/text", params={"q": text, "k": 4, "where": "label_name=platelet"}).json()
    _same(filtered, api.search(tiny_store, TINY, text=text, k=4, where=["label_name=platelet"]))
    assert {h["label_name"] for h in filtered["hits"]} == {"platelet"}


def test_more_like_this_ranks_exactly_like_probe_search(served, tiny_store):
    client, rid, _ = served
    for row, k in ((0, 10), (17, 3)):
        ours = client.get(f"/api/search/{rid}/row/{row}", params={"k": k}).json()
        _same(ours, api.search(tiny_store, TINY, row=row, k=k))
        assert ours["hits"][0]["row"] == row
    where = ["label_name!=platelet"]
    ours = client.get(f"/api/search/{rid}/row/3", params={"k": 6, "where": where}).json()
    _same(ours, api.search(tiny_store, TINY, row=3, k=6, where=where))


@pytest.mark.slow  # a CLI subprocess
def test_the_cli_json_lists_the_same_hits(served, tiny_store):
    client, rid, _ = served
    cmd = [sys.executable, "-m", "mubench_probe.cli", "search", str(tiny_store), "--model", TINY]
    out = subprocess.run(
        [*cmd, "--row", "5", "-k", "5", "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cli = json.loads(out)
    ours = client.get(f"/api/search/{rid}/row/5", params={"k": 5}).json()
    assert [h["row"] for h in ours["hits"]] == [h["row"] for h in cli["hits"]]
    assert [h["score"] for h in ours["hits"]] == pytest.approx([h["score"] for h in cli["hits"]], abs=1e-12)


def test_bad_requests_are_status_codes(served):
    client, rid, ctx = served
    n = ctx.run(rid).layout.n_rows
    assert client.get("/api/search/no-such-run/row/0").status_code == 404
    assert client.get("/api/search/no-such-run/text?q=cell").status_code == 404
    assert client.get(f"/api/search/{rid}/row/{n}").status_code == 404
    for bad in ("-1", "1.5", "abc"):
        assert client.get(f"/api/search/{rid}/row/{bad}").status_code in (400, 404)
    assert client.get(f"/api/search/{rid}/text?q=").status_code == 400
    assert client.get(f"/api/search/{rid}/text?q=%20%20").status_code == 400
    assert client.get(f"/api/search/{rid}/text").status_code == 400
    assert client.get(f"/api/search/{rid}/row/0?k=0").status_code == 400
    r = client.get(f"/api/search/{rid}/row/0?where=nope=1")
    assert r.status_code == 400 and "nope" in r.json()["error"]
    assert client.post(f"/api/search/{rid}/row/0").status_code == 405
    runs = client.get("/api/search/runs").json()["runs"]
    assert [(r["run_id"], r["has_text"]) for r in runs] == [(rid, True)]


def test_image_only_runs_refuse_text_but_answer_rows(tmp_path):
    from mubench_probe.browse.app import create_app

    rng = np.random.default_rng(0)
    meta = pd.DataFrame({"label_name": ["a", "b"] * 20, "dataset": "synth"})
    run = write_run(tmp_path / "s.zarr", rng.normal(size=(40, 8)).astype(np.float32), meta, failures=["x"] + [""] * 39)
    client = TestClient(create_app(BrowseContext.open(tmp_path / "s.zarr", cache_dir=tmp_path / "c")))
    rid = run_id_for(run.path)
    r = client.get(f"/api/search/{rid}/text?q=cell")
    assert r.status_code == 400 and "image-only" in r.json()["error"]
    r = client.get(f"/api/search/{rid}/row/0")  # its image failed: no embedding to search with
    assert r.status_code == 400 and "no embedding" in r.json()["error"]
    ours = client.get(f"/api/search/{rid}/row/4?k=5").json()
    theirs = api.search(tmp_path / "s.zarr", "synthetic:random", row=4, k=5)
    assert [(h["row"], h["score"]) for h in ours["hits"]] == [(h["row"], h["score"]) for h in theirs.hits]
    assert 0 not in [h["row"] for h in ours["hits"]]


@pytest.mark.slow  # a fresh interpreter
def test_importing_browse_does_not_import_torch():
    code = "import sys, mubench_probe.browse.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
