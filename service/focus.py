"""FocusChips (AutoFocus): from a level's focus map to the chips of the next finer level. Pure data, like plan.py.

A request in the ``focus`` preset runs its levels coarse to fine. The coarsest level runs whole (its ordinary
tiling); every chip that ran returns a focus map (the model's focus head, or -- for models without one -- a map
painted from the chip's low-confidence small detections, :func:`detections_focus_map`). For the next finer level:

1. **assemble** the chips' maps into one map of the level (:func:`level_focus_map`; max where chips overlap;
   cells no chip covered are 0),
2. **threshold** it, **dilate** by ``dilate`` cells, take **connected regions** (OpenCV
   ``connectedComponentsWithStats``, 8-connected) as boxes,
3. map them to the finer level's pixels, grow each to the **minimum size**, **merge** overlapping ones,
4. **place chips** (``placement``):

   - ``free`` (default, as AutoFocus): regions that fit in one chip together (with the padding below) are
     packed into one; each region, padded on every side by ``pad`` px, gets one chip centred on it when it
     fits, else its padded span tiled with the level's own overlap (``plan.tile_positions``), chips kept
     inside the level image. An object inside a region that fits the level's valid range lies whole in a
     chosen chip, at least ``min(pad, MIN_CONTEXT)`` px from the chip's inner edges (the inner-edge filter
     keeps it), as in the pyramid's tiling.
   - ``tiling``: **snap** to the finer level's *ordinary* tile positions -- per region and axis, the run from
     the last tile starting at or before the region to the first ending at or after it. FocusChips are then a
     subset of the pyramid's chips; a small region on a tile boundary costs two to four of them.

   Both keep the inner-edge filter, valid ranges and per-chip outputs exactly as for the pyramid's chips, and
   threshold 0 (one region: the whole level) plans exactly the pyramid's tiling.

The finer level's focus map then comes from its FocusChips only, and so on down to the finest level. Threshold
0 selects every chip (focus = pyramid); a threshold above 1 runs the coarsest level alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.adapters import ChipDetections
from service.plan import ChipPlan, Level, tile_positions

FocusSource = Literal["head", "detections", "both"]
Placement = Literal["free", "tiling"]


class FocusConfig(BaseModel):
    """How FocusChips are made from a focus map."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(default=0.05, ge=0, description="Focus cells at or above this value are in focus.")
    dilate: int = Field(default=0, ge=0, le=16, description="Dilation of the thresholded map, in cells.")
    min_size: int = Field(
        default=0, ge=0, description="Regions are grown to at least this side in the finer level's px (0: one chip)."
    )
    stride: int = Field(default=16, ge=1, description="Focus map stride, chip px.")
    source: FocusSource = Field(
        default="head", description="The model's focus head, the detection fallback, or both (their max)."
    )
    placement: Placement = Field(
        default="free", description="Chips placed on the regions ('free'), or snapped to the level's tiling."
    )
    pad: int = Field(
        default=8,
        ge=0,
        le=64,
        description="Free placement: context kept around each region, finer-level px "
        "(at least the plan's edge margin, so the inner-edge filter keeps objects at a region's border).",
    )


@dataclass(frozen=True)
class FocusStep:
    """The outcome of one coarse -> fine step: the finer level's chips and how much of it is in focus."""

    chips: np.ndarray  # int32 [J, 3]: (finer level index, x0, y0)
    regions: np.ndarray  # int64 [R, 4]: merged focus regions, xyxy in the finer level's px (before packing)
    area: float  # fraction of the finer level's image the regions cover (0..1)


def level_focus_map(maps: np.ndarray, corners: np.ndarray, level: Level, chip: int, stride: int) -> np.ndarray:
    """One focus map ``float32 [ceil(H / stride), ceil(W / stride)]`` for ``level`` from its chips' maps.

    ``maps`` ``float32 [K, h, w]`` (``h = w = chip / stride``), ``corners`` ``int [K, 2]`` chip top-left (level
    px). A chip cell lands in the level cell holding its centre; overlapping chips take the max; cells over a
    chip's padding (beyond the level image) are dropped; cells no chip covered stay 0.
    """
    gh, gw = math.ceil(level.height / stride), math.ceil(level.width / stride)
    out = np.zeros((gh, gw), np.float32)
    if maps.shape[0] == 0:
        return out
    k, h, w = maps.shape
    centres_x = corners[:, 0:1] + (np.arange(w)[None, :] + 0.5) * (chip / w)  # [K, w] level px
    centres_y = corners[:, 1:2] + (np.arange(h)[None, :] + 0.5) * (chip / h)  # [K, h]
    gx = np.floor(centres_x / stride).astype(np.int64)
    gy = np.floor(centres_y / stride).astype(np.int64)
    inside = (centres_x[:, None, :] < level.width) & (centres_y[:, :, None] < level.height)  # [K, h, w]
    xs = np.broadcast_to(gx[:, None, :], (k, h, w))[inside]
    ys = np.broadcast_to(gy[:, :, None], (k, h, w))[inside]
    np.maximum.at(out, (np.minimum(ys, gh - 1), np.minimum(xs, gw - 1)), maps[inside].astype(np.float32))
    return out


def detections_focus_map(boxes: np.ndarray, scores: np.ndarray, level: Level, finer: Level, stride: int) -> np.ndarray:
    """The fallback focus map of ``level`` for models without a focus head.

    ``boxes`` ``float32 [N, 4]`` xyxy in ``level`` px (all of the level's chips, any score), ``scores`` ``[N]``.
    A detection small enough for a finer level (``sqrt(w*h)`` at most ``finer.hi`` original px) paints its score
    into the cells it overlaps (max): a coarse detector fires weakly on objects it sees too small to be sure of,
    and that is where the finer level has something to find.
    """
    gh, gw = math.ceil(level.height / stride), math.ceil(level.width / stride)
    out = np.zeros((gh, gw), np.float32)
    if boxes.shape[0] == 0:
        return out
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (level.scale * level.scale)
    small = area <= finer.hi * finer.hi
    for (x1, y1, x2, y2), s in zip(boxes[small].tolist(), scores[small].tolist(), strict=True):
        ca, cb = max(int(x1 // stride), 0), min(int(math.ceil(x2 / stride)), gw)
        ra, rb = max(int(y1 // stride), 0), min(int(math.ceil(y2 / stride)), gh)
        if ca < cb and ra < rb:
            np.maximum(out[ra:rb, ca:cb], s, out=out[ra:rb, ca:cb])
    return out


def focus_regions(fmap: np.ndarray, threshold: float, dilate: int) -> np.ndarray:
    """Connected regions ``int64 [R, 4]`` (xyxy, cells, exclusive ends) of ``fmap >= threshold`` dilated."""
    mask: np.ndarray = (fmap >= threshold).astype(np.uint8)
    if not mask.any():
        return np.zeros((0, 4), np.int64)
    if dilate:
        mask = np.asarray(cv2.dilate(mask, np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8)))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    x, y, w, h = (stats[1:n, i].astype(np.int64) for i in range(4))
    return np.stack([x, y, x + w, y + h], axis=1)


def grow(regions: np.ndarray, min_size: int, width: int, height: int) -> np.ndarray:
    """Regions ``[R, 4]`` (px) grown about their centres to at least ``min_size`` per side, kept in the image."""
    out = regions.astype(np.int64).copy()
    for axis, limit in ((0, width), (1, height)):
        lo, hi = out[:, axis], out[:, axis + 2]
        short = np.maximum(min(min_size, limit) - (hi - lo), 0)
        lo = lo - short // 2
        hi = hi + short - short // 2
        shift = np.maximum(-lo, 0) - np.maximum(hi - limit, 0)
        out[:, axis], out[:, axis + 2] = np.clip(lo + shift, 0, limit), np.clip(hi + shift, 0, limit)
    return out


def merge_overlapping(regions: np.ndarray, fit: int = 0) -> np.ndarray:
    """Replace regions ``[R, 4]`` (xyxy) that overlap -- or, with ``fit`` > 0, whose bounding box is at most
    ``fit`` on both sides -- by their bounding boxes, until no two qualify."""
    b = regions.astype(np.int64).reshape(-1, 4).copy()
    while len(b) > 1:
        lo = np.minimum(b[:, None, :2], b[None, :, :2])
        hi = np.maximum(b[:, None, 2:], b[None, :, 2:])
        ok = (b[:, None, 0] < b[None, :, 2]) & (b[None, :, 0] < b[:, None, 2])
        ok &= (b[:, None, 1] < b[None, :, 3]) & (b[None, :, 1] < b[:, None, 3])
        if fit > 0:
            ok |= ((hi - lo) <= fit).all(axis=2)
        np.fill_diagonal(ok, False)
        pairs = np.argwhere(np.triu(ok))
        if not len(pairs):
            break
        i, j = (int(v) for v in pairs[0])
        b[i] = np.concatenate([lo[i, j], hi[i, j]])
        b = np.delete(b, j, axis=0)
    return b


def _run(starts: np.ndarray, lo: int, hi: int, chip: int) -> np.ndarray:
    """Tile positions covering ``[lo, hi)``: from the last start <= lo to the first tile ending >= hi."""
    first = max(int(np.searchsorted(starts, lo, side="right")) - 1, 0)
    last = max(int(np.searchsorted(starts + chip, hi, side="left")), first)  # an earlier tile may cover it too
    return starts[first : min(last, starts.size - 1) + 1]


def _cover(regions: np.ndarray, level: Level, starts: Callable[[int, int, int], Sequence[int]]) -> np.ndarray:
    """Chips of ``level`` (``int32 [J, 3]``: level, x0, y0; sorted by y0, x0; de-duplicated) covering ``regions``
    (px): per region, the product of ``starts(lo, hi, axis)`` over x (axis 0) and y (axis 1)."""
    picked: set[tuple[int, int]] = set()
    for x1, y1, x2, y2 in regions.tolist():
        if x2 <= x1 or y2 <= y1:
            continue
        for y0 in starts(y1, y2, 1):
            for x0 in starts(x1, x2, 0):
                picked.add((int(y0), int(x0)))
    out = np.zeros((len(picked), 3), np.int32)
    if picked:
        yx = np.asarray(sorted(picked), np.int32)
        out[:, 0], out[:, 1], out[:, 2] = level.index, yx[:, 1], yx[:, 0]
    return out


def snap_to_chips(regions: np.ndarray, level: Level, chip: int) -> np.ndarray:
    """The ordinary chips of ``level`` (``int32 [J, 3]``: level, x0, y0; sorted) that cover ``regions`` (px)."""
    axes = (tile_positions(level.width, chip, level.overlap), tile_positions(level.height, chip, level.overlap))
    return _cover(regions, level, lambda lo, hi, axis: _run(axes[axis], lo, hi, chip).tolist())


MIN_CONTEXT = 4  # px: a region this far inside one chip's edges takes that one chip (above the default edge margin, 2)


def _span(lo: int, hi: int, length: int, chip: int, overlap: int, pad: int) -> list[int]:
    """Free chip positions on one axis for ``[lo, hi)`` inside ``[0, length)``: one chip centred on a region that
    fits with ``min(pad, MIN_CONTEXT)`` px each side, else the region padded by ``pad`` tiled with ``overlap``."""
    if length <= chip:
        return [0]
    if hi - lo + 2 * min(pad, MIN_CONTEXT) <= chip:
        return [min(max((lo + hi - chip) // 2, 0), length - chip)]
    a, b = max(lo - pad, 0), min(hi + pad, length)
    return [a + int(t) for t in tile_positions(b - a, chip, overlap)]  # every start <= b - chip <= length - chip


def place_chips(regions: np.ndarray, level: Level, chip: int, pad: int) -> np.ndarray:
    """Chips of ``level`` (``int32 [J, 3]``: level, x0, y0; sorted) placed freely on ``regions`` (px): per region
    and axis :func:`_span`. Sorted and de-duplicated like :func:`snap_to_chips`."""
    lengths = (level.width, level.height)
    return _cover(regions, level, lambda lo, hi, axis: _span(lo, hi, lengths[axis], chip, level.overlap, pad))


def focus_step(fmap: np.ndarray, level: Level, finer: Level, chip: int, cfg: FocusConfig) -> FocusStep:
    """FocusChips of ``finer`` from ``level``'s assembled focus map (``level_focus_map`` or the fallback's)."""
    cells = focus_regions(fmap, cfg.threshold, cfg.dilate)
    ratio = finer.scale / level.scale
    px = cells.astype(np.float64) * cfg.stride * ratio  # finer-level px
    regions = np.stack([np.floor(px[:, 0]), np.floor(px[:, 1]), np.ceil(px[:, 2]), np.ceil(px[:, 3])], axis=1).astype(
        np.int64
    )
    regions[:, 0::2] = np.clip(regions[:, 0::2], 0, finer.width)
    regions[:, 1::2] = np.clip(regions[:, 1::2], 0, finer.height)
    regions = regions[(regions[:, 2] > regions[:, 0]) & (regions[:, 3] > regions[:, 1])]
    regions = merge_overlapping(grow(regions, cfg.min_size, finer.width, finer.height))
    area = float(((regions[:, 2] - regions[:, 0]) * (regions[:, 3] - regions[:, 1])).sum())
    area = min(1.0, area / (finer.width * finer.height))
    if cfg.placement == "tiling":
        return FocusStep(snap_to_chips(regions, finer, chip), regions, area)
    packed = merge_overlapping(regions, fit=chip - 2 * cfg.pad)
    return FocusStep(place_chips(packed, finer, chip, cfg.pad), regions, area)


def coarsest_chips(full: ChipPlan) -> np.ndarray:
    """The chips a focus run starts with: the coarsest level's whole ordinary tiling (``int32 [K, 3]``)."""
    return np.asarray(full.chips[full.chips[:, 0] == len(full.levels) - 1])


def with_chips(full: ChipPlan, chips: np.ndarray) -> ChipPlan:
    """``full``'s levels with only ``chips`` (the ones a focus run ran, in running order)."""
    return ChipPlan(full.image_size, full.chip_size, full.levels, chips.astype(np.int32), full.edge_margin)


@dataclass
class LevelFocus:
    """What a focus run did at one level: chips run, and the share of the level its FocusChips' regions cover
    (1.0 for the coarsest level, which runs whole)."""

    index: int
    chips: int
    area: float
    regions: int


class FocusRun:
    """One request's coarse-to-fine walk (no I/O: the caller runs each level's chips and hands results back).

    ``next_chips()`` gives the chips of the next level to run (``int32 [K, 3]``) or None when done;
    ``add(chips, dets, maps)`` takes their detections (``ChipDetections``, chip = row of ``chips``) and, for
    models with a focus head, their focus maps ``float32 [K, h, w]``. ``plan()`` / ``detections()`` are then the
    chips that ran and their detections, ready for ``postprocess``.
    """

    def __init__(self, full: ChipPlan, cfg: FocusConfig, threshold: float) -> None:
        self.full = full
        self.cfg = cfg
        self.threshold = threshold
        self._level = len(full.levels) - 1
        self._pending: np.ndarray | None = coarsest_chips(full)
        self._ran: list[np.ndarray] = []
        self._dets: list[ChipDetections] = []
        self._area = 1.0
        self._regions = 0
        self.levels: list[LevelFocus] = []

    def chip_threshold(self) -> float:
        """Score threshold of the next level's chips: the fallback needs the coarse levels' weak detections."""
        if self.cfg.source != "head" and self._level > 0:
            return min(self.threshold, self.cfg.threshold)
        return self.threshold

    def next_chips(self) -> np.ndarray | None:
        return self._pending

    def add(self, chips: np.ndarray, dets: ChipDetections, maps: np.ndarray | None) -> None:
        lv = self.full.levels[self._level]
        offset = sum(int(c.shape[0]) for c in self._ran)
        self._ran.append(chips)
        keep = dets.scores >= self.threshold
        self._dets.append(
            ChipDetections(dets.chip[keep] + offset, dets.boxes[keep], dets.scores[keep], dets.classes[keep])
        )
        self.levels.append(LevelFocus(lv.index, int(chips.shape[0]), round(self._area, 4), self._regions))
        if self._level == 0:
            self._pending = None
            return
        finer = self.full.levels[self._level - 1]
        fmap = self.focus_map(lv, finer, chips, dets, maps)
        step = focus_step(fmap, lv, finer, self.full.chip_size, self.cfg)
        self._level -= 1
        self._pending, self._area, self._regions = step.chips, step.area, int(step.regions.shape[0])

    def focus_map(
        self, lv: Level, finer: Level, chips: np.ndarray, dets: ChipDetections, maps: np.ndarray | None
    ) -> np.ndarray:
        """The map of ``lv`` that ``finer``'s FocusChips are planned from (``float32 [ceil(H/s), ceil(W/s)]``):
        the chips' head maps, the fallback's map of their detections, or both (max), per ``cfg.source``."""
        c, stride = self.full.chip_size, self.cfg.stride
        fmap = np.zeros((math.ceil(lv.height / stride), math.ceil(lv.width / stride)), np.float32)
        if self.cfg.source != "detections":
            if maps is None and chips.shape[0]:
                raise ValueError(f"focus source {self.cfg.source!r} needs the chips' focus maps")
            maps = maps if maps is not None else np.zeros((0, 1, 1), np.float32)
            fmap = level_focus_map(maps, chips[:, 1:3], lv, c, stride)
        if self.cfg.source != "head":  # the coarse level's weak small detections, alone or with the head's map
            off = chips[dets.chip, 1:3].astype(np.float32)
            boxes = dets.boxes + np.concatenate([off, off], axis=1)
            fmap = np.maximum(fmap, detections_focus_map(boxes, dets.scores, lv, finer, stride))
        return fmap

    def plan(self) -> ChipPlan:
        chips = np.concatenate(self._ran) if self._ran else np.zeros((0, 3), np.int32)
        return with_chips(self.full, chips)

    def detections(self) -> ChipDetections:
        return ChipDetections.concat(self._dets)
