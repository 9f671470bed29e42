"""The web demo page, end to end in headless Chromium (Debian's ``chromium``, driven by Playwright).

Chromium comes from ``scripts/install-browser.sh``; the test skips with a reason only where it is absent.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import pytest

from tests.service.live_server import blob_image, fake_app, serve_in_thread

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(os.environ.get("SNIPSERVE_WEB_SCREENSHOT", "/tmp/snipserve_web_demo.png"))
BOXES = [(80, 60, 120, 100, "red"), (300, 200, 340, 236, "green"), (500, 380, 536, 420, "blue")]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("SNIPSERVE_CHROMIUM"), "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(fake_app()) as url:
        yield url


def test_page_and_assets_are_served_without_external_fetches(base_url: str) -> None:
    page = httpx.get(base_url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset, media in (("app.js", "javascript"), ("style.css", "text/css")):
        resp = httpx.get(f"{base_url}/static/{asset}", timeout=10)
        assert resp.status_code == 200 and media in resp.headers["content-type"]
        assert "http://" not in resp.text and "https://" not in resp.text  # no CDN
    assert httpx.get(base_url + "/static/../api.py", timeout=10).status_code == 404


def pixel(page: Any, x: int, y: int) -> list[int]:
    rgba: list[int] = page.evaluate(
        "([x, y]) => Array.from(document.getElementById('canvas').getContext('2d').getImageData(x, y, 1, 1).data)",
        [x, y],
    )
    return rgba[:3]


def test_upload_draws_boxes_labels_and_timings_in_chromium(base_url: str, tmp_path: Path) -> None:
    executable = chromium_path()
    if executable is None:
        pytest.skip("Chromium is not installed (run scripts/install-browser.sh; needs apt and root or sudo)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    image_path = tmp_path / "three.png"
    cv2.imwrite(str(image_path), cv2.cvtColor(blob_image((640, 480), BOXES), cv2.COLOR_RGB2BGR))
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, timeout=30_000)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(base_url + "/", timeout=15_000)
            page.wait_for_function("document.getElementById('model').textContent.includes('fake-rgb-blobs')")
            assert page.locator("#preset option").all_text_contents() == ["default", "fast"]
            page.set_input_files("#file", str(image_path))
            page.click("#detect")
            page.wait_for_selector("#status[data-state=done]", timeout=15_000)
            assert page.text_content("#count") == "3"
            labels = page.locator("#labels li").evaluate_all("items => items.map(i => i.dataset.label)")
            assert sorted(labels) == ["blue", "green", "red"]
            stages = page.locator("#timings tr").evaluate_all("rows => rows.map(r => r.dataset.stage)")
            assert {"decode", "infer", "merge", "total"} <= set(stages)
            # each box is stroked in its class colour just outside the coloured square (palette of render.py)
            assert pixel(page, 79, 80) == [230, 25, 75]
            assert pixel(page, 299, 218) == [60, 180, 75]
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            # hiding every level hides every box
            for box in page.locator("#levels input").all():
                box.uncheck()
            assert page.text_content("#count") == "0"
            assert pixel(page, 79, 80) == [128, 128, 128]
            # a file the server cannot decode: its error code and message are shown, nothing crashes
            bad = tmp_path / "notes.png"
            bad.write_bytes(b"these are not pixels")
            page.set_input_files("#file", str(bad))
            page.click("#detect")
            page.wait_for_selector("#status[data-state=error]", timeout=15_000)
            assert "400 bad_image" in (page.text_content("#error") or "")
        finally:
            browser.close()
