"""The TensorRT modules' Python glue, run end to end on the CPU against stand-ins for CuPy and TensorRT.

``tests/service/fake_gpu.py`` documents what these stand-ins can and cannot show: the host code (splitting,
padding, buffers, manifests, calibration plumbing) runs and produces the reference results when the libraries
behave as documented; whether they do is what the ``tensorrt`` tests check on a GPU host with TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from exporters.tensorrt import calibration_chips
from service.crop import Normalizer, crop_plan, resize_levels
from service.engines import EngineConfig, create_engine
from service.engines.manifest import BatchProfile, read_manifest, sha256_file
from service.errors import ModelLoadError
from service.plan import ChipPlan, LevelSpec, PlanConfig, plan
from tests.service import fake_gpu
from tests.service.test_crop_gpu import smooth_image

# ---- TensorRT engine ---------------------------------------------------------------------------------------------

TRT_CARD = fake_gpu.TRT_CARD
_fake_engine_files = fake_gpu.engine_files


def test_tensorrt_engine_host_code_with_fakes(fake_trt: Any, tmp_path: Path) -> None:
    profile = BatchProfile(min_batch=2, opt_batch=4, max_batch=4)
    engine = create_engine(_fake_engine_files(tmp_path, profile), EngineConfig(kind="tensorrt", max_batch=16))
    c = TRT_CARD.input_size
    x = np.random.default_rng(0).normal(0, 1, (7, 3, c, c)).astype(np.float32)
    mean, top = engine.infer(x)  # 4 + 3 rows
    np.testing.assert_allclose(mean[:, 0], x.reshape(7, -1).mean(1), rtol=1e-5)
    np.testing.assert_array_equal(top[:, 0], x.reshape(7, -1).max(1))
    one = engine.infer(x[:1])  # below min batch: padded to 2, padding dropped
    assert one[0].shape == (1, 1)
    ctx = engine._runner.context  # type: ignore[attr-defined]
    assert ctx.executions == [4, 3, 2]
    assert engine.max_batch == 4 and engine.precision == "fp32"
    engine.close()


@pytest.mark.parametrize("n", [1, 3, 4])
def test_tensorrt_infer_staged_with_fakes(fake_trt: Any, tmp_path: Path, n: int) -> None:
    """The GPU pre-processing path: the crop kernel (emulated) cuts chips from device levels straight into the
    engine's input buffer; the engine sees exactly the chips the CPU path would feed it."""
    profile = BatchProfile(min_batch=2, opt_batch=4, max_batch=4)
    engine = create_engine(_fake_engine_files(tmp_path, profile), EngineConfig(kind="tensorrt"))
    img = smooth_image(np.random.default_rng(4), 200, 300)
    cfg = PlanConfig(chip_size=TRT_CARD.input_size, levels=(LevelSpec(scale=1.3), LevelSpec(scale=0.6)))
    p = plan((img.shape[1], img.shape[0]), cfg)
    norm = Normalizer.from_card(TRT_CARD)
    levels = resize_levels(img, p)
    chips = p.chips[-n:]  # the last chips: padded past the level's edge
    # Device path first: the input buffer holds only poison (fresh memory) until the crop kernel has run, so
    # TensorRT reading it before the crop's event (a missing wait) gives NaNs here.
    got = engine.infer_staged([fake_gpu.FakeArray(np.ascontiguousarray(x)) for x in levels], chips, norm)  # type: ignore[attr-defined]
    want = engine.infer(crop_plan(levels, ChipPlan(p.image_size, p.chip_size, p.levels, chips, 2.0), norm))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert engine._runner.context.executions[-1] == max(n, 2)  # type: ignore[attr-defined]  # padded to min batch
    engine.close()


def test_tensorrt_engine_refuses_other_version_with_fakes(fake_trt: Any, tmp_path: Path) -> None:
    engine = _fake_engine_files(tmp_path, BatchProfile(min_batch=1, opt_batch=1, max_batch=2), version="10.1.0.0")
    with pytest.raises(ModelLoadError, match=r"built with TensorRT 10\.1\.0\.0, this host has 10\.99\.0\.1"):
        create_engine(engine, EngineConfig(kind="tensorrt"))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_build_engine_host_code_with_fakes(fake_trt: Any, tmp_path: Path, precision: str) -> None:
    pytest.importorskip("onnx", reason="needs the export extra (onnx) for the tiny model")
    from exporters.tensorrt import TensorRTExportConfig, build_engine
    from tests.exporters.tiny_onnx import tiny_detector_onnx

    onnx_path = tiny_detector_onnx(tmp_path / "tiny.onnx")
    images = tmp_path / "calib"
    images.mkdir()
    for i in range(3):
        cv2.imwrite(str(images / f"{i}.png"), smooth_image(np.random.default_rng(i), 300, 400))
    cfg = TensorRTExportConfig(
        precision=precision,  # type: ignore[arg-type]
        profile=BatchProfile(min_batch=1, opt_batch=4, max_batch=8),
        workspace_mib=64,
        timing_cache=tmp_path / "timing.cache",
        calibration_images=images if precision == "int8" else None,
        calibration_chips=16,
        calibration_cache=tmp_path / "int8.calib",
    )
    report = build_engine(onnx_path, tmp_path / "tiny.engine", cfg)
    m = read_manifest(tmp_path / "tiny.engine")
    assert m == report.manifest
    assert (m.gpu_name, m.compute_capability, m.tensorrt_version) == ("Fake GPU", "9.0", "10.99.0.1")
    assert m.onnx_sha256 == sha256_file(onnx_path) and m.output_names == ("heatmap", "ltrb")
    assert m.card["name"] == "tiny-random"
    assert (tmp_path / "timing.cache").read_bytes() == b"fresh+timings"
    config = fake_trt.Builder.built[-1]
    assert config.pool == {"WORKSPACE": 64 << 20}
    assert config.profiles[0].shape == ("images", (1, 3, 128, 128), (4, 3, 128, 128), (8, 3, 128, 128))
    # TF32 (on by default in TensorRT) is cleared in every build: fp32 means fp32 for the 1e-3 parity.
    assert config.flags == {"fp32": set(), "fp16": {"FP16"}, "int8": set()}[precision]
    if precision == "int8":
        # Explicit quantization: the calibrated Q/DQ model is what TensorRT parses, as a strongly typed network
        # without precision flags (TensorRT 10's recommended INT8 path); no deprecated calibrator API is touched
        # (the stand-in warns on it, an error here).
        qdq = tmp_path / "int8.calib"
        assert m.calibration["chips"] == 16 and m.calibration["qdq_sha256"] == sha256_file(qdq)
        assert "explicit Q/DQ" in m.calibration["method"] and config.calibration_profile is None
        import onnx

        ops = {n.op_type for n in onnx.load(str(qdq)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        zero_points = [i for i in onnx.load(str(qdq)).graph.initializer if i.name.endswith("_zero_point")]
        assert zero_points and all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)  # symmetric
        # The INT8 "engine" runs the Q/DQ model: near the fp32 model on real chips, not identical. (The tiny model
        # has random weights; its exp-decoded ltrb amplifies quantization error, so the heatmap is the check.)
        engine = create_engine(tmp_path / "tiny.engine", EngineConfig(kind="tensorrt", max_batch=8))
        fp32 = create_engine(onnx_path, EngineConfig(max_batch=8))
        chips = calibration_chips(images, fp32.card, 8)
        (heat, ltrb), (heat32, _) = engine.infer(chips), fp32.infer(chips)
        err = np.abs(heat - heat32)
        assert 0 < err.mean() < 0.02 * np.abs(heat32).max() and np.isfinite(ltrb).all(), err.mean()
        engine.close()
        fp32.close()


def test_deprecated_int8_calibrator_api_warns_like_tensorrt(fake_trt: Any) -> None:
    """The stand-in is as strict as TensorRT 10.1+: the implicit-quantization API raises a DeprecationWarning."""
    config = fake_trt.Builder(fake_trt.Logger(fake_trt.Logger.WARNING)).create_builder_config()
    with pytest.warns(DeprecationWarning, match="int8_calibrator"):
        config.int8_calibrator = object()
    with pytest.warns(DeprecationWarning, match="set_calibration_profile"):
        config.set_calibration_profile(object())
    with pytest.warns(DeprecationWarning, match="IInt8EntropyCalibrator2"):
        fake_trt.IInt8EntropyCalibrator2()
