"""Shared fixture factories."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import pytest

COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}  # the fake engine's classes: red, green, blue


def blob_image(
    width: int, height: int, boxes: list[tuple[int, int, int, int, int]], background: int = 128
) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB grey image with filled rectangles ``(x1, y1, x2, y2, class)``."""
    img = np.full((height, width, 3), background, np.uint8)
    for x1, y1, x2, y2, cls in boxes:
        img[y1:y2, x1:x2] = COLOURS[cls]
    return img


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert ok
    return bytes(buf)


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """``create_app`` / ``instrument`` configure the root logger; put it back as the harness had it."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.getLogger("uvicorn.access").disabled = False


@pytest.fixture
def make_blob_image() -> Callable[..., np.ndarray]:
    return blob_image


@pytest.fixture
def random_blobs() -> Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Factory: a ``width x height`` image with ``n`` non-overlapping blobs -> (image, boxes [n,4], classes [n])."""

    def make(width: int, height: int, n: int, seed: int, min_size: int = 6, max_size: int = 40):
        rng = np.random.default_rng(seed)
        boxes: list[tuple[int, int, int, int, int]] = []
        occupied = np.zeros((height, width), bool)
        tries = 0
        while len(boxes) < n and tries < 10000:
            tries += 1
            w, h = (int(v) for v in rng.integers(min_size, max_size + 1, 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            if occupied[max(0, y - 3) : y + h + 3, max(0, x - 3) : x + w + 3].any():
                continue
            occupied[y : y + h, x : x + w] = True
            boxes.append((x, y, x + w, y + h, int(rng.integers(0, 3))))
        arr = np.array(boxes, np.float32).reshape(-1, 5)
        return blob_image(width, height, boxes), arr[:, :4], arr[:, 4].astype(np.int32)

    return make
