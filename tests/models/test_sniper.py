"""SNIPER chip sampling: coverage of valid boxes per level, ignore semantics, negative mining, decoding."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from models.sniper import (
    STRIDE,
    ChipLabels,
    SamplerConfig,
    box_iou,
    build_targets,
    chip_labels,
    decode,
    greedy_cover,
    level_boxes,
    levels_for,
    negative_chips,
    positive_chips,
)
from service.plan import Level, LevelSpec, valid_mask

CFG = SamplerConfig()


def _boxes(rng: np.random.Generator, w: int, h: int, n: int) -> np.ndarray:
    size = np.exp(rng.uniform(np.log(4), np.log(min(w, h) / 3), n))
    aspect = np.exp(rng.uniform(-0.8, 0.8, n))
    bw, bh = size * aspect, size / aspect
    x1 = rng.uniform(0, np.maximum(w - bw, 1))
    y1 = rng.uniform(0, np.maximum(h - bh, 1))
    return np.stack([x1, y1, np.minimum(x1 + bw, w), np.minimum(y1 + bh, h)], 1).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(w=st.integers(200, 3000), h=st.integers(200, 3000), n=st.integers(0, 40), seed=st.integers(0, 2**16))
@example(w=200, h=207, n=29, seed=19768)  # a box ending 0.46 px past a level whose height was rounded down
def test_every_valid_box_whole_in_a_chip_of_its_level(w: int, h: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    boxes = _boxes(rng, w, h, n)
    c = CFG.chip_size
    for lv, corners in positive_chips((w, h), boxes, CFG, rng):
        valid = valid_mask(boxes, lv.lo, lv.hi)
        lb = level_boxes(boxes[valid], lv)  # what the level image shows of each box
        fits = ((lb[:, 2] - lb[:, 0]) <= c) & ((lb[:, 3] - lb[:, 1]) <= c)
        if not fits.any():
            continue
        x0, y0 = corners[:, 0:1], corners[:, 1:2]
        inside = (
            (lb[None, :, 0] >= x0) & (lb[None, :, 1] >= y0) & (lb[None, :, 2] <= x0 + c) & (lb[None, :, 3] <= y0 + c)
        )
        assert inside.any(axis=0)[fits].all()
        # chips start inside the level image
        assert (corners >= 0).all() and (corners[:, 0] <= max(lv.width - c, 0)).all()


def test_levels_are_the_planners() -> None:
    from service.plan import resolve_levels

    assert levels_for((1500, 1000), CFG) == resolve_levels((1500, 1000), CFG.levels, CFG.chip_size, CFG.sweet_spot)


def test_greedy_cover_uses_few_chips() -> None:
    boxes = np.array([[10, 10, 20, 20], [30, 30, 40, 40], [500, 500, 510, 510]], np.float32)
    corners = greedy_cover((1000, 1000), boxes, 256, 32)
    assert corners.shape == (2, 2)


def _level(scale: float = 1.0, lo: float = 16.0, hi: float = 64.0) -> Level:
    return Level(index=0, scale=scale, width=1000, height=1000, lo=lo, hi=hi, overlap=70)


def test_invalid_boxes_are_ignored_not_negative() -> None:
    cfg = SamplerConfig(chip_size=128)
    boxes = np.array([[10, 10, 40, 40], [60, 60, 66, 66], [70, 10, 125, 120]], np.float32)  # valid, too small, too big
    classes = np.array([0, 1, 2], np.int32)
    labels = chip_labels(_level(), 0, 0, boxes, classes, cfg)
    assert labels.positive.tolist() == [True, False, False]
    heat, weight, reg, reg_w = build_targets(labels, 128, 3)
    # The valid box is a positive: peak 1 at its centre cell, regression there.
    assert heat[0, 25 // STRIDE, 25 // STRIDE] == 1.0 and reg_w[25 // STRIDE, 25 // STRIDE] > 0
    for x1, y1, x2, y2 in boxes[1:]:
        cy, cx = int((y1 + y2) / 2 / STRIDE), int((x1 + x2) / 2 / STRIDE)
        assert weight[cy, cx] == 0.0  # no loss: neither foreground ...
        assert heat[:, cy, cx].max() == 0.0  # ... nor a background target that would count
        assert reg_w[cy, cx] == 0.0
    # Background far from any box is a normal negative.
    assert weight[28, 4] == 1.0 and heat[:, 28, 4].max() == 0.0


def test_ignore_regions_regress_without_class_loss_when_asked() -> None:
    # a positive (class 0) and an ignore region (class -1, e.g. a boat on a lift) and an out-of-range box
    boxes = np.array([[10, 10, 40, 40], [60, 60, 100, 90], [0, 100, 30, 126]], np.float32)
    labels = ChipLabels(boxes, np.array([0, -1, 1], np.int32), np.array([True, False, False]))
    plain = build_targets(labels, 128, 3)
    heat, weight, reg, reg_w = build_targets(labels, 128, 3, regress_ignore=True)
    assert np.array_equal(heat, plain[0]) and np.array_equal(weight, plain[1])  # classification unchanged
    cy, cx = 75 // STRIDE, 80 // STRIDE  # the ignore region's centre cell: its own box as regression target
    assert plain[3][cy, cx] == 0.0 and reg_w[cy, cx] > 0 and reg[:, cy, cx].tolist() == [60, 60, 100, 90]
    assert weight[cy, cx] == 0.0
    oy, ox = 113 // STRIDE, 15 // STRIDE  # an out-of-range object (class >= 0) stays ignored for both
    assert reg_w[oy, ox] == 0.0
    # the positive keeps its own targets
    assert np.array_equal(reg[:, 25 // STRIDE, 25 // STRIDE], plain[2][:, 25 // STRIDE, 25 // STRIDE])


def test_box_mostly_cut_by_chip_is_ignored() -> None:
    cfg = SamplerConfig(chip_size=128, min_visible=0.6)
    boxes = np.array([[100, 10, 150, 40], [110, 50, 130, 70]], np.float32)  # 56% inside / 90% inside
    labels = chip_labels(_level(), 0, 0, boxes, np.zeros(2, np.int32), cfg)
    assert labels.positive.tolist() == [False, True]
    assert (labels.boxes[:, 2] <= 128).all()


def test_targets_decode_back_to_boxes() -> None:
    boxes = np.array([[20, 30, 60, 50], [100, 100, 108, 106]], np.float32)
    labels = ChipLabels(boxes, np.array([1, 2], np.int32), np.array([True, True]))
    heat, _, reg, reg_w = build_targets(labels, 128, 3)
    n = 128 // STRIDE
    ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    cx, cy = (xs + 0.5) * STRIDE, (ys + 0.5) * STRIDE
    ltrb = np.stack([cx - reg[0], cy - reg[1], reg[2] - cx, reg[3] - cy]).astype(np.float32)
    peaks = np.where(heat == 1.0, heat, 0).astype(np.float32)
    got, scores, classes = decode(peaks, ltrb, 0.5, 10)
    assert sorted(classes.tolist()) == [1, 2] and (scores == 1).all()
    assert box_iou(boxes, got).max(axis=1).min() > 0.99


def test_negative_chips_cover_false_detections_outside_positive_chips() -> None:
    cfg = SamplerConfig(chip_size=128, neg_min_hits=2)
    lv = _level(scale=1.0, lo=-1, hi=float("inf"))
    gt = np.array([[500, 500, 520, 520]], np.float32)
    dets = np.array(
        [
            [500, 500, 520, 520],  # a true positive: not false
            [10, 10, 20, 20],
            [30, 30, 40, 40],  # inside the positive chip at (0, 0): already trained against
            [700, 700, 710, 710],
            [720, 720, 730, 735],  # false, outside positive chips: a negative chip
        ],
        np.float32,
    )
    corners = negative_chips(lv, dets, gt, np.array([[0, 0]]), cfg)
    assert corners.shape == (1, 2)
    x0, y0 = corners[0]
    assert x0 <= 700 and x0 + 128 >= 730 and y0 <= 700 and y0 + 128 >= 735
    none = negative_chips(lv, dets[:3], gt, np.array([[0, 0]]), cfg)
    assert none.shape == (0, 2)


def test_decode_caps_and_orders() -> None:
    rng = np.random.default_rng(0)
    heat = rng.uniform(0, 1, (3, 8, 8)).astype(np.float32)
    ltrb = np.ones((4, 8, 8), np.float32)
    boxes, scores, classes = decode(heat, ltrb, 0.5, 5)
    assert boxes.shape == (5, 4) and (np.diff(scores) <= 0).all()
    assert scores[0] == heat.max()


def test_default_levels_have_derived_contiguous_ranges() -> None:
    # For any image in the dataset's range, adjacent levels' valid ranges overlap (no size is dropped).
    for size in [(1280, 800), (1600, 1200), (2500, 2000), (4000, 2400)]:
        levels = levels_for(size, CFG)
        assert levels[0].lo == -1 and levels[-1].hi == float("inf")
        for fine, coarse in zip(levels[:-1], levels[1:], strict=True):
            assert coarse.lo < fine.hi, (size, fine, coarse)
    assert all(isinstance(s, LevelSpec) for s in CFG.levels)
