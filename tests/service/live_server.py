"""Live uvicorn servers on 127.0.0.1 for client/stream/CLI tests, always shut down; and test images.

``serve_in_loop`` runs the server in the test's own event loop (so tests can inspect the app's asyncio
tasks and batcher directly); ``serve_in_thread`` runs it in a thread (for synchronous clients and CLIs).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import cv2
import numpy as np
import uvicorn
from fastapi import FastAPI

from service.cli.serve import uvicorn_config
from service.engines import Engine
from service.engines.fake import FakeEngine
from service.http.app import create_app
from service.http.serving import State
from service.settings import Settings

START_TIMEOUT_S = 10.0


def fake_app(delay: float = 0.0, **overrides: object) -> FastAPI:
    """The service with the deterministic fake engine (``delay`` seconds per engine call)."""
    settings = Settings(engine="fake", warmup=False, **overrides)  # type: ignore[arg-type]

    def factory(s: Settings) -> Engine:
        return FakeEngine(max_batch=s.max_batch, delay=delay)

    return create_app(settings, engine_factory=factory)


def app_state(app: FastAPI) -> State:
    state: State = app.state.snipserve
    return state


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _server(app: FastAPI) -> uvicorn.Server:
    """uvicorn as ``snipserve serve`` runs it (guarded protocol, limits from the app's settings)."""
    settings = app_state(app).settings
    config = uvicorn_config(app, settings, lifespan="on", ws_max_size=64 * 1024 * 1024, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


@contextlib.asynccontextmanager
async def serve_in_loop(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` from this event loop; yields the base URL ``http://127.0.0.1:<port>``."""
    sock = _socket()
    server = _server(app)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()


@contextlib.contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` from a background thread; yields the base URL."""
    sock = _socket()
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


Box = tuple[int, int, int, int, str]  # x1, y1, x2, y2, colour name

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def blob_image(size: tuple[int, int] = (256, 256), boxes: Sequence[Box] = ()) -> np.ndarray:
    """Grey ``uint8 [H, W, 3]`` RGB image of ``size`` = (width, height) with saturated rectangles."""
    w, h = size
    image = np.full((h, w, 3), 128, np.uint8)
    for x1, y1, x2, y2, colour in boxes:
        image[y1:y2, x1:x2] = COLOURS[colour]
    return image


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return bytes(buf)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


async def await_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()
