"""HTTP API: happy paths and every documented error, with the deterministic fake engine."""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.http.app import create_app
from service.settings import Settings
from tests.conftest import blob_image, encode

BLOBS = [(200, 100, 230, 120, 0), (500, 300, 520, 340, 1), (800, 50, 812, 60, 2)]


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(engine="fake", max_image_bytes=2_000_000, max_image_pixels=4_000_000))) as c:
        yield c


@pytest.fixture
def png() -> bytes:
    return encode(blob_image(900, 600, BLOBS))


def post_raw(client: TestClient, data: bytes, query: str = "", ctype: str = "image/png"):
    return client.post(f"/v1/detect{query}", content=data, headers={"content-type": ctype})


def test_raw_body_detects_every_blob(client: TestClient, png: bytes) -> None:
    r = post_raw(client, png)
    assert r.status_code == 200
    body = r.json()
    assert body["image"] == {"width": 900, "height": 600}
    got = sorted((d["label"], d["box"]) for d in body["detections"])
    assert got == [("blue", [800, 50, 812, 60]), ("green", [500, 300, 520, 340]), ("red", [200, 100, 230, 120])]
    assert body["model"] == "fake-rgb-blobs" and body["chips"] == sum(lv["chips"] for lv in body["levels"])
    assert {"decode", "plan", "crop", "queue_wait", "infer", "postprocess", "merge", "total"} <= body["timings"].keys()
    assert r.headers["x-request-id"]


def test_multipart_with_form_options(client: TestClient, png: bytes) -> None:
    r = client.post(
        "/v1/detect", files={"file": ("a.png", png, "image/png")}, data={"classes": "green,red", "max_detections": "1"}
    )
    assert r.status_code == 200
    dets = r.json()["detections"]
    assert len(dets) == 1 and dets[0]["label"] in {"green", "red"}


def test_query_options(client: TestClient, png: bytes) -> None:
    r = post_raw(client, png, "?preset=fast")  # coarse level only: the fake model sees a 128 px thumbnail
    assert r.status_code == 200 and r.json()["chips"] == 1
    r = post_raw(client, png, '?levels=[{"scale":1.0,"valid":[-1,25]}]')  # only objects up to sqrt-area 25
    assert sorted(d["label"] for d in r.json()["detections"]) == ["blue", "red"]
    r = post_raw(client, png, "?min_object_size=20&max_object_size=40")
    assert sorted(d["label"] for d in r.json()["detections"]) == ["green", "red"]
    r = post_raw(client, png, "?classes=2&merge=hard&iou_threshold=0.5&class_agnostic=true")
    assert [d["class_id"] for d in r.json()["detections"]] == [2]


def test_coco_and_jpeg_formats(client: TestClient, png: bytes) -> None:
    r = post_raw(client, png, "?format=coco&image_id=42")
    assert r.status_code == 200
    assert {(d["image_id"], tuple(d["bbox"])) for d in r.json()} >= {(42, (200.0, 100.0, 30.0, 20.0))}
    r = post_raw(client, png, "?format=jpeg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (600, 900, 3)


@pytest.mark.parametrize(
    ("query", "status", "fragment"),
    [
        ("?levels=not-json", 422, "levels must be a JSON list"),
        ('?levels=[{"scale":1,"long_side":500}]', 422, "either 'scale'"),
        ("?preset=nope", 422, "unknown levels preset 'nope'"),
        ("?classes=zebra", 422, "unknown class 'zebra'"),
        ("?classes=7", 422, "unknown class ids [7]"),
        ("?min_object_size=50&max_object_size=10", 422, "must be below"),
        ("?score_threshold=2", 422, "score_threshold"),
        ("?merge=fancy", 422, "merge: Input should be"),
        ("?format=gif", 422, "format"),
        ('?levels=[{"scale":0.01}]&max_detections=5', 200, ""),
    ],
)
def test_bad_options(client: TestClient, png: bytes, query: str, status: int, fragment: str) -> None:
    r = post_raw(client, png, query)
    assert r.status_code == status, r.text
    if status != 200:
        assert r.json()["error"]["code"] == "invalid_options"
        assert fragment in r.json()["error"]["message"]


def test_input_errors(client: TestClient, png: bytes) -> None:
    r = post_raw(client, b"hello", ctype="text/plain")
    assert r.status_code == 415 and "content type 'text/plain'" in r.json()["error"]["message"]
    assert r.json()["error"]["request_id"] == r.headers["x-request-id"]  # quote it when reporting a problem
    r = post_raw(client, b"")
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_image"
    r = post_raw(client, png[: len(png) // 2])
    assert r.status_code == 400
    r = post_raw(client, b"\0" * 2_100_000)
    assert r.status_code == 413 and "2000000" in r.json()["error"]["message"]
    r = post_raw(client, encode(np.zeros((2100, 2100, 3), np.uint8)))
    assert r.status_code == 413 and "above the limit of 4.0 MP" in r.json()["error"]["message"]
    r = client.post("/v1/detect", files={"other": ("a.png", png, "image/png")})
    assert r.status_code == 400 and "'file'" in r.json()["error"]["message"]
    # the service is still ready after all of that
    assert client.get("/readyz").status_code == 200


def test_health_ready_models_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    models = client.get("/v1/models").json()["models"]
    assert models[0]["id"] == "fake-rgb-blobs" and models[0]["card"]["classes"] == ["red", "green", "blue"]
    assert models[0]["engine"]["providers"] == ["cpu"]
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/detect"]["post"]
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert "example" in op["responses"]["200"]["content"]["application/json"]


def test_not_ready_before_startup() -> None:
    app = create_app(Settings(engine="fake"))
    c = TestClient(app)  # not entered: the lifespan has not run
    assert c.get("/readyz").status_code == 503
    r = c.post("/v1/detect", content=b"x", headers={"content-type": "image/png"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_queue_full_is_503_with_retry_after(png: bytes) -> None:
    with TestClient(create_app(Settings(engine="fake", queue_capacity=3))) as c:
        r = post_raw(c, png)  # 97 chips > capacity 3
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "queue_full"


def test_deadline_is_504() -> None:
    from service.engines.fake import FakeEngine

    app = create_app(Settings(engine="fake"), engine_factory=lambda s: FakeEngine(delay=0.5))
    with TestClient(app) as c:
        r = post_raw(c, encode(blob_image(128, 128, [])), "?timeout=0.1")
        assert r.status_code == 504 and "0.1 s" in r.json()["error"]["message"]


def test_engine_error_is_500_and_service_stays_ready() -> None:
    from service.engines.fake import FakeEngine

    calls = {"n": 0}

    def fail_first(batch: np.ndarray) -> None:
        if not batch.any():
            return  # warm-up batches are zeros
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("CUDA error: an illegal memory access")

    app = create_app(Settings(engine="fake", warmup=True), engine_factory=lambda s: FakeEngine(fail=fail_first))
    with TestClient(app) as c:
        img = encode(blob_image(128, 128, [(10, 10, 30, 30, 0)]))
        r = post_raw(c, img)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        assert r.json()["error"]["message"] == "inference failed"  # the exception's text stays in the log
        assert c.get("/readyz").status_code == 200
        r = post_raw(c, img)
        assert r.status_code == 200 and len(r.json()["detections"]) == 1
