"""`probe browse` in a real browser (headless OS Chromium through Playwright): every page loads,
the overview links to the errors behind a number, a confusion-matrix cell lists its images, an
image page shows the image, its predictions and its neighbours; markup in labels renders as
text; the token works from the printed URL. Screenshots go to the test's tmp folder (and to
$PROBE_SCREENSHOTS, e.g. docs/images, for the README)."""

from __future__ import annotations

import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("starlette")

from mubench_probe import api
from mubench_probe.browse.context import run_id_for
from mubench_probe.config import EvalConfig

from .browse_harness import broken_images, browser_page, need_browser, open_page, serve, shoot, wait_images, wait_ready
from .test_browse_server import IMG, SCRIPT, hostile_meta

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample_results(tiny_store, tmp_path_factory):
    """The bundled sample's tiny store evaluated on its fine task (linear probe, kNN, zero-shot)."""
    need_browser()
    out = tmp_path_factory.mktemp("browse-results")
    cfg = EvalConfig(heads=("lp", "knn", "zs_prompt"), ks=(5,), shots=(), n_boot=100)
    api.evaluate(tiny_store, cfg, tasks=["fine/bccd"], results_dir=out)
    return out


def no_errors_on_page(page) -> None:
    assert page.locator("#page .error").count() == 0, page.inner_text("#page")[:500]
    assert broken_images(page) == []
    words = set(page.inner_text("#page").split())
    assert not words & {"null", "undefined", "NaN", "[object"}, "a missing value was rendered as text"


def test_every_page_and_the_errors_workflow(tiny_store, sample_results, tmp_path):
    """Overview -> a linear-probe accuracy -> its confusion matrix -> a cell's images -> one image."""
    shots = tmp_path / "shots"
    with serve(tiny_store, sample_results, cache_dir=tmp_path / "cache") as url, browser_page() as page:
        open_page(page, url + "#/overview")
        no_errors_on_page(page)
        assert page.locator("table.runs tr").count() == 2  # header + the one run
        shoot(page, shots, "overview")

        page.locator("table.results tr", has_text="lp").locator("a").first.click()  # the number -> its images
        wait_ready(page)
        assert "head=lp" in page.url
        assert page.locator("table.confusion td.cell").count() == 9  # 3 classes
        off = page.locator("table.confusion td.cell.off:not(.zero)").first
        expected = int(off.inner_text())
        off.click()
        page.wait_for_selector("#cell-images .card")
        assert page.locator("#cell-images .card").count() == expected
        assert page.locator("#most-wrong .card").count() > 0
        wait_images(page)
        no_errors_on_page(page)
        shoot(page, shots, "errors")

        page.locator("#cell-images .card a").first.click()  # one wrong image: what are its neighbours?
        wait_ready(page)
        assert "#/image/" in page.url
        page.wait_for_function("() => document.getElementById('full-image').naturalWidth > 0")
        assert page.locator("table.predictions tr").count() > 1
        assert page.locator(".neighbours .card").count() == 8
        wait_images(page)
        no_errors_on_page(page)
        shoot(page, shots, "image", full_page=True)

        for name in ("map", "search"):  # their interactions are tested with their modules
            open_page(page, url + f"#/{name}")
            no_errors_on_page(page)
        assert page.console_errors == []
    assert {p.name for p in shots.iterdir()} == {"browse-overview.png", "browse-errors.png", "browse-image.png"}


def test_markup_in_labels_renders_as_text(tmp_path, sample):
    """A `<script>` class label and an `<img onerror>` metadata value show as text and never run."""
    need_browser()
    from mubench_probe.testing import write_run

    store = tmp_path / "hostile.zarr"
    meta = hostile_meta(sample)
    x = np.random.default_rng(0).normal(size=(len(meta), 8)).astype(np.float32)
    rid = run_id_for(write_run(store, x, meta, model="synthetic:a", dataset="sample").path)
    api.evaluate(store, EvalConfig(heads=("proto",), shots=(), n_boot=10), results_dir=tmp_path / "res")
    row = int(np.flatnonzero(meta["label_name"].to_numpy() == SCRIPT)[0])
    with serve(store, tmp_path / "res", cache_dir=tmp_path / "cache") as url, browser_page() as page:
        open_page(page, url + "#/errors")
        headers = page.locator("table.confusion th").all_inner_texts()
        assert SCRIPT in headers
        open_page(page, url + f"#/image/{rid}/{row}")
        cells = page.locator("table.meta td").all_inner_texts()
        assert IMG in cells and SCRIPT in cells
        assert page.evaluate("() => window.__pwned") is None
        assert page.evaluate("() => document.querySelectorAll('script').length") == 1  # app.js only
        assert page.evaluate("() => document.querySelectorAll('img[src=\"x\"]').length") == 0


def test_token_from_the_printed_url(tiny_store, sample_results, tmp_path):
    need_browser()
    with serve(tiny_store, sample_results, token="browser-token-123", cache_dir=tmp_path / "c") as url:
        assert url.endswith("?token=browser-token-123")
        bare = url.split("?")[0]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bare + "api/overview", timeout=10)
        assert refused.value.code == 401
        with browser_page() as page:
            open_page(page, url + "#/errors")
            page.locator("table.confusion td.cell").first.click()
            page.wait_for_selector("#cell-images .card")
            wait_images(page)
            no_errors_on_page(page)
            assert page.console_errors == []


def test_channel_toggles_on_a_multichannel_image(tmp_path):
    """Unticking a channel of a 5-channel image asks the server for the other four and shows them."""
    need_browser()
    from mubench_probe.browse.context import BrowseContext

    from .browse_harness import multichannel_store

    store, _ = multichannel_store(tmp_path)
    rid = next(iter(BrowseContext.open(store, None, tmp_path / "c0").runs))
    with serve(store, cache_dir=tmp_path / "cache") as url, browser_page() as page:
        open_page(page, url + f"#/image/{rid}/2")
        boxes = page.locator("#channels input[type=checkbox]")
        assert boxes.count() == 5
        page.wait_for_function("() => document.getElementById('full-image').naturalWidth > 0")
        boxes.nth(1).uncheck()
        page.wait_for_function(
            "() => { const i = document.getElementById('full-image');"
            " return i.src.includes('channels=0%2C2%2C3%2C4') && i.complete && i.naturalWidth > 0; }"
        )
        no_errors_on_page(page)
        shoot(page, tmp_path / "shots", "channels")
        assert page.console_errors == []
