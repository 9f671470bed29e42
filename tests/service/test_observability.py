"""service.observability on a tiny FastAPI app: request ids, route-template metrics, logs, /metrics."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi import FastAPI, HTTPException, WebSocket
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import ClientDisconnect

from service import metrics
from service.observability import (
    UNMATCHED_ROUTE,
    ObservabilityMiddleware,
    accept_request_id,
    configure_logging,
    instrument,
    request_id_var,
)


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def make_app(*, log_json: bool = True, workers: int = 1) -> tuple[FastAPI, io.StringIO]:
    """A tiny app shaped like the real one: templated routes, an error, a stream, a websocket."""
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, Any]:
        logging.getLogger("service.test").info("handling %s", item_id)
        return {"item": item_id, "request_id": request_id_var.get()}

    @app.get("/sync")
    def sync_route() -> dict[str, Any]:  # runs in a worker thread: the contextvar must follow
        return {"request_id": request_id_var.get()}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    @app.get("/denied")
    async def denied() -> None:
        raise HTTPException(status_code=401, detail="no")

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def lines() -> Any:
            for i in range(3):
                yield f"{i}\n".encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(request_id_var.get() or "")
        await websocket.close()

    instrument(app, SimpleNamespace(log_json=log_json, log_level="INFO", workers=workers))
    stream_ = io.StringIO()
    for handler in logging.getLogger().handlers:
        if handler.get_name() == "snipserve" and isinstance(handler, logging.StreamHandler):
            handler.setStream(stream_)
    return app, stream_


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


def test_generates_request_id_and_exposes_it_to_handlers() -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        response = client.get("/items/a")
        sync = client.get("/sync")
    rid = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    assert response.json()["request_id"] == rid
    assert sync.json()["request_id"] == sync.headers["X-Request-ID"] != rid


def test_accepts_sane_client_request_id_and_replaces_others() -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        kept = client.get("/items/a", headers={"X-Request-ID": "trace-7:abc.DEF_1"})
        assert kept.headers["X-Request-ID"] == "trace-7:abc.DEF_1" == kept.json()["request_id"]
        for bad in ("has space", "x" * 129, 'quote"d', "", "\xfcmlaut".encode("latin-1"), b"nul\x00"):
            rid = client.get("/items/a", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
            assert re.fullmatch(r"[0-9a-f]{32}", rid), bad
    assert accept_request_id(None) != accept_request_id(None)


def test_counts_by_route_template_not_raw_path() -> None:
    app, _ = make_app()
    route = "/items/{item_id}"
    before = sample("snipserve_requests_total", route=route, status="200")
    before_count = sample("snipserve_request_duration_seconds_count", route=route)
    with TestClient(app) as client:
        for item in ("a", "b", "c"):
            assert client.get(f"/items/{item}").status_code == 200
    assert sample("snipserve_requests_total", route=route, status="200") == before + 3
    assert sample("snipserve_request_duration_seconds_count", route=route) == before_count + 3
    routes = {s.labels["route"] for f in metrics.REGISTRY.collect() for s in f.samples if "route" in s.labels}
    assert not any(r.startswith("/items/") and r != route for r in routes)


def test_unmatched_paths_share_one_label_and_405_keeps_template() -> None:
    app, _ = make_app()
    before_404 = sample("snipserve_requests_total", route=UNMATCHED_ROUTE, status="404")
    before_405 = sample("snipserve_requests_total", route="/items/{item_id}", status="405")
    with TestClient(app) as client:
        assert client.get("/no/such/path/1").status_code == 404
        assert client.get("/no/such/path/2").status_code == 404
        assert client.post("/items/a").status_code == 405
    assert sample("snipserve_requests_total", route=UNMATCHED_ROUTE, status="404") == before_404 + 2
    assert sample("snipserve_requests_total", route="/items/{item_id}", status="405") == before_405 + 1


def test_handled_http_errors_keep_their_status_and_id() -> None:
    app, _ = make_app()
    before = sample("snipserve_requests_total", route="/denied", status="401")
    with TestClient(app) as client:
        response = client.get("/denied", headers={"X-Request-ID": "r-401"})
    assert response.status_code == 401
    assert response.headers["X-Request-ID"] == "r-401"
    assert sample("snipserve_requests_total", route="/denied", status="401") == before + 1


def test_unhandled_error_returns_json_500_and_logs_traceback_with_id() -> None:
    app, stream = make_app(log_json=True)
    before = sample("snipserve_requests_total", route="/boom", status="500")
    with TestClient(app) as client:
        response = client.get("/boom", headers={"X-Request-ID": "r-boom"})
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "r-boom"
    assert response.json() == {
        "error": {"code": "internal_error", "message": "internal server error", "request_id": "r-boom"}
    }
    assert sample("snipserve_requests_total", route="/boom", status="500") == before + 1
    records = json_lines(stream)
    errors = [r for r in records if r["logger"] == "snipserve.error"]
    assert len(errors) == 1
    assert errors[0]["level"] == "ERROR" and errors[0]["request_id"] == "r-boom"
    assert "RuntimeError: kaput" in errors[0]["exc_info"] and errors[0]["route"] == "/boom"
    access = [r for r in records if r["logger"] == "snipserve.access"]
    assert access[-1]["status"] == 500 and access[-1]["request_id"] == "r-boom"


def test_json_access_log_fields() -> None:
    app, stream = make_app(log_json=True)
    with TestClient(app) as client:
        client.get("/items/x?secret=1", headers={"X-Request-ID": "r-json", "User-Agent": "ua/1"})
    records = json_lines(stream)
    handler_log = next(r for r in records if r["logger"] == "service.test")
    assert handler_log["request_id"] == "r-json" and handler_log["message"] == "handling x"
    access = next(r for r in records if r["logger"] == "snipserve.access")
    assert access["request_id"] == "r-json"
    assert access["method"] == "GET" and access["path"] == "/items/x" and access["route"] == "/items/{item_id}"
    assert access["status"] == 200 and access["duration_s"] >= 0 and access["response_bytes"] > 0
    assert access["user_agent"] == "ua/1" and access["level"] == "INFO"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", access["ts"])


def test_plain_logs_carry_request_id_and_fields() -> None:
    app, stream = make_app(log_json=False)
    with TestClient(app) as client:
        client.get("/items/y", headers={"X-Request-ID": "r-plain"})
    lines = stream.getvalue().splitlines()
    access = next(line for line in lines if "snipserve.access" in line)
    assert "[r-plain]" in access and "GET /items/y 200" in access and "route=/items/{item_id}" in access
    assert not access.startswith("{")


def test_streaming_response_gets_id_and_is_timed_to_the_end() -> None:
    app, _ = make_app()
    before = sample("snipserve_requests_total", route="/stream", status="200")
    with TestClient(app) as client:
        response = client.get("/stream")
    assert response.text == "0\n1\n2\n" and "X-Request-ID" in response.headers
    assert sample("snipserve_requests_total", route="/stream", status="200") == before + 1


def test_websocket_gets_request_id() -> None:
    app, stream = make_app()
    with TestClient(app) as client, client.websocket_connect("/ws", headers={"X-Request-ID": "r-ws"}) as ws:
        assert ws.receive_text() == "r-ws"
    assert any(r.get("method") == "WS" and r["request_id"] == "r-ws" for r in json_lines(stream))


def test_metrics_endpoint_serves_registry_in_text_format() -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        client.get("/items/z")
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(response.text)}
    assert {"snipserve_requests", "snipserve_request_duration_seconds", "snipserve_model_info"} <= names
    assert "/metrics" not in {r.path for r in app.routes if getattr(r, "include_in_schema", False)}
    assert not any(line.split("{")[0].endswith("_created") for line in response.text.splitlines())


def test_refuses_more_than_one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="workers=2"):
        make_app(workers=2)
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    with pytest.raises(ValueError, match="WEB_CONCURRENCY=3"):
        make_app()


def test_configure_logging_is_idempotent() -> None:
    configure_logging(level="debug", json_logs=True)
    configure_logging(level="WARNING", json_logs=False)
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "snipserve"]
    assert len(ours) == 1
    assert logging.getLogger().level == logging.WARNING
    assert logging.getLogger("uvicorn.access").disabled


# -- with the real app (fake engine) -------------------------------------------------------------------


@pytest.fixture
def real_client() -> Iterator[TestClient]:
    from service.http.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(engine="fake", warmup=False, log_json=True))) as client:
        yield client


def test_real_app_detect_is_counted_timed_and_carries_request_id(real_client: TestClient) -> None:
    ok, buf = cv2.imencode(".png", np.zeros((300, 400, 3), np.uint8))
    route = "/v1/detect"
    before = {
        "requests": sample("snipserve_requests_total", route=route, status="200"),
        "latency": sample("snipserve_request_duration_seconds_count", route=route),
        "merge": sample("snipserve_stage_duration_seconds_count", stage="merge"),
        "batches": sample("snipserve_batch_size_chips_count"),
        "chips": sample("snipserve_chips_total"),
    }
    response = real_client.post(
        route, content=buf.tobytes(), headers={"content-type": "image/png", "X-Request-ID": "client-42"}
    )
    assert response.status_code == 200 and response.headers["X-Request-ID"] == "client-42"
    assert sample("snipserve_requests_total", route=route, status="200") == before["requests"] + 1
    assert sample("snipserve_request_duration_seconds_count", route=route) == before["latency"] + 1
    assert sample("snipserve_stage_duration_seconds_count", stage="merge") == before["merge"] + 1
    assert sample("snipserve_batch_size_chips_count") > before["batches"]
    assert sample("snipserve_chips_total") == before["chips"] + response.json()["chips"]


def test_real_app_errors_keep_request_id_and_count_rejections(real_client: TestClient) -> None:
    before = sample("snipserve_rejections_total", reason="bad_image")
    before_400 = sample("snipserve_requests_total", route="/v1/detect", status="400")
    response = real_client.post(
        "/v1/detect", content=b"not an image", headers={"content-type": "image/png", "X-Request-ID": "bad-1"}
    )
    assert response.status_code == 400 and response.headers["X-Request-ID"] == "bad-1"
    assert sample("snipserve_rejections_total", reason="bad_image") == before + 1
    assert sample("snipserve_requests_total", route="/v1/detect", status="400") == before_400 + 1


def test_real_app_metrics_route_and_model_info(real_client: TestClient) -> None:
    response = real_client.get("/metrics")
    assert response.status_code == 200 and "X-Request-ID" in response.headers
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    info = families["snipserve_model_info"].samples[0].labels
    assert info["engine"] == "fake" and info["model"] and info["providers"] and info["precision"]
    assert families["snipserve_ready"].samples[0].value == 1.0
    assert families["snipserve_queue_capacity_chips"].samples[0].value > 0
    assert "/metrics" not in real_client.get("/openapi.json").json()["paths"]


def test_real_app_401_before_routing_keeps_route_template_and_request_id() -> None:
    from service.http.app import create_app
    from service.settings import Settings

    settings = Settings(engine="fake", warmup=False, api_key="s3cret")
    before = sample("snipserve_requests_total", route="/v1/detect", status="401")
    before_reason = sample("snipserve_rejections_total", reason="unauthorized")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/detect", content=b"x", headers={"X-Request-ID": "no-key"})
        assert client.get("/metrics").status_code == 200  # scrapes need no key
    assert response.status_code == 401 and response.headers["X-Request-ID"] == "no-key"
    assert sample("snipserve_requests_total", route="/v1/detect", status="401") == before + 1
    assert sample("snipserve_rejections_total", reason="unauthorized") == before_reason + 1


def test_successful_scrapes_are_logged_at_debug_only() -> None:
    app, stream = make_app()
    with TestClient(app) as client:
        client.get("/metrics")
        client.get("/items/q")
    routes = [r["route"] for r in json_lines(stream) if r["logger"] == "snipserve.access"]
    assert routes == ["/items/{item_id}"]


@pytest.mark.parametrize("raised", [asyncio.CancelledError("client disconnected"), ClientDisconnect()])
async def test_client_disconnect_counts_499_not_500(raised: BaseException) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise raised

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/gone", "headers": [], "client": ("127.0.0.1", 1)}
    before = sample("snipserve_requests_total", route=UNMATCHED_ROUTE, status="499")
    before_500 = sample("snipserve_requests_total", route=UNMATCHED_ROUTE, status="500")
    middleware = ObservabilityMiddleware(app)
    if isinstance(raised, asyncio.CancelledError):
        with pytest.raises(asyncio.CancelledError):
            await middleware(scope, receive, send)
    else:
        await middleware(scope, receive, send)
    assert sent == []  # nobody to answer
    assert sample("snipserve_requests_total", route=UNMATCHED_ROUTE, status="499") == before + 1
    assert sample("snipserve_requests_total", route=UNMATCHED_ROUTE, status="500") == before_500
