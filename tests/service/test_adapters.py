"""Output adapters, each through ONNX Runtime on a small ONNX graph built here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.engines import EngineConfig
from service.engines.onnxruntime import OnnxRuntimeEngine
from service.modelcard import CARD_METADATA_KEY, ModelCard
from service.plan import LevelSpec
from tests.service.onnx_graphs import constant_model

CHIP = 64


def card(fmt: str, **kw: object) -> ModelCard:
    fields = {
        "name": f"test-{fmt}",
        "classes": ("a", "b"),
        "input_size": CHIP,
        "output_format": fmt,
        "default_levels": (LevelSpec(scale=1.0),),
    } | kw
    return ModelCard.model_validate(fields)


def load(tmp_path: Path, outputs: dict[str, np.ndarray], metadata: dict[str, str]) -> OnnxRuntimeEngine:
    path = constant_model(tmp_path / "m.onnx", outputs, CHIP, metadata)
    return OnnxRuntimeEngine(path, EngineConfig(max_batch=4))


def run(engine: OnnxRuntimeEngine, batch: int, thresholds: list[float]):
    from service.adapters import get_adapter

    outs = engine.infer(np.zeros((batch, 3, CHIP, CHIP), np.float32))
    return get_adapter(engine.card)(outs, engine.card, np.asarray(thresholds, np.float32))


def test_snipserve_format(tmp_path: Path) -> None:
    stride = 4
    h = CHIP // stride
    heat = np.zeros((1, 2, h, h), np.float32)
    heat[0, 1, 3, 5] = 0.9  # class 1 at cell (x=5, y=3)
    heat[0, 0, 10, 2] = 0.2
    ltrb = np.zeros((1, 4, h, h), np.float32)
    ltrb[0, :, 3, 5] = (2, 3, 4, 5)
    eng = load(tmp_path, {"heatmap": heat, "ltrb": ltrb}, {CARD_METADATA_KEY: card("snipserve").model_dump_json()})
    d = run(eng, 2, [0.5, 0.1])
    # chip 0 (threshold 0.5): only the 0.9 peak; chip 1 (0.1): both
    assert d.chip.tolist() == [0, 1, 1]
    cx, cy = (5 + 0.5) * stride, (3 + 0.5) * stride
    np.testing.assert_allclose(d.boxes[0], [cx - 2, cy - 3, cx + 4, cy + 5])
    assert d.classes.tolist() == [1, 1, 0]
    np.testing.assert_allclose(d.scores, [0.9, 0.9, 0.2], rtol=1e-6)


def test_yolov8_format_from_ultralytics_metadata(tmp_path: Path) -> None:
    n = 6
    pred = np.zeros((1, 4 + 2, n), np.float32)
    # two overlapping class-0 boxes (NMS keeps the better), one class-1 box, three below threshold
    pred[0, :4, 0] = (20, 20, 10, 10)
    pred[0, 4, 0] = 0.8
    pred[0, :4, 1] = (21, 20, 10, 10)
    pred[0, 4, 1] = 0.7
    pred[0, :4, 2] = (40, 40, 8, 6)
    pred[0, 5, 2] = 0.6
    meta = {"names": "{0: 'a', 1: 'b'}", "imgsz": f"[{CHIP}, {CHIP}]", "stride": "32", "task": "detect"}
    eng = load(tmp_path, {"output0": pred}, meta)
    assert eng.card.output_format == "yolov8" and eng.card.classes == ("a", "b")
    d = run(eng, 1, [0.25])
    assert d.classes.tolist() == [0, 1]
    np.testing.assert_allclose(d.boxes, [[15, 15, 25, 25], [36, 37, 44, 43]])
    np.testing.assert_allclose(d.scores, [0.8, 0.6], rtol=1e-6)


def test_end2end_packed(tmp_path: Path) -> None:
    packed = np.zeros((1, 3, 6), np.float32)
    packed[0, 0] = (1, 2, 11, 12, 0.95, 1)
    packed[0, 1] = (5, 5, 9, 9, 0.1, 0)
    eng = load(tmp_path, {"output0": packed}, {CARD_METADATA_KEY: card("end2end").model_dump_json()})
    d = run(eng, 3, [0.3, 0.3, 0.05])
    assert d.chip.tolist() == [0, 1, 2, 2]
    assert d.classes.tolist() == [1, 1, 1, 0]


def test_end2end_efficient_nms_layout(tmp_path: Path) -> None:
    num = np.array([[1]], np.float32)
    boxes = np.array([[[1, 2, 3, 4], [5, 6, 7, 8]]], np.float32)
    scores = np.array([[0.9, 0.8]], np.float32)
    classes = np.array([[1, 0]], np.float32)
    c = card("end2end", output_names=("num_dets", "det_boxes", "det_scores", "det_classes"))
    eng = load(
        tmp_path,
        {"num_dets": num, "det_boxes": boxes, "det_scores": scores, "det_classes": classes},
        {CARD_METADATA_KEY: c.model_dump_json()},
    )
    d = run(eng, 1, [0.1])
    assert len(d) == 1  # num_dets = 1: the second row is padding
    np.testing.assert_allclose(d.boxes, [[1, 2, 3, 4]])


def test_cap_per_chip(tmp_path: Path) -> None:
    packed = np.zeros((1, 5, 6), np.float32)
    packed[0, :, 4] = [0.5, 0.9, 0.7, 0.6, 0.8]
    c = card("end2end", max_per_chip=2)
    eng = load(tmp_path, {"output0": packed}, {CARD_METADATA_KEY: c.model_dump_json()})
    d = run(eng, 2, [0.1, 0.1])
    np.testing.assert_allclose(d.scores, [0.9, 0.8, 0.9, 0.8])


def test_sidecar_yaml_wins(tmp_path: Path) -> None:
    packed = np.zeros((1, 1, 6), np.float32)
    path = constant_model(
        tmp_path / "m.onnx", {"output0": packed}, CHIP, {CARD_METADATA_KEY: card("end2end").model_dump_json()}
    )
    (tmp_path / "m.yaml").write_text("name: renamed\nscore_threshold: 0.6\n")
    eng = OnnxRuntimeEngine(path, EngineConfig())
    assert eng.card.name == "renamed" and eng.card.score_threshold == 0.6


def test_bad_models_fail_clearly(tmp_path: Path) -> None:
    from service.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="not found"):
        OnnxRuntimeEngine(tmp_path / "missing.onnx", EngineConfig())
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot load"):
        OnnxRuntimeEngine(tmp_path / "junk.onnx", EngineConfig())
    path = constant_model(tmp_path / "nocard.onnx", {"output0": np.zeros((1, 1, 6), np.float32)}, CHIP, {})
    with pytest.raises(ModelLoadError, match="no model card"):
        OnnxRuntimeEngine(path, EngineConfig())
    wrong = card("end2end").model_dump() | {"input_size": 128}
    path = constant_model(
        tmp_path / "wrong.onnx",
        {"output0": np.zeros((1, 1, 6), np.float32)},
        CHIP,
        {CARD_METADATA_KEY: json.dumps(wrong)},
    )
    with pytest.raises(ModelLoadError, match="does not match"):
        OnnxRuntimeEngine(path, EngineConfig())


def test_gpu_provider_fallback_is_detected(tmp_path: Path) -> None:
    from service.errors import ModelLoadError

    path = constant_model(
        tmp_path / "m.onnx",
        {"output0": np.zeros((1, 1, 6), np.float32)},
        CHIP,
        {CARD_METADATA_KEY: card("end2end").model_dump_json()},
    )
    # The CPU build of ONNX Runtime has no CUDA provider: asking for it must fail loudly...
    with pytest.raises(ModelLoadError, match="SNIPSERVE_ALLOW_CPU_FALLBACK"):
        OnnxRuntimeEngine(path, EngineConfig(providers=("cuda", "cpu")))
    # ...or, when explicitly allowed, run on the CPU and say so.
    eng = OnnxRuntimeEngine(path, EngineConfig(providers=("cuda", "cpu"), allow_cpu_fallback=True))
    assert eng.providers == ["CPUExecutionProvider"]
