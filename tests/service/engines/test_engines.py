"""Engines: graph-side pre-processing (uint8 chips) gives what NumPy normalisation gives."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.crop import Normalizer, crop_plan, resize_levels
from service.engines import EngineConfig, engine_on_gpu, warm_up
from service.engines.fake import FakeEngine
from service.engines.onnxruntime import OnnxRuntimeEngine, check_providers
from service.errors import ModelLoadError
from service.modelcard import CARD_METADATA_KEY, ModelCard
from service.options import DetectOptions
from service.pipeline import Pipeline
from service.plan import LevelSpec, PlanConfig, plan

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "snipserve_default.onnx"


def identity_model(tmp_path: Path, channel_order: str) -> Path:
    """A model whose output is its (normalised) input, to see exactly what the graph receives."""
    import onnx
    from onnx import TensorProto, helper

    card = ModelCard(
        name="identity",
        classes=("a",),
        input_size=32,
        channel_order=channel_order,  # type: ignore[arg-type]
        mean=(0.1, 0.2, 0.3),
        std=(0.5, 0.25, 0.125),
        output_format="end2end",
        default_levels=(LevelSpec(scale=1.0),),
    )
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["out"])],
        "identity",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["B", 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", 3, 32, 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.append(onnx.StringStringEntryProto(key=CARD_METADATA_KEY, value=card.model_dump_json()))
    path = tmp_path / f"identity_{channel_order}.onnx"
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_fused_input_equals_numpy_normalisation(tmp_path: Path, order: str) -> None:
    path = identity_model(tmp_path, order)
    plain = OnnxRuntimeEngine(path, EngineConfig())
    fused = OnnxRuntimeEngine(path, EngineConfig(fuse_preprocess=True))
    assert (plain.input_layout, fused.input_layout) == ("float32_nchw", "uint8_nhwc")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), np.uint8)  # chips past the border are padded
    p = plan((70, 50), PlanConfig(chip_size=32, levels=(LevelSpec(scale=1.0),)))
    levels = resize_levels(image, p)
    norm = Normalizer.from_card(plain.card)
    want = plain.infer(crop_plan(levels, p, norm))[0]
    got = fused.infer(crop_plan(levels, p, norm, layout="uint8_nhwc"))[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped default model is not in this checkout")
def test_fused_shipped_model_gives_the_same_detections() -> None:
    from models.synth import SynthConfig, generate_image

    image = generate_image(SynthConfig(max_long_side=1300), seed=31337, index=0).decode()
    a = Pipeline.load(SHIPPED, EngineConfig()).detect(image, DetectOptions(score_threshold=0.3))
    b = Pipeline.load(SHIPPED, EngineConfig(fuse_preprocess=True)).detect(image, DetectOptions(score_threshold=0.3))
    assert len(a.scores) > 0 and a.classes.tolist() == b.classes.tolist()
    np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-2)
    np.testing.assert_allclose(b.scores, a.scores, atol=1e-4)


def test_warm_up_uses_the_engine_layout(tmp_path: Path) -> None:
    fused = OnnxRuntimeEngine(identity_model(tmp_path, "RGB"), EngineConfig(fuse_preprocess=True, max_batch=4))
    assert warm_up(fused, (1, 4)) >= 0
    assert not engine_on_gpu(fused) and not engine_on_gpu(FakeEngine())


def _ultralytics_like(tmp_path: Path, batch: str | int) -> Path:
    """A YOLOv8-layout model with Ultralytics' metadata; ``batch=1`` is ``yolo export format=onnx``'s default."""
    from tests.service.onnx_graphs import constant_model

    pred = np.zeros((1, 6, 4), np.float32)
    meta = {"names": "{0: 'a', 1: 'b'}", "imgsz": "[64, 64]", "stride": "32", "task": "detect"}
    return constant_model(tmp_path / "yolo.onnx", {"output0": pred}, 64, meta, batch=batch)


def test_static_batch_model_says_so(tmp_path: Path) -> None:
    from service.engines import static_batch_note

    static = OnnxRuntimeEngine(_ultralytics_like(tmp_path, 1), EngineConfig(max_batch=8))
    assert static.static_batch == 1 and static.max_batch == 1
    note = static_batch_note(static)
    assert note is not None and "fixed at 1" in note and "dynamic=True" in note
    dynamic = OnnxRuntimeEngine(_ultralytics_like(tmp_path, "batch"), EngineConfig(max_batch=8))
    assert dynamic.static_batch is None and dynamic.max_batch == 8 and static_batch_note(dynamic) is None


def test_static_batch_in_models_route_and_startup_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fastapi.testclient import TestClient

    from service.http.app import create_app
    from service.settings import Settings

    engine = OnnxRuntimeEngine(_ultralytics_like(tmp_path, 1), EngineConfig(max_batch=8))
    app = create_app(Settings(warmup=False), engine_factory=lambda _: engine)
    with caplog.at_level("WARNING"), TestClient(app) as client:
        info = client.get("/v1/models").json()["models"][0]["engine"]
    assert info["static_batch"] == 1 and "dynamic batch" in info["notes"][0]
    assert any("fixed at 1" in r.getMessage() for r in caplog.records)


# ---- ONNX Runtime providers: run-time fallback off, the running session's providers checked ----------------------


import onnxruntime  # noqa: E402 - the cpu extra; the real session class, before any test patches it

REAL_SESSION = onnxruntime.InferenceSession


class RecordingSession:
    """Wraps ``onnxruntime.InferenceSession``: records the providers asked for, runs on the CPU EP, and reports
    ``active`` as its providers (``active(model)`` may tell the file session from the fused, in-memory one)."""

    made: list[tuple[object, list[object], RecordingSession]] = []
    active: Callable[[object], list[str]] = staticmethod(lambda model: ["CPUExecutionProvider"])

    def __init__(self, model: object, sess_options: object = None, providers: list[object] | None = None) -> None:
        self._inner = REAL_SESSION(model, sess_options=sess_options, providers=["CPUExecutionProvider"])
        self._model = model
        self.fallback_disabled = False
        type(self).made.append((model, list(providers or []), self))

    def disable_fallback(self) -> None:
        self.fallback_disabled = True
        self._inner.disable_fallback()

    def get_providers(self) -> list[str]:
        return list(type(self).active(self._model))

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


@pytest.fixture
def recording_ort(monkeypatch: pytest.MonkeyPatch) -> type[RecordingSession]:
    import onnxruntime as ort

    RecordingSession.made = []
    monkeypatch.setattr(RecordingSession, "active", staticmethod(lambda model: ["CPUExecutionProvider"]))
    monkeypatch.setattr(ort, "InferenceSession", RecordingSession)
    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    return RecordingSession


def test_every_session_runs_without_ort_fallback(tmp_path: Path) -> None:
    """ORT rebuilds a session on the remaining providers after a run-time EP failure unless told not to."""
    for fuse in (False, True):
        engine = OnnxRuntimeEngine(identity_model(tmp_path, "RGB"), EngineConfig(fuse_preprocess=fuse))
        assert engine.session._enable_fallback is False  # the real ORT session's switch
        engine.close()


def test_provider_options_tf32_off_and_one_tensorrt_profile(tmp_path: Path, recording_ort: type) -> None:
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    recording_ort.active = staticmethod(lambda model: every)
    cfg = EngineConfig(providers=("tensorrt", "cuda"), fp16=True, max_batch=16, fuse_preprocess=True)
    engine = OnnxRuntimeEngine(identity_model(tmp_path, "RGB"), cfg)
    (file_model, file_providers, plain), (fused_model, fused_providers, fused) = recording_ort.made
    assert isinstance(file_model, str) and isinstance(fused_model, bytes)
    assert plain.fallback_disabled and fused.fallback_disabled
    trt_opts = dict(fused_providers[0][1])  # type: ignore[index]
    assert trt_opts["trt_fp16_enable"] is True
    # One profile over the batch: warm-up's sizes 1 and max_batch fall in it (one engine build, not two).
    assert trt_opts["trt_profile_min_shapes"] == "chips_uint8_nhwc:1x32x32x3"
    assert trt_opts["trt_profile_opt_shapes"] == trt_opts["trt_profile_max_shapes"] == "chips_uint8_nhwc:16x32x32x3"
    assert dict(file_providers[0][1])["trt_profile_max_shapes"] == "images:16x3x32x32"  # type: ignore[index]
    assert fused_providers[1] == ("CUDAExecutionProvider", {"use_tf32": "0"})  # TF32 off: fp32 parity
    assert fused_providers[2] == "CPUExecutionProvider"
    assert engine.precision == "fp16"


def test_the_running_sessions_providers_are_checked(tmp_path: Path, recording_ort: type) -> None:
    """With fused pre-processing the fused session runs: its providers count, not the first session's."""
    gpu, cpu = ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]
    recording_ort.active = staticmethod(lambda model: gpu if isinstance(model, str) else cpu)
    with pytest.raises(ModelLoadError, match="SNIPSERVE_ALLOW_CPU_FALLBACK"):
        OnnxRuntimeEngine(identity_model(tmp_path, "RGB"), EngineConfig(providers=("cuda",), fuse_preprocess=True))
    engine = OnnxRuntimeEngine(identity_model(tmp_path, "RGB"), EngineConfig(providers=("cuda",)))
    assert engine.providers == gpu


def test_tensorrt_ep_missing_while_cuda_runs_is_logged(
    tmp_path: Path, recording_ort: type, caplog: pytest.LogCaptureFixture
) -> None:
    recording_ort.active = staticmethod(lambda model: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="snipserve.engine"):
        engine = OnnxRuntimeEngine(identity_model(tmp_path, "RGB"), EngineConfig(providers=("tensorrt", "cuda")))
    assert engine.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert [r.getMessage() for r in caplog.records] == [
        "requested provider TensorrtExecutionProvider is not active (failed to start); "
        "active: ['CUDAExecutionProvider', 'CPUExecutionProvider']"
    ]


def test_check_providers() -> None:
    trt, cuda, cpu = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
    assert check_providers([trt, cuda], [trt, cuda, cpu], [trt, cuda, cpu], False) == []
    (only,) = check_providers([trt, cuda], [cuda, cpu], [cuda, cpu], False)
    assert only.startswith(f"requested provider {trt} is not active (not in this onnxruntime build)")
    with pytest.raises(ModelLoadError, match=r"requested providers \['CUDAExecutionProvider'\] are not active"):
        check_providers([cuda, cpu], [cpu], [cpu], False)
    warnings = check_providers([trt, cuda], [cpu], [cpu], True)
    assert len(warnings) == 3 and warnings[-1].endswith("(fallback allowed)")
