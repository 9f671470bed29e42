"""FocusPixel labels: positive / ignore / negative by the object's size at the next finer level."""

from __future__ import annotations

import numpy as np

from models.focus_labels import FocusLabelConfig, focus_labels
from service.plan import LevelSpec, resolve_levels

CHIP = 256
# 1024x1024 image: levels 1.0 (finest, hi = 64 px), 0.25 (hi = 256, coarsest open); sweet spot (8, 64) chip px
LEVELS = resolve_levels((1024, 1024), (LevelSpec(scale=1.0), LevelSpec(scale=0.25)), CHIP, (8.0, 64.0))


def box(cx: float, cy: float, size: float) -> list[float]:
    return [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]


def test_sizes_decide_the_label() -> None:
    cfg = FocusLabelConfig()
    assert LEVELS[0].hi == 64.0
    # coarse level 0.25: cell (row, col) covers original px [64 col, 64 col + 64)
    boxes = np.array(
        [
            box(96, 96, 40),  # small at the finer level (40 <= 64): positive; 10 px here >= min_px
            box(480, 96, 80),  # 64 < 80 <= 1.4 * 64 = 89.6: ignore band
            box(96, 480, 200),  # large: a job for this level, negative
            box(800, 800, 4),  # 1 px here < min_px 2: ignore (too small to see at this level)
        ],
        np.float32,
    )
    lab = focus_labels(LEVELS, 1, 0, 0, boxes, CHIP, cfg)
    assert lab.shape == (16, 16)
    assert (lab[1, 1] == 1) and (lab[1, 7] == -1) and (lab[7, 1] == 0) and (lab[12, 12] == -1)
    assert (lab[0:4, 9:16] == 0).all()  # no object: negative
    # padding beyond the level image (256 x 256 -> exactly one chip): a chip at (128, 0) has 8 padded columns
    lab2 = focus_labels(LEVELS, 1, 128, 0, boxes, CHIP, cfg)
    assert (lab2[:, 8:] == -1).all()


def test_ignore_regions_and_positives_win_shared_cells() -> None:
    cfg = FocusLabelConfig()
    boxes = np.array([box(96, 96, 40), box(100, 100, 30), box(600, 600, 30)], np.float32)
    classes = np.array([0, -1, -1], np.int32)  # class -1: a dataset ignore region
    lab = focus_labels(LEVELS, 1, 0, 0, boxes, CHIP, cfg, classes)
    assert lab[1, 1] == 1  # the positive paints over the ignore region it shares cells with
    assert lab[9, 9] == -1


def test_finest_level_is_all_ignored() -> None:
    boxes = np.array([box(96, 96, 40)], np.float32)
    assert (focus_labels(LEVELS, 0, 0, 0, boxes, CHIP, FocusLabelConfig()) == -1).all()


def test_below_own_marks_only_what_this_level_sees_too_small() -> None:
    # coarse level 0.25: valid lo = 8 / 0.25 = 32 px original; with small_factor 1.5 positives go up to 48 px
    cfg = FocusLabelConfig(small="below_own", small_factor=1.5)
    assert LEVELS[1].lo == 32.0
    boxes = np.array(
        [
            box(96, 96, 40),  # 40 <= 48: positive (as with finer_range)
            box(480, 96, 60),  # 48 < 60 <= 1.4 * 48: ignore band (positive under finer_range: 60 <= 64)
            box(96, 480, 70),  # > 67.2: negative -- this level detects it (positive's neighbour band under finer_range)
        ],
        np.float32,
    )
    lab = focus_labels(LEVELS, 1, 0, 0, boxes, CHIP, cfg)
    assert (lab[1, 1] == 1) and (lab[1, 7] == -1) and (lab[7, 1] == 0)
    wide = focus_labels(LEVELS, 1, 0, 0, boxes, CHIP, FocusLabelConfig())
    assert (wide[1, 1] == 1) and (wide[1, 7] == 1) and (wide[7, 1] == -1)
