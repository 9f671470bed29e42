"""Crop: resize once per level, then write chips straight into the engine's batch buffer.

Two buffer layouts, chosen by the engine (``engine.input_layout``):

- ``float32_nchw``: the model's own input. A chip is normalised while it is copied
  (``(pixel / 255 - mean) / std``, channel order per the card).
- ``uint8_nhwc``: raw pixels; the engine's graph normalises (ONNX Runtime with
  ``fuse_preprocess``, see :mod:`service.engines.fusion`). Copying bytes moves a quarter of the data and leaves
  the arithmetic to the engine's own thread pool.

Either way there is no per-chip temporary beyond the one resized image per level. Where a chip extends
past its level image (a level smaller than one chip, or the padded border), the chip holds a black
pixel (0), normalised in the float layout: the same padding the training sampler uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from service.modelcard import ModelCard
from service.plan import ChipPlan, Level

ChipLayout = Literal["float32_nchw", "uint8_nhwc"]


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


def write_chip_u8(dst: np.ndarray, level_image: np.ndarray, x0: int, y0: int) -> None:
    """Copy the chip at ``(x0, y0)`` of ``level_image`` (``uint8 [h, w, 3]``) into ``dst``
    (``uint8 [C, C, 3]``), zero (black) past the image."""
    c = dst.shape[0]
    region = level_image[y0 : y0 + c, x0 : x0 + c]
    h, w = region.shape[:2]
    dst[:h, :w] = region
    if h < c or w < c:
        dst[h:] = 0
        dst[:h, w:] = 0


def chip_buffer(layout: ChipLayout, n: int, chip_size: int) -> np.ndarray:
    """An empty batch buffer of ``n`` chips in ``layout``."""
    if layout == "uint8_nhwc":
        return np.empty((n, chip_size, chip_size, 3), np.uint8)
    return np.empty((n, 3, chip_size, chip_size), np.float32)


def write_chip_as(
    layout: ChipLayout, dst: np.ndarray, level_image: np.ndarray, x0: int, y0: int, norm: Normalizer
) -> None:
    """Write one chip into ``dst`` (one row of a :func:`chip_buffer`) in ``layout``."""
    if layout == "uint8_nhwc":
        write_chip_u8(dst, level_image, x0, y0)
    else:
        write_chip(dst, level_image, x0, y0, norm)


def crop_plan(
    level_images: list[np.ndarray],
    plan: ChipPlan,
    norm: Normalizer,
    out: np.ndarray | None = None,
    layout: ChipLayout = "float32_nchw",
) -> np.ndarray:
    """All chips of ``plan`` as a ``layout`` batch (``float32 [K, 3, C, C]`` by default), into ``out`` when given."""
    if out is None:
        out = chip_buffer(layout, plan.num_chips, plan.chip_size)
    crop_chips(level_images, plan.chips, norm, out, layout)
    return out


def crop_chips(
    level_images: list[np.ndarray], chips: np.ndarray, norm: Normalizer, out: np.ndarray, layout: ChipLayout
) -> None:
    """Write ``chips`` (``int [n, 3]`` level, x0, y0) of ``level_images`` into rows ``0..n-1`` of ``out``."""
    for i, (level, x0, y0) in enumerate(chips.tolist()):
        write_chip_as(layout, out[i], level_images[level], x0, y0, norm)
