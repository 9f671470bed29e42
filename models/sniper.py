"""SNIPER chip sampling and labelling, on the service planner's definition of levels and valid ranges.

- :func:`positive_chips`: per level (``service.plan.resolve_levels``), chips chosen greedily until every
  valid ground-truth box (``service.plan.valid_mask``) lies whole in at least one chip of its level.
- :func:`negative_chips`: chips covering false detections of a short-trained model that fall outside the
  positive chips (SNIPER mines these with its RPN; here the detector itself plays that part).
- :func:`chip_labels` / :func:`build_targets`: ground truth seen through one chip. Boxes valid at the chip's
  level and mostly inside it are positives; invalid boxes (and boxes mostly cut off by the chip) become
  *ignore* regions: no loss there, neither foreground nor background.

No torch here: numpy only, so the sampler is testable and cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.plan import Level, LevelSpec, resolve_levels, valid_mask

STRIDE = 4


class SamplerConfig(BaseModel):
    """SNIPER chip sampling: levels (shared with inference), chip size and mining knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chip_size: int = Field(default=256, ge=32, description="Chip side C, pixels (the model's input size).")
    levels: tuple[LevelSpec, ...] = Field(
        default=(LevelSpec(scale=1.5), LevelSpec(scale=0.6), LevelSpec(scale=0.25), LevelSpec(long_side=256)),
        min_length=1,
        description="Training levels; the same specs are the model card's default levels.",
    )
    sweet_spot: tuple[float, float] = Field(
        default=(8.0, 64.0), description="Object sizes (sqrt area, chip px) each level is responsible for."
    )
    candidate_stride: int = Field(default=32, ge=1, description="Grid step of candidate chip positions, level px.")
    min_visible: float = Field(
        default=0.6, gt=0, le=1, description="A valid box cut by the chip edge stays positive if this much is inside."
    )
    neg_score: float = Field(default=0.3, ge=0, le=1, description="Detections above this score count as firing.")
    neg_match_iou: float = Field(
        default=0.5, ge=0, le=1, description="A detection matching GT above this is not false."
    )
    neg_min_hits: int = Field(default=2, ge=1, description="A negative chip must contain this many false detections.")
    neg_max_per_level: int = Field(default=2, ge=0, description="At most this many negative chips per image and level.")
    regress_ignore: bool = Field(
        default=False,
        description="Ignore regions (class -1) get box-regression targets (their own box) but still no class loss: "
        "a detection there then takes the region's size, which evaluation ignores, instead of an arbitrary one.",
    )


@dataclass(frozen=True)
class ChipLabels:
    """Ground truth seen through one chip (chip pixels).

    ``boxes`` ``float32 [n, 4]`` xyxy clipped to the chip; ``classes`` ``int32 [n]``;
    ``positive`` ``bool [n]`` (False = ignore region).
    """

    boxes: np.ndarray
    classes: np.ndarray
    positive: np.ndarray


def levels_for(image_size: tuple[int, int], cfg: SamplerConfig) -> tuple[Level, ...]:
    """The planner's levels for one image (finest first), exactly as inference resolves them."""
    return resolve_levels(image_size, cfg.levels, cfg.chip_size, cfg.sweet_spot)


def _candidates(length: int, chip: int, step: int, offset: int) -> np.ndarray:
    if length <= chip:
        return np.zeros(1, np.int64)
    starts = np.arange(offset % step, length - chip + 1, step)
    return np.unique(np.concatenate([[0], starts, [length - chip]])).astype(np.int64)


def _inside(xy: np.ndarray, boxes: np.ndarray, chip: int) -> np.ndarray:
    """``bool [K, N]``: box ``n`` (level px) lies whole in chip ``k`` with top-left ``xy[k]``."""
    x0, y0 = xy[:, 0:1], xy[:, 1:2]  # [K, 1]
    return (
        (boxes[None, :, 0] >= x0)
        & (boxes[None, :, 1] >= y0)
        & (boxes[None, :, 2] <= x0 + chip)
        & (boxes[None, :, 3] <= y0 + chip)
    )  # [K, N]


def greedy_cover(
    level_size: tuple[int, int],
    boxes: np.ndarray,
    chip: int,
    step: int,
    rng: np.random.Generator | None = None,
    min_hits: int = 1,
    max_chips: int | None = None,
) -> np.ndarray:
    """Chip top-left corners ``int64 [K, 2]`` (level px) covering ``boxes`` ``[N, 4]`` (level px) greedily.

    Each round takes the candidate chip containing the most still-uncovered boxes whole, until every box
    that fits in a chip is covered, the best chip covers fewer than ``min_hits``, or ``max_chips`` are chosen.
    Boxes larger than the chip cannot be covered and are left out.
    """
    lw, lh = level_size
    if boxes.shape[0] == 0:
        return np.zeros((0, 2), np.int64)
    ox, oy = (0, 0) if rng is None else (int(rng.integers(step)), int(rng.integers(step)))
    xs, ys = _candidates(lw, chip, step, ox), _candidates(lh, chip, step, oy)
    gx, gy = np.meshgrid(xs, ys)
    cand = np.stack([gx.ravel(), gy.ravel()], axis=1)  # [K, 2]
    inside = _inside(cand, boxes, chip)  # [K, N]
    todo = inside.any(axis=0)  # coverable boxes
    chosen: list[np.ndarray] = []
    while todo.any() and (max_chips is None or len(chosen) < max_chips):
        gain = inside[:, todo].sum(axis=1)  # [K]
        best = int(np.argmax(gain))
        if gain[best] < min_hits:
            break
        chosen.append(cand[best])
        todo &= ~inside[best]
    return np.array(chosen, np.int64).reshape(-1, 2)


def positive_chips(
    image_size: tuple[int, int], boxes: np.ndarray, cfg: SamplerConfig, rng: np.random.Generator | None = None
) -> list[tuple[Level, np.ndarray]]:
    """Per level: ``(level, chip corners int64 [K, 2] in level px)`` covering that level's valid boxes.

    ``boxes`` ``float32 [N, 4]`` xyxy in original pixels. Validity is ``service.plan.valid_mask`` with the
    level's range, so a box is the responsibility of exactly the levels inference keeps it at.
    """
    out = []
    for lv in levels_for(image_size, cfg):
        valid = valid_mask(boxes, lv.lo, lv.hi)
        corners = greedy_cover(
            (lv.width, lv.height), level_boxes(boxes[valid], lv), cfg.chip_size, cfg.candidate_stride, rng
        )
        out.append((lv, corners))
    return out


def level_boxes(boxes: np.ndarray, level: Level) -> np.ndarray:
    """``boxes`` (original px) in ``level``'s pixels, clipped to the level image: its size is rounded, so a box
    touching the image's edge can end a fraction of a pixel past it and would otherwise fit no chip."""
    lb = boxes * level.scale
    return np.clip(lb, 0, np.array([level.width, level.height, level.width, level.height], lb.dtype))


def chip_labels(
    level: Level, x0: int, y0: int, boxes: np.ndarray, classes: np.ndarray, cfg: SamplerConfig
) -> ChipLabels:
    """Ground truth of the chip at ``(x0, y0)`` (level px) of ``level``; ``boxes`` in original px."""
    c = cfg.chip_size
    if boxes.shape[0] == 0:
        return ChipLabels(np.zeros((0, 4), np.float32), np.zeros(0, np.int32), np.zeros(0, bool))
    lb = boxes * level.scale - np.array([x0, y0, x0, y0], np.float32)  # chip px, unclipped
    clipped = np.clip(lb, 0, c)
    area = (lb[:, 2] - lb[:, 0]) * (lb[:, 3] - lb[:, 1])
    vis = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = vis > 0
    valid = valid_mask(boxes, level.lo, level.hi)
    positive = valid & (classes >= 0) & (vis >= cfg.min_visible * np.maximum(area, 1e-9))  # class -1: ignore
    return ChipLabels(clipped[keep].astype(np.float32), classes[keep].astype(np.int32), positive[keep])


def build_targets(
    labels: ChipLabels, chip: int, num_classes: int, alpha: float = 0.54, regress_ignore: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """TTFNet-style dense targets for one chip at stride 4.

    Returns ``heat`` ``float32 [K, H, W]`` (elliptical Gaussians, exactly 1 at each positive box's centre
    cell), ``weight`` ``float32 [H, W]`` (0 inside ignore regions, else 1; positives override ignores),
    ``reg`` ``float32 [4, H, W]`` (target box xyxy, chip px) and ``reg_weight`` ``float32 [H, W]`` (Gaussian
    inside the box, normalised per object to ``log(area)`` as TTFNet does). ``H = W = chip / 4``.
    ``regress_ignore``: ignore regions (class -1) get regression targets too (positives win shared cells).
    """
    n = chip // STRIDE
    heat = np.zeros((num_classes, n, n), np.float32)
    weight = np.ones((n, n), np.float32)
    reg = np.zeros((4, n, n), np.float32)
    reg_w = np.zeros((n, n), np.float32)
    b = labels.boxes / STRIDE  # cells
    for i in np.flatnonzero(~labels.positive):
        x1, y1 = int(math.floor(b[i, 0])), int(math.floor(b[i, 1]))
        x2, y2 = int(math.ceil(b[i, 2])), int(math.ceil(b[i, 3]))
        weight[max(y1, 0) : min(y2, n), max(x1, 0) : min(x2, n)] = 0.0
    # the boxes that get targets: positives, and with regress_ignore the ignore regions (regression only)
    painted = np.flatnonzero(labels.positive | (regress_ignore & (labels.classes < 0)))
    areas = (labels.boxes[painted, 2] - labels.boxes[painted, 0]) * (
        labels.boxes[painted, 3] - labels.boxes[painted, 1]
    )
    # ignore regions first, then positives large first: later ones win shared cells (small objects over large)
    for i in painted[np.lexsort((-areas, labels.positive[painted]))]:
        x1, y1, x2, y2 = b[i]
        cx = min(int((x1 + x2) / 2), n - 1)
        cy = min(int((y1 + y2) / 2), n - 1)
        sx = max(alpha * (x2 - x1) / 6, 1e-3)
        sy = max(alpha * (y2 - y1) / 6, 1e-3)
        xa, xb = max(int(math.floor(x1)), 0), min(int(math.ceil(x2)), n)
        ya, yb = max(int(math.floor(y1)), 0), min(int(math.ceil(y2)), n)
        xa, xb = min(xa, cx), max(xb, cx + 1)
        ya, yb = min(ya, cy), max(yb, cy + 1)
        gx = np.exp(-((np.arange(xa, xb) - cx) ** 2) / (2 * sx * sx))
        gy = np.exp(-((np.arange(ya, yb) - cy) ** 2) / (2 * sy * sy))
        g = gy[:, None] * gx[None, :]  # [h, w]
        if labels.positive[i]:
            k = labels.classes[i]
            heat[k, ya:yb, xa:xb] = np.maximum(heat[k, ya:yb, xa:xb], g)
            heat[k, cy, cx] = 1.0
            weight[ya:yb, xa:xb][g > 0.01] = 1.0
            weight[cy, cx] = 1.0
        m = g > 0.1  # regression only near the centre
        m[cy - ya, cx - xa] = True
        gm = np.where(m, g, 0.0)
        gm = gm / gm.sum() * math.log(max(areas[np.flatnonzero(painted == i)[0]], 2.0))
        sub = reg_w[ya:yb, xa:xb]
        upd = gm > 0
        sub[upd] = gm[upd]
        for j in range(4):
            reg[j, ya:yb, xa:xb][upd] = labels.boxes[i, j]
    return heat, weight, reg, reg_w


def negative_chips(
    level: Level,
    detections: np.ndarray,
    gt_boxes: np.ndarray,
    positive_corners: np.ndarray,
    cfg: SamplerConfig,
) -> np.ndarray:
    """Negative chip corners ``int64 [J, 2]`` (level px) for one level of one image.

    ``detections`` ``float32 [M, 4]`` are a short-trained model's boxes (score above ``cfg.neg_score``) in
    level px; ``gt_boxes`` ``[N, 4]`` in original px. A detection is *false* if it overlaps no ground truth
    with IoU ``>= cfg.neg_match_iou``; false detections lying whole in a positive chip are already
    trained against. The rest are covered greedily by chips holding at least ``cfg.neg_min_hits`` of them.
    """
    if detections.shape[0] == 0 or cfg.neg_max_per_level == 0:
        return np.zeros((0, 2), np.int64)
    gt = gt_boxes * level.scale
    if gt.shape[0]:
        false = box_iou(detections, gt).max(axis=1) < cfg.neg_match_iou
    else:
        false = np.ones(detections.shape[0], bool)
    if positive_corners.shape[0]:
        false &= ~_inside(positive_corners, detections, cfg.chip_size).any(axis=0)
    return greedy_cover(
        (level.width, level.height),
        detections[false],
        cfg.chip_size,
        cfg.candidate_stride,
        min_hits=cfg.neg_min_hits,
        max_chips=cfg.neg_max_per_level,
    )


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU ``float32 [N, M]`` of ``a`` ``[N, 4]`` and ``b`` ``[M, 4]`` xyxy (0 where the union is 0)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0).astype(np.float32)


def crop_chip(level_image: np.ndarray, x0: int, y0: int, chip: int) -> tuple[np.ndarray, int, int]:
    """``uint8 [C, C, 3]`` chip at ``(x0, y0)`` of a level image, zero padded; plus content width/height."""
    h, w = level_image.shape[:2]
    out = np.zeros((chip, chip, 3), np.uint8)
    cw, ch = max(0, min(chip, w - x0)), max(0, min(chip, h - y0))
    out[:ch, :cw] = level_image[y0 : y0 + ch, x0 : x0 + cw]
    return out, cw, ch


def decode(
    heat: np.ndarray, ltrb: np.ndarray, score_threshold: float, max_per_chip: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode "snipserve" outputs of one chip into boxes (the adapter contract).

    ``heat`` ``float32 [K, h, w]`` peak-suppressed probabilities; ``ltrb`` ``float32 [4, h, w]`` chip px.
    Returns boxes ``float32 [N, 4]`` xyxy chip px, scores ``float32 [N]``, classes ``int32 [N]``,
    the top ``max_per_chip`` cells above ``score_threshold``, best first.
    """
    k, h, w = heat.shape
    flat = heat.reshape(-1)
    idx = np.flatnonzero(flat > score_threshold)
    if idx.size > max_per_chip:
        idx = idx[np.argpartition(-flat[idx], max_per_chip - 1)[:max_per_chip]]
    idx = idx[np.argsort(-flat[idx], kind="stable")]
    cls, rem = np.divmod(idx, h * w)
    y, x = np.divmod(rem, w)
    cx, cy = (x + 0.5) * STRIDE, (y + 0.5) * STRIDE
    d = ltrb[:, y, x]  # [4, N]
    boxes = np.stack([cx - d[0], cy - d[1], cx + d[2], cy + d[3]], axis=1).astype(np.float32)
    return boxes, flat[idx].astype(np.float32), cls.astype(np.int32)


def describe_levels(specs: Sequence[LevelSpec]) -> str:
    """Short text for logs: ``scale=1.5, scale=0.6, long_side=256``."""
    return ", ".join(",".join(f"{k}={v}" for k, v in s.model_dump(exclude_none=True).items()) for s in specs)
