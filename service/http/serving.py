"""What every route shares: the serving state, admission (in-flight lanes), body reading, option parsing,
and the one detection entry point (decode -> pipeline through the shared batcher, within a deadline).

Routes are thin: read the image and options here, call :func:`run_detection`, shape the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData

from service import metrics
from service.batch import Batcher, Priority
from service.decode import ImageInfo, decode_image, probe_image
from service.engines import Engine
from service.errors import (
    BadImage,
    DeadlineExceeded,
    ImageTooLarge,
    InvalidOptions,
    NotReady,
    QueueFull,
    SnipserveError,
    UnsupportedMediaType,
)
from service.options import DetectOptions
from service.pipeline import Admission, Pipeline, Result, Route
from service.plan import PlanError, plan
from service.response import detection_response
from service.settings import Settings
from snipserve_client.options import MAX_JSON_DEPTH, MAX_LEVELS, MAX_LEVELS_JSON, OPTION_NAMES, RequestOptions

log = logging.getLogger("snipserve.api")


class State:
    """Everything the lifespan creates; one per app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.pipeline: Pipeline | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False  # SIGTERM received: readiness 503, new requests refused, in-flight ones finish
        self.in_flight = 0  # all detection requests (drain waits for 0)
        self.in_flight_bulk = 0  # of which streaming/batch (priority "bulk"), limited apart
        self.pixels = PixelBudget(settings.max_pixels_in_flight)
        self.slot_freed = asyncio.Event()  # set whenever an in-flight slot is released
        self.frame_bytes = 0  # encoded WebSocket frames held by streams (received, not yet answered)


class PixelBudget:
    """Decoded and resized pixels of all requests in flight, at most ``capacity`` (memory bounded globally).

    A request reserves what its image and pyramid levels will take before decoding; it waits for room until its
    deadline (then 503), and one that could never fit is a 413."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int, timeout: float) -> AsyncIterator[None]:
        if self.used + pixels <= self.capacity:  # fast path: room now (asyncio.wait_for(..., 0) never runs it)
            self.used += pixels
        else:
            await self._wait_for_room(pixels, timeout)
        try:
            yield
        finally:
            async with self._changed:
                self.used -= pixels
                self._changed.notify_all()

    async def _wait_for_room(self, pixels: int, timeout: float) -> None:
        if pixels > self.capacity:
            raise ImageTooLarge(
                f"the image and its pyramid levels take {pixels / 1e6:.1f} MP, above the {self.capacity / 1e6:.1f} MP "
                "in flight allowed (SNIPSERVE_MAX_PIXELS_IN_FLIGHT); use fewer or coarser levels"
            )
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.used + pixels <= self.capacity), timeout)
            except TimeoutError:
                raise QueueFull(
                    f"{self.used / 1e6:.1f} MP of images in flight; no room for {pixels / 1e6:.1f} MP in time "
                    "(SNIPSERVE_MAX_PIXELS_IN_FLIGHT)",
                    headers={"Retry-After": "1"},
                ) from None
            self.used += pixels


def pixel_cost(info: ImageInfo, pipeline: Pipeline, options: DetectOptions) -> int:
    """Pixels a request holds while it runs: the decoded image plus every resized pyramid level."""
    try:  # the chip count is arithmetic and the chip grid at most max_chips rows: cheap on the event loop
        levels = plan((info.width, info.height), pipeline.plan_config(options)).levels
    except (PlanError, ValueError) as exc:
        raise InvalidOptions(str(exc)) from exc
    return info.width * info.height + sum(lv.width * lv.height for lv in levels)


def parse_options(params: Mapping[str, str], pipeline: Pipeline) -> DetectOptions:
    """Options from query/form strings (:class:`RequestOptions`), resolved against the model's classes.

    Every error is a 422 naming the option and the (shortened) bad value. Each step is bounded by the size
    limits of :mod:`snipserve_client.options`, so a hostile option costs microseconds on the event loop."""
    return detect_options(request_options(params), pipeline.card.classes)


def request_options(params: Mapping[str, str]) -> RequestOptions:
    """The option strings of a request, validated as sent (types, ranges, lengths)."""
    raw = {k: params[k] for k in OPTION_NAMES if params.get(k) not in (None, "")}
    try:
        return RequestOptions.model_validate(raw)
    except ValidationError as exc:
        raise InvalidOptions(_validation_message(exc)) from exc


def detect_options(request: RequestOptions, class_names: Sequence[str]) -> DetectOptions:
    """The stages' :class:`DetectOptions` from the request's: ``levels`` JSON parsed, class names resolved."""
    given = request.model_dump(exclude_none=True)
    merge: dict[str, Any] = {
        k: given.pop(k) for k in ("merge", "sigma", "iou_threshold", "class_agnostic") if k in given
    }
    if "merge" in merge:
        merge["method"] = merge.pop("merge")
    if merge:
        given["merge"] = merge
    if request.levels is not None:
        given["levels"] = parse_levels(request.levels)
    if request.classes is not None:
        given["classes"] = parse_classes(request.classes, class_names)
    try:
        return DetectOptions.model_validate(given)
    except ValidationError as exc:
        raise InvalidOptions(_validation_message(exc)) from exc


def parse_levels(text: str) -> list[dict[str, Any]]:
    """``levels`` JSON -> a list of at most ``MAX_LEVELS`` objects; NaN, infinities, huge integers and deep
    nesting are refused before (depth) or while (numbers) the JSON parser runs."""
    if len(text) > MAX_LEVELS_JSON:
        raise InvalidOptions(f"levels is {len(text)} characters of JSON, above the limit of {MAX_LEVELS_JSON}")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InvalidOptions(f"levels JSON is nested {depth} deep, above the limit of {MAX_JSON_DEPTH}")
    try:
        value = json.loads(text, parse_constant=_json_constant, parse_int=_json_int, parse_float=_json_float)
    except json.JSONDecodeError as exc:
        raise InvalidOptions(f"levels must be a JSON list of level objects, got {shorten(text)}: {exc.msg}") from exc
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidOptions(f"levels must be a JSON list of level objects, got {shorten(text)}")
    if not 1 <= len(value) <= MAX_LEVELS:
        raise InvalidOptions(f"levels has {len(value)} entries; give 1 to {MAX_LEVELS}")
    return value


def json_depth(text: str) -> int:
    """Deepest nesting of ``[``/``{`` in JSON ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _json_constant(name: str) -> float:
    raise InvalidOptions(f"levels: {name} is not a number the service accepts (finite numbers only)")


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > 9:
        raise InvalidOptions(f"levels: integer {shorten(text)} has {len(text)} digits, at most 9 are accepted")
    return int(text)


def _json_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or len(text) > 32:
        raise InvalidOptions(f"levels: number {shorten(text)} is out of range (finite, at most 32 characters)")
    return value


def parse_classes(text: str, class_names: Sequence[str]) -> tuple[int, ...]:
    """Comma-separated class names or ids (ASCII digits) -> class ids; unknown names are a 422."""
    ids = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        if token.isascii() and token.isdigit():
            if len(token) > 6:
                raise InvalidOptions(f"classes: id {shorten(token)} is not a class of this model")
            ids.append(int(token))
        elif token in class_names:
            ids.append(class_names.index(token))
        else:
            raise InvalidOptions(f"unknown class {shorten(token)}; this model has {list(class_names)}")
    return tuple(ids)


def shorten(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (error messages never echo a huge input)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]} ({len(text)} characters)"


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "options"
        value = err.get("input")
        shown = f" (got {shorten(value)})" if not isinstance(value, dict | list) else ""
        parts.append(f"{loc}: {err['msg']}{shown}")
    return "invalid options: " + "; ".join(parts[:8])


async def read_limited(request: Request, limit: int) -> bytes:
    """The raw body, refusing (413) past ``limit`` bytes without reading further."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageTooLarge(
            f"request body is {int(declared)} bytes, above the limit of {limit} (SNIPSERVE_MAX_IMAGE_BYTES)"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ImageTooLarge(f"request body exceeds the limit of {limit} bytes (SNIPSERVE_MAX_IMAGE_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_image_and_params(request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
    """Image bytes (multipart field ``file`` or the raw body) and the option strings."""
    params = dict(request.query_params)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
            raise ImageTooLarge(
                f"request body is {int(declared)} bytes, above the limit of {limit} (SNIPSERVE_MAX_IMAGE_BYTES)"
            )
        form = await read_form(request, max_files=1)
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise BadImage("multipart body has no file field named 'file'")
            data = await upload.read(limit + 1)
            if len(data) > limit:
                raise ImageTooLarge(f"uploaded file exceeds the limit of {limit} bytes (SNIPSERVE_MAX_IMAGE_BYTES)")
            params |= {k: v for k, v in form.items() if isinstance(v, str)}
            return data, params
        finally:
            await form.close()  # spooled temporary files
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await read_limited(request, limit), params
    raise UnsupportedMediaType(
        f"content type {ctype or '(none)'!r} is not accepted: send multipart/form-data with a 'file' field, "
        "or the raw image with an image/* content type"
    )


MAX_FIELD_BYTES = 65536
"""A multipart text field (an option) at most; files are limited by the byte limits."""


async def read_form(request: Request, max_files: int) -> FormData:
    """The multipart form, text fields at most ``MAX_FIELD_BYTES`` each; the body's total size and pace are
    guarded while it arrives (:class:`service.http.transport.BodyGuard`)."""
    try:
        return await request.form(max_files=max_files, max_fields=64, max_part_size=MAX_FIELD_BYTES)
    except SnipserveError:
        raise  # the body guard's 408 / 413 / 503
    except Exception as exc:  # starlette raises MultiPartException / HTTPException on malformed bodies
        detail = str(getattr(exc, "detail", exc))
        if "maximum size" in detail:
            raise ImageTooLarge(f"a multipart text field is above {MAX_FIELD_BYTES} bytes (options are short)") from exc
        raise BadImage(f"malformed multipart body: {detail}") from exc


async def cancel_on_disconnect(request: Request, coro: Any, poll_s: float = 0.1) -> Any:
    """Run ``coro``; if the client disconnects first, cancel it (its queued chips are dropped)."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


@contextlib.contextmanager
def in_flight(state: State, priority: Priority = "interactive") -> Iterator[None]:
    """Count a detection request in flight; refuse (503) past its lane's limit.

    Interactive requests are limited by ``max_in_flight`` counting only themselves; bulk (streaming, batch)
    requests by ``bulk_max_in_flight``: a stream with a wide window cannot use up /v1/detect's slots."""
    _enter(state, priority)
    try:
        yield
    finally:
        _leave(state, priority)


@contextlib.asynccontextmanager
async def in_flight_when_free(state: State, priority: Priority, timeout: float) -> AsyncIterator[None]:
    """Like :func:`in_flight`, but wait up to ``timeout`` seconds for a slot before refusing (streams and batches
    that follow their window are never refused for the lane being busy with other streams)."""
    deadline = time.monotonic() + timeout
    while True:
        state.slot_freed.clear()  # before trying: a slot released after a failed try sets it again
        try:
            _enter(state, priority)
            break
        except QueueFull:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.slot_freed.wait(), remaining)
    try:
        yield
    finally:
        _leave(state, priority)


def _enter(state: State, priority: Priority) -> None:
    if state.draining:
        raise NotReady("the service is shutting down; retry on another replica", headers={"Retry-After": "1"})
    bulk = priority == "bulk"
    count = state.in_flight_bulk if bulk else state.in_flight - state.in_flight_bulk
    limit = state.settings.bulk_max_in_flight if bulk else state.settings.max_in_flight
    if count >= limit:
        name = "SNIPSERVE_BULK_MAX_IN_FLIGHT" if bulk else "SNIPSERVE_MAX_IN_FLIGHT"
        raise QueueFull(
            f"{count} {priority} requests in flight, the limit is {limit} ({name})", headers={"Retry-After": "1"}
        )
    state.in_flight += 1
    state.in_flight_bulk += bulk
    metrics.IN_FLIGHT.set(state.in_flight)


def _leave(state: State, priority: Priority) -> None:
    state.in_flight -= 1
    state.in_flight_bulk -= priority == "bulk"
    metrics.IN_FLIGHT.set(state.in_flight)
    state.slot_freed.set()


def under_load(
    state: State, options: DetectOptions, size: tuple[int, int], route: Route
) -> tuple[DetectOptions, Admission]:
    """The options a request runs with, and what admission counts for them (``Pipeline.admission_chips``).

    Brownout (``SNIPSERVE_BROWNOUT_WAIT_S``): a request for the default pyramid that would wait longer than the
    setting for other requests' chips on the current schedule runs 'focus' instead -- under a size-aware schedule
    those are the large requests behind a queue, where shedding chips shortens everyone's wait. Its own chips do not
    count: a large image on an idle service runs as asked. Bulk-lane requests and others run as asked."""
    pipeline, batcher = pipeline_of(state), batcher_of(state)
    need = pipeline.admission_chips(size, options)
    limit = state.settings.brownout_wait_s
    # the bulk lane (streams, batch NDJSON) waits behind interactive chips by design: it trades latency, not accuracy
    degraded = pipeline.brownout_options(options) if limit > 0 and route.priority == "interactive" else None
    if degraded is None:
        return options, need
    wait = batcher.queue_ahead_s(need.chips, route.deadline, route.priority, route.arrival)
    if wait is None or wait <= limit:
        return options, need
    metrics.BROWNOUTS.inc()
    return degraded, pipeline.admission_chips(size, degraded)


async def run_detection(
    state: State,
    data: bytes,
    options: DetectOptions,
    timeout: float | None = None,
    request: Request | None = None,
    priority: Priority = "interactive",
) -> tuple[np.ndarray, Result]:
    """Decode ``data`` and detect, through the shared batcher, within the request's deadline.

    The deadline (``timeout``, capped by the server's) and the queueing bound count from the request's arrival:
    ``request.state.arrival``, stamped by the transport middleware before the body was read (else now).

    The shared entry point of every route (``/v1/detect``, batch, stream). With ``request``, a client
    disconnect cancels the work and drops its queued chips. Records stage metrics. Streaming and batch
    routes pass ``priority="bulk"``: their chips go to the batcher's bulk lane (own budget, served after
    interactive chips), so they cannot starve ``/v1/detect``.
    """
    settings = state.settings
    pipeline, batcher = pipeline_of(state), batcher_of(state)
    budget = min(timeout or math.inf, settings.request_timeout_s)
    now = time.monotonic()
    stamped = getattr(request.state, "arrival", None) if request is not None else None
    arrival = now if stamped is None else min(stamped, now)
    deadline = arrival + budget

    async def run() -> tuple[np.ndarray, Result]:
        t = time.perf_counter()
        info = await run_in_threadpool(probe_image, data, settings.decode_config())
        opts, need = under_load(state, options, (info.width, info.height), Route(deadline, priority, arrival))
        # refuse by time before decoding: under overload a refusal then costs a header probe, not a decode; the
        # admitted request holds its place in the schedule while it decodes
        reservation = batcher.admit(need.chips, deadline, priority, arrival, need.pyramid)
        try:
            async with state.pixels.reserve(pixel_cost(info, pipeline, opts), deadline - time.monotonic()):
                image = await run_in_threadpool(decode_image, data, settings.decode_config())
                decode_s = time.perf_counter() - t
                metrics.INPUT_MEGAPIXELS.observe(image.shape[0] * image.shape[1] / 1e6)
                route = Route(deadline, priority, arrival, reservation)
                result = await pipeline.detect_async(image, opts, batcher, route)
        finally:
            batcher.release(reservation)
        result.timings["decode"] = decode_s
        return image, result

    if deadline <= now:  # the upload alone took the whole deadline
        raise DeadlineExceeded(f"request did not finish within its deadline of {budget:g} s (its upload took it)")
    work = run() if request is None else cancel_on_disconnect(request, run())
    try:
        image, result = await asyncio.wait_for(work, deadline - now)
    except TimeoutError:
        raise DeadlineExceeded(f"request did not finish within its deadline of {budget:g} s") from None
    metrics.observe_stages(result.timings)
    metrics.DETECTIONS_PER_IMAGE.observe(len(result.detections))
    return image, result


def get_state(request: Request) -> State:
    """The app's :class:`State` (for routers defined in other modules)."""
    state: State = request.app.state.snipserve
    return state


def engine_of(state: State) -> Engine:
    if state.engine is None:
        raise NotReady("the model is still loading")
    return state.engine


def pipeline_of(state: State) -> Pipeline:
    if state.pipeline is None or not state.ready:
        raise NotReady("the service is not ready yet (model loading or warming up)", headers={"Retry-After": "1"})
    return state.pipeline


def batcher_of(state: State) -> Batcher:
    if state.batcher is None:
        raise NotReady("the service is not ready yet", headers={"Retry-After": "1"})
    return state.batcher


def error_body(exc: SnipserveError) -> dict[str, Any]:
    """``{"status", "code", "message"}`` of a service error."""
    return {"status": exc.status, "code": exc.code, "message": exc.message}


def failure_body(task: asyncio.Task[dict[str, Any]]) -> dict[str, Any]:
    """The error body of a finished, failed task (unexpected exceptions become a logged 500)."""
    exc = task.exception()
    if isinstance(exc, SnipserveError):
        return error_body(exc)
    log.error("stream frame failed", exc_info=exc)  # the details go to the log, never to the client
    return {"status": 500, "code": "internal_error", "message": "internal server error (details in the server log)"}


def checked_options(params: Mapping[str, str], pipeline: Pipeline) -> DetectOptions:
    """Options parsed and checked against the model (preset, classes) once for the whole stream or batch."""
    options = parse_options(params, pipeline)
    pipeline.levels_for(options)
    pipeline.check_classes(options)
    return options


async def detect_one(state: State, data: bytes, options: DetectOptions, timeout: float | None) -> dict[str, Any]:
    """One image through the shared batcher (bulk lane) -> the ``/v1/detect`` JSON body (timings in ms)."""
    t0 = time.perf_counter()
    pipeline = pipeline_of(state)
    wait = min(timeout or math.inf, state.settings.request_timeout_s)
    async with in_flight_when_free(state, "bulk", wait):
        _, result = await run_detection(state, data, options, timeout, priority="bulk")
    result.timings["total"] = time.perf_counter() - t0
    return detection_response(result, pipeline.card)
