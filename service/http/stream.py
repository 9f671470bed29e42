"""``WS /v1/stream``: frames in, one reply per frame out, in order (batch clients, video).

Like ``POST /v1/detect/batch`` (:mod:`service.http.batch`), it runs every image through
:func:`service.http.serving.run_detection` (the shared batcher, deadlines, metrics)
and shapes results with :func:`service.response.detection_response`, exactly like ``/v1/detect``.

``WS /v1/stream`` protocol (options, ``window``, ``policy`` and ``timeout`` in the query string):

- server -> ``{"type": "ready", "window", "policy", "model"}`` once accepted;
- client -> optional text message, a JSON object: metadata of the *next* binary frame (echoed as ``meta``);
- client -> binary message: one encoded image (JPEG/PNG/TIFF/...), one frame;
- server -> exactly one reply per frame, **in frame order** (``seq`` counts frames from 0):
  ``{"type": "result", "seq", "meta", "result": <the /v1/detect JSON body>}``,
  ``{"type": "error", "seq", "meta", "error": {"status", "code", "message"}}`` (the stream stays open), or
  ``{"type": "dropped", "seq", "meta", "dropped_total"}`` (policy ``drop_oldest`` only).

Backpressure: at most ``window`` frames per connection are unanswered. Policy ``block`` (default): when
the window is full the server holds the one frame it has just read and stops reading the socket until the
oldest frame's reply is sent, so TCP flow control blocks the sender (uvicorn pauses the transport when
the app stops receiving). A disconnect is noticed at once while the server is reading (the client waits
for replies); a client that overfills the window and vanishes is noticed when the next reply is written.
Policy ``drop_oldest``: the server keeps reading; a new frame beyond the window cancels the oldest
unanswered frame (its queued chips are dropped), which is answered ``dropped`` with the connection's
running count. A client disconnect cancels every unanswered frame.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import BadImage, InvalidOptions, NotReady, SnipserveError
from service.http.serving import State, checked_options, detect_one, error_body, failure_body, pipeline_of
from service.options import DetectOptions

log = logging.getLogger("snipserve.stream")

Policy = Literal["block", "drop_oldest"]
FRAME_BYTES_POLL_S = 0.02  # how often a reader waiting for the frame-bytes budget looks again


class StreamConfig(BaseModel):
    """Limits of the streaming routes (one per app)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    default_window: int = Field(default=8, ge=1, le=1024, description="Frames in flight per connection by default.")
    max_window: int = Field(default=64, ge=1, le=1024, description="Largest window a client may ask for.")
    backlog_factor: int = Field(
        default=4, ge=1, le=64, description="drop_oldest: unsent replies held at most = window x this (then block)."
    )
    max_meta_bytes: int = Field(default=65536, ge=16, description="Largest metadata text message.")
    max_batch_files: int = Field(default=256, ge=1, description="Images per POST /v1/detect/batch at most.")
    batch_concurrency: int = Field(
        default=4, ge=1, le=256, description="Images of one batch request in flight at once."
    )


class StreamParams(BaseModel):
    """Per-connection stream parameters (query string)."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)

    window: int = Field(default=8, ge=1, description="Unanswered frames at most.")
    policy: Policy = Field(default="block", description="block: stop reading; drop_oldest: cancel the oldest frame.")
    timeout: float | None = Field(default=None, gt=0, description="Per-frame deadline in seconds.")


def stream_params(query: Mapping[str, str], config: StreamConfig, lane_limit: int | None = None) -> StreamParams:
    """The connection's parameters; the window is capped at ``lane_limit`` (what the bulk lane admits at once,
    ``SNIPSERVE_BULK_MAX_IN_FLIGHT``), and the ``ready`` message tells the client the window it got."""
    raw: dict[str, object] = {k: v for k, v in query.items() if k in ("window", "policy", "timeout") and v != ""}
    raw.setdefault("window", config.default_window)
    try:
        params = StreamParams.model_validate(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()]
        raise InvalidOptions("invalid stream parameters: " + "; ".join(parts)) from exc
    if params.window > config.max_window:
        raise InvalidOptions(f"window {params.window} is above the server's limit of {config.max_window}")
    if lane_limit is not None and params.window > lane_limit:
        params = params.model_copy(update={"window": lane_limit})
    return params


# ---- WebSocket -----------------------------------------------------------------------------------


@dataclass(eq=False)
class Frame:
    """One received frame: its sequence number, metadata and detection task."""

    seq: int
    meta: Any
    task: asyncio.Task[dict[str, Any]]
    dropped: bool = False


@dataclass(eq=False)
class StreamSession:
    """One connection: a reader (socket -> frame tasks) and a writer (frame tasks -> replies, in order)."""

    ws: WebSocket
    state: State
    options: DetectOptions
    params: StreamParams
    config: StreamConfig
    pending: collections.deque[Frame] = field(default_factory=collections.deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    seq: int = 0
    dropped: int = 0

    @property
    def cap(self) -> int:
        """Unsent frames held at most before the reader stops reading the socket."""
        w = self.params.window
        return w if self.params.policy == "block" else w * self.config.backlog_factor

    async def run(self) -> None:
        """Serve until the client disconnects; then cancel every unanswered frame and wait for it."""
        reader = asyncio.create_task(self._read_loop(), name="snipserve-stream-reader")
        writer = asyncio.create_task(self._write_loop(), name="snipserve-stream-writer")
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            tasks = [reader, writer, *(f.task for f in self.pending)]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.pending.clear()

    async def _read_loop(self) -> None:
        while True:
            # Receive first, so a disconnect is noticed at once while the client waits for replies; a frame
            # that arrives with the window full is held (window + 1 frames at most) and the socket is not
            # read until a reply frees a slot: uvicorn pauses the transport and TCP blocks the sender.
            meta, data, meta_error = await self._receive_frame()
            while len(self.pending) >= self.cap:
                self.progress.clear()
                await self.progress.wait()
            await self._reserve_bytes(len(data))
            self._admit(meta, data, meta_error)

    async def _reserve_bytes(self, n: int) -> None:
        """Hold ``n`` frame bytes against the service-wide budget (``SNIPSERVE_MAX_BODY_BYTES_IN_FLIGHT``, shared by
        all streams): while it is spent, this reader stops reading its socket, like a full window."""
        state = self.state
        limit = state.settings.max_body_bytes_in_flight
        while state.frame_bytes and state.frame_bytes + n > limit:
            await asyncio.sleep(FRAME_BYTES_POLL_S)
        state.frame_bytes += n

    async def _receive_frame(self) -> tuple[Any, bytes, SnipserveError | None]:
        """Next binary frame and the metadata text message before it (if any)."""
        meta: Any = None
        meta_error: SnipserveError | None = None
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            if message.get("bytes") is not None:
                return meta, message["bytes"], meta_error
            meta, meta_error = self._parse_meta(message.get("text") or "")

    def _parse_meta(self, text: str) -> tuple[Any, SnipserveError | None]:
        if len(text) > self.config.max_meta_bytes:
            return None, BadImage(f"frame metadata is {len(text)} characters, above {self.config.max_meta_bytes}")
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exc:
            return None, InvalidOptions(f"frame metadata must be a JSON object: {exc.msg} at position {exc.pos}")
        if not isinstance(meta, dict):
            return None, InvalidOptions(f"frame metadata must be a JSON object, got {type(meta).__name__}")
        return meta, None

    def _admit(self, meta: Any, data: bytes, meta_error: SnipserveError | None) -> None:
        after: asyncio.Task[dict[str, Any]] | None = None
        if self.params.policy == "drop_oldest":
            live = [f for f in self.pending if not f.dropped]
            if len(live) >= self.params.window:
                oldest = live[0]
                oldest.dropped = True
                oldest.task.cancel()  # cancels the awaited batcher future: its queued chips are dropped
                after = oldest.task  # the new frame starts once the dropped one has let go of its slot
                self.dropped += 1
        task = asyncio.create_task(self._detect(data, meta_error, after), name=f"snipserve-stream-frame-{self.seq}")
        n = len(data)
        task.add_done_callback(lambda _: self._release_bytes(n))  # done, failed, dropped or cancelled
        self.pending.append(Frame(self.seq, meta, task))
        self.seq += 1
        self.arrived.set()

    def _release_bytes(self, n: int) -> None:
        self.state.frame_bytes -= n

    async def _detect(
        self, data: bytes, meta_error: SnipserveError | None, after: asyncio.Task[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        if after is not None:
            # a cancelled task leaves on its next step; waiting for it keeps at most `window` frames in flight
            await asyncio.wait({after})
        if meta_error is not None:
            raise meta_error
        return await detect_one(self.state, data, self.options, self.params.timeout)

    async def _write_loop(self) -> None:
        while True:
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            frame = self.pending[0]
            if not frame.dropped:
                await asyncio.wait({frame.task})  # never raises; a drop meanwhile cancels the task
            await self.ws.send_text(json.dumps(self._reply(frame)))
            self.pending.popleft()
            self.progress.set()

    def _reply(self, frame: Frame) -> dict[str, Any]:
        head = {"seq": frame.seq, "meta": frame.meta}
        if frame.dropped or frame.task.cancelled():
            return {"type": "dropped", **head, "dropped_total": self.dropped}
        if frame.task.exception() is not None:
            return {"type": "error", **head, "error": failure_body(frame.task)}
        return {"type": "result", **head, "result": frame.task.result()}


async def _refuse(ws: WebSocket, exc: SnipserveError) -> None:
    """Connection-level refusal (bad options, not ready): one error message, then close."""
    await ws.send_text(json.dumps({"type": "error", "seq": None, "meta": None, "error": error_body(exc)}))
    await ws.close(code=1013 if exc.status == 503 else 1008, reason=exc.code)


# ---- router --------------------------------------------------------------------------------------


def stream_router(config: StreamConfig | None = None) -> APIRouter:
    """``WS /v1/stream``, bound to ``config`` (default limits when omitted)."""
    config = config or StreamConfig()
    router = APIRouter(tags=["stream"])

    @router.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        """Binary frames in, one JSON reply per frame out, in order (see the module docstring)."""
        state: State = ws.app.state.snipserve
        await ws.accept()
        try:
            if state.draining:  # SIGTERM: new streams go to another replica (frames already here are answered)
                raise NotReady("the service is shutting down; reconnect to another replica")
            params = stream_params(ws.query_params, config, state.settings.bulk_max_in_flight)
            pipeline = pipeline_of(state)
            options = checked_options(ws.query_params, pipeline)
        except SnipserveError as exc:
            await _refuse(ws, exc)
            return
        hello = {"type": "ready", "window": params.window, "policy": params.policy, "model": pipeline.card.name}
        await ws.send_text(json.dumps(hello))
        with contextlib.suppress(WebSocketDisconnect):
            await StreamSession(ws, state, options, params, config).run()

    return router
