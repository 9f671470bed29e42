"""Plan: which pyramid levels to run and where to cut their chips.

Pure data, no I/O: ``plan(image_size, config) -> ChipPlan``. The same code decides levels, valid
ranges and tiling for the service and for SNIPER training (``models/``), so training and inference
share one definition.

Conventions (DESIGN.md):
- A level has a scale factor ``s`` (level pixels = original pixels * s) and a valid range
  ``(lo, hi)`` on ``sqrt(w*h)`` in **original** pixels, tested as ``lo**2 < w*h <= hi**2``;
  ``lo = -1`` and ``hi = inf`` mean open.
- Chips are ``C x C`` in level pixels. A level that fits one chip is padded, not stretched. Tiled
  levels overlap by at least the level's upper valid size in level pixels (capped at ``max_overlap_fraction x C``,
  half a chip by default) plus twice the edge margin, so every valid object up to that cap lies whole, away from
  inner edges, in some chip; a larger one (a level whose upper valid size exceeds half a chip) may not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

INF = math.inf
MAX_SIDE = 1 << 20  # level sides in pixels; real limits come from max_chips, checked arithmetically in plan()


class LevelSpec(BaseModel):
    """How to size one pyramid level; exactly one sizing rule (scale, or short/long side)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    scale: float | None = Field(default=None, gt=0, le=8, description="Fixed scale factor (level px / original px).")
    short_side: int | None = Field(
        default=None, ge=8, le=MAX_SIDE, description="Resize so the short side is this many pixels."
    )
    long_side: int | None = Field(
        default=None,
        ge=8,
        le=MAX_SIDE,
        description="Upper bound on the long side (alone: resize the long side to this).",
    )
    valid: tuple[float, float | None] | None = Field(
        default=None,
        description="Valid range (lo, hi) on sqrt(w*h) in original pixels; -1 / null mean open. "
        "Omitted: derived from the model's sweet spot divided by the level's scale.",
    )
    overlap: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Tile overlap as a fraction of the chip size (SAHI-style). Omitted: the level's upper "
        "valid size in level pixels, which guarantees every valid object lies whole in some chip.",
    )

    @model_validator(mode="after")
    def _one_sizing_rule(self) -> LevelSpec:
        if self.scale is None and self.short_side is None and self.long_side is None:
            raise ValueError("a level needs 'scale', 'short_side' or 'long_side'")
        if self.scale is not None and (self.short_side is not None or self.long_side is not None):
            raise ValueError("give either 'scale' or 'short_side'/'long_side', not both")
        if self.valid is not None:
            lo, hi = self.valid
            if hi is not None and hi <= max(lo, 0):
                raise ValueError(f"valid range upper bound {hi} must exceed lower bound {lo}")
        return self

    def scale_for(self, width: int, height: int) -> float:
        """Scale factor for an image of ``width x height`` original pixels."""
        if self.scale is not None:
            return self.scale
        short, long_ = min(width, height), max(width, height)
        s = self.short_side / short if self.short_side is not None else INF
        if self.long_side is not None:
            s = min(s, self.long_side / long_)
        return s


class PlanConfig(BaseModel):
    """Everything the planner needs; per-request options resolve into one of these."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chip_size: int = Field(default=512, ge=32, description="Chip side C in pixels (the model's input size).")
    levels: tuple[LevelSpec, ...] = Field(min_length=1, description="Pyramid levels, any order.")
    sweet_spot: tuple[float, float] = Field(
        default=(16.0, 128.0), description="Object sizes (sqrt area, chip pixels) the model detects well."
    )
    edge_margin: float = Field(
        default=2.0, ge=0, description="Boxes this close (level px) to an inner chip edge are dropped."
    )
    max_overlap_fraction: float = Field(
        default=0.5, gt=0, lt=1, description="Cap on derived overlap, as a fraction of C."
    )
    max_chips: int = Field(default=4096, ge=1, description="Refuse plans with more chips than this.")


@dataclass(frozen=True)
class Level:
    """One resolved pyramid level for a given image."""

    index: int
    scale: float  # level px per original px
    width: int  # level image size in level pixels
    height: int
    lo: float  # valid range on sqrt(w*h), original pixels; -1 = open
    hi: float  # inf = open
    overlap: int  # tile overlap in level pixels


@dataclass(frozen=True)
class ChipPlan:
    """Levels and chips for one image.

    ``chips`` is ``int32 [K, 3]``: (level index, x0, y0) of each chip's top-left corner in level pixels.
    A chip covers ``[x0, x0 + C) x [y0, y0 + C)``; where that exceeds the level image it is padding.
    """

    image_size: tuple[int, int]  # (width, height), original pixels
    chip_size: int
    levels: tuple[Level, ...]
    chips: np.ndarray
    edge_margin: float

    @property
    def num_chips(self) -> int:
        return int(self.chips.shape[0])

    @property
    def pixels(self) -> int:
        """Pixels the engine processes for this plan (chips x C^2)."""
        return self.num_chips * self.chip_size * self.chip_size


class PlanError(ValueError):
    """A plan cannot be made (bad levels, too many chips); maps to HTTP 422."""


def derived_valid_range(scale: float, sweet_spot: tuple[float, float]) -> tuple[float, float]:
    """Valid range in original pixels: the sweet spot (chip px) divided by the level's scale."""
    return sweet_spot[0] / scale, sweet_spot[1] / scale


def resolve_levels(
    image_size: tuple[int, int],
    specs: Sequence[LevelSpec],
    chip_size: int,
    sweet_spot: tuple[float, float],
    max_overlap_fraction: float = 0.5,
    edge_margin: float = 2.0,
) -> tuple[Level, ...]:
    """Resolve level specs for one image, finest (largest scale) first.

    Levels without an explicit valid range get the sweet spot divided by their scale, with the
    finest level's lower bound and the coarsest level's upper bound opened (SNIP).
    """
    width, height = image_size
    if width < 1 or height < 1:
        raise PlanError(f"image size must be positive, got {width}x{height}")
    scaled = sorted(((spec.scale_for(width, height), spec) for spec in specs), key=lambda t: -t[0])
    levels: list[Level] = []
    n = len(scaled)
    for i, (s, spec) in enumerate(scaled):
        if not math.isfinite(s) or s <= 0:
            raise PlanError(f"level {spec.model_dump(exclude_none=True)} gives an invalid scale {s}")
        if spec.valid is not None:
            lo, hi_opt = spec.valid
            hi = INF if hi_opt is None else hi_opt
        else:
            lo, hi = derived_valid_range(s, sweet_spot)
            if i == 0:
                lo = -1.0
            if i == n - 1:
                hi = INF
        lw, lh = max(1, round(width * s)), max(1, round(height * s))
        if spec.overlap is not None:
            overlap = int(round(spec.overlap * chip_size))
        else:
            hi_level = (hi if math.isfinite(hi) else sweet_spot[1] / s) * s
            overlap = int(math.ceil(min(hi_level, max_overlap_fraction * chip_size) + 2 * edge_margin))
        overlap = min(overlap, chip_size - 1)
        levels.append(Level(index=i, scale=s, width=lw, height=lh, lo=float(lo), hi=float(hi), overlap=overlap))
    return tuple(levels)


def tile_count(length: int, chip: int, overlap: int) -> int:
    """How many chips :func:`tile_positions` places along an axis, without placing them."""
    return 1 if length <= chip else math.ceil((length - chip) / (chip - overlap)) + 1


def tile_positions(length: int, chip: int, overlap: int) -> np.ndarray:
    """Chip start offsets (int32) along one axis of ``length`` pixels.

    One chip at 0 if the axis fits (padded); otherwise evenly spaced starts from 0 to ``length - chip``
    (the last chip shifted inward so it is full) with adjacent chips overlapping by at least ``overlap``.
    """
    if length <= chip:
        return np.zeros(1, dtype=np.int32)
    n = tile_count(length, chip, overlap)
    # floor keeps every gap <= stride, so every overlap >= ``overlap``.
    return np.floor(np.linspace(0, length - chip, n)).astype(np.int32)


def plan(image_size: tuple[int, int], config: PlanConfig) -> ChipPlan:
    """Levels and chips for an image of ``image_size = (width, height)`` original pixels."""
    levels = resolve_levels(
        image_size,
        config.levels,
        config.chip_size,
        config.sweet_spot,
        config.max_overlap_fraction,
        config.edge_margin,
    )
    c = config.chip_size
    # Counted before anything is allocated: a hostile level (a huge long_side) costs arithmetic, not memory.
    count = sum(tile_count(lv.width, c, lv.overlap) * tile_count(lv.height, c, lv.overlap) for lv in levels)
    if count > config.max_chips:
        raise PlanError(
            f"plan needs {count} chips, more than the limit of {config.max_chips}; use fewer or coarser levels"
        )
    parts = []
    for lv in levels:
        xs = tile_positions(lv.width, c, lv.overlap)
        ys = tile_positions(lv.height, c, lv.overlap)
        gx, gy = np.meshgrid(xs, ys)  # [ny, nx]
        k = gx.size
        parts.append(np.stack([np.full(k, lv.index, np.int32), gx.ravel(), gy.ravel()], axis=1))
    chips = np.concatenate(parts).astype(np.int32)
    return ChipPlan(image_size=image_size, chip_size=c, levels=levels, chips=chips, edge_margin=config.edge_margin)


def levels_for_object_range(
    min_size: float,
    max_size: float,
    sweet_spot: tuple[float, float],
    max_scale: float = 4.0,
    min_scale: float = 1.0 / 64,
) -> tuple[LevelSpec, ...]:
    """Levels (with valid ranges) that cover objects of ``min_size..max_size`` original pixels.

    The finest level maps ``min_size`` to the bottom of the sweet spot; each coarser level shifts the
    covered band by the sweet spot's ratio, with adjacent bands overlapping by a factor of 1.25.
    Valid ranges are the covered bands, clipped to the requested range.
    """
    if not (0 < min_size < max_size):
        raise PlanError(f"need 0 < min_object_size < max_object_size, got {min_size} and {max_size}")
    lo_c, hi_c = sweet_spot
    step = max(hi_c / lo_c / 1.25, 1.25)
    specs: list[LevelSpec] = []
    s = min(max_scale, lo_c / min_size)
    while True:
        s = max(s, min_scale)
        band_lo, band_hi = lo_c / s, hi_c / s
        last = band_hi >= max_size or s <= min_scale
        lo = min_size if not specs else max(band_lo, min_size)
        # The coarsest level keeps everything up to max_size (SNIP opens the coarsest level's top).
        specs.append(LevelSpec(scale=round(s, 6), valid=(lo, max_size if last else band_hi)))
        if last:
            return tuple(specs)
        s /= step


def valid_mask(boxes: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``bool [N]``: ``lo**2 < w*h <= hi**2`` for ``boxes`` ``float32 [N, 4]`` xyxy in original pixels."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    lo2 = -INF if lo < 0 else lo * lo
    return np.asarray((area > lo2) & (area <= hi * hi))
