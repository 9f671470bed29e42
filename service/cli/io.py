"""Inputs, outputs and progress shared by ``snipserve detect`` and ``snipserve stream``.

- Inputs: image files and directories (recursively, sorted by relative path) or a video (OpenCV), each
  frame with a stable id (relative path, or ``frame_000123``) and an integer COCO ``image_id``
  (position in sorted order, or the video frame number).
- Output records, one JSON line per frame: ``{"frame", "image_id", "source", "result"}`` (the
  ``/v1/detect`` body) or ``{"frame", "image_id", "source", "error": {"status", "code", "message"}}``.
  ``--format ndjson`` appends these lines to the output as each frame finishes; ``--format coco`` appends
  them to a journal ``<output>.frames.ndjson`` and writes the COCO results array to ``<output>`` at the end.
- Resume: frames whose result is already in the output (or journal) are skipped on a rerun; errors are
  retried. A half-written last line (a crash mid-write) is cut off before appending.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import cv2
import numpy as np
from tqdm import tqdm

from service.pipeline import Result
from service.plan import ChipPlan
from service.postprocess import Detections
from service.render import draw
from snipserve_client.options import OPTION_NAMES, RequestOptions, option_field_type

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp", ".gif"})
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".ts"})
OutputFormat = Literal["ndjson", "coco"]

# ---- arguments -----------------------------------------------------------------------------------


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``/v1/detect`` options as flags, from their one declaration (:class:`RequestOptions`): ``--score-threshold
    0.5``, ``--classes car,truck``, ``--class-agnostic`` / ``--no-edge-filter`` for the booleans."""
    group = parser.add_argument_group("detection options (as for POST /v1/detect)")
    for name, field in RequestOptions.model_fields.items():
        flag, kind = "--" + name.replace("_", "-"), option_field_type(name)
        help_ = (field.description or "").rstrip(".")
        if kind is bool:
            group.add_argument(flag, dest=f"opt_{name}", action=argparse.BooleanOptionalAction, help=help_)
        else:
            group.add_argument(flag, dest=f"opt_{name}", metavar=name.upper(), type=kind, help=help_)


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", type=Path, help="output file (default: NDJSON on stdout, no resume)")
    parser.add_argument("--format", choices=["ndjson", "coco"], default="ndjson", help="output format")
    parser.add_argument("--render", type=Path, metavar="DIR", help="also write each image with its boxes drawn")
    parser.add_argument("--api-key", help="API key for --url servers that need one (or SNIPSERVE_API_KEY)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def option_strings(args: argparse.Namespace) -> dict[str, str]:
    """The option flags given on the command line, as the strings ``/v1/detect`` parses."""
    params: dict[str, str] = {}
    for name in OPTION_NAMES:
        value = getattr(args, f"opt_{name}", None)
        if value is not None:
            params[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return params


# ---- inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameRef:
    """One input frame: a stable id, its COCO image id, and where it comes from."""

    frame: str
    image_id: int
    source: str
    path: Path | None = None  # image file; None for video frames


def is_video(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES


def image_refs(inputs: Iterable[Path]) -> list[FrameRef]:
    """Image files given directly, and those under given directories (recursive, sorted by relative path).

    Frame ids are paths relative to their directory (files given directly: the path as given); if two
    inputs would share an id, every id is the full path instead.
    Raises ``FileNotFoundError`` for an input that does not exist."""
    found: list[tuple[str, Path]] = []
    for item in inputs:
        if item.is_dir():
            files = [p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
            found.extend((str(p.relative_to(item)), p) for p in sorted(files, key=lambda p: p.relative_to(item).parts))
        elif item.is_file():
            found.append((str(item), item))
        else:
            raise FileNotFoundError(f"no such file or directory: {item}")
    if len({fid for fid, _ in found}) < len(found):  # e.g. two directories holding the same names
        found = [(str(p), p) for _, p in found]
    return [FrameRef(frame=fid, image_id=i, source=str(p), path=p) for i, (fid, p) in enumerate(found)]


def video_frames(path: Path, skip: set[str], jpeg_quality: int = 95) -> Iterator[tuple[FrameRef, np.ndarray, bytes]]:
    """Frames of a video as ``(ref, uint8 [H, W, 3] RGB, JPEG bytes)``; frames whose id is in ``skip`` are
    grabbed without decoding. Raises ``ValueError`` if OpenCV cannot open the file."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"OpenCV cannot open the video {path}")
    try:
        index = 0
        while True:
            ref = FrameRef(frame=f"frame_{index:06d}", image_id=index, source=str(path))
            if ref.frame in skip:
                if not capture.grab():
                    return
            else:
                ok, bgr = capture.read()
                if not ok:
                    return
                ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                if not ok:
                    raise ValueError(f"JPEG encoding of {ref.frame} failed")
                yield ref, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), bytes(buf)
            index += 1
    finally:
        capture.release()


# ---- outputs -------------------------------------------------------------------------------------


def _read_records(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines of ``path``; a half-written last line is cut off the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    records = []
    for line in raw.decode().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "frame" in record:
            records.append(record)
    return records


class ResultWriter:
    """Appends one record per frame; knows which frames are done (resume); writes COCO at the end."""

    def __init__(self, output: Path | None, fmt: OutputFormat, stdout: IO[str] | None = None) -> None:
        if output is None and fmt == "coco":
            raise ValueError("--format coco needs --output FILE")
        self.output = output
        self.fmt = fmt
        self.journal = None if output is None else (output if fmt == "ndjson" else Path(f"{output}.frames.ndjson"))
        previous = _read_records(self.journal) if self.journal is not None else []
        self.results: dict[str, dict[str, Any]] = {r["frame"]: r for r in previous if "result" in r}
        self.errors = 0
        self._file: IO[str] = stdout or sys.stdout
        if self.journal is not None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.journal.open("a", encoding="utf-8")

    @property
    def done(self) -> set[str]:
        """Frame ids that already have a result (skipped on a rerun)."""
        return set(self.results)

    def write(self, ref: FrameRef, body: dict[str, Any]) -> None:
        """Record a frame: ``body`` is ``{"result": ...}`` or ``{"error": ...}``."""
        record = {"frame": ref.frame, "image_id": ref.image_id, "source": ref.source, **body}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if "result" in body:
            self.results[ref.frame] = record
        else:
            self.errors += 1

    def close(self) -> None:
        if self.journal is not None:
            self._file.close()
        if self.fmt == "coco" and self.output is not None:
            self.output.write_text(json.dumps(coco_from_records(self.results.values())))


def coco_from_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`` from result records."""
    out = []
    for record in sorted(records, key=lambda r: r["image_id"]):
        for det in record["result"]["detections"]:
            x1, y1, x2, y2 = det["box"]
            bbox = [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]
            out.append(
                {"image_id": record["image_id"], "category_id": det["class_id"], "bbox": bbox, "score": det["score"]}
            )
    return out


# ---- rendering -----------------------------------------------------------------------------------


def result_from_response(body: dict[str, Any]) -> Result:
    """A :class:`Result` holding the detections of a ``/v1/detect`` body (no plan), for :func:`draw`."""
    dets = body["detections"]
    detections = Detections(
        np.array([d["box"] for d in dets], np.float32).reshape(-1, 4),
        np.array([d["score"] for d in dets], np.float32),
        np.array([d["class_id"] for d in dets], np.int32),
        np.array([d.get("level", 0) for d in dets], np.int32),
    )
    size = (int(body["image"]["width"]), int(body["image"]["height"]))
    empty_plan = ChipPlan(size, 0, (), np.empty((0, 3), np.int32), 0.0)
    return Result(size, detections, empty_plan)


def render_to(directory: Path, ref: FrameRef, image: np.ndarray, body: dict[str, Any], labels: list[str]) -> Path:
    """Write ``image`` (``uint8 [H, W, 3]`` RGB) with the boxes of ``body`` drawn to ``directory``."""
    path = directory / (ref.frame.replace("/", "__").replace("\\", "__") + ".jpg")
    path.parent.mkdir(parents=True, exist_ok=True)
    drawn = draw(image, result_from_response(body), labels)
    if not cv2.imwrite(str(path), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
    return path


# ---- progress ------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar (frames/s) with the median latency of the last 50 frames, in ms."""

    def __init__(self, total: int | None, quiet: bool, unit: str = "frame") -> None:
        self.bar = tqdm(total=total, unit=unit, disable=quiet, dynamic_ncols=True, file=sys.stderr)
        self.latencies: deque[float] = deque(maxlen=50)
        self.done = 0  # frames processed in this run (the bar's own count stays 0 when it is disabled)

    def update(self, latency_s: float) -> None:
        self.done += 1
        self.latencies.append(latency_s)
        self.bar.set_postfix(latency_ms=f"{statistics.median(self.latencies) * 1000:.0f}", refresh=False)
        self.bar.update(1)

    def skip(self, n: int) -> None:
        if n:
            self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def now() -> float:
    return time.perf_counter()
