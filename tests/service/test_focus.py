"""FocusChips: reference cases, and Hypothesis properties (coverage with inner-edge margins, subset of the pyramid
when snapped to its tiling, monotonicity), for both placements."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.focus import (
    MIN_CONTEXT,
    FocusConfig,
    Placement,
    detections_focus_map,
    focus_regions,
    focus_step,
    grow,
    level_focus_map,
    merge_overlapping,
    snap_to_chips,
)
from service.plan import LevelSpec, PlanConfig, plan

C = 256
SWEET = (8.0, 64.0)


def levels_of(w: int, h: int, *specs: LevelSpec):  # type: ignore[no-untyped-def]
    p = plan((w, h), PlanConfig(chip_size=C, levels=specs, sweet_spot=SWEET, max_chips=100000))
    return p, p.levels


def test_reference_blob_to_chips() -> None:
    # 1500x1000 image; coarse level 0.25 (375x250, one chip), finer level 1.0 (1500x1000, a 7x5 tiling).
    p, (fine, coarse) = levels_of(1500, 1000, LevelSpec(scale=1.0), LevelSpec(scale=0.25))
    fmap = np.zeros((16, 24), np.float32)  # ceil(250/16) x ceil(375/16)
    fmap[5, 10] = 0.9  # one focus cell: coarse px [160, 176) x [80, 96) -> fine px [640, 704) x [320, 384)
    free = focus_step(fmap, coarse, fine, C, FocusConfig(threshold=0.5))
    assert free.regions.tolist() == [[640, 320, 704, 384]]
    assert free.chips.tolist() == [[0, 672 - C // 2, 352 - C // 2]]  # one chip centred on the region
    step = focus_step(fmap, coarse, fine, C, FocusConfig(threshold=0.5, dilate=0, min_size=0, placement="tiling"))
    assert step.regions.tolist() == [[640, 320, 704, 384]]
    xs = sorted({int(x) for x in p.chips[p.chips[:, 0] == 0][:, 1]})
    ys = sorted({int(y) for y in p.chips[p.chips[:, 0] == 0][:, 2]})
    # the tiles holding [640, 704) whole on x, [320, 384) on y -- from the ordinary tiling
    want_x = [x for x in xs if x <= 640 and x + C >= 704]
    want_y = [y for y in ys if y <= 320 and y + C >= 384]
    got = {(int(x), int(y)) for _, x, y in step.chips.tolist()}
    assert got and got <= {(x, y) for x in want_x for y in want_y}
    assert 0 < step.area < 0.01
    # dilation by one cell grows the region by 16 coarse px = 64 fine px per side
    step2 = focus_step(fmap, coarse, fine, C, FocusConfig(threshold=0.5, dilate=1, min_size=0, placement="tiling"))
    assert step2.regions.tolist() == [[576, 256, 768, 448]]


def test_free_placement_packs_regions_that_fit_one_chip() -> None:
    _, (fine, coarse) = levels_of(3000, 3000, LevelSpec(scale=1.0), LevelSpec(scale=0.5))
    fmap = np.zeros((94, 94), np.float32)
    fmap[10, 10] = fmap[10, 12] = 0.9  # two cells 2 apart: 32 px regions 32 px apart -> one chip
    fmap[60, 60] = 0.9  # far away: a chip of its own
    step = focus_step(fmap, coarse, fine, C, FocusConfig(threshold=0.5))
    assert step.regions.tolist() == [[320, 320, 352, 352], [384, 320, 416, 352], [1920, 1920, 1952, 1952]]
    assert step.chips.shape == (2, 3)  # the first two packed into one chip
    snapped = focus_step(fmap, coarse, fine, C, FocusConfig(threshold=0.5, placement="tiling"))
    assert snapped.chips.shape[0] >= step.chips.shape[0]
    # packing needs the padded union to fit: regions further apart keep chips of their own
    assert merge_overlapping(np.array([[0, 0, 10, 10], [300, 0, 310, 10]]), fit=200).shape == (2, 4)


def test_regions_merge_and_grow() -> None:
    assert merge_overlapping(np.array([[0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40]])).tolist() == [
        [0, 0, 20, 20],
        [30, 30, 40, 40],
    ]
    # merging can make a box that overlaps a third one: merged again
    chain = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [8, 0, 22, 2]])
    assert merge_overlapping(chain).tolist() == [[0, 0, 30, 10]]
    assert grow(np.array([[10, 10, 20, 20]]), 100, 50, 500).tolist() == [[0, 0, 50, 100]]
    fmap = np.zeros((10, 10), np.float32)
    fmap[1, 1] = fmap[8, 8] = 1.0
    assert focus_regions(fmap, 0.5, 0).tolist() == [[1, 1, 2, 2], [8, 8, 9, 9]]
    assert focus_regions(fmap, 0.5, 1).tolist() == [[0, 0, 3, 3], [7, 7, 10, 10]]
    assert focus_regions(fmap, 1.5, 1).shape == (0, 4)


def test_level_map_from_chips_takes_max_and_drops_padding() -> None:
    _, (lv,) = levels_of(300, 200, LevelSpec(scale=1.0))
    maps = np.zeros((2, 16, 16), np.float32)
    maps[0, 0, 0] = 0.2
    maps[1, 0, 0] = 0.7  # second chip at (32, 0): its cell (0, 0) lands in level cell (0, 2)
    maps[1, 15, 15] = 1.0  # beyond the level image (padding): dropped
    out = level_focus_map(maps, np.array([[0, 0], [32, 0]]), lv, C, 16)
    assert out.shape == (13, 19)
    assert out[0, 0] == np.float32(0.2) and out[0, 2] == np.float32(0.7) and out.max() == np.float32(0.7)


def test_detection_fallback_paints_small_boxes_only() -> None:
    _, (fine, coarse) = levels_of(1600, 1600, LevelSpec(scale=1.0), LevelSpec(scale=0.25))
    # fine.hi = 64 original px = 16 coarse px; a 10 px coarse box is small, a 40 px one is not
    boxes = np.array([[32, 32, 42, 42], [100, 100, 140, 140]], np.float32)
    fmap = detections_focus_map(boxes, np.array([0.2, 0.9], np.float32), coarse, fine, 16)
    assert fmap[2, 2] == np.float32(0.2) and fmap.max() == np.float32(0.2)


@pytest.mark.parametrize("placement", ["free", "tiling"])
def test_threshold_zero_is_the_pyramid_and_above_one_is_nothing(placement: Placement) -> None:
    p, (fine, coarse) = levels_of(2000, 1300, LevelSpec(scale=1.0), LevelSpec(scale=0.3))
    coarse_chips = p.chips[p.chips[:, 0] == 1]
    maps = np.random.default_rng(0).random((coarse_chips.shape[0], 16, 16)).astype(np.float32)
    fmap = level_focus_map(maps, coarse_chips[:, 1:], coarse, C, 16)
    every = focus_step(fmap, coarse, fine, C, FocusConfig(threshold=0.0, placement=placement))
    assert every.chips.tolist() == sorted(p.chips[p.chips[:, 0] == 0].tolist(), key=lambda c: (c[2], c[1]))
    assert every.area == 1.0
    assert focus_step(fmap, coarse, fine, C, FocusConfig(threshold=1.01, placement=placement)).chips.shape == (0, 3)


@st.composite
def scene(draw: st.DrawFn) -> tuple[int, int, float, np.ndarray]:
    w, h = draw(st.integers(200, 3000)), draw(st.integers(200, 3000))
    ratio = draw(st.sampled_from([1.5, 2.0, 2.5, 4.0]))
    gh, gw = -(-int(round(h / ratio)) // 16), -(-int(round(w / ratio)) // 16)
    fmap = draw(st.integers(0, 2**31 - 1).map(lambda s: np.random.default_rng(s).random((gh, gw)) ** 4))
    return w, h, ratio, fmap.astype(np.float32)


def _holds(chips: set[tuple[int, ...]], box: tuple[int, int, int, int], level_wh: tuple[int, int], margin: int) -> bool:
    """Some chip holds ``box`` whole, at least ``margin`` px from each of its edges inside the level image."""
    bx, by, bw, bh = box
    w, h = level_wh
    for _, x0, y0 in chips:
        left = bx - x0 >= (margin if x0 > 0 else 0)
        top = by - y0 >= (margin if y0 > 0 else 0)
        right = x0 + C - (bx + bw) >= (margin if x0 + C < w else 0)
        bottom = y0 + C - (by + bh) >= (margin if y0 + C < h else 0)
        if left and top and right and bottom:
            return True
    return False


@settings(max_examples=60, deadline=None)
@given(
    scene(), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(0, 2), st.sampled_from(["free", "tiling"]), st.data()
)
def test_focus_chips_properties(
    sc: tuple[int, int, float, np.ndarray],
    t1: float,
    t2: float,
    dilate: int,
    placement: Placement,
    data: st.DataObject,
) -> None:
    w, h, ratio, fmap = sc
    p, (fine, coarse) = levels_of(w, h, LevelSpec(scale=1.0), LevelSpec(scale=1.0 / ratio))
    fmap = fmap[: -(-coarse.height // 16), : -(-coarse.width // 16)]
    lo, hi = sorted((t1, t2))
    a = focus_step(fmap, coarse, fine, C, FocusConfig(threshold=lo, dilate=dilate, placement=placement))
    chips_a = {tuple(c) for c in a.chips.tolist()}
    assert all(0 <= x0 <= max(fine.width - C, 0) and 0 <= y0 <= max(fine.height - C, 0) for _, x0, y0 in chips_a)
    if placement == "tiling":  # FocusChips are chips the pyramid runs too
        assert chips_a <= {tuple(c) for c in p.chips[p.chips[:, 0] == 0].tolist()}
    # Without the minimum-size growth (which re-centres a region) a lower threshold never covers less: every
    # pixel of a higher threshold's regions lies in a chip of the lower one. (Not the same chips: a merged,
    # larger region can take shifted positions.)
    a0 = focus_step(fmap, coarse, fine, C, FocusConfig(threshold=lo, dilate=dilate, min_size=0, placement=placement))
    b0 = focus_step(fmap, coarse, fine, C, FocusConfig(threshold=hi, dilate=dilate, min_size=0, placement=placement))
    covered = np.zeros((fine.height, fine.width), bool)
    for _, x0, y0 in a0.chips.tolist():
        covered[y0 : y0 + C, x0 : x0 + C] = True
    assert all(covered[y1:y2, x1:x2].all() for x1, y1, x2, y2 in b0.regions.tolist())
    assert 0.0 <= b0.area <= a0.area <= 1.0
    # merged regions do not overlap
    r = a.regions
    for i in range(len(r)):
        for j in range(i + 1, len(r)):
            assert not (r[i, 0] < r[j, 2] and r[j, 0] < r[i, 2] and r[i, 1] < r[j, 3] and r[j, 1] < r[i, 3])
    if not len(r):
        return
    k = data.draw(st.integers(0, len(r) - 1))
    x1, y1, x2, y2 = r[k].tolist()
    # any object inside a region that fits the level's overlap lies whole in a chip; placed freely, also clear of
    # the chip's inner edges by the pad (so the inner-edge filter keeps it)
    margin = 0 if placement == "tiling" else min(FocusConfig().pad, MIN_CONTEXT)
    top = fine.overlap if placement == "tiling" else fine.overlap - 2 * margin
    bw = data.draw(st.integers(1, max(1, min(top, x2 - x1))))
    bh = data.draw(st.integers(1, max(1, min(top, y2 - y1))))
    bx = data.draw(st.integers(x1, max(x1, x2 - bw)))
    by = data.draw(st.integers(y1, max(y1, y2 - bh)))
    assert _holds(chips_a, (bx, by, bw, bh), (fine.width, fine.height), margin)


@settings(max_examples=40, deadline=None)
@given(st.integers(100, 4000), st.integers(100, 4000), st.integers(0, 2**31 - 1))
def test_snap_covers_every_region(w: int, h: int, seed: int) -> None:
    _, (lv,) = levels_of(w, h, LevelSpec(scale=1.0))
    rng = np.random.default_rng(seed)
    x1, y1 = rng.integers(0, w), rng.integers(0, h)
    region = np.array([[x1, y1, rng.integers(x1 + 1, w + 1), rng.integers(y1 + 1, h + 1)]])
    chips = snap_to_chips(region, lv, C)
    covered = np.zeros((h, w), bool)
    for _, x0, y0 in chips.tolist():
        covered[y0 : y0 + C, x0 : x0 + C] = True
    rx1, ry1, rx2, ry2 = region[0].tolist()
    assert covered[ry1:ry2, rx1:rx2].all()
