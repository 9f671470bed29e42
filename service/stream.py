"""Streaming routes for batch clients: ``WS /v1/stream`` and ``POST /v1/detect/batch`` (NDJSON).

Both run every image through :func:`service.api.run_detection` (the shared batcher, deadlines, metrics)
and shape results with :func:`service.response.detection_response`, exactly like ``/v1/detect``.

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
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.datastructures import FormData, UploadFile

from service.api import State, get_state, in_flight, parse_options, run_detection
from service.errors import BadImage, ImageTooLarge, InvalidOptions, NotReady, SnipserveError, UnsupportedMediaType
from service.options import DetectOptions
from service.pipeline import Pipeline
from service.response import detection_response

log = logging.getLogger("snipserve.stream")

Policy = Literal["block", "drop_oldest"]


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

    model_config = ConfigDict(frozen=True, extra="ignore")

    window: int = Field(default=8, ge=1, description="Unanswered frames at most.")
    policy: Policy = Field(default="block", description="block: stop reading; drop_oldest: cancel the oldest frame.")
    timeout: float | None = Field(default=None, gt=0, description="Per-frame deadline in seconds.")


def error_body(exc: SnipserveError) -> dict[str, Any]:
    """``{"status", "code", "message"}`` of a service error."""
    return {"status": exc.status, "code": exc.code, "message": exc.message}


def _pipeline(state: State) -> Pipeline:
    if state.pipeline is None or not state.ready:
        raise NotReady("the service is not ready yet (model loading or warming up)", headers={"Retry-After": "1"})
    return state.pipeline


def _params(query: Mapping[str, str], config: StreamConfig) -> StreamParams:
    raw: dict[str, object] = {k: v for k, v in query.items() if k in ("window", "policy", "timeout") and v != ""}
    raw.setdefault("window", config.default_window)
    try:
        params = StreamParams.model_validate(raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()]
        raise InvalidOptions("invalid stream parameters: " + "; ".join(parts)) from exc
    if params.window > config.max_window:
        raise InvalidOptions(f"window {params.window} is above the server's limit of {config.max_window}")
    return params


def checked_options(params: Mapping[str, str], pipeline: Pipeline) -> DetectOptions:
    """Options parsed and checked against the model (preset, classes) once for the whole stream or batch."""
    options = parse_options(params, pipeline)
    pipeline.levels_for(options)
    pipeline.check_classes(options)
    return options


async def detect_one(state: State, data: bytes, options: DetectOptions, timeout: float | None) -> dict[str, Any]:
    """One image through the shared batcher -> the ``/v1/detect`` JSON body (timings in ms)."""
    t0 = time.perf_counter()
    pipeline = _pipeline(state)
    with in_flight(state, "bulk"):
        _, result = await run_detection(state, data, options, timeout, priority="bulk")
    result.timings["total"] = time.perf_counter() - t0
    return detection_response(result, pipeline.card)


def _failure(task: asyncio.Task[dict[str, Any]]) -> dict[str, Any]:
    """The error body of a finished, failed task (unexpected exceptions become a logged 500)."""
    exc = task.exception()
    if isinstance(exc, SnipserveError):
        return error_body(exc)
    log.error("stream frame failed", exc_info=exc)
    return {"status": 500, "code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}


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
            self._admit(meta, data, meta_error)

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
        if self.params.policy == "drop_oldest":
            live = [f for f in self.pending if not f.dropped]
            if len(live) >= self.params.window:
                oldest = live[0]
                oldest.dropped = True
                oldest.task.cancel()  # cancels the awaited batcher future: its queued chips are dropped
                self.dropped += 1
        task = asyncio.create_task(self._detect(data, meta_error), name=f"snipserve-stream-frame-{self.seq}")
        self.pending.append(Frame(self.seq, meta, task))
        self.seq += 1
        self.arrived.set()

    async def _detect(self, data: bytes, meta_error: SnipserveError | None) -> dict[str, Any]:
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
            return {"type": "error", **head, "error": _failure(frame.task)}
        return {"type": "result", **head, "result": frame.task.result()}


async def _refuse(ws: WebSocket, exc: SnipserveError) -> None:
    """Connection-level refusal (bad options, not ready): one error message, then close."""
    await ws.send_text(json.dumps({"type": "error", "seq": None, "meta": None, "error": error_body(exc)}))
    await ws.close(code=1013 if exc.status == 503 else 1008, reason=exc.code)


# ---- POST /v1/detect/batch -----------------------------------------------------------------------


async def _read_batch_form(request: Request, max_files: int, limit: int) -> FormData:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType(
            f"content type {ctype or '(none)'!r} is not accepted: "
            "send multipart/form-data with one 'files' field per image"
        )
    declared = request.headers.get("content-length")
    total = max_files * limit + 1024 * 1024
    if declared is not None and declared.isdigit() and int(declared) > total:
        raise ImageTooLarge(
            f"request body is {int(declared)} bytes, above {total} ({max_files} images x {limit} bytes)"
        )
    try:
        return await request.form(max_files=max_files, max_fields=64, max_part_size=limit)
    # starlette raises MultiPartException / HTTPException on malformed or oversized bodies
    except Exception as exc:
        raise BadImage(f"malformed multipart body: {getattr(exc, 'detail', exc)}") from exc


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        name = upload.filename
        raise ImageTooLarge(f"file {name!r} exceeds the limit of {limit} bytes (SNIPSERVE_MAX_IMAGE_BYTES)")
    return data


async def _batch_item(
    state: State, upload: UploadFile, options: DetectOptions, timeout: float | None
) -> dict[str, Any]:
    data = await _read_upload(upload, state.settings.max_image_bytes)
    return await detect_one(state, data, options, timeout)


async def batch_lines(
    state: State,
    uploads: list[UploadFile],
    options: DetectOptions,
    timeout: float | None,
    concurrency: int,
) -> AsyncIterator[bytes]:
    """NDJSON lines in completion order, ``concurrency`` images in flight; a summary line last.

    A disconnect cancels this generator, which cancels the images in flight (their chips are dropped).
    The form (spooled upload files) is closed by the response's background task, which runs even when
    the generator never started."""
    running: dict[asyncio.Task[dict[str, Any]], int] = {}
    next_index, errors = 0, 0
    try:
        while running or next_index < len(uploads):
            while next_index < len(uploads) and len(running) < concurrency:
                task = asyncio.create_task(_batch_item(state, uploads[next_index], options, timeout))
                running[task] = next_index
                next_index += 1
            done, _ = await asyncio.wait(set(running), return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=running.__getitem__):
                index = running.pop(task)
                head = {"index": index, "filename": uploads[index].filename}
                if task.exception() is not None:
                    errors += 1
                    line = {"type": "error", **head, "error": _failure(task)}
                else:
                    line = {"type": "result", **head, "result": task.result()}
                yield (json.dumps(line) + "\n").encode()
        summary = {"type": "summary", "images": len(uploads), "errors": errors}
        yield (json.dumps(summary) + "\n").encode()
    finally:
        # Shielded: on a disconnect anyio keeps cancelling this task, which would abort the clean-up itself.
        with anyio.CancelScope(shield=True):
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)


# ---- router --------------------------------------------------------------------------------------


def stream_router(config: StreamConfig | None = None) -> APIRouter:
    """The streaming routes, bound to ``config`` (default limits when omitted)."""
    config = config or StreamConfig()
    router = APIRouter(tags=["stream"])

    @router.websocket("/v1/stream")
    async def stream(ws: WebSocket) -> None:
        """Binary frames in, one JSON reply per frame out, in order (see the module docstring)."""
        state: State = ws.app.state.snipserve
        await ws.accept()
        try:
            params = _params(ws.query_params, config)
            pipeline = _pipeline(state)
            options = checked_options(ws.query_params, pipeline)
        except SnipserveError as exc:
            await _refuse(ws, exc)
            return
        hello = {"type": "ready", "window": params.window, "policy": params.policy, "model": pipeline.card.name}
        await ws.send_text(json.dumps(hello))
        with contextlib.suppress(WebSocketDisconnect):
            await StreamSession(ws, state, options, params, config).run()

    @router.post(
        "/v1/detect/batch",
        summary="Detect objects in many images; NDJSON lines streamed as each image completes.",
        description=(
            "multipart/form-data with one `files` field per image; options as query or form fields (as for "
            "`/v1/detect`), plus `timeout` per image. Lines arrive in **completion order**, each "
            '`{"type": "result", "index", "filename", "result"}` or `{"type": "error", "index", "filename", '
            '"error": {"status", "code", "message"}}`; '
            'the last line is `{"type": "summary", "images", "errors"}`. '
            "A bad image is an error line, not a failed response."
        ),
        response_class=StreamingResponse,
        responses={200: {"content": {"application/x-ndjson": {}}}},
    )
    async def detect_batch(request: Request) -> StreamingResponse:
        state = get_state(request)
        pipeline = _pipeline(state)
        form = await _read_batch_form(request, config.max_batch_files, state.settings.max_image_bytes)
        try:
            uploads = [u for u in form.getlist("files") if isinstance(u, UploadFile)]
            if not uploads:
                raise BadImage("multipart body has no file fields named 'files'")
            params = dict(request.query_params) | {k: v for k, v in form.items() if isinstance(v, str)}
            options = checked_options(params, pipeline)
            timeout = _params(params, config).timeout
        except SnipserveError:
            await form.close()
            raise
        lines = batch_lines(state, uploads, options, timeout, config.batch_concurrency)
        return StreamingResponse(lines, media_type="application/x-ndjson", background=BackgroundTask(form.close))

    return router
