"""End to end: the real `snipserve serve` process on a loopback port, a generated image, recall."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.cli.serve_process import running_server
from tests.conftest import encode


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[str]:
    with running_server(env={"SNIPSERVE_ENGINE": "fake"}, log=tmp_path / "server.log") as server:
        yield server.url


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``[N, M]`` IoU of xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def recall(gt: np.ndarray, gt_cls: np.ndarray, boxes: np.ndarray, cls: np.ndarray, thr: float = 0.5) -> float:
    if len(boxes) == 0:
        return 0.0
    m = iou(gt, boxes) * (gt_cls[:, None] == cls[None, :])
    return float((m.max(axis=1) >= thr).mean())


def test_served_over_loopback_with_recall(fake_server: str, random_blobs) -> None:
    image, gt, gt_cls = random_blobs(1500, 1000, 60, seed=7, min_size=6, max_size=45)
    r = httpx.post(f"{fake_server}/v1/detect", content=encode(image), headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    dets = r.json()["detections"]
    boxes = np.array([d["box"] for d in dets], np.float32).reshape(-1, 4)
    cls = np.array([d["class_id"] for d in dets], np.int32)
    assert recall(gt, gt_cls, boxes, cls) >= 0.95
    assert r.headers.get("x-request-id")


SHIPPED = Path(__file__).resolve().parents[3] / "models" / "snipserve_default.onnx"


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped default model is not in this checkout")
def test_shipped_model_served_over_loopback(tmp_path: Path) -> None:
    with running_server(log=tmp_path / "server.log") as server:  # all defaults: the shipped model, ORT, CPU
        url = server.url
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["models"]
        assert models[0]["engine"]["providers"] == ["CPUExecutionProvider"]
        from models.synth import SynthConfig, generate_image  # noqa: PLC0415

        sample = generate_image(SynthConfig(max_long_side=1600), seed=123456, index=0)
        r = httpx.post(f"{url}/v1/detect", content=sample.jpeg, headers={"content-type": "image/jpeg"}, timeout=120)
        assert r.status_code == 200, r.text
        dets = r.json()["detections"]
        boxes = np.array([d["box"] for d in dets], np.float32).reshape(-1, 4)
        cls = np.array([d["class_id"] for d in dets], np.int32)
        assert recall(sample.boxes, sample.classes, boxes, cls) >= 0.7
