"""Draw detections on an image (annotated JPEG responses, ``--render`` in the CLI)."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from service.pipeline import Result

# Distinct colours (RGB) per class id, cycling.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def draw(image: np.ndarray, result: Result, labels: Sequence[str]) -> np.ndarray:
    """A copy of ``image`` (``uint8 [H, W, 3]`` RGB) with boxes and labels drawn."""
    out = np.ascontiguousarray(image.copy())
    thick = max(1, round(max(image.shape[:2]) / 800))
    d = result.detections
    for (x1, y1, x2, y2), score, cls in zip(d.boxes.tolist(), d.scores.tolist(), d.classes.tolist(), strict=True):
        colour = PALETTE[cls % len(PALETTE)]
        cv2.rectangle(out, (round(x1), round(y1)), (round(x2), round(y2)), colour, thick)
        cv2.putText(
            out, f"{labels[cls]} {score:.2f}", (round(x1), max(0, round(y1) - 3)), cv2.FONT_HERSHEY_SIMPLEX,
            0.4 * thick, colour, thick, cv2.LINE_AA,
        )  # fmt: skip
    return out


def render_jpeg(image: np.ndarray, result: Result, labels: Sequence[str], quality: int = 90) -> bytes:
    """JPEG bytes of :func:`draw`."""
    ok, buf = cv2.imencode(
        ".jpg", cv2.cvtColor(draw(image, result, labels), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return bytes(buf)
