"""``snipserve detect IMAGE...``: detect objects in image files, in-process or against a server.

Without ``--url`` the pipeline runs in this process (``Pipeline`` over the ONNX Runtime engine and the
shipped model, or ``--model``); with ``--url`` each image is POSTed to ``/v1/detect``. ``--tiled`` is the
offline mode for TIFF/GeoTIFF orthomosaics above the service's pixel limit: read window by window,
merged, with map coordinates when the file is georeferenced (see :mod:`service.tiled`).
Output, resume and rendering: :mod:`service.cli.io`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from service.cli.io import (
    FrameRef,
    Progress,
    ResultWriter,
    add_option_arguments,
    add_output_arguments,
    image_refs,
    now,
    option_strings,
    render_to,
)
from service.errors import SnipserveError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files or directories (sorted)")
    parser.add_argument("--url", help="server base URL, e.g. http://127.0.0.1:8000 (default: run in-process)")
    parser.add_argument("--model", type=Path, help="in-process: ONNX model (default: the shipped model)")
    parser.add_argument("--engine", choices=["onnxruntime", "fake"], default="onnxruntime", help="in-process engine")
    tiled = parser.add_argument_group("offline mode for huge TIFF/GeoTIFF orthomosaics")
    tiled.add_argument("--tiled", action="store_true", help="read TIFFs window by window (in-process only)")
    tiled.add_argument("--window", type=int, default=4096, help="window side in pixels (default 4096)")
    tiled.add_argument("--overlap", type=int, default=256, help="window overlap in pixels, >= largest object (256)")
    add_output_arguments(parser)
    add_option_arguments(parser)


def error_record(exc: SnipserveError) -> dict[str, Any]:
    return {"error": {"status": exc.status, "code": exc.code, "message": exc.message}}


class LocalDetector:
    """The pipeline in this process: decode with the service's rules, detect, shape like ``/v1/detect``."""

    def __init__(self, args: argparse.Namespace) -> None:
        from service.engines import EngineConfig
        from service.http.serving import parse_options
        from service.pipeline import Pipeline
        from service.settings import Settings
        from service.tiled import TileConfig

        settings = Settings()
        self.decode_config = settings.decode_config()
        self.pipeline = Pipeline.load(
            args.model or settings.model_path, EngineConfig(kind=args.engine), preprocess=settings.preprocess
        )
        self.options = parse_options(option_strings(args), self.pipeline)
        self.pipeline.levels_for(self.options)  # unknown preset or class: a usage error, before any image
        self.pipeline.check_classes(self.options)
        self.tiles = TileConfig(window=args.window, overlap=args.overlap) if args.tiled else None
        self.labels = list(self.pipeline.card.classes)

    def close(self) -> None:
        self.pipeline.engine.close()

    def __call__(self, ref: FrameRef, want_image: bool) -> tuple[dict[str, Any], np.ndarray | None]:
        from service.decode import decode_image
        from service.response import detection_response
        from service.tiled import detect_tiled

        assert ref.path is not None
        try:
            if self.tiles is not None:
                return {"result": detect_tiled(ref.path, self.pipeline, self.options, self.tiles)}, None
            t0 = now()
            image = decode_image(ref.path.read_bytes(), self.decode_config)
            decode_s = now() - t0
            result = self.pipeline.detect(image, self.options)
            result.timings |= {"decode": decode_s, "total": now() - t0}
            return {"result": detection_response(result, self.pipeline.card)}, image
        except SnipserveError as exc:
            return error_record(exc), None


class RemoteDetector:
    """``POST /v1/detect`` per image through :class:`snipserve_client.Client`."""

    def __init__(self, args: argparse.Namespace) -> None:
        from snipserve_client import Client

        self.client = Client(args.url, api_key=args.api_key or os.environ.get("SNIPSERVE_API_KEY"))
        self.params = option_strings(args)
        try:
            self.labels = list(self.client.models()["models"][0]["card"]["classes"])
        except BaseException:
            self.client.close()
            raise

    def close(self) -> None:
        self.client.close()

    def __call__(self, ref: FrameRef, want_image: bool) -> tuple[dict[str, Any], np.ndarray | None]:
        from snipserve_client import SnipserveClientError

        assert ref.path is not None
        data = ref.path.read_bytes()
        try:
            result = self.client.detect(data, **self.params)
        except SnipserveClientError as exc:
            if exc.status == 0:
                raise
            return {"error": {"status": exc.status, "code": exc.code, "message": exc.message}}, None
        return {"result": result.model_dump(mode="json")}, local_image(data) if want_image else None


def local_image(data: bytes) -> np.ndarray | None:
    """The image as the server saw it (same decoder and orientation rules), for ``--render``."""
    from service.decode import DecodeConfig, decode_image

    try:
        return decode_image(data, DecodeConfig(max_bytes=2**31 - 1, max_pixels=2**30))
    except SnipserveError:
        return None


def run(args: argparse.Namespace) -> int:
    from snipserve_client import SnipserveClientError

    if args.tiled and args.url:
        print("snipserve detect: --tiled runs in-process; drop --url", file=sys.stderr)
        return 2
    try:
        refs = image_refs(args.images)
        writer = ResultWriter(args.output, args.format)
        detector = RemoteDetector(args) if args.url else LocalDetector(args)
    except (FileNotFoundError, ValueError, SnipserveError, SnipserveClientError) as exc:
        print(f"snipserve detect: {exc}", file=sys.stderr)
        return 2
    todo = [r for r in refs if r.frame not in writer.done]
    progress = Progress(len(refs), args.quiet, unit="image")
    progress.skip(len(refs) - len(todo))
    try:
        for ref in todo:
            t0 = now()
            body, image = detector(ref, want_image=args.render is not None)
            writer.write(ref, body)
            if args.render is not None and image is not None and "result" in body:
                render_to(args.render, ref, image, body["result"], detector.labels)
            progress.update(now() - t0)
    except SnipserveClientError as exc:
        print(f"snipserve detect: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
        writer.close()
        detector.close()
    skipped = len(refs) - len(todo)
    print(f"{len(todo)} images done, {skipped} already in the output, {writer.errors} errors", file=sys.stderr)
    return 1 if writer.errors else 0
