"""The ASGI app factory: lifespan (engine, pipeline, batcher), error handlers, routers, middleware.

Heavy resources (engine, batcher, thread pools) are created in the lifespan and closed there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service import metrics, observability, security
from service.batch import Batcher
from service.engines import Engine, create_engine, static_batch_note, warm_up
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
from service.http.batch import batch_router
from service.http.detect import detect_router
from service.http.health import health_router
from service.http.models import models_router
from service.http.serving import State
from service.http.stream import stream_router
from service.http.transport import BodyGuard
from service.http.web import web_router
from service.pipeline import Pipeline
from service.settings import Settings, get_settings

log = logging.getLogger("snipserve.api")

EngineFactory = Callable[[Settings], Engine]

REJECT_REASON: dict[type[SnipserveError], str] = {
    QueueFull: "queue_full",
    DeadlineExceeded: "deadline",
    ImageTooLarge: "too_large",
    BadImage: "bad_image",
    UnsupportedMediaType: "bad_image",
    Unauthorized: "unauthorized",
    InvalidOptions: "invalid_options",
}


def create_app(settings: Settings | None = None, engine_factory: EngineFactory | None = None) -> FastAPI:
    """The ASGI app. ``engine_factory`` lets tests inject an engine (default: from settings)."""
    settings = settings or get_settings()
    state = State(settings)
    app = FastAPI(
        title="snipserve",
        version="0.1.0",
        description=(
            "Small-object detection in large images: SNIP/SNIPER pyramid, chips batched across requests, soft-NMS."
        ),
        lifespan=_lifespan(state, engine_factory),
    )
    app.state.snipserve = state
    install_error_handlers(app)
    for router in (health_router(), models_router(), detect_router(), stream_router(), batch_router(), web_router()):
        app.include_router(router)
    app.add_middleware(BodyGuard, config=settings.transport_config())  # innermost: after auth, before routes
    security.install(app, settings.api_key, settings.cors_origins)  # before instrument: it stays outermost
    observability.instrument(app, settings)
    return app


def _lifespan(
    state: State, engine_factory: EngineFactory | None
) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    settings = state.settings

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        factory = engine_factory or (lambda s: create_engine(s.model_path, s.engine_config()))
        engine = await run_in_threadpool(factory, settings)
        await start_serving(state, engine)
        try:
            yield
        finally:
            state.ready = False
            metrics.READY.set(0)
            if state.batcher is not None:
                await state.batcher.stop()
            engine.close()

    return lifespan


async def start_serving(state: State, engine: Engine) -> None:
    """Pipeline and batcher over ``engine``, warm-up, then ready."""
    settings = state.settings
    state.engine = engine
    state.pipeline = pipeline = Pipeline(
        engine, max_chips=settings.max_chips, preprocess=settings.preprocess, soft_nms=settings.soft_nms_dispatch()
    )
    state.batcher = batcher = Batcher(
        engine, pipeline.adapter, pipeline.norm, settings.batcher_config(), pipeline.staging
    )
    await batcher.start()
    metrics.set_model_info(
        model=engine.card.name, engine=engine.name, providers=",".join(engine.providers), precision=engine.precision
    )
    note = static_batch_note(engine)
    if note is not None:
        log.warning("%s", note)
    if settings.warmup:
        seconds = await run_in_threadpool(warm_up, engine, (1, batcher.max_batch))
        log.info("warm-up done in %.2f s", seconds)
    state.ready = True
    metrics.READY.set(1)
    log.info(
        "ready: model %s on %s %s, pre-processing on the %s",
        engine.card.name,
        engine.name,
        engine.providers,
        pipeline.staging.name,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Service errors -> their status with ``{"error": {"code", "message", "request_id"}}``; validation -> 422."""

    @app.exception_handler(SnipserveError)
    async def _snipserve_error(request: Request, exc: SnipserveError) -> JSONResponse:
        reason = next((r for cls, r in REJECT_REASON.items() if isinstance(exc, cls)), None)
        if reason is not None:
            metrics.REJECTIONS.labels(reason=reason).inc()
        if exc.status >= 500 and not isinstance(exc, QueueFull | NotReady | DeadlineExceeded):
            log.error("%s: %s", exc.code, exc.message)
        body: dict[str, Any] = {
            "code": exc.code,
            "message": exc.message,
            "request_id": observability.request_id_var.get(),
        }
        if exc.retry_after_s is not None:
            body["retry_after_s"] = round(exc.retry_after_s, 3)
        return JSONResponse({"error": body}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.REJECTIONS.labels(reason="invalid_options").inc()
        parts = [f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": {"code": "invalid_options", "message": "; ".join(parts)}}, status_code=422)
