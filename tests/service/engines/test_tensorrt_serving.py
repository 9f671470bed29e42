"""The whole GPU serving path, run on the CPU with stand-ins, on the shipped model.

`snipserve export tensorrt`'s builder "builds" the shipped ONNX model with the TensorRT stand-in, whose engines
execute the model with ONNX Runtime; CuPy is the stand-in whose kernels are the project's own CUDA source
emulated by tests/cudasim. So export -> manifest -> engine load -> GPU pre-processing through the batcher ->
adapter -> GPU soft-NMS -> HTTP runs end to end with the real model, and must give what the CPU service gives
(up to the one-grey-level resize tolerance). What this cannot show is listed in tests/service/fake_gpu.py.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.engines import EngineConfig, create_engine
from service.engines.manifest import BatchProfile, read_manifest
from service.http.app import create_app
from service.options import DetectOptions
from service.pipeline import Pipeline, Result
from service.settings import Settings
from service.soft_nms import box_iou_one
from service.soft_nms_gpu import SoftNmsDispatch
from tests.conftest import encode

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "snipserve_default.onnx"
pytest.importorskip("onnx", reason="needs the export extra (onnx) to build the engine")


@pytest.fixture
def engine_path(fake_trt: types.ModuleType, tmp_path: Path) -> Path:
    from exporters.tensorrt import TensorRTExportConfig, build_engine

    out = tmp_path / "models" / "default.engine"
    out.parent.mkdir()
    cfg = TensorRTExportConfig(precision="fp16", profile=BatchProfile(min_batch=1, opt_batch=8, max_batch=16))
    build_engine(SHIPPED, out, cfg)
    return out


@pytest.fixture
def image() -> np.ndarray:
    from models.synth import SynthConfig, generate_image

    return generate_image(SynthConfig(min_long_side=480, max_long_side=560), seed=4242, index=3).decode()


OPTIONS = DetectOptions()  # the card's default pyramid: 16 chips on this image, two engine batches of 8


def assert_same_detections(got: Result, want: Result) -> None:
    """Every confident detection of ``want`` is in ``got`` (same class, IoU > 0.9, score within 0.05)."""
    confident = np.flatnonzero(want.scores >= 0.3)
    assert confident.size >= 3, "the image should give the model something to find"
    for i in confident:
        same = np.flatnonzero(got.classes == want.classes[i])
        assert same.size, f"class {want.classes[i]} missing"
        iou = box_iou_one(want.boxes[i].astype(np.float64), got.boxes[same].astype(np.float64))
        j = same[int(np.argmax(iou))]
        assert iou.max() > 0.9 and abs(float(got.scores[j]) - float(want.scores[i])) <= 0.05
    assert abs(len(got.scores) - len(want.scores)) <= max(2, len(want.scores) // 20)


def test_tensorrt_engine_with_gpu_preprocessing_matches_the_cpu_service(engine_path: Path, image: np.ndarray) -> None:
    manifest = read_manifest(engine_path)
    assert manifest.precision == "fp16" and manifest.card["name"] == "snipserve-default"
    engine = create_engine(engine_path, EngineConfig(kind="tensorrt", max_batch=8))
    try:
        gpu = Pipeline(engine, soft_nms=SoftNmsDispatch(device="gpu"))  # GPU soft-NMS is opt-in
        assert gpu.staging.name == "gpu" and engine.name == "tensorrt"
        cpu = Pipeline.load(SHIPPED, EngineConfig(intra_op_threads=2, max_batch=16), preprocess="cpu")
        got = gpu.detect(image, OPTIONS)
        want = cpu.detect(image, OPTIONS)
        executions = engine._runner.context.executions  # type: ignore[attr-defined]
    finally:
        engine.close()
    assert got.num_chips == want.num_chips > 8
    assert executions[-2:] == [8, got.num_chips - 8]
    assert_same_detections(got, want)


@pytest.fixture
def client(engine_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        engine="tensorrt",
        model_path=engine_path,
        models_dir=engine_path.parent,
        max_batch=8,
        preprocess="gpu",
        soft_nms_device="gpu",
    )
    with TestClient(create_app(settings)) as c:
        yield c


def test_http_service_on_tensorrt_with_gpu_preprocessing(
    client: TestClient, image: np.ndarray, engine_path: Path
) -> None:
    model = client.get("/v1/models").json()["models"][0]
    assert model["engine"] == {
        "name": "tensorrt",
        "providers": ["tensorrt"],
        "precision": "fp16",
        "max_batch": 8,
        "static_batch": None,  # a TensorRT profile is a batch range, never one fixed batch
        "notes": [],
        "preprocess": "gpu",
        "soft_nms": {"device": "gpu", "min_boxes": 0, "max_group": None},
    }
    r = client.post("/v1/detect", content=encode(image), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    got = sorted(d["score"] for d in r.json()["detections"])
    want = Pipeline.load(SHIPPED, EngineConfig(intra_op_threads=2), preprocess="cpu").detect(image, OPTIONS)
    assert len(want.scores) >= 3
    np.testing.assert_allclose(got, sorted(want.scores.tolist()), atol=0.05)


def test_tensorrt_engine_serves_a_focus_head_model(fake_trt: types.ModuleType, tmp_path: Path) -> None:
    """A model with a focus output through the TensorRT engine wrapper and GPU staging: the same FocusChips and
    detections as ONNX Runtime on the CPU."""
    torch = pytest.importorskip("torch", reason="needs the train extra (torch) to make the focus model")
    from exporters.onnx import export_onnx
    from exporters.tensorrt import TensorRTExportConfig, build_engine
    from models.net import NetConfig, TinyDet
    from models.sniper import SamplerConfig
    from models.train import MEAN, STD
    from service.plan import LevelSpec

    torch.manual_seed(0)
    cfg = NetConfig(widths=(8, 16, 16, 16), head_width=8, focus_head=True)
    net = TinyDet(cfg)
    torch.nn.init.normal_(net.cls.weight, std=1.0)
    assert net.focus is not None
    torch.nn.init.normal_(net.focus.out.weight, std=2.0)  # a map with both sides of the threshold
    sampler = SamplerConfig(chip_size=64, levels=(LevelSpec(scale=1.0), LevelSpec(scale=0.5), LevelSpec(long_side=64)))
    weights = tmp_path / "model.pt"
    meta = {"net": cfg.model_dump(), "sampler": sampler.model_dump(mode="json"), "classes": ["a", "b", "c"]}
    torch.save({"model": net.state_dict(), "mean": MEAN, "std": STD, "training": {}, **meta}, weights)
    onnx_path = tmp_path / "models" / "focus.onnx"
    export_onnx(weights, onnx_path, name="tiny-focus")
    engine_path = tmp_path / "models" / "focus.engine"
    build_engine(
        onnx_path, engine_path, TensorRTExportConfig(profile=BatchProfile(min_batch=1, opt_batch=4, max_batch=8))
    )
    engine = create_engine(engine_path, EngineConfig(kind="tensorrt", max_batch=8))
    image = np.random.default_rng(5).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    options = DetectOptions(preset="focus", focus_threshold=0.5, score_threshold=0.2)
    try:
        got = Pipeline(engine).detect(image, options)
    finally:
        engine.close()
    want = Pipeline.load(onnx_path, EngineConfig(intra_op_threads=1), preprocess="cpu").detect(image, options)
    assert got.focus is not None and [lv.chips for lv in got.focus] == [lv.chips for lv in want.focus or []]
    full = Pipeline.load(onnx_path, EngineConfig(intra_op_threads=1)).detect(image, DetectOptions(preset="pyramid"))
    assert 0 < want.num_chips < full.num_chips  # the map keeps some chips and drops others
    assert abs(len(got.scores) - len(want.scores)) <= max(2, len(want.scores) // 10)
