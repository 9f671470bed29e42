"""AutoFocus FocusPixel labels (numpy only) and the settings of the focus-head training stage.

:func:`focus_labels` labels one training chip at the chip's own level; ``models.focus_train`` trains the head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.plan import Level


class FocusLabelConfig(BaseModel):
    """FocusPixel labels (AutoFocus, sec. 3): positive cells overlap objects that are small enough for a finer level.

    AutoFocus marks a cell positive when it overlaps an object of 5..64 px at the chip's resolution, ignores
    64..90 px (and below 5 px), negative otherwise. Here "small" is exactly "inside the next finer level's valid
    range or below it" (the planner's ranges: the sweet spot (8, 64) chip px divided by that level's scale), so the
    upper bound is the finer level's ``hi`` in original px; the ignore band goes ``ignore_factor`` above it (90/64
    as in the paper), and objects under ``min_px`` at this level are ignored (too small to be seen here at all).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    stride: int = Field(default=16, ge=1, description="Focus map stride, chip px (the focus head's).")
    min_px: float = Field(
        default=2.0, ge=0, description="Objects smaller than this (sqrt area, this level's px) are ignored."
    )
    ignore_factor: float = Field(
        default=1.4, ge=1.0, description="Objects up to this factor above the positive bound are ignored."
    )
    small: Literal["finer_range", "below_own"] = Field(
        default="finer_range",
        description="'finer_range': positive up to the finer level's valid hi (every object the finer level "
        "may detect); 'below_own': positive up to small_factor x this level's own valid lo (only objects this "
        "level sees too small to be sure of -- the ones the finer level is needed for).",
    )
    small_factor: float = Field(default=1.5, gt=0, description="'below_own': the bound as a multiple of lo.")


def focus_labels(
    levels: Sequence[Level],
    index: int,
    x0: int,
    y0: int,
    boxes: np.ndarray,
    chip: int,
    cfg: FocusLabelConfig,
    classes: np.ndarray | None = None,
) -> np.ndarray:
    """FocusPixel labels ``int8 [chip / stride, chip / stride]`` of the chip at ``(x0, y0)`` (level px) of
    ``levels[index]``: 1 positive, 0 negative, -1 ignore (also the chip's padding beyond the level image).

    ``levels`` finest first (``levels_for``); ``boxes`` ``float32 [N, 4]`` xyxy original px; ``classes`` ``[N]``
    (optional; class -1 marks an ignore region of the dataset: its cells are ignored). The finest level has no
    finer level: every cell is ignored there.
    """
    n = chip // cfg.stride
    out = np.zeros((n, n), np.int8)
    lv = levels[index]
    if index == 0:
        out[:] = -1
        return out
    hi = levels[index - 1].hi if cfg.small == "finer_range" else min(cfg.small_factor * lv.lo, levels[index - 1].hi)
    # padding: cells whose top-left corner lies beyond the level image carry no pixels
    cw, ch = lv.width - x0, lv.height - y0
    cells = np.arange(n) * cfg.stride
    out[:, cells >= cw] = -1
    out[cells >= ch, :] = -1
    if boxes.shape[0] == 0:
        return out
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    here = np.sqrt(np.maximum(area, 0)) * lv.scale
    small = area <= hi * hi
    real = np.ones(boxes.shape[0], bool) if classes is None else np.asarray(classes) >= 0
    positive = small & (here >= cfg.min_px) & real
    ignore = ~positive & ((area <= (cfg.ignore_factor * hi) ** 2) | ~real)
    b = boxes * lv.scale - np.array([x0, y0, x0, y0], np.float32)  # chip px
    for paint, value in ((ignore, -1), (positive, 1)):  # positives win shared cells
        for x1, y1, x2, y2 in b[paint].tolist():
            ca, cb = max(int(math.floor(x1 / cfg.stride)), 0), min(int(math.ceil(x2 / cfg.stride)), n)
            ra, rb = max(int(math.floor(y1 / cfg.stride)), 0), min(int(math.ceil(y2 / cfg.stride)), n)
            if ca < cb and ra < rb:
                out[ra:rb, ca:cb] = value
    return out


class FocusStageConfig(BaseModel):
    """The focus-head stage: which chips, which labels, how often to measure the head on held-out chips."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    labels: FocusLabelConfig = Field(default_factory=FocusLabelConfig, description="FocusPixel labels.")
    chips_per_image: int = Field(
        default=12, ge=1, description="At most this many chips of the coarse levels per image (seeded sample)."
    )
    holdout: float = Field(default=0.1, ge=0, lt=1, description="Fraction of images held out to measure the head.")
    eval_every: int = Field(default=200, ge=1, description="Steps between held-out measurements (in log.jsonl).")
