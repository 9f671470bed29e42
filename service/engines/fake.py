"""The deterministic fake engine: no model file; "detects" saturated red/green/blue blobs (tests, demos)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from service.crop import ChipLayout
from service.modelcard import FocusSpec, ModelCard
from service.plan import LevelSpec

FAKE_CARD = ModelCard(
    name="fake-rgb-blobs",
    version="1",
    classes=("red", "green", "blue"),
    input_size=128,
    output_format="end2end",
    sweet_spot=(8.0, 48.0),
    default_levels=(LevelSpec(scale=1.0), LevelSpec(long_side=128)),
    presets={"fast": (LevelSpec(long_side=128),)},
    score_threshold=0.3,
    max_per_chip=100,
    training={"note": "not trained: a deterministic colour-blob detector for tests"},
)

FAKE_FOCUS_CARD = FAKE_CARD.model_copy(
    update={
        "name": "fake-rgb-blobs-focus",
        "output_names": ("detections", "focus"),
        "focus": FocusSpec(stride=16, output="focus", threshold=0.5),
    }
)


class FakeEngine:
    """Deterministic stand-in: per chip, each 4-connected blob of saturated red, green or blue pixels
    becomes a detection of class 0, 1 or 2 with its bounding box and score 0.9. Outputs the ``end2end``
    layout ``[B, M, 6]``. ``delay`` (s per call) and ``fail`` (called with the batch; raise to fail) let
    tests model slow or broken engines. With a card that has a focus output (:data:`FAKE_FOCUS_CARD`) it also
    returns a stand-in focus head: ``[B, 1, C/16, C/16]``, 1.0 in every cell holding a saturated pixel."""

    name = "fake"

    def __init__(
        self,
        card: ModelCard = FAKE_CARD,
        max_batch: int = 8,
        delay: float = 0.0,
        fail: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self.card = card
        self.max_batch = max_batch
        self.providers = ["cpu"]
        self.precision = "fp32"
        self.input_layout: ChipLayout = "float32_nchw"
        self.delay = delay
        self.fail = fail
        self.calls: list[int] = []  # batch sizes, for tests
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        import cv2

        with self._lock:
            self.calls.append(int(batch.shape[0]))
        if self.fail is not None:
            self.fail(batch)
        if self.delay:
            time.sleep(self.delay)
        m = self.card.max_per_chip
        out = np.zeros((batch.shape[0], m, 6), np.float32)
        mean = np.asarray(self.card.mean, np.float32)[:, None, None]
        std = np.asarray(self.card.std, np.float32)[:, None, None]
        for i, chip in enumerate(batch):
            pix = (chip * std + mean) * 255.0  # back to RGB pixels, [3, C, C]
            hi, lo = pix > 200, pix < 60
            dets = []
            for cls in range(3):
                others = [j for j in range(3) if j != cls]
                mask = (hi[cls] & lo[others[0]] & lo[others[1]]).astype(np.uint8)
                n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
                for x, y, w, h, _area in stats[1:]:
                    dets.append((x, y, x + w, y + h, 0.9, cls))
            dets = dets[:m]
            if dets:
                out[i, : len(dets)] = np.asarray(dets, np.float32)
        if not self.card.has_focus_head:
            return [out]
        return [out, self._focus(batch)]

    def _focus(self, batch: np.ndarray) -> np.ndarray:
        """1.0 where a stride x stride cell holds a saturated red/green/blue pixel (any class), else 0."""
        assert self.card.focus is not None
        mean = np.asarray(self.card.mean, np.float32)[None, :, None, None]
        std = np.asarray(self.card.std, np.float32)[None, :, None, None]
        pix = (batch * std + mean) * 255.0  # [B, 3, C, C]
        hi, lo = pix > 200, pix < 60
        sat = np.asarray((hi & lo[:, [1, 0, 0]] & lo[:, [2, 2, 1]]).any(axis=1))  # [B, C, C]
        b, c = sat.shape[0], sat.shape[1]
        g = self.card.focus.stride
        cells = np.asarray(sat.reshape(b, c // g, g, c // g, g).any(axis=(2, 4)))  # [B, C/g, C/g]
        return cells[:, None].astype(np.float32)

    def close(self) -> None:
        pass
