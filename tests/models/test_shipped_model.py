"""The committed default model: a valid card and an accuracy floor on freshly generated images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.evaluate import EvalConfig, mode_options, recall_at_iou
from models.synth import CLASSES, SynthConfig, generate_image

MODEL = Path(__file__).resolve().parents[2] / "models" / "snipserve_default.onnx"
ort = pytest.importorskip("onnxruntime", reason="needs the cpu extra (onnxruntime)")


def _pipeline():  # type: ignore[no-untyped-def]
    from service.engines import EngineConfig
    from service.pipeline import Pipeline

    return Pipeline.load(MODEL, EngineConfig(intra_op_threads=2, max_batch=16))


def test_shipped_model_is_small_and_carded() -> None:
    assert MODEL.stat().st_size <= 20 * 1024 * 1024
    card = _pipeline().card
    assert card.classes == CLASSES and card.output_format == "snipserve" and card.channel_order == "RGB"
    assert card.input_size == 256 and card.sweet_spot[0] < card.sweet_spot[1]
    assert len(card.default_levels) >= 2 and "fast" in card.presets
    assert card.training["train_seconds"] > 0 and card.training["seed"] is not None
    assert "modes" in card.evaluation and "pyramid" in card.evaluation["modes"]


@pytest.mark.slow
def test_pyramid_recall_floor() -> None:
    # Seed 4242: neither the training (1) nor the validation (1000) seed.
    pipe = _pipeline()
    options = mode_options("pyramid", pipe.card.input_size, EvalConfig())
    cfg = SynthConfig(max_long_side=1600)
    matched = total = 0
    for i in range(3):
        im = generate_image(cfg, 4242, i)
        res = pipe.detect(im.decode(), options)
        keep = res.scores >= 0.05
        m, t = recall_at_iou(im.boxes, im.classes, res.boxes[keep], res.classes[keep], iou=0.5)
        matched, total = matched + m, total + t
    assert total > 50
    assert matched / total >= 0.8, f"recall@0.5 = {matched / total:.3f} over {total} objects"
    assert np.isfinite(res.boxes).all()
