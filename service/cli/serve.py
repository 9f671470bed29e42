"""``snipserve serve``: run the HTTP service with uvicorn (one worker: one batcher owns the engine).

Graceful shutdown: the first SIGTERM (or Ctrl-C) starts a drain. Readiness turns 503 at once and new
detection requests are answered 503 + Retry-After, while requests already in flight finish and are
answered. When none is left (or after ``SNIPSERVE_SHUTDOWN_TIMEOUT_S``) uvicorn closes the listener,
waits for open connections (same timeout) and runs the lifespan shutdown, which stops the batcher. A
second signal skips the drain. Worst-case exit: about ``2 x shutdown_timeout_s`` plus the batcher stop.

An engine call that hung (abandoned by the batcher after ``infer_timeout_s``) still occupies a
non-daemon thread, which Python's exit would wait for forever; past a short grace period we log it and
end the process with ``os._exit`` so that SIGTERM always ends it within the bound.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from service import metrics
from service.http.transport import guarded_protocol
from service.settings import Settings

log = logging.getLogger("snipserve.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (default: SNIPSERVE_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: SNIPSERVE_PORT or 8000)")
    parser.add_argument("--model", type=Path, help="ONNX model (default: SNIPSERVE_MODEL_PATH or the shipped model)")
    parser.add_argument("--engine", choices=["onnxruntime", "tensorrt", "fake"], help="engine backend")


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase before its own graceful shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is not None or self.should_exit:
            super().handle_exit(sig, frame)  # second signal: shut down now
            return
        self.drain_deadline = time.monotonic() + self.drain_timeout_s
        self.app.state.snipserve.draining = True
        metrics.READY.set(0)
        log.info(
            "signal %d: draining (readiness 503, new requests refused), up to %.0f s",
            sig,
            self.drain_timeout_s,
        )

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            in_flight = self.app.state.snipserve.in_flight
            if in_flight == 0 or time.monotonic() >= self.drain_deadline:
                log.info("drain finished with %d request(s) still in flight; shutting down", in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def uvicorn_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn serving ``app`` with the edge limits of ``settings`` (:mod:`service.http.transport`)."""
    transport = settings.transport_config()
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "timeout_graceful_shutdown": int(max(1, settings.shutdown_timeout_s)),
        # A WebSocket frame carries one image: allow what /v1/detect allows, plus room for metadata.
        "ws_max_size": settings.max_image_bytes + 1024 * 1024,
        # Frames uvicorn reads ahead of the app: each may be ws_max_size, so keep the queue short (default 32
        # would let one connection buffer 32 x 51 MiB); the stream's window bounds the rest.
        "ws_max_queue": 2,
        "http": guarded_protocol(transport),  # request-head size limit and timeout (httptools has neither)
        "h11_max_incomplete_event_size": transport.max_header_bytes,  # if someone swaps in h11
    }
    return uvicorn.Config(app, **(options | overrides))


def serve_app(app: FastAPI, settings: Settings, sock: socket.socket | None = None) -> int:
    """Serve ``app`` on ``sock`` (default: a new one on ``settings.host:port``) until a signal; the exit status."""
    sock = sock or listen_socket(settings.host, settings.port)
    DrainingServer(uvicorn_config(app, settings), app, settings.shutdown_timeout_s).run(sockets=[sock])
    _exit_past_stuck_threads(grace_s=2.0)
    return 0


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (uvicorn listens on it); a port in use is an ``OSError`` naming it,
    which ``snipserve`` reports in one line (uvicorn would log it among its startup lines and exit 1)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _exit_past_stuck_threads(grace_s: float) -> None:
    """If non-daemon threads (a hung engine call) outlive the server by ``grace_s``, exit now (status 0)."""
    deadline = time.monotonic() + grace_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    if stuck:
        log.warning("exiting with %d stuck thread(s) (a hung engine call?): %s", len(stuck), ", ".join(stuck))
        logging.shutdown()
        os._exit(0)


def run(args: argparse.Namespace) -> int:
    from service.engines import create_engine
    from service.http.app import create_app
    from service.pipeline import Pipeline

    given = {"host": args.host, "port": args.port, "model_path": args.model, "engine": args.engine}
    overrides = {k: v for k, v in given.items() if v is not None}
    settings = Settings(**overrides)
    from service import observability

    observability.configure_logging(level=settings.log_level.upper(), json_logs=settings.log_json)
    if int(os.environ.get("WEB_CONCURRENCY", "1")) != 1:
        raise SystemExit(
            "snipserve runs one worker per accelerator: the batcher must own the engine (WEB_CONCURRENCY=1)"
        )
    # Bind, load the engine and build the pipeline before uvicorn starts: a port in use, a bad model or provider
    # is then one line and exit status 2 (service.cli.main), not a log among uvicorn's or a lifespan traceback.
    sock = listen_socket(settings.host, settings.port)
    engine = create_engine(settings.model_path, settings.engine_config())
    try:
        Pipeline(
            engine, max_chips=settings.max_chips, preprocess=settings.preprocess, soft_nms=settings.soft_nms_dispatch()
        )
    except BaseException:
        engine.close()
        sock.close()
        raise
    return serve_app(create_app(settings, engine_factory=lambda _: engine), settings, sock)
