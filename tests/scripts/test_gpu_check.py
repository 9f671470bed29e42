"""scripts/gpu_check.py's GPU rows, run on the CPU: CuPy is the stand-in whose kernels are the project's CUDA
source emulated by tests/cudasim (small sizes; the script's defaults are for a real device). This checks the
script itself -- argument order, shapes, the pass/fail logic -- so a GPU session's time is not lost to a crash
in it. The numbers it prints here mean nothing: emulated kernels are slow by design."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from service.engines.fake import FAKE_CARD

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_soft_nms_rows(fake_cupy: types.ModuleType, gpu_check: types.ModuleType) -> None:
    ok, detail = gpu_check.soft_nms_parity(cases=4, max_boxes=120)
    assert ok, detail
    assert "0 index mismatches" in detail
    ok, detail = gpu_check.soft_nms_bench(150, repeat=1)
    assert ok is None and "same indices: True" in detail


def test_preprocess_rows(fake_cupy: types.ModuleType, gpu_check: types.ModuleType) -> None:
    ok, detail = gpu_check.preprocess_parity(FAKE_CARD, size=(120, 160))
    assert ok, detail
    assert "crop+normalise bit-exact: True" in detail
    ok, detail = gpu_check.preprocess_bench(FAKE_CARD, repeat=1, size=(100, 130))
    assert ok is None and "GPU (upload+resize+crop)" in detail


def test_rows_skip_with_a_reason_without_cupy(gpu_check: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import fails, as on a CPU-only install
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    gpu_check.ROWS.clear()
    gpu_check.row("soft-NMS parity", lambda: gpu_check.soft_nms_parity(1))
    assert gpu_check.ROWS[-1].status == "SKIPPED (cupy not installed)"


def test_tensorrt_rows(fake_trt: types.ModuleType, gpu_check: types.ModuleType, tmp_path: Path) -> None:
    """Export, TensorRT vs ONNX Runtime, and the pipeline with GPU vs CPU pre-processing, on the shipped model
    (the stand-in's engines execute the model with ONNX Runtime, so parity here checks the script's logic)."""
    pytest.importorskip("onnx", reason="needs the export extra (onnx)")
    onnx_path = ROOT / "models" / "snipserve_default.onnx"
    gpu_check.ROWS.clear()
    engine = gpu_check.build(onnx_path, tmp_path, "fp16", None)
    assert gpu_check.ROWS[-1].status == "PASS" and engine.is_file()
    chips = np.random.default_rng(0).normal(0, 1, (40, 3, 256, 256)).astype(np.float32)
    ok, detail = gpu_check.trt_parity(engine, onnx_path, chips, 5e-2, 0.5)
    assert ok, detail
    ok, detail = gpu_check.staged_pipeline(engine, repeat=1, size=(300, 400))
    assert ok, detail
    assert "images/s with GPU pre-processing" in detail
