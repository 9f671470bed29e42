"""scripts/gpu_check.py, run on the CPU: CuPy is the stand-in whose kernels are the project's CUDA source emulated by
tests/cudasim, TensorRT the stand-in whose engines run the model with ONNX Runtime (small sizes; the script's
defaults are for a real device). This checks the script itself -- argument order, shapes, the pass/fail logic,
the time limits, the report -- so a device session is not lost to a crash in it. Its numbers mean nothing here:
emulated kernels are slow by design."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from service.engines.fake import FAKE_CARD

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "snipserve_default.onnx"


@pytest.fixture
def gpu_check(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.ROWS.clear()
    module.PROBE.update(ok=None, reason="not run")
    return module


# ---- the frame: time limits, budget, report ------------------------------------------------------------------


def test_a_step_past_its_limit_fails_and_the_next_runs(gpu_check: types.ModuleType) -> None:
    def slow() -> tuple[bool, str]:
        while True:
            time.sleep(0.01)

    gpu_check.row("slow step", slow, limit_s=1.0)
    gpu_check.row("next step", lambda: (True, "fine"))
    assert [(r.check, r.status) for r in gpu_check.ROWS] == [("slow step", "FAIL"), ("next step", "PASS")]
    assert "timed out after its 1 s limit" in gpu_check.ROWS[0].detail


def test_steps_are_skipped_once_the_budget_is_spent(gpu_check: types.ModuleType) -> None:
    gpu_check.BUDGET = gpu_check.Budget(4.0)  # less than the 5 s kept for the report
    gpu_check.row("late step", lambda: (True, "never runs"))
    assert gpu_check.ROWS[-1].status == "SKIPPED (time budget spent)"
    gpu_check.BUDGET = gpu_check.Budget(100.0, only="^soft")
    gpu_check.row("other", lambda: (True, ""))
    gpu_check.row("soft one", lambda: (True, ""))
    assert [r.status for r in gpu_check.ROWS[-2:]] == ["SKIPPED (not selected by --only)", "PASS"]


def test_report_writes_markdown_and_json(gpu_check: types.ModuleType, tmp_path: Path) -> None:
    dispatch = {"device": "gpu", "min_boxes": 5000, "max_group": 20000, "why": "measured crossover"}
    gpu_check.ROWS.append(
        gpu_check.Row("GPU soft-NMS vs NumPy, size sweep (x)", "GOAL MET", "d", {"dispatch": dispatch})
    )
    gpu_check.ROWS.append(gpu_check.Row("a | b", "FAIL", "broken"))
    text = gpu_check.report({"gpu": "none"}, tmp_path / "t.md", tmp_path / "t.json")
    assert (tmp_path / "t.md").read_text() == text and "| a | b | FAIL | 0.0 | broken |" in text
    payload = json.loads((tmp_path / "t.json").read_text())
    assert payload["soft_nms_dispatch"] == dispatch and payload["goals"] == {
        "GPU soft-NMS vs NumPy, size sweep (x)": "GOAL MET"
    }
    assert payload["rows"][1]["status"] == "FAIL"


# ---- compile probe, pytest, sanitizer ------------------------------------------------------------------------------


def test_compile_probe_passes_on_working_kernels(fake_cupy: types.ModuleType, gpu_check: types.ModuleType) -> None:
    ok, detail, data = gpu_check.compile_probe()
    assert ok and "resize_linear,resize_area,crop_normalise" in detail and gpu_check.PROBE["ok"] is True
    assert set(data["steps"]) == {"cupy fp16 kernel (cuda_fp16.h)", "pre-processing module", "soft-NMS kernel"}


def test_a_failed_compile_probe_skips_the_cupy_rows_with_its_reason(
    fake_cupy: types.ModuleType, gpu_check: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import crop_gpu

    def no_headers() -> None:
        raise RuntimeError("Failed to find CUDA headers")

    monkeypatch.setattr(crop_gpu, "compile_kernels", no_headers)
    gpu_check.row("probe", gpu_check.compile_probe)
    gpu_check.row("parity", lambda: gpu_check.soft_nms_parity(2))
    assert gpu_check.ROWS[0].status == "FAIL" and "Failed to find CUDA headers" in gpu_check.ROWS[0].detail
    assert gpu_check.ROWS[1].status == "SKIPPED (the compile probe failed: RuntimeError: Failed to find CUDA headers)"


def test_pytest_step_reports_passes_and_failures(gpu_check: types.ModuleType, tmp_path: Path) -> None:
    tests = ROOT / "tests" / "scripts" / "_gpu_check_probe_tmp"
    tests.mkdir(exist_ok=True)
    try:
        (tests / "test_ok.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_ok():\n    pass\n")
        (tests / "test_bad.py").write_text("import pytest\n\n@pytest.mark.gpu\ndef test_bad():\n    assert 0\n")
        rel = str(tests.relative_to(ROOT))
        ok, detail, data = gpu_check.run_pytest([f"{rel}/test_ok.py"], 120)
        assert ok is True and "1 passed" in detail
        ok, detail, data = gpu_check.run_pytest([f"{rel}/test_ok.py", f"{rel}/test_bad.py"], 120)
        assert ok is False and "1 failed" in detail and data["failed"]
    finally:
        for f in tests.iterdir():
            f.unlink()
        tests.rmdir()
    assert "tests/service/test_soft_nms_gpu.py" in gpu_check.gpu_test_files()


def test_sanitizer_rows_skip_without_the_tool(gpu_check: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "sanitizer_path", lambda: None)
    gpu_check.row("memcheck", lambda: gpu_check.run_sanitizer("memcheck", 10))
    assert gpu_check.ROWS[-1].status == "SKIPPED (compute-sanitizer not found)"


def test_kernel_driver_launches_every_kernel(
    fake_cupy: types.ModuleType, gpu_check: types.ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    """What compute-sanitizer watches: here against the emulated kernels (wrong arguments would fail)."""
    gpu_check.kernel_driver()
    assert "kernel driver: ok" in capsys.readouterr().out


# ---- kernel rows -----------------------------------------------------------------------------------------------


def test_soft_nms_rows(fake_cupy: types.ModuleType, gpu_check: types.ModuleType) -> None:
    ok, detail = gpu_check.soft_nms_parity(cases=4, max_boxes=120)
    assert ok, detail
    assert "0 index mismatches" in detail
    ok, detail, data = gpu_check.soft_nms_bench(150, repeat=1)
    assert ok is None and "same indices: True" in detail and data["same"] is True


def test_soft_nms_sweep_writes_dispatch_thresholds(fake_cupy: types.ModuleType, gpu_check: types.ModuleType) -> None:
    status, detail, data = gpu_check.soft_nms_sweep((30, 60), repeat=1)
    assert status in ("GOAL MET", "GOAL MISSED") and "dispatch: SNIPSERVE_SOFT_NMS_DEVICE=" in detail
    assert len(data["runs"]) == 4 and data["dispatch"]["device"] in ("cpu", "gpu")
    assert data["settings"][0].startswith("SNIPSERVE_SOFT_NMS_DEVICE=")


def run(n: int, classes: int, numpy_s: float, gpu_s: float, largest: int | None = None) -> dict[str, object]:
    return {"n": n, "classes": classes, "largest_group": largest or n, "numpy_s": numpy_s, "gpu_s": gpu_s, "same": True}


def test_dispatch_from_the_measured_crossover(gpu_check: types.ModuleType) -> None:
    from service.settings import Settings

    runs = [
        run(1000, 1, 0.001, 0.002),
        run(1000, 8, 0.001, 0.002, 140),
        run(5000, 1, 0.05, 0.01),
        run(5000, 8, 0.01, 0.004, 700),
        run(20000, 1, 0.9, 1.2),  # one huge class: the GPU loses
        run(20000, 8, 0.2, 0.02, 2600),
    ]
    d = gpu_check.dispatch_from(runs)
    assert (d["device"], d["min_boxes"], d["max_group"]) == ("gpu", 5000, 5000)
    lines = gpu_check.settings_lines(d)
    env = dict(line.split("=") for line in lines)
    assert Settings(**{k.removeprefix("SNIPSERVE_").lower(): v for k, v in env.items()}).soft_nms_dispatch() == (
        __import__("service.soft_nms_gpu", fromlist=["x"]).SoftNmsDispatch(device="gpu", min_boxes=5000, max_group=5000)
    )
    assert gpu_check.dispatch_from([run(1000, 8, 0.001, 0.01), run(20000, 8, 0.1, 0.2)])["device"] == "cpu"
    assert gpu_check.dispatch_from([{**run(1000, 8, 0.01, 0.001), "same": False}])["device"] == "cpu"
    everywhere = gpu_check.dispatch_from([run(1000, 1, 0.01, 0.001), run(1000, 8, 0.01, 0.001)])
    assert (everywhere["min_boxes"], everywhere["max_group"]) == (1000, None)


def test_preprocess_rows(fake_cupy: types.ModuleType, gpu_check: types.ModuleType) -> None:
    ok, detail = gpu_check.preprocess_parity(FAKE_CARD, size=(120, 160))
    assert ok, detail
    assert "crop+normalise bit-exact: True" in detail
    status, detail, data = gpu_check.preprocess_bench(FAKE_CARD, repeat=1, size=(100, 130))
    assert status.startswith("GOAL") and "GPU (upload+resize+crop)" in detail and data["chips"] > 0


def test_rows_skip_with_a_reason_without_cupy(gpu_check: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import fails, as on a CPU-only install
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    gpu_check.row("soft-NMS parity", lambda: gpu_check.soft_nms_parity(1))
    assert gpu_check.ROWS[-1].status == "SKIPPED (cupy not installed)"


# ---- TensorRT rows (stand-in engines running the shipped model with ONNX Runtime) ---------------------------------


@pytest.fixture
def fp16_engine(fake_trt: types.ModuleType, gpu_check: types.ModuleType, tmp_path: Path) -> Path:
    pytest.importorskip("onnx", reason="needs the export extra (onnx)")
    engine, built = gpu_check.build(SHIPPED, tmp_path, "fp16", None)
    assert engine.is_file() and built.manifest.profile.opt_batch == 16
    return Path(engine)


def test_tensorrt_parity_rows(fp16_engine: Path, gpu_check: types.ModuleType) -> None:
    chips = np.random.default_rng(0).normal(0, 1, (40, 3, 256, 256)).astype(np.float32)
    ok, detail, data = gpu_check.trt_parity(fp16_engine, SHIPPED, chips, "fp16")
    assert ok, detail
    assert "peak flips 0/" in detail and data["max_abs_diff"]["ltrb"] == 0.0
    img = gpu_check.test_image(300, 400, 3)
    ok, detail, totals = gpu_check.trt_detections(fp16_engine, SHIPPED, [img])
    assert totals["matched"] == totals["reference"] or not totals["reference"], detail


def test_service_and_pipeline_rows(fp16_engine: Path, gpu_check: types.ModuleType) -> None:
    status, detail, data = gpu_check.service_vs_engine(fp16_engine, (150, 200), n_images=2, repeat=1)
    assert status.startswith("GOAL") and "gpu pre-processing" in detail
    assert data["service_images_per_s"] > 0 and data["engine_images_per_s"] > 0
    ok, detail = gpu_check.staged_pipeline(fp16_engine, repeat=1, size=(300, 400))
    assert ok, detail
    assert "images/s with GPU pre-processing" in detail


def test_the_whole_run_with_stand_ins(
    fake_trt: types.ModuleType, gpu_check: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row wired end to end (tiny sizes): no row crashes; only the missing tools and providers skip."""
    pytest.importorskip("onnx", reason="needs the export extra (onnx)")
    monkeypatch.setattr(gpu_check, "sanitizer_path", lambda: None)
    gpu_check.BUDGET = gpu_check.Budget(600.0, only="^(?!pytest)")  # the pytest step has its own test
    sizes = gpu_check.Sizes(
        cases=3,
        repeat=1,
        sweep=(30,),
        parity_image=(60, 80),
        bench_image=(60, 80),
        service_image=(150, 200),
        service_images=2,
        detection_images=1,
        calibration_chips=8,
    )
    gpu_check.run_all(None, sizes)
    status = {r.check: r.status for r in gpu_check.ROWS}
    assert not [c for c, s in status.items() if s == "FAIL"], [r for r in gpu_check.ROWS if r.status == "FAIL"]
    skipped = {c for c, s in status.items() if s.startswith("SKIPPED")}
    assert skipped == {
        "compute-sanitizer memcheck (all kernels)",
        "compute-sanitizer racecheck (all kernels)",
        'pytest -m "gpu or tensorrt"',
        "ORT CUDA EP vs CPU EP",
        "ORT TensorRT EP (fp32) vs CPU EP",
        "ORT TensorRT EP (fp16) vs CPU EP",
    }, status
    text = gpu_check.report({"gpu": "stand-in"}, tmp_path / "r.md", tmp_path / "r.json")
    assert "TensorRT export int8 | PASS" in text
    assert json.loads((tmp_path / "r.json").read_text())["soft_nms_settings"][0].startswith("SNIPSERVE_SOFT_NMS")
