"""Image mixes for load tests: synthetic JPEGs by size, or the files of a directory, with weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
               ".tif": "image/tiff", ".tiff": "image/tiff", ".bmp": "image/bmp"}  # fmt: skip


@dataclass(frozen=True)
class MixImage:
    """One image of the mix: encoded bytes, its media type, a name for reports, and a relative weight."""

    name: str
    data: bytes
    media_type: str
    weight: float


def synthetic_jpeg(width: int, height: int, seed: int = 0, objects: int = 40) -> bytes:
    """A ``width x height`` JPEG (quality 90): textured grey ground with small saturated squares (4-40 px)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(70, 150, (max(height // 16, 1), max(width // 16, 1), 3), np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    image = cv2.add(image, rng.integers(0, 20, image.shape, np.uint8))
    for _ in range(objects):
        size = int(rng.integers(4, 41))
        x, y = int(rng.integers(0, max(width - size, 1))), int(rng.integers(0, max(height - size, 1)))
        color = [0, 0, 0]
        color[int(rng.integers(0, 3))] = 255
        image[y : y + size, x : x + size] = color
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


def parse_mix(spec: str, seed: int = 0) -> list[MixImage]:
    """``"1920x1080:3,4000x3000:1"`` -> synthetic JPEGs of those sizes with those weights (weight optional)."""
    mix = []
    for i, item in enumerate(x.strip() for x in spec.split(",") if x.strip()):
        size, _, weight = item.partition(":")
        try:
            w, h = (int(v) for v in size.lower().split("x"))
            wt = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"bad image mix item {item!r}: expected WIDTHxHEIGHT[:WEIGHT], e.g. 1920x1080:3") from None
        if w < 1 or h < 1 or wt <= 0:
            raise ValueError(f"bad image mix item {item!r}: sizes and weights must be positive")
        mix.append(MixImage(f"{w}x{h}", synthetic_jpeg(w, h, seed + i), "image/jpeg", wt))
    if not mix:
        raise ValueError("empty image mix")
    return mix


def directory_mix(directory: Path, limit: int | None = None) -> list[MixImage]:
    """Every image file in ``directory`` (sorted, at most ``limit``), equal weights."""
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return [MixImage(p.name, p.read_bytes(), MEDIA_TYPES[p.suffix.lower()], 1.0) for p in files]


def weights(mix: list[MixImage]) -> np.ndarray:
    """Probabilities of picking each image, ``float64 [len(mix)]``."""
    w = np.asarray([m.weight for m in mix], np.float64)
    p: np.ndarray = w / w.sum()
    return p
