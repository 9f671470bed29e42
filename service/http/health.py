"""Health routes: ``GET /healthz`` (liveness) and ``GET /readyz`` (readiness; 503 while loading or draining)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.http.serving import get_state


def health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="Liveness: the process is up.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness: model loaded and warmed up.")
    async def readyz(request: Request) -> JSONResponse:
        state = get_state(request)
        if not state.ready or state.draining:
            return JSONResponse({"status": "draining" if state.draining else "not ready"}, status_code=503)
        return JSONResponse({"status": "ready"})

    return router
