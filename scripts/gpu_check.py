"""Every GPU check and benchmark of issue 7, one Markdown table: PASS / FAIL / SKIPPED (reason) per row.

    .venv/bin/python scripts/gpu_check.py [--onnx models/snipserve_default.onnx] [--quick] [--json out.json]

Runs anywhere: on a machine without a GPU (or without TensorRT / CuPy / onnxruntime-gpu) the rows that need
them are SKIPPED with the reason. On a GPU host install the extras first: ``pip install -e '.[gpu,export,dev]'``.

Rows: environment (GPU, driver, CUDA, TensorRT, CuPy, ONNX Runtime); GPU soft-NMS parity on thousands of
random cases and its speed against NumPy at 1k / 5k / 20k boxes; GPU pre-processing parity (resize within one
grey level, crop bit-exact, whole path within tolerance) and speed; TensorRT engine builds (FP32, FP16, INT8);
TensorRT vs ONNX Runtime CPU (max |diff| and decoded detections); ONNX Runtime CUDA EP and TensorRT EP vs CPU;
the service pipeline on TensorRT with GPU vs CPU pre-processing (detections and images/s). Timings are medians
of repeated runs after a warm-up.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `tests.exporters.tiny_onnx` and the packages, without an install


@dataclass
class Row:
    check: str
    status: str  # PASS | FAIL | SKIPPED (reason) | INFO
    detail: str


class Skip(Exception):
    """A prerequisite is missing: the row is SKIPPED with this reason."""


ROWS: list[Row] = []


def row(check: str, fn: Callable[[], tuple[bool | None, str]]) -> None:
    """Run one check: ``fn`` returns (passed, detail); ``None`` = informational (a benchmark)."""
    try:
        ok, detail = fn()
        status = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    except Skip as exc:
        status, detail = f"SKIPPED ({exc})", ""
    except Exception as exc:  # noqa: BLE001 - every failure becomes a FAIL row, the script goes on
        status = "FAIL"
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        traceback.print_exc(file=sys.stderr)
    ROWS.append(Row(check, status, detail))
    print(f"[{status}] {check}: {detail}", file=sys.stderr, flush=True)


def need(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise Skip(f"{m} not installed")


def need_gpu() -> None:
    need("cupy")
    import cupy as cp

    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver
        raise Skip(f"no CUDA driver/device: {type(exc).__name__}") from None
    if n < 1:
        raise Skip("no CUDA device")


def need_trt() -> None:
    need("tensorrt")
    need_gpu()


def median_s(fn: Callable[[], Any], repeat: int, sync: Callable[[], None] | None = None) -> float:
    fn()  # warm-up (compilation, allocation)
    if sync:
        sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_sync() -> None:
    import cupy as cp

    cp.cuda.Device().synchronize()


# ---- environment -------------------------------------------------------------------------------------------------


def environment() -> dict[str, str]:
    env = {"python": platform.python_version(), "host": platform.node()}
    for mod in ("numpy", "cv2", "onnxruntime", "cupy", "tensorrt"):
        if importlib.util.find_spec(mod) is None:
            env[mod] = "not installed"
            continue
        try:
            env[mod] = str(__import__(mod).__version__)
        except Exception as exc:  # noqa: BLE001 - a broken install is reported, not fatal
            env[mod] = f"import failed: {exc}"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        env["gpu (nvidia-smi)"] = out.stdout.strip().replace("\n", "; ") or out.stderr.strip()[:120]
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        env["gpu (nvidia-smi)"] = f"unavailable ({type(exc).__name__})"
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy as cp

            env["cuda runtime (cupy)"] = str(cp.cuda.runtime.runtimeGetVersion())
            env["cuda driver (cupy)"] = str(cp.cuda.runtime.driverGetVersion())
        except Exception as exc:  # noqa: BLE001
            env["cuda (cupy)"] = f"unavailable: {type(exc).__name__}: {exc}"[:160]
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime as ort

        env["onnxruntime providers"] = ",".join(ort.get_available_providers())
    return env


# ---- soft-NMS ----------------------------------------------------------------------------------------------------


def random_boxes(rng: np.random.Generator, n: int, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered boxes like merged pyramid detections on a 4000 px image (many overlaps), some exact score ties:
    the soft-NMS tests' generator with wider parameters."""
    from tests.service.test_soft_nms_gpu import random_case

    return random_case(rng, n, classes, extent=4000, spread=8, max_side=60, tie_share=10)


def soft_nms_parity(cases: int, max_boxes: int = 600) -> tuple[bool, str]:
    need_gpu()
    from service.soft_nms import SoftNMSParams, batched_soft_nms
    from service.soft_nms_gpu import soft_nms_groups_gpu

    rng = np.random.default_rng(0)
    bad, worst = 0, 0.0
    for i in range(cases):
        method = ("gaussian", "linear", "hard")[i % 3]
        n = int(rng.integers(1, max_boxes))
        boxes, scores, groups = random_boxes(rng, n, int(rng.integers(1, 8)))
        thr = float(rng.choice([0.0, 0.001, 0.05, 0.3]))
        want = batched_soft_nms(boxes, scores, groups, SoftNMSParams(method, 0.5, 0.3, thr))  # type: ignore[arg-type]
        got = soft_nms_groups_gpu(boxes, scores, groups, SoftNMSParams(method, 0.5, 0.3, thr))  # type: ignore[arg-type]
        if not np.array_equal(got[0], want[0]):
            bad += 1
            continue
        if got[1].size:
            worst = max(worst, float(np.abs(got[1] - want[1]).max()))
    ok = bad == 0 and worst <= 1e-5
    return (
        ok,
        f"{cases} random cases (3 methods, 1-7 classes, ties): {bad} index mismatches, max |score diff| {worst:.2g}",
    )


def soft_nms_bench(n: int, repeat: int) -> tuple[None, str]:
    need_gpu()
    from service.soft_nms import batched_soft_nms
    from service.soft_nms_gpu import soft_nms_groups_gpu

    boxes, scores, groups = random_boxes(np.random.default_rng(n), n, 1)
    cpu = median_s(lambda: batched_soft_nms(boxes, scores, groups), max(1, repeat // 3))
    gpu = median_s(lambda: soft_nms_groups_gpu(boxes, scores, groups), repeat)
    same = np.array_equal(batched_soft_nms(boxes, scores, groups)[0], soft_nms_groups_gpu(boxes, scores, groups)[0])
    kept = len(batched_soft_nms(boxes, scores, groups)[0])
    return None, (
        f"{n} boxes, 1 class, {kept} kept: NumPy {cpu * 1e3:.2f} ms, GPU {gpu * 1e3:.2f} ms "
        f"(x{cpu / gpu:.1f}); same indices: {same}"
    )


# ---- pre-processing ----------------------------------------------------------------------------------------------


def test_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


def pyramid_plan(card: Any, image: np.ndarray, levels: Any = None) -> Any:
    from service.plan import PlanConfig, plan

    cfg = PlanConfig(
        chip_size=card.input_size,
        levels=levels or card.default_levels,
        sweet_spot=card.sweet_spot,
        max_chips=100_000,
    )
    return plan((image.shape[1], image.shape[0]), cfg)


def preprocess_parity(card: Any, size: tuple[int, int] = (1080, 1920)) -> tuple[bool, str]:
    need_gpu()
    import cupy as cp

    from service import crop_gpu
    from service.crop import Normalizer, crop_plan, resize_levels
    from service.plan import LevelSpec

    img = test_image(*size)
    levels = (LevelSpec(scale=1.6), LevelSpec(scale=1.0), LevelSpec(scale=0.41), LevelSpec(scale=0.25))
    p = pyramid_plan(card, img, levels)
    norm = Normalizer.from_card(card)
    cpu_levels = resize_levels(img, p)
    gpu_levels = crop_gpu.resize_levels_gpu(cp.asarray(img), p)
    diffs = [np.abs(a.astype(int) - cp.asnumpy(b)) for a, b in zip(cpu_levels, gpu_levels, strict=True)]
    resize_max = max(int(d.max()) for d in diffs)
    exact = float(np.mean([float((d == 0).mean()) for d in diffs]))
    want = crop_plan(cpu_levels, p, norm)
    same_levels = cp.asnumpy(
        crop_gpu.crop_to_device([cp.asarray(x) for x in cpu_levels], p.chips, norm, cp.empty(want.shape, cp.float32))
    )
    crop_exact = bool(np.array_equal(same_levels, want))
    whole = cp.asnumpy(crop_gpu.preprocess_to_device(img, p, norm))
    whole_max = float(np.abs(whole - want).max())
    tol = float(norm.scale.max()) * 1.0001
    ok = resize_max <= 1 and crop_exact and whole_max <= tol
    return ok, (
        f"{size[1]}x{size[0]}, 4 levels, {p.num_chips} chips: resize max |diff| {resize_max} grey level(s), "
        f"{exact:.2%} pixels exact; crop+normalise bit-exact: {crop_exact}; whole path max |diff| {whole_max:.3g} "
        f"(tolerance {tol:.3g})"
    )


def preprocess_bench(card: Any, repeat: int, size: tuple[int, int] = (3000, 4000)) -> tuple[None, str]:
    need_gpu()
    import cupy as cp

    from service import crop_gpu
    from service.crop import Normalizer, crop_plan, resize_levels

    img = test_image(*size, 1)
    p = pyramid_plan(card, img)
    norm = Normalizer.from_card(card)
    out_cpu = np.empty((p.num_chips, 3, card.input_size, card.input_size), np.float32)
    out_gpu = cp.empty(out_cpu.shape, cp.float32)
    cpu = median_s(lambda: crop_plan(resize_levels(img, p), p, norm, out=out_cpu), max(1, repeat // 3))
    gpu = median_s(lambda: crop_gpu.preprocess_to_device(img, p, norm, out=out_gpu), repeat, cuda_sync)
    return None, (
        f"{size[1]}x{size[0]}, default levels, {p.num_chips} chips: CPU (OpenCV+NumPy) {cpu * 1e3:.1f} ms, "
        f"GPU (upload+resize+crop) {gpu * 1e3:.1f} ms (x{cpu / gpu:.1f})"
    )


# ---- TensorRT ----------------------------------------------------------------------------------------------------


def decoded(card: Any, outputs: list[np.ndarray], threshold: float) -> Any:
    from service.adapters import get_adapter

    n = outputs[0].shape[0]
    return get_adapter(card)(outputs, card, np.full(n, threshold, np.float32))


def detections_match(card: Any, got: list[np.ndarray], want: list[np.ndarray], box_tol: float) -> tuple[int, int, int]:
    """(reference detections, matched, near-threshold unmatched): a detection matches one of the same chip and
    class with every box edge within ``box_tol`` px; unmatched ones whose reference score is within 0.01 of
    the threshold are counted apart (a rounding-level change can cross the threshold)."""
    thr = card.score_threshold
    a, b = decoded(card, want, thr), decoded(card, got, thr)
    matched = near = 0
    used = np.zeros(len(b), bool)
    for i in range(len(a)):
        cand = np.flatnonzero((b.chip == a.chip[i]) & (b.classes == a.classes[i]) & ~used)
        if cand.size:
            d = np.abs(b.boxes[cand] - a.boxes[i]).max(1)
            j = int(np.argmin(d))
            if d[j] <= box_tol:
                used[cand[j]] = True
                matched += 1
                continue
        if abs(float(a.scores[i]) - thr) < 0.01:
            near += 1
    return len(a), matched, near


def build(onnx_path: Path, work: Path, precision: str, calib: Path | None) -> Path:
    from exporters.tensorrt import TensorRTExportConfig, build_engine
    from service.engines.manifest import BatchProfile

    engine = work / f"model_{precision}.engine"
    cfg = TensorRTExportConfig(
        precision=precision,  # type: ignore[arg-type]
        profile=BatchProfile(min_batch=1, opt_batch=8, max_batch=32),
        workspace_mib=2048,
        timing_cache=work / "timing.cache",
        calibration_images=calib if precision == "int8" else None,
        calibration_chips=128,
    )
    report = build_engine(onnx_path, engine, cfg)
    ROWS.append(Row(f"TensorRT export {precision}", "PASS", report.summary()))
    print(f"[PASS] TensorRT export {precision}: {report.summary()}", file=sys.stderr, flush=True)
    return engine


def trt_parity(engine: Path, onnx_path: Path, chips: np.ndarray, tol: float, box_tol: float) -> tuple[bool, str]:
    from service.engines import EngineConfig
    from service.engines.onnxruntime import OnnxRuntimeEngine
    from service.engines.tensorrt import TensorRTEngine

    trt_e = TensorRTEngine(engine, EngineConfig(kind="tensorrt", max_batch=32))
    ort_e = OnnxRuntimeEngine(onnx_path, EngineConfig(max_batch=64))
    try:
        got, want = trt_e.infer(chips), ort_e.infer(chips)  # 40 chips: split 32 + 8
        diff = max(float(np.abs(g.astype(np.float64) - w).max()) for g, w in zip(got, want, strict=True))
        n, matched, near = detections_match(trt_e.card, got, want, box_tol)
    finally:
        trt_e.close()
        ort_e.close()
    ok = diff <= tol and matched + near == n
    return ok, (
        f"{chips.shape[0]} chips: max |diff| {diff:.3g} (tolerance {tol:g}); detections {matched}/{n} matched "
        f"within {box_tol:g} px, {near} unmatched within 0.01 of the threshold"
    )


def trt_bench(engine: Path, onnx_path: Path, chips: np.ndarray, repeat: int) -> tuple[None, str]:
    from service.engines import EngineConfig
    from service.engines.onnxruntime import OnnxRuntimeEngine
    from service.engines.tensorrt import TensorRTEngine

    b = chips[:8]
    trt_e = TensorRTEngine(engine, EngineConfig(kind="tensorrt", max_batch=32))
    try:
        t_trt = median_s(lambda: trt_e.infer(b), repeat)
    finally:
        trt_e.close()
    parts = [f"batch 8: TensorRT {t_trt * 1e3:.2f} ms"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        cuda_e = OnnxRuntimeEngine(onnx_path, EngineConfig(providers=("cuda",), max_batch=32))
        parts.append(f"ORT CUDA EP {median_s(lambda: cuda_e.infer(b), repeat) * 1e3:.2f} ms")
        cuda_e.close()
    cpu_e = OnnxRuntimeEngine(onnx_path, EngineConfig(max_batch=32))
    parts.append(f"ORT CPU {median_s(lambda: cpu_e.infer(b), max(1, repeat // 5)) * 1e3:.2f} ms")
    cpu_e.close()
    return None, ", ".join(parts)


def ort_ep_parity(
    onnx_path: Path, chips: np.ndarray, providers: tuple[str, ...], fp16: bool, tol: float, work: Path
) -> tuple[bool, str]:
    need("onnxruntime")
    import onnxruntime as ort

    from service.engines import ORT_PROVIDER_NAMES, EngineConfig
    from service.engines.onnxruntime import OnnxRuntimeEngine

    if ORT_PROVIDER_NAMES[providers[0]] not in ort.get_available_providers():
        raise Skip(f"{ORT_PROVIDER_NAMES[providers[0]]} not in this onnxruntime build")
    need_gpu()
    cfg = EngineConfig(providers=providers, fp16=fp16, max_batch=64, trt_cache_dir=work / "ort_trt_cache")
    gpu_e = OnnxRuntimeEngine(onnx_path, cfg)  # fails (ModelLoadError) if ORT fell back to the CPU
    cpu_e = OnnxRuntimeEngine(onnx_path, EngineConfig(max_batch=64))
    try:
        got, want = gpu_e.infer(chips), cpu_e.infer(chips)
        diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
        n, matched, near = detections_match(cpu_e.card, got, want, 0.5 if fp16 else 1e-2)
        active = ",".join(gpu_e.providers)
    finally:
        gpu_e.close()
        cpu_e.close()
    ok = diff <= tol and matched + near == n
    return ok, (
        f"active [{active}], max |diff| vs CPU EP {diff:.3g} (tolerance {tol:g}); detections {matched}/{n} matched, "
        f"{near} near-threshold"
    )


def staged_pipeline(engine: Path, repeat: int, size: tuple[int, int] = (1080, 1920)) -> tuple[bool, str]:
    """The service's pipeline on the TensorRT engine with pre-processing on the GPU (DeviceStaging) vs on the
    CPU (HostStaging): same detections (within the resize tolerance), and images/s of each."""
    from service.engines import EngineConfig
    from service.engines.tensorrt import TensorRTEngine
    from service.options import DetectOptions
    from service.pipeline import Pipeline

    trt_e = TensorRTEngine(engine, EngineConfig(kind="tensorrt", max_batch=32))
    try:
        gpu, cpu = Pipeline(trt_e, preprocess="gpu"), Pipeline(trt_e, preprocess="cpu")
        img = test_image(*size, 8)
        opts = DetectOptions()
        got, want = gpu.detect(img, opts), cpu.detect(img, opts)
        t_gpu = median_s(lambda: gpu.detect(img, opts), repeat)
        t_cpu = median_s(lambda: cpu.detect(img, opts), repeat)
    finally:
        trt_e.close()
    n = len(want.scores)
    matched = 0
    if n and len(got.scores):
        from service.soft_nms import box_iou_one

        for i in range(n):
            iou = box_iou_one(want.boxes[i].astype(np.float64), got.boxes.astype(np.float64))
            matched += bool((iou > 0.9).any())
    ok = abs(len(got.scores) - n) <= max(2, n // 50) and matched >= 0.97 * n
    return ok, (
        f"{size[1]}x{size[0]}, {got.num_chips} chips: {len(got.scores)} vs {n} detections, {matched}/{n} matched "
        f"(IoU > 0.9); "
        f"{1 / t_gpu:.1f} images/s with GPU pre-processing vs {1 / t_cpu:.1f} with CPU ({t_cpu / t_gpu:.2f}x)"
    )


# ---- main --------------------------------------------------------------------------------------------------------


def model_path(arg: Path | None, work: Path) -> tuple[Path, str]:
    default = ROOT / "models" / "snipserve_default.onnx"
    if arg is not None:
        return arg, f"{arg}"
    if default.is_file():
        return default, "the shipped model"
    need("onnx")
    from tests.exporters.tiny_onnx import tiny_detector_onnx

    return tiny_detector_onnx(work / "tiny.onnx"), "tiny random-weight detector (no shipped model found)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=None, help="ONNX model (default: the shipped one, else a tiny one)")
    ap.add_argument("--quick", action="store_true", help="fewer parity cases and repeats")
    ap.add_argument("--json", type=Path, default=None, help="also write rows and environment as JSON")
    args = ap.parse_args(argv)
    cases, repeat = (300, 5) if args.quick else (3000, 20)
    env = environment()

    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        from service.engines.fake import FAKE_CARD

        row("GPU soft-NMS parity vs NumPy", lambda: soft_nms_parity(cases))
        for n in (1000, 5000, 20000):
            row(f"GPU soft-NMS speed, {n} boxes", lambda n=n: soft_nms_bench(n, repeat))  # type: ignore[misc]

        onnx_path: Path | None = None
        card: Any = FAKE_CARD
        try:
            onnx_path, what = model_path(args.onnx, work)
            from service.engines import EngineConfig
            from service.engines.onnxruntime import OnnxRuntimeEngine

            e = OnnxRuntimeEngine(onnx_path, EngineConfig())
            card = e.card
            e.close()
            ROWS.append(Row("model", "INFO", f"{what}: {card.name}, chip {card.input_size}"))
        except Skip as exc:
            ROWS.append(Row("model", f"SKIPPED ({exc})", "no ONNX model and no onnx package to make one"))

        row("GPU pre-processing parity vs CPU", lambda: preprocess_parity(card))
        row("GPU pre-processing speed", lambda: preprocess_bench(card, repeat))

        chips = np.random.default_rng(0).normal(0, 1, (40, 3, card.input_size, card.input_size)).astype(np.float32)
        if onnx_path is not None:
            from service.crop import Normalizer, crop_plan, resize_levels

            real = test_image(1080, 1920, 5)
            p = pyramid_plan(card, real)
            real_chips = crop_plan(resize_levels(real, p), p, Normalizer.from_card(card))
            picks = np.linspace(0, p.num_chips - 1, min(40, p.num_chips)).astype(int)
            chips = np.ascontiguousarray(real_chips[picks])  # the service's own pre-processing

        engines: dict[str, Path] = {}
        calib = work / "calib"
        for precision in ("fp32", "fp16", "int8"):
            try:
                need_trt()
                if onnx_path is None:
                    raise Skip("no ONNX model")
                if precision == "int8" and not calib.exists():
                    import cv2

                    calib.mkdir()
                    for i in range(4):  # calibration images; chips are cut by the service's own pipeline
                        cv2.imwrite(str(calib / f"{i}.png"), test_image(720, 1280, 10 + i))
                engines[precision] = build(onnx_path, work, precision, calib)  # appends its PASS row
            except Skip as exc:
                ROWS.append(Row(f"TensorRT export {precision}", f"SKIPPED ({exc})", ""))
            except Exception as exc:  # noqa: BLE001 - a failed build is a FAIL row; the other checks go on
                traceback.print_exc(file=sys.stderr)
                ROWS.append(Row(f"TensorRT export {precision}", "FAIL", f"{type(exc).__name__}: {exc}"[:300]))

        tolerances = {"fp32": (1e-3, 1e-2), "fp16": (5e-2, 0.5), "int8": (0.25, 2.0)}
        for precision in ("fp32", "fp16", "int8"):
            tol, box_tol = tolerances[precision]

            def parity(precision: str = precision, tol: float = tol, box_tol: float = box_tol) -> tuple[bool, str]:
                if precision not in engines:
                    raise Skip(f"no {precision} engine (see its export row)")
                assert onnx_path is not None
                return trt_parity(engines[precision], onnx_path, chips, tol, box_tol)

            row(f"TensorRT {precision} vs ONNX Runtime CPU", parity)

        def bench() -> tuple[None, str]:
            if "fp16" not in engines or onnx_path is None:
                raise Skip("no fp16 engine")
            return trt_bench(engines["fp16"], onnx_path, chips, repeat)

        row("TensorRT fp16 speed", bench)

        def staged() -> tuple[bool, str]:
            if "fp16" not in engines:
                raise Skip("no fp16 engine")
            return staged_pipeline(engines["fp16"], repeat)

        row("Pipeline on TensorRT fp16: GPU vs CPU pre-processing", staged)

        for label, providers, fp16, tol in (
            ("ORT CUDA EP vs CPU EP", ("cuda",), False, 1e-3),
            ("ORT TensorRT EP (fp32) vs CPU EP", ("tensorrt", "cuda"), False, 1e-3),
            ("ORT TensorRT EP (fp16) vs CPU EP", ("tensorrt", "cuda"), True, 5e-2),
        ):

            def ep(providers: tuple[str, ...] = providers, fp16: bool = fp16, tol: float = tol) -> tuple[bool, str]:
                if onnx_path is None:
                    raise Skip("no ONNX model")
                return ort_ep_parity(onnx_path, chips, providers, fp16, tol, work)

            row(label, ep)

    print("| environment | value |")
    print("|---|---|")
    for k, v in env.items():
        print(f"| {k} | {v} |")
    print()
    print("| check | status | detail |")
    print("|---|---|---|")
    for r in ROWS:
        print(f"| {r.check} | {r.status} | {r.detail} |")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in ROWS]}, indent=2))
    return 1 if any(r.status == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
