"""POST /v1/detect with preset=focus: the response shows the focus run per level; option errors are 422."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.settings import Settings
from tests.conftest import blob_image, encode

BLOBS = [(200, 100, 210, 108, 0), (500, 300, 508, 309, 1)]


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(engine="fake", max_image_bytes=2_000_000, max_image_pixels=4_000_000))) as c:
        yield c


def test_focus_preset_reports_chips_and_focus_area_per_level(client: TestClient) -> None:
    png = encode(blob_image(900, 600, BLOBS))
    full = client.post("/v1/detect?preset=pyramid", content=png, headers={"content-type": "image/png"}).json()
    r = client.post("/v1/detect?preset=focus&focus_threshold=0.5", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "focus" and "mode" not in full
    assert sorted(d["box"] for d in body["detections"]) == sorted(d["box"] for d in full["detections"])
    assert body["chips"] == sum(lv["chips"] for lv in body["levels"]) < full["chips"]
    coarse = body["levels"][-1]
    assert coarse["focus_area"] == 1.0 and 0 < body["levels"][0]["focus_area"] < 1.0
    metrics = client.get("/metrics").text
    assert 'snipserve_focus_chips_count{level="0"}' in metrics


def test_focus_threshold_outside_the_focus_preset_is_422(client: TestClient) -> None:
    png = encode(blob_image(300, 200, BLOBS[:1]))
    r = client.post("/v1/detect?focus_threshold=0.3", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "focus_threshold" in r.json()["error"]["message"]
    r = client.post("/v1/detect?preset=focus&focus_threshold=2", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "focus_threshold" in r.json()["error"]["message"]
