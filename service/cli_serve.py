"""``snipserve serve``: run the HTTP service with uvicorn (one worker: one batcher owns the engine)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="bind address (default: SNIPSERVE_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: SNIPSERVE_PORT or 8000)")
    parser.add_argument("--model", type=Path, help="ONNX model (default: SNIPSERVE_MODEL_PATH or the shipped model)")
    parser.add_argument("--engine", choices=["onnxruntime", "tensorrt", "fake"], help="engine backend")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api import create_app
    from service.settings import Settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port, "model_path": args.model, "engine": args.engine}.items() if v is not None}
    settings = Settings(**overrides)
    from service import observability

    observability.configure_logging(level=settings.log_level.upper(), json_logs=settings.log_json)
    if int(os.environ.get("WEB_CONCURRENCY", "1")) != 1:
        raise SystemExit("snipserve runs one worker per accelerator: the batcher must own the engine (WEB_CONCURRENCY=1)")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=30)
    return 0
