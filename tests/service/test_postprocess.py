"""Mapping chip -> original pixels, the inner-edge filter, valid ranges and the merge."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from service.adapters import ChipDetections
from service.options import MergeConfig
from service.plan import ChipPlan, Level, LevelSpec, PlanConfig, plan
from service.postprocess import Detections, inner_edge_mask, merge, postprocess, to_image, valid_range_mask


def two_chip_plan() -> ChipPlan:
    # level 0: scale 2, 400x200 level px -> chips at x0 = 0 and 144 (C = 256), y0 = 0 (padded)
    lv = Level(index=0, scale=2.0, width=400, height=200, lo=-1, hi=math.inf, overlap=112)
    chips = np.array([[0, 0, 0], [0, 144, 0]], np.int32)
    return ChipPlan(image_size=(200, 100), chip_size=256, levels=(lv,), chips=chips, edge_margin=2.0)


def dets(rows: list[tuple[int, float, float, float, float]]) -> ChipDetections:
    arr = np.array(rows, np.float32).reshape(-1, 5)
    n = arr.shape[0]
    return ChipDetections(arr[:, 0].astype(np.int32), arr[:, 1:], np.full(n, 0.9, np.float32), np.zeros(n, np.int32))


def test_to_image_adds_offset_and_divides_by_scale() -> None:
    out = to_image(dets([(1, 10, 20, 30, 40)]), two_chip_plan())
    np.testing.assert_allclose(out.boxes, [[(144 + 10) / 2, 10, (144 + 30) / 2, 20]])
    assert out.levels.tolist() == [0]


def test_to_image_clips_to_the_image() -> None:
    out = to_image(dets([(1, 200, 150, 300, 260)]), two_chip_plan())  # runs past the level's right/bottom
    np.testing.assert_allclose(out.boxes, [[172, 75, 200, 100]])


def test_inner_edge_filter() -> None:
    p = two_chip_plan()
    d = dets(
        [
            (0, 0, 10, 20, 30),  # chip 0 touches its left edge: the image border -> kept
            (0, 240, 10, 255, 30),  # chip 0 touches its right edge: inner (chip 1 continues) -> dropped
            (1, 1, 10, 20, 30),  # chip 1 left edge is inner -> dropped
            (1, 240, 10, 255.5, 30),  # chip 1 right edge is the level border -> kept
            (0, 100, 190, 120, 199),  # bottom: level height 200 < C, padded -> not inner -> kept
        ]
    )
    assert inner_edge_mask(d, p).tolist() == [True, False, False, True, True]


def test_valid_range_mask_per_level() -> None:
    levels = (
        Level(0, 2.0, 400, 200, -1, 10, 20),
        Level(1, 0.5, 100, 50, 10, math.inf, 20),
    )
    p = ChipPlan((200, 100), 256, levels, np.array([[0, 0, 0], [1, 0, 0]], np.int32), 2.0)
    d = Detections(
        np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 5, 5], [0, 0, 50, 50]], np.float32),
        np.ones(4, np.float32),
        np.zeros(4, np.int32),
        np.array([0, 1, 1, 0], np.int32),
    )
    # sqrt area 10 is inside level 0 (hi inclusive), outside level 1 (lo exclusive)
    assert valid_range_mask(d, p).tolist() == [True, False, False, False]


def test_class_filter_and_merge_cap() -> None:
    p = two_chip_plan()
    d = ChipDetections(
        np.array([0, 0, 1], np.int32),
        np.array([[10, 10, 20, 20], [50, 50, 60, 60], [10, 10, 20, 20]], np.float32),
        np.array([0.9, 0.8, 0.7], np.float32),
        np.array([0, 1, 0], np.int32),
    )
    out = postprocess(d, p, edge_filter=True, classes=(0,))
    assert out.classes.tolist() == [0, 0]
    merged = merge(out, MergeConfig(method="hard", iou_threshold=0.5), 0.1, max_detections=1)
    assert len(merged) == 1 and merged.scores.tolist() == [np.float32(0.9)]


def test_duplicate_detections_across_chips_merge_to_one() -> None:
    """An object in the overlap of two chips is detected twice; the merge keeps one."""
    p = plan(
        (300, 100), PlanConfig(chip_size=256, levels=(LevelSpec(scale=1.0, valid=(-1, 100)),), sweet_spot=(8, 100))
    )
    x0 = p.chips[1, 1]
    obj = (120.0, 40.0, 140.0, 60.0)
    d = ChipDetections(
        np.array([0, 1], np.int32),
        np.array([obj, (obj[0] - x0, obj[1], obj[2] - x0, obj[3])], np.float32),
        np.array([0.9, 0.85], np.float32),
        np.zeros(2, np.int32),
    )
    out = merge(postprocess(d, p, edge_filter=True, classes=None), MergeConfig(), 0.5, 100)
    assert len(out) == 1
    np.testing.assert_allclose(out.boxes[0], obj)


@settings(max_examples=100, deadline=None)
@given(st.integers(50, 2000), st.integers(50, 2000), st.floats(0.1, 3.0), st.data())
def test_mapped_boxes_stay_inside_the_image(w: int, h: int, scale: float, data: st.DataObject) -> None:
    p = plan((w, h), PlanConfig(chip_size=128, levels=(LevelSpec(scale=scale),), max_chips=100000))
    n = data.draw(st.integers(1, 20))
    chip = data.draw(st.lists(st.integers(0, p.num_chips - 1), min_size=n, max_size=n))
    xy = np.array(
        data.draw(st.lists(st.tuples(st.floats(-20, 150), st.floats(-20, 150)), min_size=n, max_size=n)), np.float32
    )
    wh = np.array(
        data.draw(st.lists(st.tuples(st.floats(0, 60), st.floats(0, 60)), min_size=n, max_size=n)), np.float32
    )
    d = ChipDetections(
        np.array(chip, np.int32), np.concatenate([xy, xy + wh], 1), np.ones(n, np.float32), np.zeros(n, np.int32)
    )
    out = to_image(d, p)
    assert (out.boxes[:, 0::2] >= 0).all() and (out.boxes[:, 0::2] <= w).all()
    assert (out.boxes[:, 1::2] >= 0).all() and (out.boxes[:, 1::2] <= h).all()
