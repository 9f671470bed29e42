"""``snipserve export tensorrt``: CLI and calibration data on any machine; engine builds on a GPU with TensorRT.

The ``gpu``/``tensorrt`` tests build FP32 and FP16 engines from a tiny random-weight detector, check the
manifest, parity against ONNX Runtime on the CPU, and that a manifest from another TensorRT version or
GPU is refused with a clear error. They skip with the reason where TensorRT, CuPy or a GPU is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from exporters.tensorrt import ExportError, calibration_chips
from service.engines.fake import FAKE_CARD
from service.errors import ModelLoadError


def _trt_reason() -> str | None:
    for mod, extra in (("tensorrt", "TensorRT"), ("cupy", "CuPy"), ("onnx", "onnx (the export extra)")):
        if importlib.util.find_spec(mod) is None:
            return f"{extra} is not installed"
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # noqa: BLE001 - no driver raises CUDARuntimeError
        return f"no usable CUDA device: {exc}"
    return None


TRT_REASON = _trt_reason()
requires_trt = pytest.mark.skipif(TRT_REASON is not None, reason=TRT_REASON or "")


def parse(argv: list[str]) -> argparse.Namespace:
    from exporters.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_parses_tensorrt_options() -> None:
    args = parse(
        ["tensorrt", "--onnx", "m.onnx", "--precision", "int8", "--max-batch", "64", "--calibration-images", "imgs"]
    )
    assert (args.format, args.onnx, args.precision, args.max_batch) == ("tensorrt", Path("m.onnx"), "int8", 64)
    assert args.calibration_images == Path("imgs") and args.engine is None and args.min_batch == 1


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is installed here: the missing-extra message cannot show")
def test_cli_without_tensorrt_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    assert main(["export", "tensorrt", "--precision", "fp32"]) == 2
    assert "gpu' extra" in capsys.readouterr().err


def write_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 256, (90 + 10 * i, 120, 3), dtype=np.uint8)
        assert cv2.imwrite(str(folder / f"im{i}.png"), img)
    (folder / "notes.txt").write_text("not an image")


def test_calibration_chips_come_from_the_service_pipeline(tmp_path: Path) -> None:
    write_images(tmp_path / "imgs", 3)
    chips = calibration_chips(tmp_path / "imgs", FAKE_CARD, max_chips=5)
    c = FAKE_CARD.input_size
    assert chips.dtype == np.float32 and chips.shape == (5, 3, c, c)
    np.testing.assert_array_equal(chips, calibration_chips(tmp_path / "imgs", FAKE_CARD, max_chips=5))  # seeded
    # Normalised pixels: (x / 255 - mean) / std, within the card's range.
    lo = (0 - max(FAKE_CARD.mean)) / min(FAKE_CARD.std)
    hi = (1 - min(FAKE_CARD.mean)) / min(FAKE_CARD.std)
    assert lo - 1e-6 <= chips.min() and chips.max() <= hi + 1e-6


def test_calibration_chips_need_images(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no images"):
        calibration_chips(tmp_path / "empty", FAKE_CARD, max_chips=8)


# ---- on a GPU with TensorRT --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.exporters.tiny_onnx import tiny_detector_onnx

    return tiny_detector_onnx(tmp_path_factory.mktemp("trt") / "tiny.onnx")


@pytest.mark.gpu
@pytest.mark.tensorrt
@requires_trt
@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-3), ("fp16", 3e-2)])
def test_build_engine_manifest_and_parity(tiny_onnx: Path, tmp_path: Path, precision: str, tolerance: float) -> None:
    from exporters.tensorrt import TensorRTExportConfig, build_engine, engine_parity
    from service.engines.manifest import BatchProfile, read_manifest, sha256_file

    cfg = TensorRTExportConfig(
        precision=precision,  # type: ignore[arg-type]
        profile=BatchProfile(min_batch=1, opt_batch=4, max_batch=8),
        workspace_mib=256,
        timing_cache=tmp_path / "timing.cache",
    )
    engine = tmp_path / f"tiny_{precision}.engine"
    report = build_engine(tiny_onnx, engine, cfg)
    m = read_manifest(engine)
    assert m == report.manifest and m.precision == precision and m.onnx_sha256 == sha256_file(tiny_onnx)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    chips = np.random.default_rng(0).normal(0, 1, (11, 3, 128, 128)).astype(np.float32)
    parity = engine_parity(engine, tiny_onnx, chips, max_batch=8)  # 11 rows: split 8 + 3
    assert parity.outputs.ok(tolerance, tolerance), parity.summary()  # peak flips only at near-ties


@pytest.mark.gpu
@pytest.mark.tensorrt
@requires_trt
def test_engine_from_another_tensorrt_version_is_refused(tiny_onnx: Path, tmp_path: Path) -> None:
    from exporters.tensorrt import TensorRTExportConfig, build_engine
    from service.engines import EngineConfig, create_engine
    from service.engines.manifest import manifest_path

    engine = tmp_path / "tiny.engine"
    build_engine(tiny_onnx, engine, TensorRTExportConfig(precision="fp32", workspace_mib=256))
    data = json.loads(manifest_path(engine).read_text())
    manifest_path(engine).write_text(json.dumps({**data, "tensorrt_version": "9.9.9"}))
    with pytest.raises(ModelLoadError, match=r"built with TensorRT 9\.9\.9"):
        create_engine(engine, EngineConfig(kind="tensorrt"))
    manifest_path(engine).write_text(json.dumps({**data, "compute_capability": "1.0"}))
    with pytest.raises(ModelLoadError, match=r"compute capability 1\.0"):
        create_engine(engine, EngineConfig(kind="tensorrt"))
