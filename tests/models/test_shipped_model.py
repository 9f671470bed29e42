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
    assert "pyramid" in card.evaluation["real_val"] and "pyramid" in card.evaluation["synthetic_val"]
    assert card.focus is not None and card.focus.output == "focus" and card.focus.placement == "free"


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


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "real"


def _real_fixture(name: str):  # type: ignore[no-untyped-def]
    """(image RGB, boxes xyxy px, classes) of one real test-split fixture, imported by the shipped sources file."""
    import cv2

    from models.dataimport import ImportConfig, Report, import_source

    cfg = ImportConfig.from_yaml(Path(__file__).resolve().parents[2] / "models" / "data" / "real_sources.yaml")
    spec = next(s for s in cfg.sources if s.name == name)
    (rec,) = import_source(spec, FIXTURES / name, Report())
    keep = [(b, c) for b, c, ignore in rec.boxes if not ignore]
    boxes = np.array([b for b, _ in keep], np.float32)
    classes = np.array([CLASSES.index(c) for _, c in keep], np.int32)
    return cv2.cvtColor(cv2.imread(str(rec.path)), cv2.COLOR_BGR2RGB), boxes, classes


# recall@0.5 (score >= 0.05) of the shipped model on each fixture: aerial-cars 24/26, airport 76/92, maritime 6/7;
# floors a little below. None of these images was used in training: all three belong to the import's test split.
REAL_FLOORS = {"airport": 0.75, "aerial-cars": 0.85, "maritime": 0.7}


@pytest.mark.slow
@pytest.mark.parametrize("source", sorted(REAL_FLOORS))
def test_real_image_recall_floor(source: str) -> None:
    pipe = _pipeline()
    image, boxes, classes = _real_fixture(source)
    res = pipe.detect(image, mode_options("pyramid", pipe.card.input_size, EvalConfig()))
    keep = res.scores >= 0.05
    matched, total = recall_at_iou(boxes, classes, res.boxes[keep], res.classes[keep], iou=0.5)
    assert matched / total >= REAL_FLOORS[source], f"{source}: recall@0.5 = {matched}/{total}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uniform_noise", "flat", "linear_gradient", "radial_gradient", "gaussian_noise"])
def test_default_request_is_quiet_where_there_is_nothing(kind: str) -> None:
    """Out-of-distribution 1920x1080 images (a seed the training chips never used): at most 5 detections."""
    from models.ood import ood_image
    from service.options import DetectOptions

    res = _pipeline().detect(ood_image(kind, 1920, 1080, np.random.default_rng(2026)), DetectOptions())
    assert res.boxes.shape[0] <= 5, f"{kind}: {res.boxes.shape[0]} detections, scores {res.scores[:10]}"
