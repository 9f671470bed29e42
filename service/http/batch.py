"""``POST /v1/detect/batch``: many images in one multipart request, NDJSON lines as each image completes.

Every image goes through :func:`service.http.serving.detect_one` (the bulk lane of the shared batcher), so a
batch cannot starve ``/v1/detect``. Limits come from :class:`service.http.stream.StreamConfig`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import FormData, UploadFile

from service.errors import BadImage, ImageTooLarge, SnipserveError, UnsupportedMediaType
from service.http.serving import (
    State,
    checked_options,
    detect_one,
    failure_body,
    get_state,
    pipeline_of,
    read_form,
)
from service.http.stream import StreamConfig, stream_params
from service.options import DetectOptions


async def _read_batch_form(request: Request, max_files: int, limit: int) -> FormData:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise UnsupportedMediaType(
            f"content type {ctype or '(none)'!r} is not accepted: "
            "send multipart/form-data with one 'files' field per image"
        )
    return await read_form(request, max_files=max_files)  # total size: the body guard's batch limit


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
                    line = {"type": "error", **head, "error": failure_body(task)}
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


def batch_router(config: StreamConfig | None = None) -> APIRouter:
    """``POST /v1/detect/batch``, bound to ``config`` (default limits when omitted)."""
    config = config or StreamConfig()
    router = APIRouter(tags=["stream"])

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
        pipeline = pipeline_of(state)
        form = await _read_batch_form(request, config.max_batch_files, state.settings.max_image_bytes)
        try:
            uploads = [u for u in form.getlist("files") if isinstance(u, UploadFile)]
            if not uploads:
                raise BadImage("multipart body has no file fields named 'files'")
            params = dict(request.query_params) | {k: v for k, v in form.items() if isinstance(v, str)}
            options = checked_options(params, pipeline)
            timeout = stream_params(params, config).timeout
        except SnipserveError:
            await form.close()
            raise
        lines = batch_lines(state, uploads, options, timeout, config.batch_concurrency)
        return StreamingResponse(lines, media_type="application/x-ndjson", background=BackgroundTask(form.close))

    return router
