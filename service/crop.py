"""Crop: resize once per level, then write chips straight into the engine's batch buffer.

A chip is normalised while it is copied (``(pixel / 255 - mean) / std``, channel order per the card),
so there is no per-chip temporary beyond the one resized image per level. Where a chip extends past
its level image (a level smaller than one chip, or the padded border), the buffer holds the
normalised value of a black pixel (0), the same padding the training sampler uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from service.modelcard import ModelCard
from service.plan import ChipPlan, Level


@dataclass(frozen=True)
class Normalizer:
    """Per-channel affine map from uint8 pixels to model input: ``x * scale + bias``."""

    scale: np.ndarray  # float32 [3, 1, 1]
    bias: np.ndarray  # float32 [3, 1, 1]
    bgr: bool

    @classmethod
    def from_card(cls, card: ModelCard) -> Normalizer:
        # mean/std are given in the model's channel order, applied after any RGB -> BGR flip.
        std = np.asarray(card.std, np.float32)
        mean = np.asarray(card.mean, np.float32)
        scale = (1.0 / (255.0 * std)).reshape(3, 1, 1).astype(np.float32)
        bias = (-mean / std).reshape(3, 1, 1).astype(np.float32)
        return cls(scale=scale, bias=bias, bgr=card.channel_order == "BGR")

    @property
    def pad_value(self) -> np.ndarray:
        """Normalised value of a black pixel, ``float32 [3, 1, 1]``."""
        return self.bias


def resize_level(image: np.ndarray, level: Level) -> np.ndarray:
    """``image`` (``uint8 [H, W, 3]``) at ``level``'s size: the image itself where the size is unchanged.

    INTER_AREA anti-aliases when shrinking, INTER_LINEAR enlarges. SNIPER training resizes with this
    same function, so the model sees the same pixels in training and in service.
    """
    if (level.width, level.height) == (image.shape[1], image.shape[0]):
        return image
    interp = cv2.INTER_AREA if level.scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (level.width, level.height), interpolation=interp)


def resize_levels(image: np.ndarray, plan: ChipPlan) -> list[np.ndarray]:
    """One resized copy per level of ``plan``."""
    return [resize_level(image, lv) for lv in plan.levels]


def write_chip(dst: np.ndarray, level_image: np.ndarray, x0: int, y0: int, norm: Normalizer) -> None:
    """Write the chip at ``(x0, y0)`` of ``level_image`` (``uint8 [h, w, 3]`` RGB) into ``dst``
    (``float32 [3, C, C]``, a slice of the batch buffer), normalised, padding past the image."""
    c = dst.shape[-1]
    region = level_image[y0 : y0 + c, x0 : x0 + c]  # view, [h', w', 3]
    h, w = region.shape[:2]
    chw = region.transpose(2, 0, 1)  # view, [3, h', w']
    if norm.bgr:
        chw = chw[::-1]
    inner = dst[:, :h, :w]
    np.multiply(chw, norm.scale, out=inner, casting="unsafe")
    inner += norm.bias
    if h < c or w < c:
        dst[:, h:, :] = norm.pad_value
        dst[:, :h, w:] = norm.pad_value


def crop_plan(
    level_images: list[np.ndarray], plan: ChipPlan, norm: Normalizer, out: np.ndarray | None = None
) -> np.ndarray:
    """All chips of ``plan`` as ``float32 [K, 3, C, C]`` (into ``out`` when given)."""
    k, c = plan.num_chips, plan.chip_size
    if out is None:
        out = np.empty((k, 3, c, c), np.float32)
    for i, (level, x0, y0) in enumerate(plan.chips.tolist()):
        write_chip(out[i], level_images[level], x0, y0, norm)
    return out
