"""Postprocess: chip pixels -> original pixels, edge and valid-range filters, then the soft-NMS merge.

All functions take and return flat arrays (boxes ``float32 [N, 4]`` xyxy); no per-box objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.adapters import ChipDetections
from service.options import MergeConfig
from service.plan import ChipPlan
from service.soft_nms import SoftNMSParams
from service.soft_nms_gpu import CPU_ONLY, SoftNmsDispatch, batched_soft_nms_auto


@dataclass(frozen=True)
class Detections:
    """Detections of one image in original pixels: boxes ``float32 [N, 4]`` xyxy, scores ``float32 [N]``,
    classes ``int32 [N]``, levels ``int32 [N]`` (the pyramid level each came from, 0 = finest)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    levels: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int32), np.empty(0, np.int32))

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def select(self, index: np.ndarray) -> Detections:
        return Detections(self.boxes[index], self.scores[index], self.classes[index], self.levels[index])


def inner_edge_mask(dets: ChipDetections, plan: ChipPlan) -> np.ndarray:
    """``bool [N]``: True for boxes that do NOT touch an inner chip edge (within ``plan.edge_margin``).

    An edge is inner when the level image continues past it; a box touching it is cut, and the
    planner's overlap guarantees a whole copy of every valid object in a neighbouring chip.
    """
    c = plan.chip_size
    chips = plan.chips[dets.chip]  # [N, 3] level, x0, y0
    sizes = np.array([(lv.width, lv.height) for lv in plan.levels]).reshape(-1, 2)[chips[:, 0]]  # [N, 2]
    return away_from_inner_edges(dets.boxes, chips[:, 1:], (c, c), sizes, plan.edge_margin)


def away_from_inner_edges(
    boxes: np.ndarray, origin: np.ndarray, tile: tuple[int, int], full: np.ndarray, margin: float
) -> np.ndarray:
    """``bool [N]``: boxes (``[N, 4]`` xyxy in tile pixels) that do not touch an inner edge of their tile.

    A tile of ``tile = (w, h)`` pixels sits at ``origin`` (``[N, 2]`` or ``[2]``, x0, y0) in an image of ``full``
    (``[N, 2]`` or ``[2]``, width, height); an edge is inner where the image continues past it. Chips of a level
    (here) and windows of the offline mode (:mod:`service.tiled`) both use it."""
    origin, full = np.broadcast_to(origin, (len(boxes), 2)), np.broadcast_to(full, (len(boxes), 2))
    (w, h), m, b = tile, margin, boxes
    x0, y0 = origin[:, 0], origin[:, 1]
    cut = (
        ((x0 > 0) & (b[:, 0] <= m))
        | ((y0 > 0) & (b[:, 1] <= m))
        | ((x0 + w < full[:, 0]) & (b[:, 2] >= w - m))
        | ((y0 + h < full[:, 1]) & (b[:, 3] >= h - m))
    )
    return np.asarray(~cut)


def to_image(dets: ChipDetections, plan: ChipPlan) -> Detections:
    """Map chip-pixel boxes to original pixels (add chip offset, clip to the level image, divide by scale)."""
    chips = plan.chips[dets.chip]
    level = chips[:, 0]
    scale = np.array([lv.scale for lv in plan.levels], np.float32)[level]
    lw = np.array([lv.width for lv in plan.levels], np.float32)[level]
    lh = np.array([lv.height for lv in plan.levels], np.float32)[level]
    off = chips[:, 1:3].astype(np.float32)
    b = dets.boxes + np.concatenate([off, off], axis=1)
    b[:, 0::2] = np.clip(b[:, 0::2], 0, lw[:, None])
    b[:, 1::2] = np.clip(b[:, 1::2], 0, lh[:, None])
    b /= scale[:, None]
    w, h = plan.image_size
    b[:, 0::2] = np.clip(b[:, 0::2], 0, w)  # rounding of the level size can overshoot by < 1 px
    b[:, 1::2] = np.clip(b[:, 1::2], 0, h)
    return Detections(b.astype(np.float32), dets.scores, dets.classes, level.astype(np.int32))


def valid_range_mask(dets: Detections, plan: ChipPlan) -> np.ndarray:
    """``bool [N]``: ``lo**2 < w*h <= hi**2`` with each box's own level range (original pixels)."""
    lo = np.array([lv.lo for lv in plan.levels], np.float64)[dets.levels]
    hi = np.array([lv.hi for lv in plan.levels], np.float64)[dets.levels]
    b = dets.boxes.astype(np.float64)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lo2 = np.where(lo < 0, -np.inf, lo * lo)
    return np.asarray((area > lo2) & (area <= hi * hi) & (area > 0))


def merge(
    dets: Detections,
    config: MergeConfig,
    score_threshold: float,
    max_detections: int,
    dispatch: SoftNmsDispatch = CPU_ONLY,
) -> Detections:
    """Soft-NMS across all chips and levels, per class (or class-agnostic), best first, capped."""
    if len(dets) == 0:
        return dets
    groups = np.zeros(len(dets), np.int32) if config.class_agnostic else dets.classes
    # The GPU kernel where ``dispatch`` chooses it (opt-in, by size), else the NumPy reference (same result).
    params = SoftNMSParams(config.method, config.sigma, config.iou_threshold, score_threshold)
    keep, kept = batched_soft_nms_auto(dets.boxes, dets.scores, groups, params, dispatch)
    keep, kept = keep[:max_detections], kept[:max_detections]
    out = dets.select(keep)
    return Detections(out.boxes, kept.astype(np.float32), out.classes, out.levels)


def postprocess(
    dets: ChipDetections,
    plan: ChipPlan,
    *,
    edge_filter: bool,
    classes: tuple[int, ...] | None,
) -> Detections:
    """Everything before the merge: class filter, inner-edge filter, mapping, valid ranges."""
    if classes is not None:
        dets = dets.select(np.isin(dets.classes, np.asarray(classes, np.int32)))
    if edge_filter and len(dets):
        dets = dets.select(inner_edge_mask(dets, plan))
    image = to_image(dets, plan)
    return image.select(valid_range_mask(image, plan))
