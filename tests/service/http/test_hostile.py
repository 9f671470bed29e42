"""Hostile requests against the real app (fake engine): every one is a 4xx naming the problem, never a 5xx,
and the service stays ready. Timing goals live in ``benchmarks/adversarial.py``, not here.

Families (issue 12): options (unicode digits, huge integers, deep nesting, 10^400, NaN, amplification);
transport and security cases are in the sections below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import tracemalloc
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from service.errors import QueueFull
from service.http.serving import PixelBudget, json_depth, parse_levels
from service.plan import LevelSpec, PlanConfig, PlanError, plan
from tests.conftest import blob_image, encode
from tests.service.live_server import fake_app, serve_in_thread

HUGE_INT = "9" * 5000


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(fake_app(), raise_server_exceptions=False) as c:
        yield c


def detect(client: TestClient, params: dict[str, str], form: bool = False) -> tuple[int, dict[str, object]]:
    image = encode(blob_image(64, 64, [(10, 10, 20, 20, 0)]))
    if form:
        r = client.post("/v1/detect", files={"file": ("a.png", image, "image/png")}, data=params)
    else:
        r = client.post("/v1/detect", params=params, content=image, headers={"Content-Type": "image/png"})
    return r.status_code, r.json()


HOSTILE_OPTIONS: list[tuple[str, str, str]] = [
    # (option, value, a word the message must contain)
    ("classes", "\u00b2", "class"),  # a unicode digit: str.isdigit() is True, int() fails
    ("classes", HUGE_INT, "classes"),
    ("classes", ",".join(["red"] * 5000), "classes"),
    ("levels", "[" * 3000 + "]" * 3000, "levels"),
    ("levels", '[{"short_side": 1' + "0" * 400 + "}]", "levels"),
    ("levels", '[{"long_side": 1000000000000}]', "levels"),
    ("levels", '[{"short_side": 1048576}]', "chips"),  # allowed as a number; 10^10 chips, refused by arithmetic
    ("levels", '[{"long_side": 1316000}]', "long_side"),
    ("levels", '[{"scale": 1, "valid": [NaN, NaN]}]', "levels"),
    ("levels", '[{"scale": 1e400}]', "levels"),
    ("levels", '[{"scale": 1, "valid": [-1, Infinity]}]', "levels"),
    ("levels", json.dumps([{"scale": 1}] * 1000), "levels"),  # a URL carries ~64 KB at most; the form: any size
    ("levels", json.dumps([{"scale": 1}] * 17), "levels"),
    ("levels", "{}", "levels"),
    ("levels", "[1, 2]", "levels"),
    ("min_object_size", "inf", "min_object_size"),
    ("min_object_size", "nan", "min_object_size"),
    ("max_object_size", "1e400", "max_object_size"),
    ("score_threshold", "NaN", "score_threshold"),
    ("sigma", "1e400", "sigma"),
    ("max_detections", HUGE_INT, "max_detections"),
    ("max_detections", "\u00b2", "max_detections"),
    ("merge", "bogus", "merge"),
    ("preset", "p" * 10_000, "preset"),
    ("class_agnostic", "maybe", "class_agnostic"),
    ("timeout", "nan", "timeout"),
]


@pytest.mark.parametrize("form", [False, True], ids=["query", "form"])
@pytest.mark.parametrize(("name", "value", "word"), HOSTILE_OPTIONS, ids=lambda v: str(v)[:24])
def test_hostile_option_is_a_422_naming_it(client: TestClient, name: str, value: str, word: str, form: bool) -> None:
    if form and name == "timeout":
        pytest.skip("timeout is a query parameter only")
    status, body = detect(client, {name: value}, form=form)
    assert status == 422, body
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == "invalid_options"
    assert word in error["message"], error["message"]
    assert len(error["message"]) < 1000  # never echoes a huge input
    assert client.get("/readyz").status_code == 200


def test_a_million_levels_in_a_form_field_is_refused_by_size(client: TestClient) -> None:
    status, body = detect(client, {"levels": json.dumps([{"scale": 1}] * 1_000_000)}, form=True)
    assert status in (413, 422), body
    assert "levels" in str(body) or "too_large" in str(body)


def test_a_normal_request_still_works(client: TestClient) -> None:
    status, body = detect(client, {"levels": '[{"scale": 1, "valid": [-1, null]}]', "classes": "red,1"})
    assert status == 200, body


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth('[{"a": "[[[[{{"}]') == 2
    assert json_depth('["\\"[["]') == 1
    assert json_depth("[" * 50 + "]" * 50) == 50


def test_levels_parser_refuses_before_recursing() -> None:
    from service.errors import InvalidOptions

    with pytest.raises(InvalidOptions, match="nested"):
        parse_levels("[" * 1000 + "]" * 1000)
    assert parse_levels('[{"scale": 2, "valid": [-1, 40]}]') == [{"scale": 2, "valid": [-1, 40]}]


def test_chip_count_is_computed_before_anything_is_allocated() -> None:
    """A level of 10^6 pixels a side on a small image would need ~10^8 chips (the old planner built that grid
    and needed 1.9 GB before refusing); the count is arithmetic now, so refusing costs no memory."""
    config = PlanConfig(chip_size=128, levels=(LevelSpec(long_side=1_000_000),), max_chips=4096)
    tracemalloc.start()
    try:
        with pytest.raises(PlanError, match="chips"):
            plan((640, 480), config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak


# ---- transport: a real server on 127.0.0.1 (the guarded protocol and the body guard) -------------------


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


FAST = {"header_timeout_s": 0.5, "body_idle_timeout_s": 0.5, "body_grace_s": 0.3, "min_body_rate": 20000.0}


@pytest.fixture
def server() -> Iterator[str]:
    with serve_in_thread(fake_app(max_header_bytes=4096, **FAST)) as base:
        yield base


def test_oversized_request_head_is_431_and_closed(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):  # the server may close while we are still sending
            for _ in range(64):
                sock.sendall(b"X-Pad: " + b"a" * 1000 + b"\r\n")
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 431"), reply[:100]
    assert httpx.get(server + "/readyz").status_code == 200


def test_idle_connection_is_closed(server: str) -> None:
    with _connect(server) as sock:
        t0 = time.monotonic()
        assert _read_all(sock) == b""  # closed by the server, nothing said
        assert time.monotonic() - t0 < 5


def test_slow_request_head_is_408(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]


def test_keep_alive_connection_gets_a_new_head_timeout(server: str) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        reply = _read_all(sock)  # the answer, then the server closes the connection once it is idle
        assert reply.startswith(b"HTTP/1.1 200") and reply.count(b"HTTP/1.1") == 1, reply
        assert time.monotonic() - t0 < 5  # closed by the server, not by our 10 s socket timeout


def _post_head(sock: socket.socket, length: int, path: str = "/v1/detect") -> None:
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: {length}\r\n\r\n".encode()
    )


def test_paused_body_is_408(server: str) -> None:
    with _connect(server) as sock:
        _post_head(sock, 1000)
        sock.sendall(b"\x89PNG")
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in reply, reply[:300]


def test_trickled_body_is_408(server: str) -> None:
    with _connect(server) as sock:
        _post_head(sock, 100_000)
        with contextlib.suppress(OSError):
            for _ in range(40):  # 10 bytes every 0.1 s: never paused, far below the minimum rate
                sock.sendall(b"\0" * 10)
                time.sleep(0.1)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"too slow" in reply, reply[:300]


def test_slow_body_holds_no_in_flight_slot() -> None:
    """The slot is taken once the body is read: with one slot and a client trickling its body (within the
    timeouts), a normal request is answered 200 (it used to get 503 for as long as the slow client liked)."""
    settings = {"max_in_flight": 1, "body_idle_timeout_s": 5.0, "body_grace_s": 5.0}
    with serve_in_thread(fake_app(**settings)) as base, _connect(base) as slow:
        _post_head(slow, 100_000)
        slow.sendall(b"\x89PNG")
        time.sleep(0.2)
        image = encode(blob_image(64, 64, [(10, 10, 20, 20, 0)]))
        r = httpx.post(base + "/v1/detect", content=image, headers={"Content-Type": "image/png"}, timeout=10)
        assert r.status_code == 200, r.text


def test_batch_total_body_limit() -> None:
    image = encode(blob_image(256, 256, [(10, 10, 20, 20, 0)]))
    files = [("files", (f"{i}.png", image + b"\0" * 20_000, "image/png")) for i in range(4)]
    with TestClient(fake_app(max_batch_body_bytes=50_000), raise_server_exceptions=False) as c:
        r = c.post("/v1/detect/batch", files=files)
        assert r.status_code == 413 and "SNIPSERVE_MAX_BATCH_BODY_BYTES" in r.text, r.text
        assert c.post("/v1/detect/batch", files=files[:1]).status_code == 200


def test_chunked_multipart_is_limited_while_it_arrives() -> None:
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'.encode()

    def body() -> Iterator[bytes]:  # no Content-Length: chunked, 3 MB of "image"
        yield head
        for _ in range(48):
            yield b"\0" * 65536

    with TestClient(fake_app(max_image_bytes=1024 * 1024), raise_server_exceptions=False) as c:
        r = c.post("/v1/detect", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413 and "SNIPSERVE_MAX_IMAGE_BYTES" in r.text, r.text


def test_bodies_in_flight_are_bounded_globally() -> None:
    image = encode(blob_image(256, 256, [(10, 10, 20, 20, 0)]))
    with TestClient(fake_app(max_body_bytes_in_flight=2048), raise_server_exceptions=False) as c:
        r = c.post("/v1/detect", content=image + b"\0" * 4096, headers={"Content-Type": "image/png"})
    assert r.status_code == 503 and "SNIPSERVE_MAX_BODY_BYTES_IN_FLIGHT" in r.text, r.text


def test_one_request_above_the_pixel_budget_is_413() -> None:
    image = encode(blob_image(256, 256, [(10, 10, 20, 20, 0)]))
    with TestClient(fake_app(max_pixels_in_flight=50_000), raise_server_exceptions=False) as c:
        r = c.post("/v1/detect", content=image, headers={"Content-Type": "image/png"})
    assert r.status_code == 413 and "SNIPSERVE_MAX_PIXELS_IN_FLIGHT" in r.text, r.text


async def test_pixel_budget_waits_for_room_then_gives_up() -> None:
    budget = PixelBudget(100)
    order: list[str] = []

    async def second() -> None:
        async with budget.reserve(60, timeout=5):
            order.append("second")

    async with budget.reserve(60, timeout=1):
        task = asyncio.create_task(second())
        await asyncio.sleep(0.05)
        assert budget.used == 60 and not order  # waiting: 60 + 60 > 100
        with pytest.raises(QueueFull):
            async with budget.reserve(50, timeout=0.05):
                pass
        order.append("first")
    await task
    assert order == ["first", "second"] and budget.used == 0


# ---- security ------------------------------------------------------------------------------------


def test_empty_api_key_fails_at_settings_time() -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    with pytest.raises(ValidationError, match="SNIPSERVE_API_KEY is set but empty"):
        Settings(engine="fake", api_key="")
    with pytest.raises(ValidationError, match="SNIPSERVE_API_KEY is set but empty"):
        Settings(engine="fake", api_key="  ")


def test_empty_api_key_from_the_environment_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv("SNIPSERVE_API_KEY", "")
    with pytest.raises(ValidationError, match="set but empty"):
        Settings(engine="fake")


@pytest.mark.parametrize("path", ["/healthz", "/v1/models", "/nowhere", "/"])
def test_nosniff_on_every_response(client: TestClient, path: str) -> None:
    assert client.get(path).headers["x-content-type-options"] == "nosniff"


def test_nosniff_on_401_and_on_refusals() -> None:
    with TestClient(fake_app(api_key="k"), raise_server_exceptions=False) as c:
        r = c.post("/v1/detect", content=b"x", headers={"Content-Type": "image/png"})
        assert r.status_code == 401 and r.headers["x-content-type-options"] == "nosniff"


def test_plain_log_lines_escape_control_characters() -> None:
    import logging

    from service.observability import PlainFormatter

    record = logging.LogRecord("snipserve.access", logging.INFO, __file__, 1, "%s %s", ("POST", "/a\nforged"), None)
    record.path = "/a\r\nINFO forged"
    line = PlainFormatter().format(record)
    assert "\n" not in line and "\r" not in line
    assert "/a\\x0aforged" in line and "path=/a\\x0d\\x0aINFO forged" in line


def test_plain_log_keeps_the_traceback_on_its_own_lines() -> None:
    import logging
    import sys

    from service.observability import PlainFormatter

    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = PlainFormatter().format(record)
    assert line.splitlines()[0].endswith("failed") and "RuntimeError: kaput" in line


def test_a_forged_log_line_via_a_real_request(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    from service.observability import PlainFormatter

    client.get("/v1/models%0aINFO%20snipserve.access%20forged")
    formatter = PlainFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name == "snipserve.access"]
    assert lines and all("\n" not in line for line in lines)


def test_stream_failure_reply_has_no_exception_text() -> None:
    from service.http.serving import failure_body

    async def boom() -> dict[str, object]:
        raise RuntimeError("secret path /etc/x")

    async def run() -> dict[str, object]:
        task = asyncio.ensure_future(boom())
        await asyncio.wait({task})
        return failure_body(task)  # type: ignore[arg-type]

    body = asyncio.run(run())
    assert body["code"] == "internal_error" and "secret" not in str(body)


def test_early_answer_then_body_bytes_are_not_a_request_head() -> None:
    """A 401 sent before the body is read: the body still arriving is not counted as the next request's head
    (no second, 431 answer on the connection)."""
    with serve_in_thread(fake_app(api_key="k", max_header_bytes=4096, **FAST)) as base, _connect(base) as sock:
        _post_head(sock, 200_000)
        with contextlib.suppress(OSError):
            for _ in range(20):
                sock.sendall(b"\0" * 10_000)
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:100]
    assert b"HTTP/1.1 431" not in reply and reply.count(b"HTTP/1.1 ") == 1, reply[:400]
