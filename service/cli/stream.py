"""``snipserve stream DIR|VIDEO --url URL [--url URL ...] [--connections N]``: stream frames to ``WS /v1/stream``.

With policy ``block`` (the default) frames are spread over ``--connections`` connections to each ``--url``
(replicas, or one Service address), each with its own window; a replica that drains (SIGTERM, scale-down) or
disconnects has its unanswered frames sent again elsewhere, and every frame is written once
(:mod:`snipserve_client.spread`). Policy ``drop_oldest`` uses one connection to one URL.

A directory streams its images in sorted order (files sent as they are); a video streams its frames
(OpenCV, sent as JPEG quality 95). Replies come back in frame order; output, resume and rendering as
in :mod:`service.cli.io`. Dropped frames (``--policy drop_oldest``) are recorded as errors with code
``dropped``, so a rerun retries them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import deque
from collections.abc import Iterator
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
    is_video,
    now,
    option_strings,
    render_to,
    video_frames,
)
from snipserve_client import AsyncClient, FrameResult, SnipserveClientError
from snipserve_client.spread import SpreadConfig, stream_spread

Pending = tuple[FrameRef, np.ndarray | None, float]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path, metavar="DIR|VIDEO", help="directory of images, or a video file")
    parser.add_argument(
        "--url",
        required=True,
        action="append",
        help="server base URL, e.g. http://127.0.0.1:8000; repeat it to spread frames over several replicas",
    )
    parser.add_argument("--connections", type=int, default=1, help="connections per --url (default 1)")
    parser.add_argument("--window", type=int, default=8, help="frames in flight per connection (default 8)")
    parser.add_argument(
        "--policy", choices=["block", "drop_oldest"], default="block", help="when the window is full (default block)"
    )
    add_output_arguments(parser)
    add_option_arguments(parser)


def frame_source(
    source: Path, done: set[str], want_image: bool
) -> tuple[int, Iterator[tuple[FrameRef, np.ndarray | None, bytes]]]:
    """(frames to send, or -1 if unknown; iterator of ``(ref, RGB image for rendering or None, bytes)``)."""
    if is_video(source):
        return -1, iter(video_frames(source, done))
    refs = [r for r in image_refs([source]) if r.frame not in done]

    def images() -> Iterator[tuple[FrameRef, np.ndarray | None, bytes]]:
        from service.cli.detect import local_image

        for ref in refs:
            assert ref.path is not None
            data = ref.path.read_bytes()
            yield ref, local_image(data) if want_image else None, data

    return len(refs), images()


def reply_record(reply: FrameResult) -> dict[str, Any]:
    if reply.type == "result" and reply.result is not None:
        return {"result": reply.result.model_dump(mode="json")}
    if reply.type == "dropped":
        message = f"dropped by the server (policy drop_oldest), {reply.dropped_total} so far"
        return {"error": {"status": 503, "code": "dropped", "message": message}}
    assert reply.error is not None
    return {"error": reply.error.model_dump(mode="json")}


async def stream_all(args: argparse.Namespace, writer: ResultWriter, progress: Progress) -> None:
    _total, source = frame_source(args.source, writer.done, args.render is not None)
    pending: deque[Pending] = deque()

    def frames() -> Iterator[tuple[bytes, dict[str, Any]]]:
        for ref, image, data in source:
            pending.append((ref, image, now()))
            yield data, {"frame": ref.frame, "image_id": ref.image_id}

    api_key = args.api_key or os.environ.get("SNIPSERVE_API_KEY")
    labels = await model_labels(args.url, api_key)
    async with AsyncClient(args.url[0], api_key=api_key) as client:
        if args.policy == "drop_oldest":
            replies = client.stream(frames(), window=args.window, policy=args.policy, **option_strings(args))
        else:
            config = SpreadConfig(window=args.window, connections=args.connections)
            replies = stream_spread(args.url, frames(), config=config, api_key=api_key, options=option_strings(args))
        async for reply in replies:
            ref, image, sent = pending.popleft()  # replies come in frame order
            record = reply_record(reply)
            writer.write(ref, record)
            if args.render is not None and image is not None and "result" in record:
                render_to(args.render, ref, image, record["result"], labels)
            progress.update(now() - sent)


async def model_labels(urls: list[str], api_key: str | None) -> list[str]:
    """Class names of the served model, from the first URL that answers ``/v1/models``."""
    error: SnipserveClientError | None = None
    for url in urls:
        async with AsyncClient(url, api_key=api_key) as client:
            try:
                return list((await client.models())["models"][0]["card"]["classes"])
            except SnipserveClientError as exc:
                error = exc
    assert error is not None
    raise error


def run(args: argparse.Namespace) -> int:
    try:
        if args.policy == "drop_oldest" and (len(args.url) > 1 or args.connections > 1):
            raise ValueError("--policy drop_oldest streams over one connection: give one --url and --connections 1")
        if args.connections < 1 or args.window < 1:
            raise ValueError("--connections and --window must be at least 1")
        writer = ResultWriter(args.output, args.format)
        if not args.source.exists():
            raise FileNotFoundError(f"no such file or directory: {args.source}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"snipserve stream: {exc}", file=sys.stderr)
        return 2
    skipped = len(writer.done)
    progress = Progress(None, args.quiet)
    try:
        asyncio.run(stream_all(args, writer, progress))
    except (SnipserveClientError, ValueError, FileNotFoundError) as exc:
        print(f"snipserve stream: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
        writer.close()
    print(f"{progress.done} frames done, {skipped} already in the output, {writer.errors} errors", file=sys.stderr)
    return 1 if writer.errors else 0
