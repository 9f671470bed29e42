"""``GET /v1/models``: the served model's card and engine."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.engines import static_batch_note
from service.http.serving import engine_of, get_state


def models_router() -> APIRouter:
    router = APIRouter(tags=["models"])

    @router.get("/v1/models", summary="The served model's card and engine.")
    async def models(request: Request) -> dict[str, Any]:
        state = get_state(request)
        engine = engine_of(state)
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
                        "static_batch": getattr(engine, "static_batch", None),
                        "notes": [n for n in (static_batch_note(engine),) if n is not None],
                        "preprocess": state.pipeline.staging.name if state.pipeline is not None else None,
                        "soft_nms": state.pipeline.soft_nms.model_dump() if state.pipeline is not None else None,
                    },
                }
            ]
        }

    return router
