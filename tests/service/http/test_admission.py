"""Admission control, deadlines, priorities and engine faults, through the batcher and over HTTP.

The batcher's own mechanics (sharing, overflow, hang recovery) are in ``test_batch.py``; this file checks
the priority lanes and what a client sees: status, ``Retry-After``, JSON error body, readiness after faults.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.adapters import get_adapter
from service.batch import Batcher, BatcherConfig
from service.crop import Normalizer
from service.engines.fake import FAKE_CARD, FAKE_FOCUS_CARD, FakeEngine
from service.errors import QueueFull
from service.http.app import create_app
from service.http.serving import batcher_of, under_load
from service.http.transport import BodyGuard, TransportConfig
from service.options import DetectOptions
from service.pipeline import Route
from service.plan import LevelSpec, PlanConfig, plan
from service.settings import Settings


def make_batcher(engine: FakeEngine, **cfg: float) -> Batcher:
    config = BatcherConfig(**({"max_batch": 2, "max_delay_ms": 0.0, "pipeline_depth": 1} | cfg))
    return Batcher(engine, get_adapter(engine.card), Normalizer.from_card(engine.card), config)


def work_for(n_chips: int) -> tuple[object, list[np.ndarray]]:
    c = FAKE_CARD.input_size
    p = plan((c * n_chips, c), PlanConfig(chip_size=c, levels=(LevelSpec(scale=1.0, overlap=0.0),)))
    return p, [np.zeros((c, c * n_chips, 3), np.uint8)]


def png(width: int = 256, height: int = 256) -> bytes:
    image = np.zeros((height, width, 3), np.uint8)
    image[40:60, 40:60] = (0, 0, 255)  # BGR red
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


@pytest.fixture
def client_for() -> Iterator[Callable[..., TestClient]]:
    """Factory: ``client_for(engine, **settings)`` -> a started TestClient (closed at teardown)."""
    clients: list[TestClient] = []

    def make(engine: FakeEngine, **overrides: object) -> TestClient:
        settings = Settings(**({"engine": "fake", "warmup": False, "max_delay_ms": 0.0} | overrides))
        app = create_app(settings, engine_factory=lambda s: engine)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def detect(client: TestClient, **params: object) -> object:
    return client.post("/v1/detect", content=png(), headers={"content-type": "image/png"}, params=params)


# ---- priority lanes ---------------------------------------------------------------------------------
async def test_interactive_chips_overtake_queued_bulk_chips() -> None:
    gate = threading.Event()
    engine = FakeEngine(max_batch=2, fail=lambda batch: gate.wait(5) and None)
    b = make_batcher(engine)
    await b.start()
    try:
        bulk = await b.submit(*work_for(8), threshold=0.5, priority="bulk")  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # first bulk batch (2 chips) is on the engine, 6 queued
        interactive = await b.submit(*work_for(2), threshold=0.5)  # type: ignore[arg-type]
        gate.set()
        await asyncio.wait_for(interactive.future, 5)
        assert not bulk.future.done()  # interactive went ahead of the 6 queued bulk chips
        assert bulk.done == 2  # only the batch already running when it arrived
        await asyncio.wait_for(bulk.future, 5)
    finally:
        gate.set()
        await b.stop()


async def test_bulk_lane_has_its_own_budget() -> None:
    gate = threading.Event()
    engine = FakeEngine(max_batch=2, fail=lambda batch: gate.wait(5) and None)
    b = make_batcher(engine, queue_capacity=4, bulk_queue_capacity=4)
    await b.start()
    try:
        await b.submit(*work_for(2), threshold=0.5, priority="bulk")  # type: ignore[arg-type]
        await asyncio.sleep(0.05)  # on the engine
        await b.submit(*work_for(4), threshold=0.5, priority="bulk")  # type: ignore[arg-type]
        with pytest.raises(QueueFull, match="bulk"):
            await b.submit(*work_for(1), threshold=0.5, priority="bulk")  # type: ignore[arg-type]
        # the streaming lane is full; /v1/detect's lane still takes its whole budget
        ok = await b.submit(*work_for(4), threshold=0.5)  # type: ignore[arg-type]
        gate.set()
        await asyncio.wait_for(ok.future, 5)
    finally:
        gate.set()
        await b.stop()


# ---- over HTTP ---------------------------------------------------------------------------------------
def test_queue_full_is_503_with_retry_after(client_for: Callable[..., TestClient]) -> None:
    client = client_for(FakeEngine(), queue_capacity=1)  # any 256x256 image needs more than one chip
    r = detect(client)
    assert r.status_code == 503
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    assert "capacity 1" in r.json()["error"]["message"]
    assert 0 < r.json()["error"]["retry_after_s"] <= int(r.headers["retry-after"])
    assert client.get("/readyz").status_code == 200


def test_in_flight_limit_is_503(client_for: Callable[..., TestClient]) -> None:
    client = client_for(FakeEngine(), max_in_flight=1)
    client.app.state.snipserve.in_flight = 1  # type: ignore[attr-defined]  # one request already running
    r = detect(client)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "SNIPSERVE_MAX_IN_FLIGHT" in r.json()["error"]["message"]


def test_client_deadline_is_504_with_clear_body(client_for: Callable[..., TestClient]) -> None:
    client = client_for(FakeEngine(delay=0.5))
    r = detect(client, timeout=0.1)
    assert r.status_code == 504
    body = r.json()["error"]
    assert body["code"] == "deadline_exceeded" and "0.1 s" in body["message"]
    assert client.get("/readyz").status_code == 200


def test_client_cannot_extend_the_server_deadline(client_for: Callable[..., TestClient]) -> None:
    client = client_for(FakeEngine(delay=0.5), request_timeout_s=0.1)
    r = detect(client, timeout=1000)
    assert r.status_code == 504 and "0.1 s" in r.json()["error"]["message"]


def test_raising_engine_fails_only_its_request(client_for: Callable[..., TestClient]) -> None:
    broken = {"on": True}

    def fail(batch: np.ndarray) -> None:
        if broken["on"]:
            raise RuntimeError("CUDA error: an illegal memory access")

    client = client_for(FakeEngine(fail=fail))
    r = detect(client)
    assert r.status_code == 500
    error = r.json()["error"]
    # the exception's text goes to the server log, never to the client
    assert error["code"] == "engine_error" and error["message"] == "inference failed"
    assert client.get("/readyz").status_code == 200
    broken["on"] = False
    assert detect(client).status_code == 200


def test_hanging_engine_times_out_and_service_recovers(client_for: Callable[..., TestClient]) -> None:
    release = threading.Event()
    calls = {"n": 0}

    def hang_once(batch: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            release.wait(10)

    client = client_for(FakeEngine(fail=hang_once), infer_timeout_s=0.2)
    try:
        r = detect(client)
        assert r.status_code == 500 and "timed out" in r.json()["error"]["message"]
        assert client.get("/readyz").status_code == 200
        assert detect(client).status_code == 200  # a fresh engine thread serves the next batch
    finally:
        release.set()


def test_rejections_are_counted(client_for: Callable[..., TestClient]) -> None:
    client = client_for(FakeEngine(), queue_capacity=1)
    detect(client)
    text = client.get("/metrics").text
    prefix = 'snipserve_rejections_total{reason="queue_full"}'
    line = next(x for x in text.splitlines() if x.startswith(prefix))
    assert float(line.split()[-1]) >= 1


def test_bulk_requests_in_flight_do_not_use_up_detect_slots(client_for: Callable[..., TestClient]) -> None:
    from service.errors import QueueFull as Full
    from service.http.serving import in_flight

    client = client_for(FakeEngine(), max_in_flight=1, bulk_max_in_flight=2)
    state = client.app.state.snipserve  # type: ignore[attr-defined]
    with in_flight(state, "bulk"), in_flight(state, "bulk"):  # a stream at its limit
        with pytest.raises(Full, match="SNIPSERVE_BULK_MAX_IN_FLIGHT"), in_flight(state, "bulk"):
            pass
        assert detect(client).status_code == 200  # /v1/detect still has its own slot
    assert state.in_flight == 0 and state.in_flight_bulk == 0


def test_deadline_counts_from_arrival(client_for: Callable[..., TestClient]) -> None:
    """``/v1/detect``'s deadline starts when the request reached the service (BodyGuard's stamp, before the
    upload), not when the handler has the body: an upload slower than the deadline is 504 at once."""
    client = client_for(FakeEngine())
    data = png()

    def post(upload_s: float, timeout: float) -> tuple[int, bytes]:
        async def go() -> tuple[int, bytes]:
            sent = False

            async def receive() -> dict[str, object]:
                nonlocal sent
                if sent:  # the body is in: from here on the client just waits
                    await asyncio.Event().wait()
                await asyncio.sleep(upload_s)
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}

            out: list[dict[str, object]] = []

            async def send(message: dict[str, object]) -> None:
                out.append(message)

            headers = [(b"content-type", b"image/png"), (b"content-length", b"%d" % len(data))]
            scope = {
                "type": "http", "http_version": "1.1", "method": "POST", "path": "/v1/detect", "root_path": "",
                "scheme": "http", "query_string": f"timeout={timeout}".encode(), "server": ("test", 80),
                "client": ("test", 1), "headers": headers,
            }  # fmt: skip
            await client.app(scope, receive, send)  # type: ignore[arg-type]
            start = next(m for m in out if m["type"] == "http.response.start")
            body = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")  # type: ignore[misc]
            return int(start["status"]), body  # type: ignore[call-overload]

        return client.portal.call(go)  # type: ignore[union-attr, no-any-return]

    assert post(0.0, 1.0)[0] == 200
    status, body = post(0.5, 0.3)  # the same request, its upload slower than its deadline
    assert status == 504 and b"upload" in body


async def test_body_guard_stamps_arrival_before_the_body() -> None:
    seen: dict[str, float] = {}

    async def app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        await receive()  # type: ignore[operator]
        seen["arrival"] = scope["state"]["arrival"]

    async def receive() -> dict:  # type: ignore[type-arg]
        await asyncio.sleep(0.05)  # a slow upload
        seen["body"] = time.monotonic()
        return {"type": "http.request", "body": b"x", "more_body": False}

    guard = BodyGuard(app, TransportConfig())  # type: ignore[arg-type]
    await guard({"type": "http", "path": "/v1/detect", "headers": []}, receive, None)  # type: ignore[arg-type]
    assert seen["body"] - seen["arrival"] >= 0.04  # stamped before the upload, not after it


def test_a_request_that_fails_after_admission_releases_its_place(client_for: Callable[..., TestClient]) -> None:
    """A PNG whose header probes fine but whose pixels are cut off is admitted, then fails to decode (400): its
    reservation in the schedule is released, not left to block later requests."""
    client = client_for(FakeEngine())
    data = png(640, 480)
    for _ in range(3):
        r = client.post("/v1/detect", content=data[: len(data) // 2], headers={"content-type": "image/png"})
        assert r.status_code == 400, r.text
    batcher = batcher_of(client.app.state.snipserve)  # type: ignore[attr-defined]
    assert batcher.chips_ahead(1, float("inf"), "interactive") == 0
    assert detect(client).status_code == 200  # type: ignore[attr-defined]


def test_brownout_degrades_only_requests_waiting_behind_others(client_for: Callable[..., TestClient]) -> None:
    """Brownout compares the wait for *other* requests' chips with its limit: a large image on an idle service runs
    the pyramid it asked for, however long its own chips take; behind admitted requests it runs 'focus'; a model
    without a focus head, an explicit pyramid and the bulk lane are never degraded."""
    for card, degrades in ((FAKE_FOCUS_CARD, True), (FAKE_CARD, False)):
        client = client_for(FakeEngine(card=card), brownout_wait_s=1e-6)
        assert detect(client).status_code == 200  # the batcher has measured a drain rate
        state = client.app.state.snipserve  # type: ignore[attr-defined]
        batcher = batcher_of(state)
        large = (4000, 3000)
        opts, _ = under_load(state, DetectOptions(), large, Route())
        assert opts.preset == "default"  # idle: nothing ahead of it
        ahead = [batcher.admit(4) for _ in range(5)]  # admitted, decoding: served before the large image
        try:
            opts, _ = under_load(state, DetectOptions(), large, Route())
            assert (opts.preset == "focus") is degrades
            explicit, _ = under_load(state, DetectOptions(preset="pyramid"), large, Route())
            assert explicit.preset == "pyramid"  # what the client chose is kept
            bulk, _ = under_load(state, DetectOptions(), large, Route(priority="bulk"))
            assert bulk.preset == "default"  # streams and batches trade latency, not accuracy
        finally:
            for r in ahead:
                batcher.release(r)
