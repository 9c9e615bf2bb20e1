"""Running `probe browse` inside a test: the app under uvicorn in a thread, and a headless Chromium.

`serve(store, results)` yields the base URL of a live server (port 0, loopback); `browser_page(shots)`
yields a Playwright page on the OS Chromium (/usr/bin/chromium, never a downloaded one) and
`shoot(page, name)` saves a screenshot into the test's folder (and into $PROBE_SCREENSHOTS when
set, e.g. docs/images for the README). Without Chromium or Playwright the browser tests skip with
the reason, except under CI=true, where they fail: CI must run them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mubench_probe.browse.app import create_app
from mubench_probe.browse.context import BrowseContext
from mubench_probe.browse.server import allowed_hosts, bind, make_server, url_for

CHROMIUM = os.environ.get("PROBE_CHROMIUM", "/usr/bin/chromium")


def need_browser() -> None:
    """Skip (fail under CI=true) when the OS Chromium or Playwright for Python is missing."""
    missing = []
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("playwright for Python (pip install playwright; no `playwright install` needed)")
    if missing:
        reason = "browser tests need " + " and ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@contextlib.contextmanager
def serve(
    store: str | Path,
    results: str | Path | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
) -> Iterator[str]:
    """A live server over `store` (and `results`) on a free loopback port; yields its URL."""
    ctx = BrowseContext.open(store, results, cache_dir)
    sock = bind("127.0.0.1", 0)
    server = make_server(create_app(ctx, token, allowed_hosts(sock)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    server.install_signal_handlers = lambda: None  # not the main thread (uvicorn < 0.29 asks)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the browse server did not start")
    try:
        yield url_for(sock, token)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A Playwright page in headless OS Chromium; console errors are collected in `page.console_errors`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.console_errors = errors
            yield page
        finally:
            browser.close()


def shoot(page: Any, folder: Path, name: str, full_page: bool = False) -> Path:
    """Screenshot into `folder` (the test's tmp_path) and also into $PROBE_SCREENSHOTS when set."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"browse-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    extra = os.environ.get("PROBE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(extra) / path.name)
    return path


def open_page(page: Any, url: str, timeout_ms: int = 30000) -> None:
    """Go to `url` (a hash route of the app) and wait until its page script has rendered."""
    page.goto(url)
    wait_ready(page, timeout_ms)


def wait_ready(page: Any, timeout_ms: int = 30000) -> None:
    """Wait until the page of the *current* hash has rendered (after a click the previous page is
    still marked ready until the hashchange handler runs)."""
    page.wait_for_function(
        """() => { const p = document.getElementById("page");
                   return p && p.dataset.ready === "true" && p.dataset.rendered === location.hash; }""",
        timeout=timeout_ms,
    )


def wait_images(page: Any, timeout_ms: int = 30000) -> None:
    """Wait until every image in the viewport has loaded (lazy ones below it are left alone)."""
    page.wait_for_function(
        """() => [...document.images].filter((i) => i.getBoundingClientRect().top < innerHeight)
                 .every((i) => i.complete)""",
        timeout=timeout_ms,
    )


def broken_images(page: Any) -> list[str]:
    """Sources of loaded-but-broken images in the viewport (a 404 or 500 thumbnail)."""
    return page.evaluate(
        """() => [...document.images].filter((i) => i.getBoundingClientRect().top < innerHeight)
                 .filter((i) => i.complete && i.naturalWidth === 0).map((i) => i.src)"""
    )


def multichannel_store(root: Path) -> tuple[Path, Path]:
    """A folder dataset of 5-channel uint16 TIFFs (two classes, three images each) extracted with the
    tiny random model: (store, dataset folder). Extraction keeps the first three channels; the app
    shows all five as a composite."""
    import numpy as np
    import tifffile

    from mubench_probe import api

    data = root / "mcdata"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128]
    for cls in ("cellA", "cellB"):
        (data / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):  # a few fluorescent-looking spots per channel over camera noise, 12-bit range
            arr = rng.normal(200, 20, size=(5, 96, 128))
            for c in range(5):
                for _ in range(3):
                    y, x, r = rng.uniform(10, 86), rng.uniform(10, 118), rng.uniform(4, 14)
                    arr[c] += rng.uniform(1000, 3500) * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * r * r))
            arr = np.clip(arr, 0, 4095).astype(np.uint16)
            tifffile.imwrite(data / cls / f"img{i}.tif", arr, imagej=True, metadata={"axes": "CYX"})
    store = root / "mc.zarr"
    api.extract("mubench-tiny-vit:random", str(data), store=store, num_workers=0)
    return store, data
