"""The Map and Search pages of `probe browse` in a real headless Chromium (the OS package, driven by
Playwright): the map paints with WebGL, a box and a lasso selection list thumbnails, colours come
with an escaped legend, a second model shares the selection, a text search and a "more like this"
search show thumbnails with the scores `probe search` gives. Screenshots go to the test's folder
and, with PROBE_SCREENSHOTS=DIR, to DIR (the README's come from `PROBE_SCREENSHOTS=docs/images`)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("starlette")
from mubench_probe import api
from mubench_probe.browse.context import run_id_for
from mubench_probe.config import EvalConfig
from mubench_probe.testing import write_run
from tests.browse_harness import browser_page, need_browser, open_page, serve, shoot
from tests.conftest import TINY

pytestmark = pytest.mark.slow
HOSTILE = '<img src=x onerror="window.__pwned=1">'


@pytest.fixture(scope="module")
def site(tiny_store, sample, tmp_path_factory):
    """The tiny store plus a second (synthetic) model over the same rows, with results; a live server."""
    need_browser()
    root = tmp_path_factory.mktemp("browse-map")
    store, results = root / "tiny.zarr", root / "results"
    shutil.copytree(tiny_store, store)
    meta = sample.meta.copy()
    meta["note"] = np.where(np.arange(len(meta)) % 3 == 0, HOSTILE, "plain")
    rng = np.random.default_rng(0)
    other = write_run(
        store, rng.normal(size=(len(meta), 12)).astype(np.float32), meta, model="synthetic:b", dataset="sample"
    )
    api.evaluate(store, EvalConfig(heads=("proto",), shots=(), n_boot=10), results_dir=results)
    (tiny,) = [rid for rid in _ids(store) if rid.startswith("mubench-tiny")]
    with serve(store, results, cache_dir=root / "cache") as url:
        yield url, tiny, run_id_for(other.path), store


def _ids(store) -> list[str]:
    from mubench_probe.store import EmbeddingStore

    return [run_id_for(r.path) for r in EmbeddingStore(store).runs()]


def _drag(page, canvas, points: list[tuple[float, float]]) -> None:
    """Press, move through `points` (fractions of the canvas), release."""
    box = canvas.bounding_box()
    xy = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*xy[0])
    page.mouse.down()
    for p in xy[1:]:
        page.mouse.move(*p, steps=4)
    page.mouse.up()


def _thumbs_loaded(page, selector: str, first: int = 4) -> int:
    """How many thumbnails match `selector`, after the first few (lazy images: scrolled to) have decoded."""
    page.locator(selector).first.scroll_into_view_if_needed()
    page.wait_for_function(
        "([sel, n]) => { const im = [...document.querySelectorAll(sel)].slice(0, n); return im.length > 0 && "
        "im.every((i) => i.complete && i.naturalWidth > 0); }",
        arg=[selector, first],
        timeout=60000,
    )
    return page.locator(selector).count()


def test_map_paints_selects_and_links_two_models(site, tmp_path):
    url, tiny, other, _ = site
    with browser_page() as page:
        open_page(page, f"{url}#/map?run={tiny}&b={other}", timeout_ms=60000)
        canvases = page.locator("canvas.map-gl")
        assert canvases.count() == 2
        for i in range(2):
            assert canvases.nth(i).get_attribute("data-painted") == "true"
        assert page.locator(".map-panel").first.locator(".map-legend li").count() >= 2
        shoot(page, tmp_path, "map")

        page.click("#map-mode-box")
        _drag(page, page.locator("canvas.map-overlay").first, [(0.15, 0.15), (0.6, 0.5), (0.85, 0.85)])
        page.wait_for_selector("#map-selection-count", timeout=30000)
        count = int(page.get_attribute("#map-selection-count", "data-count"))
        assert count > 0
        n_thumbs = _thumbs_loaded(page, "#map-selection img.thumb")
        assert n_thumbs == min(count, 60)
        # linked: the page highlights the same rows in both panels, as many as the server selected
        assert [canvases.nth(i).get_attribute("data-selected") for i in range(2)] == [str(count)] * 2
        shoot(page, tmp_path, "map-selection")

        page.click("#map-mode-lasso")
        _drag(page, page.locator("canvas.map-overlay").nth(1), [(0.2, 0.2), (0.8, 0.25), (0.75, 0.8), (0.25, 0.75)])
        page.wait_for_function(
            "(prev) => { const h = document.querySelector('#map-selection-count'); "
            "return h && h.textContent !== prev; }",
            arg=page.text_content("#map-selection-count"),
            timeout=30000,
        )
        assert int(page.get_attribute("#map-selection-count", "data-count")) > 0
        _thumbs_loaded(page, "#map-selection img.thumb")
        assert not page.console_errors, page.console_errors


def test_map_legend_shows_markup_as_text_and_colours_by_correctness(site, tmp_path):
    url, tiny, other, _ = site
    with browser_page() as page:
        open_page(page, f"{url}#/map?run={other}&colour=note", timeout_ms=60000)
        labels = page.locator(".map-legend .legend-label").all_text_contents()
        assert HOSTILE in labels, labels
        assert page.locator(".map-legend img").count() == 0
        assert page.evaluate("() => window.__pwned") is None
        options = page.locator("#map-colour option").all_text_contents()
        assert any("correct or wrong" in o for o in options)
        page.goto("about:blank")  # a fresh load: a hash change alone would find the old page ready
        open_page(page, f"{url}#/map?run={tiny}", timeout_ms=60000)
        choice = next(o for o in page.locator("#map-colour option").all_text_contents() if "correct or wrong" in o)
        page.select_option("#map-colour", label=choice)  # the page reloads its route with the new colouring
        page.wait_for_function(
            "() => { const l = [...document.querySelectorAll('.map-legend .legend-label')].map((e) => e.textContent); "
            "return l.length > 0 && l.every((t) => ['correct', 'wrong', 'mixed', '(missing)'].includes(t)); }",
            timeout=60000,
        )
        assert page.locator("#map-colour option:checked").text_content() == choice
        shoot(page, tmp_path, "map-correct-wrong")
        assert not page.console_errors, page.console_errors


def test_text_and_image_search_show_thumbnails_and_scores(site, tmp_path):
    url, tiny, _, store = site
    text = "a micrograph of a white blood cell"
    with browser_page() as page:
        open_page(page, f"{url}#/search?run={tiny}&k=8", timeout_ms=60000)
        page.fill("#search-text", text)
        page.click("#search-text-go")
        page.wait_for_selector("#search-hits .hit", timeout=120000)  # the first text query loads the model
        assert _thumbs_loaded(page, "#search-hits img.thumb") == 8
        scores = [
            float(s) for s in page.locator("#search-hits .score").evaluate_all("e => e.map(x => x.dataset.score)")
        ]
        rows = [int(r) for r in page.locator("#search-hits .hit").evaluate_all("e => e.map(x => x.dataset.row)")]
        ref = api.search(store, TINY, text=text, k=8)
        assert rows == [h["row"] for h in ref.hits]
        assert scores == [h["score"] for h in ref.hits]
        shoot(page, tmp_path, "search")

        page.locator("#search-hits .hit a", has_text="more like this").nth(2).click()
        page.wait_for_function(
            "(r) => { const h = document.querySelector('#search-title'); "
            "return h && h.textContent.includes('row ' + r); }",
            arg=rows[2],
            timeout=60000,
        )
        _thumbs_loaded(page, "#search-hits img.thumb")
        like = [int(r) for r in page.locator("#search-hits .hit").evaluate_all("e => e.map(x => x.dataset.row)")]
        ref = api.search(store, TINY, row=rows[2], k=8)
        assert like == [h["row"] for h in ref.hits] and like[0] == rows[2]
        shoot(page, tmp_path, "search-more-like-this")
        assert not page.console_errors, page.console_errors
