"""``POST /v1/detect``: one image (multipart field ``file`` or the raw body), options in the query or form."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from service.http.serving import get_state, in_flight, parse_options, pipeline_of, read_image_and_params, run_detection
from service.render import render_jpeg
from service.response import coco_results, detection_response
from snipserve_client.options import RequestOptions

DETECT_OPENAPI: dict[str, Any] = {
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
}


def option_parameters() -> list[dict[str, Any]]:
    """The OpenAPI query parameters of the request options, from their one declaration (:class:`RequestOptions`).

    They are parsed by :func:`service.http.serving.parse_options` (query string or form fields, form wins), not
    by FastAPI, so that every bad value is a 422 naming it, whatever the transport."""
    schema = RequestOptions.model_json_schema()
    parameters = []
    for name, prop in schema["properties"].items():
        prop = {k: v for k, v in prop.items() if k not in ("title", "default")}
        description = prop.pop("description", "")
        parameters.append({"name": name, "in": "query", "required": False, "description": description, "schema": prop})
    return parameters


def detect_router() -> APIRouter:
    router = APIRouter(tags=["detect"])

    @router.post(
        "/v1/detect",
        summary="Detect objects in one image.",
        description=(
            "Send the image as multipart/form-data (field `file`) or as the raw body with an image/* content type. "
            "Options go in the query string or as form fields. `format=json` (default) returns detections in "
            "original pixels, `coco` returns COCO results, `jpeg` the image with boxes drawn."
        ),
        openapi_extra=DETECT_OPENAPI | {"parameters": option_parameters()},
    )
    async def detect(
        request: Request,
        format: Annotated[Literal["json", "coco", "jpeg"], Query(description="json | coco | jpeg")] = "json",
        timeout: Annotated[float | None, Query(gt=0, description="Deadline in seconds (at most the server's).")] = None,
    ) -> Response:
        t0 = time.perf_counter()
        state = get_state(request)
        pipeline = pipeline_of(state)
        # The body first, then the slot: a slow client holds its connection, never one of the in-flight slots.
        data, params = await read_image_and_params(request, state.settings.max_image_bytes)
        options = parse_options(params, pipeline)
        with in_flight(state):
            image, result = await run_detection(state, data, options, timeout, request)
        result.timings["total"] = time.perf_counter() - t0
        if format == "coco":
            return JSONResponse(coco_results(result, image_id=params.get("image_id", 0)))
        if format == "jpeg":
            jpeg = await run_in_threadpool(render_jpeg, image, result, pipeline.card.classes)
            return Response(jpeg, media_type="image/jpeg")
        return JSONResponse(detection_response(result, pipeline.card))

    return router
