"""Out-of-distribution images: noise, flat colour, gradients, stripes — scenes with nothing to detect.

Used twice, with different seeds: as all-background training chips (``ood_chips`` in the training
config), so the detector learns that texture without object structure is background; and by
``benchmarks/calibration.py``, which counts detections on full-size images of each kind.
"""

from __future__ import annotations

import cv2
import numpy as np

KINDS = (
    "uniform_noise",
    "gaussian_noise",
    "colour_noise",
    "smooth_noise",
    "salt_pepper",
    "flat",
    "linear_gradient",
    "radial_gradient",
    "stripes",
    "checkerboard",
)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def ood_image(kind: str, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """One ``uint8 [height, width, 3]`` RGB image of ``kind`` (one of :data:`KINDS`)."""
    h, w = height, width
    if kind == "uniform_noise":
        img = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
    elif kind == "gaussian_noise":
        grey = rng.normal(rng.uniform(40, 215), rng.uniform(5, 60), (h, w, 1))
        img = np.repeat(grey, 3, axis=2).astype(np.float32)
    elif kind == "colour_noise":
        img = rng.normal(_colour(rng), rng.uniform(5, 60), (h, w, 3)).astype(np.float32)
    elif kind == "smooth_noise":
        cells = int(rng.integers(2, 64))
        small = rng.uniform(0, 255, (max(2, h // cells), max(2, w // cells), 3)).astype(np.float32)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == "salt_pepper":
        img = np.full((h, w, 3), _colour(rng), np.float32)
        mask = rng.random((h, w)) < rng.uniform(0.01, 0.2)
        img[mask] = rng.choice([0.0, 255.0], size=(int(mask.sum()), 1))
    elif kind == "flat":
        img = np.full((h, w, 3), _colour(rng), np.float32)
    elif kind == "linear_gradient":
        t = (
            np.cos(rng.uniform(0, np.pi)) * np.arange(w)[None, :]
            + np.sin(rng.uniform(0, np.pi)) * np.arange(h)[:, None]
        )
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        a, b = _colour(rng), _colour(rng)
        img = a + (b - a) * t[..., None]
    elif kind == "radial_gradient":
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = np.hypot(np.arange(h)[:, None] - cy, np.arange(w)[None, :] - cx)
        t = r / max(1e-6, float(r.max()))
        a, b = _colour(rng), _colour(rng)
        img = a + (b - a) * t[..., None]
    elif kind in ("stripes", "checkerboard"):
        period = float(rng.uniform(4, 80))
        xs, ys = np.arange(w)[None, :], np.arange(h)[:, None]
        on = (xs // period).astype(int) % 2 if kind == "stripes" else ((xs // period + ys // period).astype(int) % 2)
        on = np.broadcast_to(on, (h, w))
        img = np.where(on[..., None] > 0, _colour(rng), _colour(rng)).astype(np.float32)
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")
    return np.clip(img, 0, 255).astype(np.uint8)


def ood_chips(count: int, chip: int, seed: int) -> np.ndarray:
    """``uint8 [count, chip, chip, 3]`` background chips: every kind, drawn at 1/4x to 4x the chip's scale
    and resized to it (a level of the pyramid sees noise smoothed or magnified), some JPEG-compressed."""
    rng = np.random.default_rng([seed, 7])
    out = np.empty((count, chip, chip, 3), np.uint8)
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        side = int(np.clip(chip * 2.0 ** rng.uniform(-2, 2), 16, 4 * chip))
        img = ood_image(kind, side, side, rng)
        interp = cv2.INTER_AREA if side > chip else cv2.INTER_LINEAR
        img = cv2.resize(img, (chip, chip), interpolation=interp)
        if rng.random() < 0.3:
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 95))])
            if ok:
                img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        out[i] = img
    return out
