"""Offline mode for huge TIFF/GeoTIFF orthomosaics: read window by window, detect, merge, georeference.

Images above the service's pixel limit (``SNIPSERVE_MAX_IMAGE_PIXELS``) are refused over HTTP; this
module runs the same pipeline in-process over a grid of overlapping windows without ever holding the
whole image: uncompressed contiguous files are memory-mapped and sliced; tiled or striped compressed
files are read segment by segment (only the tiles/strips that intersect a window are read and decoded).

Windows overlap by ``overlap`` pixels; a box touching an inner window edge is dropped (its whole copy
lies in the neighbouring window when the object is smaller than the overlap), then all windows are
merged with the request's soft-NMS settings. With GeoTIFF tags (ModelTransformation, or ModelTiepoint
plus ModelPixelScale; GeoKeyDirectory for the EPSG code and PixelIsArea/PixelIsPoint) every detection
also carries its box in map coordinates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from pydantic import BaseModel, ConfigDict, Field

from service.decode import samples_to_rgb8
from service.errors import BadImage, InvalidOptions, UnsupportedMediaType
from service.options import DetectOptions
from service.pipeline import Pipeline
from service.plan import tile_positions
from service.postprocess import Detections, away_from_inner_edges, merge
from service.response import detection_dicts

TAG_MODEL_PIXEL_SCALE = 33550
TAG_MODEL_TIEPOINT = 33922
TAG_MODEL_TRANSFORMATION = 34264
TAG_GEO_KEY_DIRECTORY = 34735
KEY_RASTER_TYPE = 1025  # GTRasterTypeGeoKey: 1 = PixelIsArea, 2 = PixelIsPoint
KEY_GEOGRAPHIC_TYPE = 2048
KEY_PROJECTED_CS_TYPE = 3072
USER_DEFINED = 32767


class TileConfig(BaseModel):
    """Window grid of the offline mode."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    window: int = Field(default=4096, ge=64, le=32768, description="Window side in pixels.")
    overlap: int = Field(
        default=256, ge=0, description="Overlap of adjacent windows in pixels; at least the largest object size."
    )
    edge_margin: float = Field(default=2.0, ge=0, description="Boxes this close to an inner window edge are dropped.")


# ---- georeferencing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeoTransform:
    """Affine pixel -> map transform: ``X = a*x + b*y + c``, ``Y = d*x + e*y + f``.

    ``x, y`` are continuous pixel coordinates (0 = the left/top edge of the first pixel), as in boxes."""

    a: float
    b: float
    c: float
    d: float
    e: float
    f: float
    crs: str | None = None

    def apply(self, boxes: np.ndarray) -> np.ndarray:
        """Map-coordinate bounding boxes ``float64 [N, 4]`` (min X, min Y, max X, max Y) of pixel boxes
        ``[N, 4]`` xyxy (all four corners are mapped, so rotated transforms are handled)."""
        x = boxes[:, [0, 2, 2, 0]].astype(np.float64)  # [N, 4] corner x
        y = boxes[:, [1, 1, 3, 3]].astype(np.float64)  # [N, 4] corner y
        gx = self.a * x + self.b * y + self.c
        gy = self.d * x + self.e * y + self.f
        return np.stack([gx.min(1), gy.min(1), gx.max(1), gy.max(1)], axis=1)

    def as_dict(self) -> dict[str, Any]:
        return {"crs": self.crs, "transform": [self.a, self.b, self.c, self.d, self.e, self.f]}


def geo_keys(page: tifffile.TiffPage) -> dict[int, int]:
    """Short-valued GeoKeys of ``page`` (key id -> value); empty without a GeoKeyDirectory."""
    tag = page.tags.get(TAG_GEO_KEY_DIRECTORY)
    if tag is None:
        return {}
    values = [int(v) for v in tag.value]
    keys: dict[int, int] = {}
    for i in range(4, 4 + 4 * values[3], 4):
        key, location, _count, value = values[i : i + 4]
        if location == 0:  # value stored inline
            keys[key] = value
    return keys


def geo_transform(page: tifffile.TiffPage) -> GeoTransform | None:
    """The GeoTIFF affine transform of ``page``, or None when it carries no georeferencing tags."""
    tags = page.tags
    keys = geo_keys(page)
    code = keys.get(KEY_PROJECTED_CS_TYPE) or keys.get(KEY_GEOGRAPHIC_TYPE)
    crs = f"EPSG:{code}" if code and code != USER_DEFINED else None
    if TAG_MODEL_TRANSFORMATION in tags:
        m = [float(v) for v in tags[TAG_MODEL_TRANSFORMATION].value]
        a, b, c, d, e, f = m[0], m[1], m[3], m[4], m[5], m[7]
    elif TAG_MODEL_TIEPOINT in tags and TAG_MODEL_PIXEL_SCALE in tags:
        i, j, _k, x, y, _z = (float(v) for v in tags[TAG_MODEL_TIEPOINT].value[:6])
        sx, sy = (float(v) for v in tags[TAG_MODEL_PIXEL_SCALE].value[:2])
        a, b, c, d, e, f = sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy
    else:
        return None
    if keys.get(KEY_RASTER_TYPE) == 2:  # PixelIsPoint: the tiepoint names a pixel centre, not its corner
        c, f = c - 0.5 * (a + b), f - 0.5 * (d + e)
    return GeoTransform(a, b, c, d, e, f, crs)


# ---- windowed reading ----------------------------------------------------------------------------


def to_rgb8(pixels: np.ndarray) -> np.ndarray:
    """``[H, W]`` or ``[H, W, S]`` samples of one window -> ``uint8 [H, W, 3]`` RGB by the decode stage's rules
    (:func:`service.decode.samples_to_rgb8` with a fixed range: the same scaling in every window)."""
    return samples_to_rgb8(pixels, fixed_range=True)


class TiffWindowReader:
    """Reads rectangular windows of the first (full-resolution) page of a TIFF, never the whole image."""

    def __init__(self, path: Path) -> None:
        try:
            self.tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError, ValueError) as exc:
            raise BadImage(f"{path}: not a readable TIFF: {exc}") from exc
        self.path = path
        self.page = self.tif.pages.first
        if not isinstance(self.page, tifffile.TiffPage):
            raise BadImage(f"{path}: the first page is not a regular TIFF page")
        self.height, self.width = int(self.page.imagelength), int(self.page.imagewidth)
        self.separate = self.page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
        self._memmap = self._open_memmap()

    def close(self) -> None:
        self._memmap = None
        self.tif.close()

    def __enter__(self) -> TiffWindowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def memory_mapped(self) -> bool:
        return self._memmap is not None

    def _open_memmap(self) -> np.ndarray | None:
        if not self.page.is_memmappable or self.page.imagedepth > 1:
            return None
        array: np.ndarray = tifffile.memmap(self.path, page=0, mode="r")
        return array

    def read(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Pixels of ``[x0, x0 + w) x [y0, y0 + h)`` as ``uint8 [h, w, 3]`` RGB."""
        if self._memmap is not None:
            window = (
                self._memmap[:, y0 : y0 + h, x0 : x0 + w] if self.separate else self._memmap[y0 : y0 + h, x0 : x0 + w]
            )
            return to_rgb8(np.moveaxis(window, 0, -1) if self.separate else np.asarray(window))
        return to_rgb8(self._read_segments(x0, y0, w, h))

    def _segment_boxes(self) -> tuple[int, int]:
        """(segment width, segment height): the tile size, or (image width, rows per strip)."""
        if self.page.is_tiled:
            return int(self.page.tilewidth), int(self.page.tilelength)
        return self.width, int(self.page.rowsperstrip or self.height)

    def _segments_in(self, x0: int, y0: int, w: int, h: int) -> Iterator[int]:
        """Indices (into the offset/bytecount tags) of the segments intersecting the window."""
        sw, sh = self._segment_boxes()
        across, down = math.ceil(self.width / sw), math.ceil(self.height / sh)
        planes = int(self.page.samplesperpixel) if self.separate else 1
        for plane in range(planes):
            for row in range(y0 // sh, min(down, math.ceil((y0 + h) / sh))):
                for col in range(x0 // sw, min(across, math.ceil((x0 + w) / sw))):
                    yield plane * across * down + row * across + col

    def _read_segments(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        samples = int(self.page.samplesperpixel)
        out = np.zeros((h, w, samples), self.page.dtype)
        fh = self.tif.filehandle
        for index in self._segments_in(x0, y0, w, h):
            fh.seek(self.page.dataoffsets[index])
            data = fh.read(self.page.databytecounts[index])
            try:
                segment, (plane, _d, sy, sx, _s), _shape = self.page.decode(
                    data, index, jpegtables=self.page.jpegtables
                )
            except (KeyError, ValueError, NotImplementedError) as exc:
                raise UnsupportedMediaType(
                    f"{self.path}: cannot decode {tifffile.COMPRESSION(self.page.compression).name} segments ({exc}); "
                    "`pip install imagecodecs` adds JPEG/LZW/WebP TIFF codecs"
                ) from exc
            if segment is None:
                continue
            seg = segment[0]  # [sh, sw, contig samples]
            ys, xs = max(y0, sy), max(x0, sx)
            ye, xe = min(y0 + h, sy + seg.shape[0], self.height), min(x0 + w, sx + seg.shape[1], self.width)
            if ye <= ys or xe <= xs:
                continue
            channels = slice(plane, plane + 1) if self.separate else slice(None)
            out[ys - y0 : ye - y0, xs - x0 : xe - x0, channels] = seg[ys - sy : ye - sy, xs - sx : xe - sx]
        return out


# ---- windows and detection -----------------------------------------------------------------------


def plan_windows(width: int, height: int, config: TileConfig) -> list[tuple[int, int, int, int]]:
    """Windows ``(x0, y0, w, h)`` covering the image, adjacent ones overlapping by at least ``config.overlap``,
    placed like the planner's chips (:func:`service.plan.tile_positions`: evenly spread, the last one flush with
    the far edge, so every window is full unless the image is smaller)."""
    if config.overlap >= config.window:
        raise InvalidOptions(f"overlap {config.overlap} must be below the window size {config.window}")
    xs = tile_positions(width, config.window, config.overlap).tolist()
    ys = tile_positions(height, config.window, config.overlap).tolist()
    ww, wh = min(config.window, width), min(config.window, height)
    return [(x, y, ww, wh) for y in ys for x in xs]


def inner_edge_keep(
    boxes: np.ndarray, window: tuple[int, int, int, int], size: tuple[int, int], margin: float
) -> np.ndarray:
    """``bool [N]``: boxes (window pixels, ``[N, 4]`` xyxy) not touching an inner window edge (the chips' rule,
    :func:`service.postprocess.away_from_inner_edges`)."""
    x0, y0, w, h = window
    return away_from_inner_edges(boxes, np.array([x0, y0]), (w, h), np.array(size), margin)


def _shift(dets: Detections, dx: int, dy: int) -> Detections:
    boxes = dets.boxes + np.array([dx, dy, dx, dy], np.float32)
    return Detections(boxes, dets.scores, dets.classes, dets.levels)


def _concat(parts: list[Detections]) -> Detections:
    if not parts:
        return Detections.empty()
    return Detections(
        np.concatenate([p.boxes for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.classes for p in parts]),
        np.concatenate([p.levels for p in parts]),
    )


def detect_tiled(
    path: Path,
    pipeline: Pipeline,
    options: DetectOptions,
    config: TileConfig | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Detect in a TIFF/GeoTIFF of any size; returns the ``/v1/detect``-shaped body plus ``windows``,
    ``geo`` (``{"crs", "transform"}`` or None) and, when georeferenced, ``geo_box`` (min X, min Y, max X,
    max Y in map units) and ``geo_center`` per detection. ``on_window(done, total)`` reports progress."""
    config = config or TileConfig()
    t0 = time.perf_counter()
    timings = {"read": 0.0, "detect": 0.0}
    parts: list[Detections] = []
    chips = 0
    with TiffWindowReader(path) as reader:
        size = (reader.width, reader.height)
        geo = geo_transform(reader.page)
        windows = plan_windows(*size, config)
        for n, window in enumerate(windows, 1):
            t = time.perf_counter()
            pixels = reader.read(*window)
            timings["read"] += time.perf_counter() - t
            t = time.perf_counter()
            result = pipeline.detect(pixels, options)
            timings["detect"] += time.perf_counter() - t
            chips += result.num_chips
            dets = result.detections
            parts.append(
                _shift(dets.select(inner_edge_keep(dets.boxes, window, size, config.edge_margin)), *window[:2])
            )
            if on_window is not None:
                on_window(n, len(windows))
    t = time.perf_counter()
    everything = _concat(parts)
    merged = merge(everything, options.merge, pipeline.threshold(options), max(1, len(everything)), pipeline.soft_nms)
    timings["merge"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return tiled_response(merged, pipeline, TiledRun(size, geo, len(windows), chips, timings))


@dataclass(frozen=True)
class TiledRun:
    """What one offline run measured, for its response."""

    size: tuple[int, int]  # (width, height), original pixels
    geo: GeoTransform | None
    windows: int
    chips: int
    timings: dict[str, float]  # seconds


def tiled_response(dets: Detections, pipeline: Pipeline, run: TiledRun) -> dict[str, Any]:
    """The offline-mode JSON body: the ``/v1/detect`` detections (:func:`service.response.detection_dicts`) plus
    ``geo_box``/``geo_center`` when georeferenced, ``windows`` and ``geo``; timings in milliseconds."""
    detections = detection_dicts(dets, pipeline.card)
    if run.geo is not None:
        for det, gbox in zip(detections, run.geo.apply(dets.boxes).tolist(), strict=True):
            det["geo_box"] = gbox
            det["geo_center"] = [(gbox[0] + gbox[2]) / 2, (gbox[1] + gbox[3]) / 2]
    return {
        "image": {"width": run.size[0], "height": run.size[1]},
        "detections": detections,
        "model": pipeline.card.name,
        "chips": run.chips,
        "windows": run.windows,
        "geo": run.geo.as_dict() if run.geo is not None else None,
        "timings": {k: round(v * 1000, 3) for k, v in run.timings.items()},
    }
