"""Graceful shutdown of ``snipserve serve`` on SIGTERM, in a real subprocess on a loopback port.

SIGTERM turns readiness 503 at once, refuses new detection requests with 503, lets the request in
flight finish and be answered, then the process exits (status 0) well within its bound.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from service.cli.serve_process import running_server

ENGINE_DELAY_S = 2.0
EXIT_BOUND_S = 10.0

SERVER = textwrap.dedent(
    """
    import sys, threading
    from service.http.app import create_app
    from service.cli.serve import serve_app
    from service.engines.fake import FakeEngine
    from service.settings import Settings

    delay, hang = float(sys.argv[1]), sys.argv[2] == "hang"
    never = threading.Event()
    fail = (lambda batch: never.wait()) if hang else None  # a hung engine call: never returns
    settings = Settings(
        engine="fake", warmup=False, max_batch=64, shutdown_timeout_s=5, infer_timeout_s=0.5 if hang else 30
    )
    # host and port: SNIPSERVE_HOST / SNIPSERVE_PORT, set by running_server
    app = create_app(settings, engine_factory=lambda s: FakeEngine(max_batch=64, delay=delay, fail=fail))
    sys.exit(serve_app(app, settings))
    """
)


def png() -> bytes:
    ok, data = cv2.imencode(".png", np.zeros((256, 256, 3), np.uint8))
    assert ok
    return data.tobytes()


@contextlib.contextmanager
def serve(log: Path, mode: str = "slow") -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The server above in a child process (output to ``log``); yields its base URL and the process."""
    command = [sys.executable, "-c", SERVER, str(ENGINE_DELAY_S), mode]
    with running_server(command, log=log, ready_timeout_s=30.0, stop_timeout_s=5.0) as server:
        yield server.url, server.proc


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with serve(tmp_path / "server.log") as s:
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


def test_sigterm_exits_even_with_a_hung_engine_thread(tmp_path: Path) -> None:
    with serve(tmp_path / "server.log", "hang") as (url, proc):
        r = httpx.post(f"{url}/v1/detect", content=png(), headers={"content-type": "image/png"}, timeout=10)
        assert r.status_code == 500 and "timed out" in r.json()["error"]["message"]  # infer_timeout_s
        assert httpx.get(f"{url}/readyz", timeout=2).status_code == 200  # still ready after the hang
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(EXIT_BOUND_S)  # the abandoned engine thread does not keep the process alive
        assert proc.returncode == 0 and time.monotonic() - t_signal < EXIT_BOUND_S
