"""The GPU modules' Python glue, run end to end on the CPU against stand-ins for CuPy and TensorRT.

``tests/service/fake_gpu.py`` documents what these stand-ins can and cannot show: the host code (argument
order, shapes, buffers, splitting, manifests, calibration plumbing) runs and produces the reference results
when the libraries behave as documented; whether they do is what the ``gpu`` tests check on a GPU.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from service import crop_gpu, soft_nms_gpu
from service.crop import Normalizer, crop_plan, resize_levels
from service.engine import FAKE_CARD, EngineConfig, create_engine
from service.engine_manifest import BatchProfile, EngineManifest, read_manifest, sha256_file, write_manifest
from service.errors import ModelLoadError
from service.plan import LevelSpec, PlanConfig, plan
from service.soft_nms import batched_soft_nms
from tests.service import fake_gpu
from tests.service.test_crop_gpu import emulate_area, emulate_linear, smooth_image
from tests.service.test_soft_nms_gpu import random_case

# ---- kernel emulations, called with the exact argument tuples our host code passes --------------------------------


def _soft_nms_kernel(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
    boxes, scores, alive, offsets, method, sigma, nt, thr, keep, kept, counts = args
    assert block[0] % 32 == 0 and grid == (offsets.shape[0] - 1,)
    assert isinstance(method, np.int32) and isinstance(sigma, np.float64) and isinstance(thr, np.float64)
    from service.soft_nms import box_iou_one, decay

    name = ("gaussian", "linear", "hard")[int(method)]
    for g in range(grid[0]):
        lo, hi = int(offsets.a[g]), int(offsets.a[g + 1])
        b, s, live = boxes.a[lo:hi], scores.a[lo:hi], alive.a[lo:hi].astype(bool)
        n = 0
        while live.any():
            cand = np.flatnonzero(live)
            k = int(cand[np.argmax(s[cand])])
            keep.a[lo + n], kept.a[lo + n] = k, s[k]
            n += 1
            live[k] = False
            rest = np.flatnonzero(live)
            s[rest] = s[rest] * decay(box_iou_one(b[k], b[rest]), name, float(sigma), float(nt))  # type: ignore[arg-type]
            live[rest] = s[rest] >= thr
        counts.a[g] = n


def _resize(kind: str) -> Any:
    def run(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        src, sh, sw, dst, dh, dw, sy, sx = args
        assert src.shape == (sh, sw, 3) and dst.shape == (dh, dw, 3)
        assert sy == 1.0 / (dh / sh) and sx == 1.0 / (dw / sw)  # OpenCV's scale, computed as OpenCV does
        assert grid[0] * block[0] >= dw and grid[1] * block[1] >= dh
        dst.a[...] = (emulate_linear if kind == "linear" else emulate_area)(src.a, int(dw), int(dh))

    return run


def _crop_kernel(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
    ptrs, hw, chips, scale, bias, bgr, size, out = args
    size = int(size)
    assert grid[2] == chips.shape[0] and grid[0] * block[0] >= size and grid[1] * block[1] >= size
    for k, (lv, x0, y0) in enumerate(chips.a.tolist()):
        img = fake_gpu._BY_ADDRESS[int(ptrs.a[lv])]
        h, w = hw.a[lv]
        assert img.shape == (h, w, 3)
        region = img[y0 : y0 + size, x0 : x0 + size]
        rh, rw = region.shape[:2]
        for c in range(3):
            plane = np.full((size, size), bias.a[c], np.float32)
            src = region[..., 2 - c if bgr else c].astype(np.float32)
            plane[:rh, :rw] = src * scale.a[c] + bias.a[c]
            out.a[k, c] = plane


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    cp, cupyx = fake_gpu.make_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(fake_gpu.KERNELS, "soft_nms_groups", _soft_nms_kernel)
    monkeypatch.setitem(fake_gpu.KERNELS, "resize_linear", _resize("linear"))
    monkeypatch.setitem(fake_gpu.KERNELS, "resize_area", _resize("area"))
    monkeypatch.setitem(fake_gpu.KERNELS, "crop_normalise", _crop_kernel)
    for cached in (soft_nms_gpu._kernel, soft_nms_gpu.gpu_available, crop_gpu._module):
        cached.cache_clear()
    yield cp
    for cached in (soft_nms_gpu._kernel, soft_nms_gpu.gpu_available, crop_gpu._module):
        cached.cache_clear()


# ---- soft-NMS ----------------------------------------------------------------------------------------------------


def test_soft_nms_host_code_with_fake_cupy(fake_cupy: Any) -> None:
    assert soft_nms_gpu.gpu_available()  # the probe run went through the (fake) kernel
    rng = np.random.default_rng(5)
    for i in range(20):
        method = ("gaussian", "linear", "hard")[i % 3]
        boxes, scores, groups = random_case(rng, int(rng.integers(1, 200)), classes=int(rng.integers(1, 5)))
        got = soft_nms_gpu.batched_soft_nms_auto(boxes, scores, groups, method, 0.5, 0.3, 0.01)  # type: ignore[arg-type]
        want = batched_soft_nms(boxes, scores, groups, method, 0.5, 0.3, 0.01)  # type: ignore[arg-type]
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


# ---- pre-processing ----------------------------------------------------------------------------------------------


def _plan(img: np.ndarray) -> Any:
    levels = (LevelSpec(scale=1.7), LevelSpec(scale=1.0), LevelSpec(scale=0.5), LevelSpec(scale=0.37))
    cfg = PlanConfig(chip_size=FAKE_CARD.input_size, levels=levels, sweet_spot=FAKE_CARD.sweet_spot)
    return plan((img.shape[1], img.shape[0]), cfg)


@pytest.mark.parametrize("bgr", [False, True])
def test_preprocess_host_code_with_fake_cupy(fake_cupy: Any, bgr: bool) -> None:
    img = smooth_image(np.random.default_rng(3), 200, 300)
    p = _plan(img)
    card = FAKE_CARD.model_copy(update={"channel_order": "BGR" if bgr else "RGB", "mean": (0.4, 0.5, 0.6)})
    norm = Normalizer.from_card(card)
    cpu_levels = resize_levels(img, p)
    want = crop_plan(cpu_levels, p, norm)
    exact = crop_gpu.crop_to_device(
        [fake_cupy.asarray(x) for x in cpu_levels], p.chips, norm, fake_cupy.empty(want.shape, np.float32)
    )
    np.testing.assert_array_equal(exact.get(), want)  # same levels: bit-exact
    whole = crop_gpu.preprocess_to_device(img, p, norm).get()
    assert whole.shape == want.shape
    assert np.abs(whole - want).max() <= float(norm.scale.max()) * 1.0001  # one grey level


# ---- TensorRT engine ---------------------------------------------------------------------------------------------

TRT_CARD = FAKE_CARD.model_copy(update={"input_name": "images", "output_names": ("mean", "top")})


def _fake_engine_files(tmp_path: Path, profile: BatchProfile, version: str = "10.99.0.1") -> Path:
    engine = tmp_path / "model.engine"
    spec = {"chip": TRT_CARD.input_size, "profile": [profile.min_batch, profile.opt_batch, profile.max_batch]}
    engine.write_text(json.dumps(spec))  # what the fake TensorRT runtime deserialises
    write_manifest(
        engine,
        EngineManifest(
            tensorrt_version=version,
            gpu_name="Fake GPU",
            compute_capability="9.0",
            precision="fp32",
            profile=profile,
            input_name="images",
            output_names=("mean", "top"),
            onnx_file="model.onnx",
            onnx_sha256="0" * 64,
            card=TRT_CARD.model_dump(mode="json", exclude_none=True),
            workspace_mib=64,
        ),
    )
    return engine


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch, fake_cupy: Any) -> Any:
    trt = fake_gpu.make_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


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
    # GPU pre-processing path: rows written straight into the device input buffer.
    engine.input_device.a[:3] = x[:3]  # type: ignore[union-attr]
    mean_dev, _ = engine.infer_device(3)  # type: ignore[attr-defined]
    np.testing.assert_allclose(mean_dev, mean[:3], rtol=1e-6)
    assert engine.max_batch == 4 and engine.precision == "fp32"
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
    assert config.flags == {"fp32": [], "fp16": ["FP16"], "int8": ["FP16", "INT8"]}[precision]
    if precision == "int8":
        assert m.calibration["chips"] == 16 and m.calibration["batch"] == 4
        assert config.calibration_profile.shape[1] == (4, 3, 128, 128)
        assert (tmp_path / "int8.calib").read_bytes() == b"calibration-table"
