"""Synthetic aerial dataset: large top-down images of textured ground with small-to-large objects.

Deterministic: image ``i`` of seed ``s`` is drawn from ``numpy.random.default_rng([s, i])`` only, so the same
seed gives the same bytes whatever the number of images or the order they are made in.

Scene, back to front: ground texture (two noise octaves) -> fields (striped polygons) -> water -> roads
(with lane marks) -> buildings, trees and blobs (distractors, some in object colours) -> objects with
shadows -> tree canopies over some objects (partial occlusion) -> lighting field -> blur -> JPEG.

Objects (three classes, drawn as rotated polygons with sub-pixel precision):

- ``vehicle``: chamfered rectangle (aspect 1.8-2.4), windscreen and rear window bands, lighter roof.
- ``boat``: pointed hull (aspect 2.6-3.6), inset deck, cabin.
- ``aircraft``: fuselage, swept wings, tailplane (a cross, aspect about 1).

Sizes are drawn per object on the *annotated box* (``sqrt(w*h)`` of the axis-aligned box of the rotated
shape, original pixels) from a COCO-like mix: 40% small (6-32 px), 35% medium (32-96 px), 25% large
(96 px to a quarter of the image's long side). Boxes are clipped at the image border (truncation).
Annotations are COCO JSON with ``bbox = [x, y, w, h]`` and ``area = w*h`` (box area, so COCO's
small/medium/large split and the planner's valid ranges measure the same thing).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

CLASSES: tuple[str, ...] = ("vehicle", "boat", "aircraft")

_SHIFT = 4  # cv2 fixed-point bits: vertices are drawn with 1/16 px precision
_ONE = 1 << _SHIFT


class SynthConfig(BaseModel):
    """Knobs of the generator; the defaults make the project's dataset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_long_side: int = Field(default=1280, ge=256, description="Smallest image long side, pixels.")
    max_long_side: int = Field(default=4000, ge=256, description="Largest image long side, pixels.")
    long_side_skew: float = Field(
        default=3.0, ge=1.0, description="Long side = min * (max/min) ** (u ** skew): >1 skews toward min."
    )
    min_aspect: float = Field(default=0.6, gt=0, le=1, description="Smallest short/long side ratio.")
    objects_per_mpx: tuple[float, float] = Field(
        default=(9.0, 16.0), description="Object density range, per megapixel."
    )
    min_objects: int = Field(default=8, ge=0, description="At least this many objects are attempted per image.")
    max_objects: int = Field(default=70, ge=1, description="At most this many objects are attempted per image.")
    size_mix: tuple[float, float, float] = Field(
        default=(0.40, 0.35, 0.25), description="Fractions of small (<32), medium (32-96) and large (>96) objects."
    )
    min_size: float = Field(default=6.0, gt=2, description="Smallest object, sqrt of box area, pixels.")
    max_size_fraction: float = Field(default=0.25, gt=0, le=0.5, description="Largest object, fraction of long side.")
    truncation_prob: float = Field(default=0.08, ge=0, le=1, description="Chance an object is placed on the border.")
    occlusion_prob: float = Field(
        default=0.15, ge=0, le=1, description="Chance a tree canopy covers part of an object."
    )
    blur_sigma: tuple[float, float] = Field(default=(0.0, 0.9), description="Gaussian blur sigma range, pixels.")
    jpeg_quality: tuple[int, int] = Field(default=(70, 95), description="JPEG quality range.")


@dataclass(frozen=True)
class SynthImage:
    """One generated image: JPEG bytes plus its annotations.

    ``boxes`` is ``float32 [N, 4]`` xyxy in pixels (clipped to the image); ``classes`` is ``int32 [N]``.
    """

    index: int
    width: int
    height: int
    jpeg: bytes
    boxes: np.ndarray
    classes: np.ndarray

    def decode(self) -> np.ndarray:
        """``uint8 [H, W, 3]`` RGB pixels."""
        bgr = cv2.imdecode(np.frombuffer(self.jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert bgr is not None, "the generator's own JPEG always decodes"
        return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


# --- colours (RGB) -----------------------------------------------------------------------------------------

_GROUND = np.array([[96, 118, 64], [128, 120, 84], [150, 138, 110], [112, 112, 104], [84, 100, 60]], np.float32)
_FIELD = np.array([[120, 150, 60], [170, 160, 90], [100, 120, 50], [140, 110, 70], [180, 170, 120]], np.float32)
_CAR = np.array(
    [[200, 30, 30], [30, 60, 170], [235, 235, 235], [25, 25, 28], [160, 165, 170], [230, 200, 40], [40, 120, 60]],
    np.float32,
)
_BOAT = np.array([[245, 245, 245], [240, 120, 30], [90, 170, 220], [230, 220, 190]], np.float32)
_PLANE = np.array([[235, 235, 240], [200, 205, 210], [180, 185, 195]], np.float32)


def _poly(points: np.ndarray, length: float, width: float, angle: float, cx: float, cy: float) -> np.ndarray:
    """Object-frame unit points ``[P, 2]`` (x along length) -> image points, float64 ``[P, 2]``."""
    c, s = math.cos(angle), math.sin(angle)
    x = points[:, 0] * length
    y = points[:, 1] * width
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


_VEHICLE_BODY = np.array(
    [[-0.5, -0.38], [-0.44, -0.5], [0.44, -0.5], [0.5, -0.38], [0.5, 0.38], [0.44, 0.5], [-0.44, 0.5], [-0.5, 0.38]]
)
_VEHICLE_PARTS = (_rect(0.12, -0.42, 0.3, 0.42), _rect(-0.38, -0.4, -0.26, 0.4))  # windscreen, rear window
_VEHICLE_ROOF = _rect(-0.26, -0.36, 0.12, 0.36)
_BOAT_HULL = np.array([[-0.5, -0.5], [0.15, -0.5], [0.5, 0.0], [0.15, 0.5], [-0.5, 0.5]])
_BOAT_DECK = np.array([[-0.44, -0.34], [0.1, -0.34], [0.36, 0.0], [0.1, 0.34], [-0.44, 0.34]])
_BOAT_CABIN = _rect(-0.3, -0.22, -0.02, 0.22)
# Aircraft in a unit square: fuselage along x, swept wings and tailplane along y.
_PLANE_FUSELAGE = np.array([[-0.5, -0.05], [0.4, -0.05], [0.5, 0.0], [0.4, 0.05], [-0.5, 0.05]])
_PLANE_WINGS = np.array(
    [[0.12, -0.04], [-0.12, -0.5], [-0.2, -0.5], [-0.06, 0.0], [-0.2, 0.5], [-0.12, 0.5], [0.12, 0.04]]
)
_PLANE_TAIL = np.array(
    [[-0.36, -0.03], [-0.46, -0.18], [-0.5, -0.18], [-0.46, 0.0], [-0.5, 0.18], [-0.46, 0.18], [-0.36, 0.03]]
)

# (outline used for the box, aspect range length/width)
_OUTLINES = (_VEHICLE_BODY, _BOAT_HULL, np.concatenate([_PLANE_FUSELAGE, _PLANE_WINGS]))
_ASPECTS = ((1.8, 2.4), (2.6, 3.6), (0.95, 1.15))


class _Canvas:
    """A float32 RGB image with sub-pixel anti-aliased polygon drawing."""

    def __init__(self, img: np.ndarray) -> None:
        self.img = img

    def fill(self, pts: np.ndarray, color: np.ndarray | tuple[float, ...]) -> None:
        p = np.round(pts * _ONE).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(self.img, [p], tuple(float(c) for c in color), cv2.LINE_AA, _SHIFT)


def _noise(rng: np.random.Generator, w: int, h: int, cells: int, amp: float) -> np.ndarray:
    """Smooth noise ``float32 [h, w]``: ``cells`` random values along the long side, bicubic upsampled."""
    gw = max(2, int(cells * w / max(w, h)))
    gh = max(2, int(cells * h / max(w, h)))
    small = rng.normal(0.0, amp, (gh, gw)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _image_size(cfg: SynthConfig, rng: np.random.Generator) -> tuple[int, int]:
    ratio = cfg.max_long_side / cfg.min_long_side
    long_ = int(round(cfg.min_long_side * ratio ** (rng.random() ** cfg.long_side_skew)))
    short = int(round(long_ * rng.uniform(cfg.min_aspect, 1.0)))
    return (long_, short) if rng.random() < 0.7 else (short, long_)


def _ground(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = _GROUND[rng.integers(len(_GROUND))]
    img = np.empty((h, w, 3), np.float32)
    img[:] = base
    low = _noise(rng, w, h, 10, 14.0)
    # Fine texture at half resolution keeps generation fast; a quarter-pixel grain is not needed.
    fine = cv2.resize(rng.normal(0.0, 9.0, (h // 2 + 1, w // 2 + 1)).astype(np.float32), (w, h))
    img += (low + fine)[:, :, None]
    return img


def _fields(rng: np.random.Generator, canvas: _Canvas, w: int, h: int) -> None:
    for _ in range(int(rng.integers(2, 7))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.08, 0.3) * max(w, h)
        angles = np.sort(rng.uniform(0, 2 * math.pi, 4)) + np.array([0, 0.3, 0.6, 0.9])
        pts = np.stack([cx + r * np.cos(angles), cy + r * rng.uniform(0.6, 1.0) * np.sin(angles)], 1)
        color = _FIELD[rng.integers(len(_FIELD))] + rng.normal(0, 8, 3)
        canvas.fill(pts, color)
        # Ploughing stripes inside the field: lines clipped to the polygon via a ROI mask.
        x0, y0 = np.clip(pts.min(0).astype(int), 0, [w - 1, h - 1])
        x1, y1 = np.clip(pts.max(0).astype(int) + 1, 1, [w, h])
        if x1 - x0 < 4 or y1 - y0 < 4:
            continue
        mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(mask, [np.round(pts - [x0, y0]).astype(np.int32)], 1)
        stripes = np.zeros_like(mask)
        spacing, theta = rng.uniform(5, 14), rng.uniform(0, math.pi)
        d = np.array([math.cos(theta), math.sin(theta)])
        n = np.array([-d[1], d[0]])
        diag = math.hypot(x1 - x0, y1 - y0)
        centre = np.array([(x1 - x0) / 2, (y1 - y0) / 2])
        for k in np.arange(-diag / 2, diag / 2, spacing):
            a = centre + n * k - d * diag
            b = centre + n * k + d * diag
            cv2.line(stripes, tuple(int(v) for v in a), tuple(int(v) for v in b), 1, max(1, int(spacing / 3)))
        sel = (mask & stripes).astype(bool)
        roi = canvas.img[y0:y1, x0:x1]
        roi[sel] *= rng.uniform(0.82, 0.92)


def _water(rng: np.random.Generator, canvas: _Canvas, w: int, h: int) -> None:
    if rng.random() < 0.5:
        return
    pts = np.cumsum(rng.normal(0, 0.08 * max(w, h), (8, 2)), axis=0) + [rng.uniform(0, w), rng.uniform(0, h)]
    colour = np.array([40, 80, 110], np.float32) + rng.normal(0, 6, 3)
    width = int(rng.uniform(0.03, 0.08) * max(w, h))
    cv2.polylines(canvas.img, [pts.astype(np.int32)], False, tuple(float(c) for c in colour), width, cv2.LINE_AA)


def _roads(rng: np.random.Generator, canvas: _Canvas, w: int, h: int) -> None:
    for _ in range(int(rng.integers(1, 5))):
        start = np.array([rng.uniform(0, w), rng.uniform(0, h)])
        heading = rng.uniform(0, 2 * math.pi)
        pts = [start]
        for _ in range(6):
            heading += rng.normal(0, 0.25)
            pts.append(pts[-1] + 0.25 * max(w, h) * np.array([math.cos(heading), math.sin(heading)]))
        p = np.array(pts).astype(np.int32)
        width = int(rng.uniform(10, 36))
        grey = rng.uniform(70, 110)
        cv2.polylines(canvas.img, [p], False, (grey, grey, grey * 1.02), width, cv2.LINE_AA)
        if width > 16:  # dashed lane marks: white, like vehicles and boats, so they are honest distractors
            for a, b in zip(p[:-1], p[1:], strict=True):
                for t in np.arange(0, 1, 0.04)[::2]:
                    q0 = a + (b - a) * t
                    q1 = a + (b - a) * (t + 0.02)
                    cv2.line(canvas.img, tuple(int(v) for v in q0), tuple(int(v) for v in q1), (215, 215, 210), 2)


def _clutter(rng: np.random.Generator, canvas: _Canvas, w: int, h: int) -> None:
    area_mpx = w * h / 1e6
    for _ in range(int(rng.integers(3, 10) * area_mpx)):  # buildings: grey/brown rectangles with a ridge
        s = rng.uniform(20, 160)
        ar = rng.uniform(1.0, 2.5)
        cx, cy, ang = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, math.pi)
        roof = np.array([rng.uniform(90, 170)] * 3) + rng.normal(0, 12, 3)
        canvas.fill(_poly(_rect(-0.5, -0.5, 0.5, 0.5), s * ar, s, ang, cx, cy), roof)
        canvas.fill(_poly(_rect(-0.5, -0.5, 0.5, 0.0), s * ar, s, ang, cx, cy), roof * 0.8)
    for _ in range(int(rng.integers(40, 120) * area_mpx)):  # blobs in object colours: hard negatives
        r = rng.uniform(1.5, 6)
        palette = (_CAR, _BOAT, _GROUND)[rng.integers(3)]
        colour = palette[rng.integers(len(palette))] + rng.normal(0, 10, 3)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        axes = (int(r * _ONE), int(r * rng.uniform(0.4, 1.0) * _ONE))
        cv2.ellipse(
            canvas.img,
            (int(cx * _ONE), int(cy * _ONE)),
            axes,
            rng.uniform(0, 180),
            0,
            360,
            tuple(float(c) for c in colour),
            -1,
            cv2.LINE_AA,
            _SHIFT,
        )
    for _ in range(int(rng.integers(30, 150) * area_mpx)):  # trees
        _tree(rng, canvas, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(3, 28))


def _tree(rng: np.random.Generator, canvas: _Canvas, cx: float, cy: float, r: float) -> None:
    green = np.array([40, 75, 35], np.float32) + rng.normal(0, 8, 3)
    cv2.circle(
        canvas.img,
        (int(cx * _ONE), int(cy * _ONE)),
        int(r * _ONE),
        tuple(float(c) for c in green * 0.7),
        -1,
        cv2.LINE_AA,
        _SHIFT,
    )
    cv2.circle(
        canvas.img,
        (int((cx - r * 0.2) * _ONE), int((cy - r * 0.2) * _ONE)),
        int(r * 0.7 * _ONE),
        tuple(float(c) for c in green),
        -1,
        cv2.LINE_AA,
        _SHIFT,
    )


def _draw_object(
    rng: np.random.Generator,
    canvas: _Canvas,
    shadow: np.ndarray,
    cls: int,
    length: float,
    width: float,
    ang: float,
    cx: float,
    cy: float,
    sun: np.ndarray,
) -> None:
    def put(pts: np.ndarray, colour: np.ndarray) -> None:
        canvas.fill(_poly(pts, length, width, ang, cx, cy), colour)

    off = sun * max(length, width) * 0.08
    outline = _poly(_OUTLINES[cls], length, width, ang, cx + off[0], cy + off[1])
    cv2.fillPoly(shadow, [np.round(outline * _ONE).astype(np.int32)], 1.0, cv2.LINE_AA, _SHIFT)
    if cls == 0:
        body = _CAR[rng.integers(len(_CAR))] + rng.normal(0, 6, 3)
        put(_VEHICLE_BODY, body)
        glass = np.array([30, 35, 45], np.float32)
        for part in _VEHICLE_PARTS:
            put(part, glass)
        put(_VEHICLE_ROOF, np.clip(body * 1.12 + 10, 0, 255))
    elif cls == 1:
        hull = _BOAT[rng.integers(len(_BOAT))] + rng.normal(0, 6, 3)
        put(_BOAT_HULL, hull)
        put(_BOAT_DECK, np.array([150, 110, 70], np.float32) + rng.normal(0, 8, 3))
        put(_BOAT_CABIN, np.clip(hull * 0.95 + 8, 0, 255))
    else:
        skin = _PLANE[rng.integers(len(_PLANE))] + rng.normal(0, 4, 3)
        put(_PLANE_WINGS, skin * 0.92)
        put(_PLANE_TAIL, skin * 0.92)
        put(_PLANE_FUSELAGE, skin)


def _sample_size(cfg: SynthConfig, rng: np.random.Generator, long_side: int) -> float:
    """Target sqrt(box area) in pixels from the small/medium/large mix (log-uniform within a bin)."""
    hi = max(97.0, cfg.max_size_fraction * long_side)
    bins = ((cfg.min_size, 32.0), (32.0, 96.0), (96.0, hi))
    lo, up = bins[int(rng.choice(3, p=np.asarray(cfg.size_mix) / sum(cfg.size_mix)))]
    return float(math.exp(rng.uniform(math.log(lo), math.log(up))))


def _place_objects(
    cfg: SynthConfig, rng: np.random.Generator, w: int, h: int
) -> list[tuple[int, float, float, float, float, float, np.ndarray]]:
    """Object layout: (class, length, width, angle, cx, cy, clipped box) with limited mutual overlap."""
    density = rng.uniform(*cfg.objects_per_mpx)
    n = int(np.clip(round(density * w * h / 1e6), cfg.min_objects, cfg.max_objects))
    placed: list[tuple[int, float, float, float, float, float, np.ndarray]] = []
    boxes: list[np.ndarray] = []
    for _ in range(n):
        cls = int(rng.integers(len(CLASSES)))
        size = _sample_size(cfg, rng, max(w, h))
        aspect = rng.uniform(*_ASPECTS[cls])
        ang = rng.uniform(0, 2 * math.pi)
        unit = _poly(_OUTLINES[cls], aspect, 1.0, ang, 0.0, 0.0)
        ext = unit.max(0) - unit.min(0)
        k = size / math.sqrt(ext[0] * ext[1])  # scale so the axis-aligned box has sqrt-area == size
        length, width = aspect * k, k
        half = ext * k / 2
        if half[0] * 2 > w * 0.9 or half[1] * 2 > h * 0.9:
            continue
        for _attempt in range(15):
            if rng.random() < cfg.truncation_prob:
                side = rng.integers(4)
                cx = rng.uniform(0, w) if side < 2 else (0.0 if side == 2 else float(w))
                cy = rng.uniform(0, h) if side >= 2 else (0.0 if side == 0 else float(h))
                cx += rng.uniform(-0.3, 0.3) * half[0] * 2
                cy += rng.uniform(-0.3, 0.3) * half[1] * 2
            else:
                cx, cy = rng.uniform(half[0], w - half[0]), rng.uniform(half[1], h - half[1])
            pts = _poly(_OUTLINES[cls], length, width, ang, cx, cy)
            full = np.array([*pts.min(0), *pts.max(0)])
            box = np.clip(full, 0, [w, h, w, h])
            bw, bh = box[2] - box[0], box[3] - box[1]
            if bw < 3 or bh < 3 or bw * bh < 0.4 * (full[2] - full[0]) * (full[3] - full[1]):
                continue
            if boxes and _max_cover(box, np.array(boxes)) > 0.2:
                continue
            placed.append((cls, length, width, ang, cx, cy, box))
            boxes.append(box)
            break
    return placed


def _max_cover(box: np.ndarray, others: np.ndarray) -> float:
    """Largest intersection / min(area) between ``box`` and ``others`` ``[M, 4]``."""
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    a = (box[2] - box[0]) * (box[3] - box[1])
    b = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return float((ix * iy / np.minimum(a, b)).max())


def generate_image(cfg: SynthConfig, seed: int, index: int) -> SynthImage:
    """Image ``index`` of the dataset with seed ``seed`` (independent of every other image)."""
    rng = np.random.default_rng([seed, index])
    w, h = _image_size(cfg, rng)
    canvas = _Canvas(_ground(rng, w, h))
    _fields(rng, canvas, w, h)
    _water(rng, canvas, w, h)
    _roads(rng, canvas, w, h)
    _clutter(rng, canvas, w, h)
    objects = _place_objects(cfg, rng, w, h)
    sun_angle = rng.uniform(0, 2 * math.pi)
    sun = np.array([math.cos(sun_angle), math.sin(sun_angle)])
    shadow = np.zeros((h, w), np.float32)
    # Large objects first, so small ones parked beside or on them stay visible.
    order = sorted(range(len(objects)), key=lambda i: -objects[i][1] * objects[i][2])
    layer = _Canvas(canvas.img)
    for i in order:
        cls, length, width, ang, cx, cy, _box = objects[i]
        _draw_object(rng, layer, shadow, cls, length, width, ang, cx, cy, sun)
    # Shadows darken the ground beside objects. Applied after drawing, in one pass, so objects under a
    # shadow get a faint shade too (as under a neighbour's shadow in a real photo).
    canvas.img *= (1.0 - 0.35 * np.clip(shadow, 0, 1))[:, :, None]
    for _cls, length, width, _ang, cx, cy, _box in objects:
        if rng.random() < cfg.occlusion_prob:  # a canopy covering part of the object
            r = 0.35 * math.sqrt(length * width) * rng.uniform(0.6, 1.0)
            a = rng.uniform(0, 2 * math.pi)
            d = 0.45 * max(length, width)
            _tree(rng, canvas, cx + d * math.cos(a), cy + d * math.sin(a), max(r, 1.5))
    light = 1.0 + _noise(rng, w, h, 4, 0.08)
    gain, bias = rng.uniform(0.8, 1.2), rng.uniform(-15, 15)
    img = canvas.img * (light * gain)[:, :, None] + bias
    sigma = rng.uniform(*cfg.blur_sigma)
    if sigma > 0.3:
        img = np.asarray(cv2.GaussianBlur(img, (0, 0), sigma), np.float64)
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - cv2 only fails on invalid input
        raise RuntimeError("JPEG encoding failed")
    boxes = np.array([o[6] for o in objects], np.float32).reshape(-1, 4)
    classes = np.array([o[0] for o in objects], np.int32)
    return SynthImage(index=index, width=w, height=h, jpeg=buf.tobytes(), boxes=boxes, classes=classes)


def generate(cfg: SynthConfig, seed: int, count: int, start: int = 0) -> Iterator[SynthImage]:
    """Images ``start .. start+count-1`` of seed ``seed``."""
    for i in range(start, start + count):
        yield generate_image(cfg, seed, i)


def coco_dict(images: list[SynthImage], seed: int, cfg: SynthConfig) -> dict[str, Any]:
    """COCO detection JSON for ``images`` (category ids are class index + 1)."""
    coco_images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for im in images:
        coco_images.append(
            {"id": im.index, "file_name": f"images/{im.index:06d}.jpg", "width": im.width, "height": im.height}
        )
        for box, cls in zip(im.boxes.tolist(), im.classes.tolist(), strict=True):
            x, y = round(box[0], 2), round(box[1], 2)
            bw, bh = round(box[2] - box[0], 2), round(box[3] - box[1], 2)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": im.index,
                    "category_id": cls + 1,
                    "bbox": [x, y, bw, bh],
                    "area": round(bw * bh, 2),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "snipserve synthetic aerial dataset", "seed": seed, "config": cfg.model_dump()},
        "images": coco_images,
        "annotations": anns,
        "categories": [{"id": i + 1, "name": n, "supercategory": "object"} for i, n in enumerate(CLASSES)],
    }


def write_dataset(
    out: Path, count: int, seed: int, cfg: SynthConfig | None = None, progress: bool = False
) -> dict[str, Any]:
    """Write ``out/images/*.jpg`` and ``out/annotations.json``; returns the COCO dict."""
    cfg = cfg or SynthConfig()
    (out / "images").mkdir(parents=True, exist_ok=True)
    made: list[SynthImage] = []
    it: Iterator[SynthImage] = generate(cfg, seed, count)
    if progress:
        from tqdm import tqdm

        it = iter(tqdm(it, total=count, desc="synth", unit="img"))
    for im in it:
        (out / "images" / f"{im.index:06d}.jpg").write_bytes(im.jpeg)
        made.append(im)
    coco = coco_dict(made, seed, cfg)
    (out / "annotations.json").write_text(json.dumps(coco, indent=None, separators=(",", ":")))
    return coco


def load_coco(data_dir: Path) -> tuple[dict[str, Any], list[tuple[Path, np.ndarray, np.ndarray]]]:
    """Read a dataset written by :func:`write_dataset` (or any COCO folder with ``annotations.json``).

    Returns the COCO dict and, per image, ``(path, boxes float32 [N,4] xyxy px, classes int32 [N])``.
    Ignore regions (COCO ``iscrowd: 1``, as ``snipserve data import`` writes them) get class ``-1``: training
    gives them no loss and never counts a detection on them as a false positive.
    """
    coco = json.loads((data_dir / "annotations.json").read_text())
    cat_index = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    per: dict[int, list[tuple[list[float], int]]] = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, bw, bh = a["bbox"]
        cls = -1 if a.get("iscrowd", 0) else cat_index[a["category_id"]]
        per[a["image_id"]].append(([x, y, x + bw, y + bh], cls))
    items = []
    for im in coco["images"]:
        anns = per[im["id"]]
        boxes = np.array([b for b, _ in anns], np.float32).reshape(-1, 4)
        classes = np.array([c for _, c in anns], np.int32)
        items.append((data_dir / im["file_name"], boxes, classes))
    return coco, items
