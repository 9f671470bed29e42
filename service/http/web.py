"""Web demo page: ``GET /`` (upload or drop an image, pick levels and threshold, see boxes and timings).

Static HTML/JS/CSS under ``service/http/static/``; no build step, no CDN: the page calls ``/v1/models`` and
``/v1/detect`` of the same server and draws on a canvas.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Served by name only (no path parameters reach the file system): name -> media type.
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def web_router(static_dir: Path = STATIC_DIR) -> APIRouter:
    """``GET /`` (the page) and ``GET /static/<asset>`` for the files in :data:`ASSETS`."""
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def index() -> FileResponse:
        return FileResponse(static_dir / "index.html", media_type="text/html; charset=utf-8")

    def asset_route(name: str, media_type: str) -> None:
        async def asset() -> FileResponse:
            return FileResponse(static_dir / name, media_type=media_type)

        router.add_api_route(f"/static/{name}", asset, methods=["GET"])

    for name, media_type in ASSETS.items():
        asset_route(name, media_type)
    return router
