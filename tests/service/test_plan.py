"""Planner: tiling, levels, valid ranges; Hypothesis properties from STYLE.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from service.plan import (
    LevelSpec,
    PlanConfig,
    PlanError,
    levels_for_object_range,
    plan,
    resolve_levels,
    tile_positions,
    valid_mask,
)

SWEET = (16.0, 96.0)


def cfg(*levels: LevelSpec, chip: int = 256, **kw: float) -> PlanConfig:
    return PlanConfig(chip_size=chip, levels=levels, sweet_spot=SWEET, **kw)


@given(st.integers(1, 5000), st.integers(32, 512), st.data())
def test_tile_positions_cover_with_overlap(length: int, chip: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(0, chip - 1))
    pos = tile_positions(length, chip, overlap)
    assert pos[0] == 0
    if length <= chip:
        assert pos.tolist() == [0]
        return
    assert pos[-1] == length - chip  # last chip shifted inward, full
    gaps = np.diff(pos)
    assert (gaps > 0).all() and (gaps <= chip - overlap).all()


level_strategy = st.one_of(
    st.builds(LevelSpec, scale=st.floats(0.05, 3.0)),
    st.builds(LevelSpec, short_side=st.integers(64, 2000), long_side=st.one_of(st.none(), st.integers(64, 3000))),
    st.builds(LevelSpec, long_side=st.integers(64, 3000)),
)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000), st.lists(level_strategy, min_size=1, max_size=3))
def test_chips_inside_and_cover_every_pixel(w: int, h: int, levels: list[LevelSpec]) -> None:
    c = 256
    try:
        p = plan((w, h), cfg(*levels, chip=c, max_chips=100000))
    except PlanError:
        return
    for lv in p.levels:
        chips = p.chips[p.chips[:, 0] == lv.index]
        x0, y0 = chips[:, 1], chips[:, 2]
        assert (x0 >= 0).all() and (y0 >= 0).all()
        # a chip is either full inside the level, or the level is narrower than a chip (padded at 0)
        assert ((x0 + c <= lv.width) | ((x0 == 0) & (lv.width < c))).all()
        assert ((y0 + c <= lv.height) | ((y0 == 0) & (lv.height < c))).all()
        cover = np.zeros((lv.height, lv.width), bool)
        for _, x, y in chips:
            cover[y : y + c, x : x + c] = True
        assert cover.all()


@settings(max_examples=150, deadline=None)
@given(st.integers(300, 3000), st.integers(300, 3000), st.floats(0.2, 2.5), st.data())
def test_every_valid_box_whole_in_some_chip(w: int, h: int, scale: float, data: st.DataObject) -> None:
    """Objects up to the level's upper valid size, within the overlap's cap (half a chip), lie whole, off inner
    edges, in some chip. (At scale 2.5 the valid 60 px are 150 level px, over the 128 px cap: Hypothesis found a
    136 px box in no chip, which the plan does not promise.)"""
    p = plan((w, h), cfg(LevelSpec(scale=scale, valid=(-1, 60)), chip=256, max_chips=100000))
    (lv,) = p.levels
    c, m = 256, p.edge_margin
    size = data.draw(st.floats(1, min(lv.hi * lv.scale, 0.5 * c)))  # side in level px: the valid bound, the cap
    assume(size < min(lv.width, lv.height))
    x = data.draw(st.floats(0, lv.width - size))
    y = data.draw(st.floats(0, lv.height - size))
    x0, y0 = p.chips[:, 1], p.chips[:, 2]

    def clear(lo: np.ndarray, b0: float, b1: float, length: int) -> np.ndarray:
        inner_lo = lo > 0
        inner_hi = lo + c < length
        return (b0 >= lo) & (b1 <= lo + c) & (~inner_lo | (b0 - lo > m)) & (~inner_hi | (lo + c - b1 > m))

    ok = clear(x0, x, x + size, lv.width) & clear(y0, y, y + size, lv.height)
    assert ok.any()


def test_single_chip_level_is_padded_not_stretched() -> None:
    p = plan((1000, 500), cfg(LevelSpec(long_side=256), chip=256))
    (lv,) = p.levels
    assert (lv.width, lv.height) == (256, 128)
    assert p.chips.tolist() == [[0, 0, 0]]


def test_levels_sorted_finest_first_and_ranges_derived() -> None:
    levels = resolve_levels(
        (2000, 1000), [LevelSpec(long_side=512), LevelSpec(scale=2.0), LevelSpec(scale=0.8)], 256, SWEET
    )
    assert [lv.scale for lv in levels] == [2.0, 0.8, 512 / 2000]
    assert levels[0].lo == -1 and levels[0].hi == pytest.approx(96 / 2.0)  # finest: open below
    assert levels[1].lo == pytest.approx(16 / 0.8) and levels[1].hi == pytest.approx(96 / 0.8)
    assert math.isinf(levels[2].hi)  # coarsest: open above
    explicit = resolve_levels((2000, 1000), [LevelSpec(scale=1.0, valid=(10, None))], 256, SWEET)
    assert explicit[0].lo == 10 and math.isinf(explicit[0].hi)


def test_short_long_side_rule() -> None:
    spec = LevelSpec(short_side=800, long_side=1280)
    assert spec.scale_for(1000, 500) == pytest.approx(1280 / 1000)  # long side binds
    assert spec.scale_for(1000, 900) == pytest.approx(800 / 900)


def test_level_spec_validation() -> None:
    with pytest.raises(ValueError, match="needs"):
        LevelSpec()
    with pytest.raises(ValueError, match="either"):
        LevelSpec(scale=1.0, long_side=100)
    with pytest.raises(ValueError, match="exceed"):
        LevelSpec(scale=1.0, valid=(50, 40))


def test_too_many_chips_refused() -> None:
    with pytest.raises(PlanError, match="limit of 10"):
        plan((5000, 5000), cfg(LevelSpec(scale=1.0), max_chips=10))


@given(st.floats(2, 50), st.floats(1.5, 200))
def test_object_range_levels_cover_the_range(min_size: float, ratio: float) -> None:
    max_size = min_size * ratio
    specs = levels_for_object_range(min_size, max_size, SWEET)
    ranges = sorted((s.valid[0], s.valid[1]) for s in specs)  # type: ignore[index,misc]
    assert ranges[0][0] == pytest.approx(min_size)
    assert ranges[-1][1] == pytest.approx(max_size)
    for (_lo1, hi1), (lo2, _) in zip(ranges, ranges[1:], strict=False):
        assert lo2 <= hi1  # contiguous, overlapping bands


def test_valid_mask_boundaries() -> None:
    # sqrt areas: 10 (exactly lo), 10.5, 20 (exactly hi), 21
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10.5, 10.5], [0, 0, 20, 20], [0, 0, 21, 21]], np.float32)
    assert valid_mask(boxes, 10, 20).tolist() == [False, True, True, False]
    assert valid_mask(boxes, -1, math.inf).all()


@given(
    st.lists(st.tuples(st.floats(1, 100), st.floats(1, 100)), min_size=1, max_size=30),
    st.floats(-1, 50),
    st.floats(51, 200),
    st.floats(0, 20),
    st.floats(0, 100),
)
def test_wider_range_never_keeps_fewer(whs, lo, hi, grow_lo, grow_hi) -> None:
    boxes = np.array([[0, 0, w, h] for w, h in whs], np.float32)
    narrow = valid_mask(boxes, lo, hi)
    wide = valid_mask(boxes, lo - grow_lo if lo - grow_lo >= 0 else -1, hi + grow_hi)
    assert (wide | ~narrow).all()
