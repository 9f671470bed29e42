"""HTTP API (FastAPI). Routes are thin: read the image and options, call the pipeline, shape the reply.

Heavy resources (engine, batcher, thread pools) are created in the lifespan and closed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service import metrics, observability
from service.batch import Batcher, Priority
from service.decode import decode_image
from service.engine import Engine, create_engine, warm_up
from service.errors import (
    BadImage,
    DeadlineExceeded,
    ImageTooLarge,
    InvalidOptions,
    NotReady,
    QueueFull,
    SnipserveError,
    Unauthorized,
    UnsupportedMediaType,
)
from service.options import DetectOptions
from service.pipeline import Pipeline, Result
from service.render import render_jpeg
from service.response import coco_results, detection_response
from service.settings import Settings, get_settings

log = logging.getLogger("snipserve.api")

REJECT_REASON: dict[type[SnipserveError], str] = {
    QueueFull: "queue_full",
    DeadlineExceeded: "deadline",
    ImageTooLarge: "too_large",
    BadImage: "bad_image",
    UnsupportedMediaType: "bad_image",
    Unauthorized: "unauthorized",
    InvalidOptions: "invalid_options",
}

# Options accepted as query parameters or multipart form fields (form fields win).
OPTION_FIELDS = (
    "preset", "levels", "min_object_size", "max_object_size", "score_threshold", "classes",
    "max_detections", "merge", "sigma", "iou_threshold", "class_agnostic", "edge_filter",
)  # fmt: skip


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


def parse_options(params: Mapping[str, str], pipeline: Pipeline) -> DetectOptions:
    """Options from query/form strings; every error names the field and the bad value."""
    raw: dict[str, Any] = {}
    merge: dict[str, Any] = {}
    for key in OPTION_FIELDS:
        value = params.get(key)
        if value is None or value == "":
            continue
        if key == "levels":
            try:
                raw["levels"] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidOptions(f"levels must be a JSON list of level objects, got {value!r}: {exc.msg}") from exc
        elif key == "classes":
            raw["classes"] = tuple(_class_id(name.strip(), pipeline) for name in value.split(",") if name.strip())
        elif key == "merge":
            merge["method"] = value
        elif key in ("sigma", "iou_threshold", "class_agnostic"):
            merge[key] = value
        else:
            raw[key] = value
    if merge:
        raw["merge"] = merge
    try:
        return DetectOptions.model_validate(raw)
    except ValidationError as exc:
        raise InvalidOptions(_validation_message(exc)) from exc


def _class_id(token: str, pipeline: Pipeline) -> int:
    names = pipeline.card.classes
    if token.isdigit():
        return int(token)
    if token in names:
        return names.index(token)
    raise InvalidOptions(f"unknown class {token!r}; this model has {list(names)}")


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "options"
        value = err.get("input")
        shown = f" (got {value!r})" if not isinstance(value, dict | list) else ""
        parts.append(f"{loc}: {err['msg']}{shown}")
    return "invalid options: " + "; ".join(parts)


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
        try:
            form = await request.form(max_files=1, max_fields=64, max_part_size=limit)
        except Exception as exc:  # starlette raises MultiPartException / HTTPException on malformed bodies
            raise BadImage(f"malformed multipart body: {getattr(exc, 'detail', exc)}") from exc
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


def create_app(settings: Settings | None = None, engine_factory: Callable[[Settings], Engine] | None = None) -> FastAPI:
    """The ASGI app. ``engine_factory`` lets tests inject an engine (default: from settings)."""
    settings = settings or get_settings()
    state = State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        factory = engine_factory or (lambda s: create_engine(s.model_path, s.engine_config()))
        engine = await run_in_threadpool(factory, settings)
        state.engine = engine
        state.pipeline = Pipeline(engine, max_chips=settings.max_chips, preprocess=settings.preprocess)
        state.batcher = Batcher(
            engine, state.pipeline.adapter, state.pipeline.norm, settings.batcher_config(), state.pipeline.staging
        )
        await state.batcher.start()
        metrics.set_model_info(
            model=engine.card.name, engine=engine.name, providers=",".join(engine.providers), precision=engine.precision
        )
        if settings.warmup:
            seconds = await run_in_threadpool(warm_up, engine, (1, state.batcher.max_batch))
            log.info("warm-up done in %.2f s", seconds)
        state.ready = True
        metrics.READY.set(1)
        log.info(
            "ready: model %s on %s %s, pre-processing on the %s",
            engine.card.name,
            engine.name,
            engine.providers,
            state.pipeline.staging.name,
        )
        try:
            yield
        finally:
            state.ready = False
            metrics.READY.set(0)
            await state.batcher.stop()
            engine.close()

    app = FastAPI(
        title="snipserve",
        version="0.1.0",
        description=(
            "Small-object detection in large images: SNIP/SNIPER pyramid, chips batched across requests, soft-NMS."
        ),
        lifespan=lifespan,
    )
    app.state.snipserve = state

    @app.exception_handler(SnipserveError)
    async def _snipserve_error(request: Request, exc: SnipserveError) -> JSONResponse:
        reason = next((r for cls, r in REJECT_REASON.items() if isinstance(exc, cls)), None)
        if reason is not None:
            metrics.REJECTIONS.labels(reason=reason).inc()
        if exc.status >= 500 and not isinstance(exc, QueueFull | NotReady | DeadlineExceeded):
            log.error("%s: %s", exc.code, exc.message)
        body = {"code": exc.code, "message": exc.message, "request_id": observability.request_id_var.get()}
        return JSONResponse({"error": body}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.REJECTIONS.labels(reason="invalid_options").inc()
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": {"code": "invalid_options", "message": "; ".join(parts)}}, status_code=422)

    @app.get("/healthz", tags=["health"], summary="Liveness: the process is up.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Readiness: model loaded and warmed up.")
    async def readyz() -> JSONResponse:
        if not state.ready or state.draining:
            return JSONResponse({"status": "draining" if state.draining else "not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/models", tags=["models"], summary="The served model's card and engine.")
    async def models() -> dict[str, Any]:
        engine = _engine(state)
        return {
            "models": [
                {
                    "id": engine.card.name,
                    "card": engine.card.model_dump(mode="json"),
                    "engine": {
                        "name": engine.name,
                        "providers": engine.providers,
                        "precision": engine.precision,
                        "max_batch": engine.max_batch,
                        "preprocess": state.pipeline.staging.name if state.pipeline is not None else None,
                    },
                }
            ]
        }

    @app.post(
        "/v1/detect",
        tags=["detect"],
        summary="Detect objects in one image.",
        description=(
            "Send the image as multipart/form-data (field `file`) or as the raw body with an image/* content type. "
            "Options go in the query string or as form fields. `format=json` (default) returns detections in "
            "original pixels, `coco` returns COCO results, `jpeg` the image with boxes drawn."
        ),
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    },
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "responses": {
                "200": {
                    "content": {
                        "application/json": {
                            "example": {
                                "image": {"width": 1920, "height": 1080},
                                "detections": [
                                    {
                                        "box": [100.5, 200.0, 112.0, 209.5],
                                        "score": 0.91,
                                        "class_id": 0,
                                        "label": "vehicle",
                                        "level": 0,
                                    }
                                ],
                                "model": "snipserve-aerial",
                                "chips": 21,
                                "timings": {
                                    "decode": 12.1,
                                    "plan": 0.1,
                                    "crop": 3.2,
                                    "queue_wait": 1.0,
                                    "infer": 180.4,
                                    "postprocess": 0.8,
                                    "merge": 1.5,
                                    "total": 199.1,
                                },
                            }
                        },
                        "image/jpeg": {},
                    }
                },
                "400": {"description": "Not a decodable image"},
                "413": {"description": "Image over the byte or pixel limit"},
                "415": {"description": "Unsupported content type or image format"},
                "422": {"description": "Invalid options"},
                "503": {"description": "Queue full or not ready (see Retry-After)"},
                "504": {"description": "Deadline passed"},
            },
        },
    )
    async def detect(
        request: Request,
        preset: Annotated[
            str | None, Query(description="Levels preset from the model card.", examples=["default"])
        ] = None,
        levels: Annotated[
            str | None,
            Query(description='Explicit levels as JSON, e.g. [{"scale": 2, "valid": [-1, 40]}, {"long_side": 512}]'),
        ] = None,
        min_object_size: Annotated[
            float | None, Query(gt=0, description="Smallest object, sqrt(area) in original px.")
        ] = None,
        max_object_size: Annotated[
            float | None, Query(gt=0, description="Largest object, sqrt(area) in original px.")
        ] = None,
        score_threshold: Annotated[
            float | None, Query(ge=0, le=1, description="Minimum score (default: the model's).")
        ] = None,
        classes: Annotated[str | None, Query(description="Comma-separated class names or ids to keep.")] = None,
        max_detections: Annotated[
            int | None, Query(ge=1, le=10000, description="At most this many detections.")
        ] = None,
        merge: Annotated[str | None, Query(description="Soft-NMS method: gaussian, linear or hard.")] = None,
        sigma: Annotated[float | None, Query(gt=0, description="Gaussian soft-NMS sigma.")] = None,
        iou_threshold: Annotated[float | None, Query(ge=0, le=1, description="Nt for linear/hard merge.")] = None,
        class_agnostic: Annotated[bool | None, Query(description="Merge across classes.")] = None,
        edge_filter: Annotated[bool | None, Query(description="Drop boxes cut by inner chip edges.")] = None,
        format: Annotated[str, Query(description="json | coco | jpeg", pattern="^(json|coco|jpeg)$")] = "json",
        timeout: Annotated[float | None, Query(gt=0, description="Deadline in seconds (at most the server's).")] = None,
    ) -> Response:
        t0 = time.perf_counter()
        pipeline = _pipeline(state)
        with in_flight(state):
            data, params = await read_image_and_params(request, settings.max_image_bytes)
            options = parse_options(params, pipeline)
            image, result = await run_detection(state, data, options, timeout, request)
        result.timings["total"] = time.perf_counter() - t0
        if format == "coco":
            return JSONResponse(coco_results(result, image_id=params.get("image_id", 0)))
        if format == "jpeg":
            jpeg = await run_in_threadpool(render_jpeg, image, result, pipeline.card.classes)
            return Response(jpeg, media_type="image/jpeg")
        return JSONResponse(detection_response(result, pipeline.card))

    from service.stream import stream_router
    from service.web import web_router

    app.include_router(stream_router())
    app.include_router(web_router())

    from service import security

    security.install(app, settings.api_key, settings.cors_origins)  # before instrument: it stays outermost
    observability.instrument(app, settings)
    return app


@contextlib.contextmanager
def in_flight(state: State, priority: Priority = "interactive") -> Iterator[None]:
    """Count a detection request in flight; refuse (503) past its lane's limit.

    Interactive requests are limited by ``max_in_flight`` counting only themselves; bulk (streaming, batch)
    requests by ``bulk_max_in_flight``: a stream with a wide window cannot use up /v1/detect's slots."""
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
    try:
        yield
    finally:
        state.in_flight -= 1
        state.in_flight_bulk -= bulk
        metrics.IN_FLIGHT.set(state.in_flight)


async def run_detection(
    state: State,
    data: bytes,
    options: DetectOptions,
    timeout: float | None = None,
    request: Request | None = None,
    priority: Priority = "interactive",
) -> tuple[np.ndarray, Result]:
    """Decode ``data`` and detect, through the shared batcher, within the request's deadline.

    The shared entry point of every route (``/v1/detect``, batch, stream). With ``request``, a client
    disconnect cancels the work and drops its queued chips. Records stage metrics. Streaming and batch
    routes pass ``priority="bulk"``: their chips go to the batcher's bulk lane (own budget, served after
    interactive chips), so they cannot starve ``/v1/detect``.
    """
    settings = state.settings
    pipeline, batcher = _pipeline(state), _batcher(state)
    budget = min(timeout or math.inf, settings.request_timeout_s)
    deadline = time.monotonic() + budget

    async def run() -> tuple[np.ndarray, Result]:
        t = time.perf_counter()
        image = await run_in_threadpool(decode_image, data, settings.decode_config())
        decode_s = time.perf_counter() - t
        metrics.INPUT_MEGAPIXELS.observe(image.shape[0] * image.shape[1] / 1e6)
        result = await pipeline.detect_async(image, options, batcher, deadline, priority)
        result.timings["decode"] = decode_s
        return image, result

    work = run() if request is None else cancel_on_disconnect(request, run())
    try:
        image, result = await asyncio.wait_for(work, budget)
    except TimeoutError:
        raise DeadlineExceeded(f"request did not finish within its deadline of {budget:g} s") from None
    metrics.observe_stages(result.timings)
    metrics.DETECTIONS_PER_IMAGE.observe(len(result.detections))
    return image, result


def get_state(request: Request) -> State:
    """The app's :class:`State` (for routers defined in other modules)."""
    state: State = request.app.state.snipserve
    return state


def _engine(state: State) -> Engine:
    if state.engine is None:
        raise NotReady("the model is still loading")
    return state.engine


def _pipeline(state: State) -> Pipeline:
    if state.pipeline is None or not state.ready:
        raise NotReady("the service is not ready yet (model loading or warming up)", headers={"Retry-After": "1"})
    return state.pipeline


def _batcher(state: State) -> Batcher:
    if state.batcher is None:
        raise NotReady("the service is not ready yet", headers={"Retry-After": "1"})
    return state.batcher
