"""Graceful shutdown of ``snipserve serve`` on SIGTERM, in a real subprocess on a loopback port.

SIGTERM turns readiness 503 at once, refuses new detection requests with 503, lets the request in
flight finish and be answered, then the process exits (status 0) well within its bound.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import cv2
import httpx
import numpy as np
import pytest

ENGINE_DELAY_S = 2.0
EXIT_BOUND_S = 10.0

SERVER = textwrap.dedent(
    """
    import sys, threading
    from service.api import create_app
    from service.cli_serve import serve_app
    from service.engine import FakeEngine
    from service.settings import Settings

    port, delay, hang = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "hang"
    never = threading.Event()
    fail = (lambda batch: never.wait()) if hang else None  # a hung engine call: never returns
    settings = Settings(
        engine="fake", warmup=False, port=port, max_batch=64, shutdown_timeout_s=5, infer_timeout_s=0.5 if hang else 30
    )
    app = create_app(settings, engine_factory=lambda s: FakeEngine(max_batch=64, delay=delay, fail=fail))
    sys.exit(serve_app(app, settings))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def png() -> bytes:
    ok, data = cv2.imencode(".png", np.zeros((256, 256, 3), np.uint8))
    assert ok
    return data.tobytes()


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1].decode()
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


@contextlib.contextmanager
def serve(mode: str = "slow") -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    argv = [sys.executable, "-c", SERVER, str(port), str(ENGINE_DELAY_S), mode]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.fixture
def server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with serve() as s:
        yield s


def test_sigterm_drains_in_flight_requests_and_exits(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, proc = server
    answer: dict[str, httpx.Response] = {}

    def in_flight() -> None:
        answer["r"] = httpx.post(f"{url}/v1/detect", content=png(), headers={"content-type": "image/png"}, timeout=30)

    worker = threading.Thread(target=in_flight)
    worker.start()
    time.sleep(0.5)  # the request is on the (slow) engine
    t_signal = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)

    ready = httpx.get(f"{url}/readyz", timeout=2)
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    refused = httpx.post(f"{url}/v1/detect", content=png(), headers={"content-type": "image/png"}, timeout=5)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "not_ready" and refused.headers["retry-after"] == "1"

    worker.join(30)
    assert answer["r"].status_code == 200, answer["r"].text  # the in-flight request was answered
    assert "detections" in answer["r"].json()

    proc.wait(EXIT_BOUND_S)
    assert proc.returncode == 0
    assert time.monotonic() - t_signal < EXIT_BOUND_S
    with pytest.raises(httpx.TransportError):  # and nothing listens any more
        httpx.get(f"{url}/healthz", timeout=1)


def test_sigterm_exits_even_with_a_hung_engine_thread() -> None:
    with serve("hang") as (url, proc):
        r = httpx.post(f"{url}/v1/detect", content=png(), headers={"content-type": "image/png"}, timeout=10)
        assert r.status_code == 500 and "timed out" in r.json()["error"]["message"]  # infer_timeout_s
        assert httpx.get(f"{url}/readyz", timeout=2).status_code == 200  # still ready after the hang
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(EXIT_BOUND_S)  # the abandoned engine thread does not keep the process alive
        assert proc.returncode == 0 and time.monotonic() - t_signal < EXIT_BOUND_S
