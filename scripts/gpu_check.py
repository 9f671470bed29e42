"""The one-shot device check: every GPU check and benchmark, one Markdown table and one JSON file, in minutes.

    python3 scripts/gpu_check.py --budget-s 420 --markdown gpu_check.md --json gpu_check.json [--quick] [--only RE]

Installs nothing: it runs on what is there (the ``gpu`` extra, or the device image's own CuPy) and marks every row
whose prerequisite is missing SKIPPED with the reason. Order, cheapest and most telling first:

1. environment (GPU, driver, CUDA, TensorRT, CuPy, ONNX Runtime and its providers);
2. a compile probe: CuPy's own fp16 kernels (``cuda_fp16.h``), the pre-processing module and the soft-NMS kernel
   through NVRTC, and where CuPy finds the CUDA headers -- when it fails, every CuPy row below says so;
3. ``pytest -m "gpu or tensorrt"`` on the test files that hold such tests (the emulated kernel tests, on the device);
4. ``compute-sanitizer`` memcheck and racecheck on every kernel (this script's ``--kernel-driver`` mode), where
   the tool exists;
5. parity rows: GPU soft-NMS vs NumPy (thousands of random cases), GPU pre-processing vs OpenCV, TensorRT FP32 /
   FP16 / INT8 engines vs ONNX Runtime CPU (the ONNX exporter's near-tie handling for peak suppression), TensorRT
   FP16 detections vs ORT CPU (IoU > 0.9, scores within 0.02), ORT CUDA EP and TensorRT EP vs the CPU EP;
6. benchmark rows, against the issue's goals: GPU soft-NMS vs NumPy over a size sweep up to 20k boxes (the
   crossover gives the dispatch thresholds, written to the JSON as ``soft_nms_dispatch`` and as settings), GPU
   pre-processing vs OpenCV at 12 MP, TensorRT FP16 engine-only limit at batch 16 vs the service's images/s
   through the batcher, the pipeline with GPU vs CPU pre-processing.

Every step has its own time limit inside the overall ``--budget-s`` (default 420 s: the script ends well inside
8 minutes); a step past its limit is a FAIL row ("timed out"), steps left when the budget is spent are SKIPPED.
Exit status 1 when any row FAILs. Timings are medians of repeated runs after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `tests.exporters.tiny_onnx` and the packages, without an install

GOALS = {
    "service_vs_engine": 0.9,  # service images/s >= 0.9 x the TensorRT engine-only limit (FP16, batch 16)
    "soft_nms_20k": 10.0,  # GPU soft-NMS >= 10x NumPy at 20k boxes
    "preprocess_12mp": 5.0,  # GPU pre-processing >= 5x OpenCV at 12 MP
}


@dataclass
class Row:
    check: str
    status: str  # PASS | FAIL | SKIPPED (reason) | INFO | GOAL MET | GOAL MISSED
    detail: str
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class Skip(Exception):
    """A prerequisite is missing: the row is SKIPPED with this reason."""


class StepTimeout(Exception):
    """A step ran past its own time limit."""


ROWS: list[Row] = []


class Budget:
    """The script's overall time budget; each step gets at most its own limit and never more than what is left."""

    def __init__(self, total_s: float, only: str | None = None) -> None:
        self.t0 = time.monotonic()
        self.total_s = total_s
        self.only = re.compile(only) if only else None

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.t0)

    def limit(self, step_s: float) -> float:
        return max(0.0, min(step_s, self.left() - 5.0))  # 5 s kept for writing the report


BUDGET = Budget(420.0)
PROBE: dict[str, Any] = {"ok": None, "reason": "not run"}


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`StepTimeout` in this (main) thread after ``seconds`` (Python-level: a blocking C call is
    interrupted when it returns; subprocess steps have their own timeouts)."""

    def expire(signum: int, frame: Any) -> None:
        raise StepTimeout(f"timed out after its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def row(check: str, fn: Callable[[], tuple[Any, ...]], limit_s: float = 60.0) -> Row:
    """Run one step: ``fn`` returns ``(passed, detail[, data])``; ``passed`` None = INFO, or a status string."""
    t0 = time.monotonic()
    limit = BUDGET.limit(limit_s)
    data: dict[str, Any] = {}
    if BUDGET.only is not None and not BUDGET.only.search(check):
        status, detail = "SKIPPED (not selected by --only)", ""
    elif limit < 1.0:
        status, detail = "SKIPPED (time budget spent)", ""
    else:
        try:
            with time_limit(limit):
                ok, detail, *rest = fn()
            data = rest[0] if rest else {}
            status = ok if isinstance(ok, str) else ("INFO" if ok is None else ("PASS" if ok else "FAIL"))
        except Skip as exc:
            status, detail = f"SKIPPED ({exc})", ""
        except StepTimeout as exc:
            status, detail = "FAIL", str(exc)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a FAIL row, the script goes on
            status = "FAIL"
            detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:400]
            traceback.print_exc(file=sys.stderr)
    r = Row(check, status, detail, data, round(time.monotonic() - t0, 2))
    ROWS.append(r)
    print(f"[{status}] {check} ({r.seconds:.1f} s): {detail}", file=sys.stderr, flush=True)
    return r


def goal(ratio: float, target: float) -> str:
    return "GOAL MET" if ratio >= target else "GOAL MISSED"


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
    if PROBE["ok"] is False:
        raise Skip(f"the compile probe failed: {PROBE['reason']}")


def need_trt() -> None:
    need("tensorrt")
    need_gpu()


def median_s(fn: Callable[[], Any], repeat: int, sync: Callable[[], None] | None = None, cap_s: float = 20.0) -> float:
    """Median seconds of ``fn`` over up to ``repeat`` runs after a warm-up; stops repeating after ``cap_s``."""
    fn()  # warm-up (compilation, allocation)
    if sync:
        sync()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > cap_s:
            break
    return statistics.median(times)


def cuda_sync() -> None:
    import cupy as cp

    cp.cuda.Device().synchronize()


# ---- environment and the compile probe -------------------------------------------------------------------------


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
    env["compute-sanitizer"] = sanitizer_path() or "not found"
    return env


def cuda_include_dir() -> str:
    """Where CuPy looks for the CUDA headers (best effort across CuPy 13 and 14)."""
    import cupy as cp

    for probe in (
        lambda: cp.cuda.get_cuda_path(),
        lambda: os.environ.get("CUDA_PATH"),
    ):
        with contextlib.suppress(Exception):
            path = probe()
            if path:
                return str(Path(path) / "include")
    return "unknown"


def compile_probe() -> tuple[bool, str, dict[str, Any]]:
    """CuPy's own fp16 kernel, the pre-processing module and the soft-NMS kernel, compiled and run once."""
    need("cupy")
    import cupy as cp

    from service import crop_gpu, soft_nms_gpu

    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise Skip("no CUDA device")
    except Skip:
        raise
    except Exception as exc:  # noqa: BLE001 - no driver
        raise Skip(f"no CUDA driver/device: {type(exc).__name__}") from None
    steps: dict[str, str] = {}
    try:
        steps["cupy fp16 kernel (cuda_fp16.h)"] = str(cp.ones(4, cp.float16).get().tolist())
        crop_gpu.compile_kernels()
        steps["pre-processing module"] = ",".join(crop_gpu.KERNEL_NAMES)
        soft_nms_gpu.gpu_available.cache_clear()
        if not soft_nms_gpu.gpu_available():
            raise RuntimeError("the soft-NMS probe run failed (see the log above)")
        steps["soft-NMS kernel"] = soft_nms_gpu.KERNEL_NAME
    except Exception as exc:  # noqa: BLE001 - the reason every CuPy row will give
        PROBE.update(ok=False, reason=f"{type(exc).__name__}: {exc}"[:300])
        return False, f"{PROBE['reason']} (CUDA headers looked for in {cuda_include_dir()})", {"steps": steps}
    PROBE.update(ok=True, reason="")
    done = "; ".join(f"{k}: {v}" for k, v in steps.items())
    return True, f"compiled and ran: {done}; headers from {cuda_include_dir()}", {"steps": steps}


# ---- pytest and compute-sanitizer --------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    """The test files holding ``gpu``/``tensorrt`` tests (collecting the rest would need the whole dev extra)."""
    marked = re.compile(r"mark\.gpu|mark\.tensorrt|cupy_backend")
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").rglob("test_*.py")
        if marked.search(p.read_text(encoding="utf-8", errors="replace"))
    )


def run_pytest(files: list[str], timeout_s: float) -> tuple[bool | str, str, dict[str, Any]]:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu or tensorrt", "-q", "-rfEs", "-p", "no:cacheprovider", *files]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:.0f} s", {}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else proc.stderr.strip()[-200:]
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:8]
    data = {"returncode": proc.returncode, "summary": summary, "failed": failed, "files": files}
    if proc.returncode == 0 and " passed" not in summary:
        skips = [ln for ln in lines if ln.startswith("SKIPPED")][:3]
        return "SKIPPED (every GPU test skipped)", f"{summary}; {' | '.join(skips)}"[:400], data
    return proc.returncode == 0, f"{summary}{'; ' + ' | '.join(failed) if failed else ''}"[:400], data


def sanitizer_path() -> str | None:
    found = shutil.which("compute-sanitizer")
    for candidate in (found, "/usr/local/cuda/bin/compute-sanitizer"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def run_sanitizer(tool: str, timeout_s: float) -> tuple[bool, str, dict[str, Any]]:
    """``compute-sanitizer --tool <tool>`` over this script's ``--kernel-driver`` mode (every kernel once)."""
    path = sanitizer_path()
    if path is None:
        raise Skip("compute-sanitizer not found")
    need_gpu()
    cmd = [
        path,
        "--tool",
        tool,
        "--error-exitcode",
        "3",
        sys.executable,
        str(Path(__file__).resolve()),
        "--kernel-driver",
    ]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout_s:.0f} s", {}
    out = proc.stdout + proc.stderr
    summary = re.findall(r"ERROR SUMMARY: (\d+) error", out)
    errors = int(summary[-1]) if summary else -1
    ok = proc.returncode == 0 and errors == 0 and "kernel driver: ok" in out
    first = next((ln for ln in out.splitlines() if "=========" in ln and ("Invalid" in ln or "hazard" in ln)), "")
    detail = f"{errors} error(s) reported, exit {proc.returncode}" + (
        f"; first: {first.strip()[:200]}" if first else ""
    )
    return ok, detail, {"errors": errors, "returncode": proc.returncode, "tail": out[-1500:]}


def kernel_driver() -> None:
    """Launch every kernel once on small inputs (what the sanitizer watches): soft-NMS (three methods, two block
    sizes), both resize kernels and the crop; plain device allocations so out-of-bounds accesses are visible."""
    import cupy as cp

    from service import crop_gpu
    from service.crop import Normalizer
    from service.engines.fake import FAKE_CARD
    from service.plan import LevelSpec
    from service.soft_nms import SoftNMSParams
    from service.soft_nms_gpu import soft_nms_groups_gpu

    with contextlib.suppress(Exception):
        cp.cuda.set_allocator(None)  # no pool: every array its own allocation, exact bounds for memcheck
    boxes, scores, groups = random_boxes(np.random.default_rng(0), 300, 3)
    for method, threads in (("gaussian", 256), ("linear", 64), ("hard", 32)):
        soft_nms_groups_gpu(boxes, scores, groups, SoftNMSParams(method), block_threads=threads)  # type: ignore[arg-type]
    img = test_image(97, 131, 3)
    levels = (LevelSpec(scale=1.7), LevelSpec(scale=0.6), LevelSpec(scale=0.5))
    p = pyramid_plan(FAKE_CARD, img, levels)
    crop_gpu.preprocess_to_device(img, p, Normalizer.from_card(FAKE_CARD))
    cuda_sync()
    print("kernel driver: ok", flush=True)


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


def soft_nms_bench(n: int, repeat: int, classes: int = 1) -> tuple[None, str, dict[str, Any]]:
    need_gpu()
    from service.soft_nms import batched_soft_nms
    from service.soft_nms_gpu import soft_nms_groups_gpu

    boxes, scores, groups = random_boxes(np.random.default_rng(n + classes), n, classes)
    cpu = median_s(lambda: batched_soft_nms(boxes, scores, groups), max(1, repeat // 3))
    gpu = median_s(lambda: soft_nms_groups_gpu(boxes, scores, groups), repeat)
    want = batched_soft_nms(boxes, scores, groups)
    same = np.array_equal(want[0], soft_nms_groups_gpu(boxes, scores, groups)[0])
    largest = int(np.bincount(groups).max())
    data = {"n": n, "classes": classes, "largest_group": largest, "numpy_s": cpu, "gpu_s": gpu, "same": same}
    return (
        None,
        (
            f"{n} boxes, {classes} class(es) (largest {largest}), {len(want[0])} kept: NumPy {cpu * 1e3:.2f} ms, "
            f"GPU {gpu * 1e3:.2f} ms (x{cpu / gpu:.1f}); same indices: {same}"
        ),
        data,
    )


def dispatch_from(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Soft-NMS dispatch thresholds from measured runs (``soft_nms_bench`` data): GPU from the smallest total
    where it wins and keeps winning at every larger measured total (``min_boxes``), and only while no group is
    larger than the largest single-class size where it still wins (``max_group``; None when it wins at all).
    A GPU that loses everywhere, or gives other indices, keeps NumPy (``device="cpu"``)."""
    if not runs or not all(r["same"] for r in runs):
        return {"device": "cpu", "min_boxes": 0, "max_group": None, "why": "no runs, or GPU results differ"}
    faster = {(r["n"], r["classes"]): r["gpu_s"] < r["numpy_s"] for r in runs}
    totals = sorted({r["n"] for r in runs if r["classes"] > 1}) or sorted({r["n"] for r in runs})
    multi = [r for r in runs if r["classes"] > 1] or runs
    win = {n: all(faster[(r["n"], r["classes"])] for r in multi if r["n"] == n) for n in totals}
    start = next((n for i, n in enumerate(totals) if all(win[m] for m in totals[i:])), None)
    if start is None:
        return {"device": "cpu", "min_boxes": 0, "max_group": None, "why": "NumPy was faster at every size"}
    single = sorted((r["largest_group"], faster[(r["n"], r["classes"])]) for r in runs if r["classes"] == 1)
    max_group = None
    if single and not all(ok for _, ok in single):
        wins = [g for g, ok in single if ok]
        max_group = max(wins) if wins else start
    return {"device": "gpu", "min_boxes": int(start), "max_group": max_group, "why": "measured crossover"}


def soft_nms_sweep(sizes: tuple[int, ...], repeat: int) -> tuple[str, str, dict[str, Any]]:
    """The sweep (single class and 8 classes at each size), the 20k goal and the derived dispatch thresholds."""
    need_gpu()
    runs = [soft_nms_bench(n, repeat, classes)[2] for n in sizes for classes in (1, 8)]
    dispatch = dispatch_from(runs)
    top = max(sizes)
    at_top = [r for r in runs if r["n"] == top and r["classes"] == 1][0]
    ratio = at_top["numpy_s"] / at_top["gpu_s"]
    table = ", ".join(f"{r['n']}/{r['classes']}c x{r['numpy_s'] / r['gpu_s']:.1f}" for r in runs)
    env = settings_lines(dispatch)
    detail = f"{table}; at {top} boxes x{ratio:.1f} (goal >= {GOALS['soft_nms_20k']:g}x); dispatch: {'; '.join(env)}"
    return goal(ratio, GOALS["soft_nms_20k"]), detail, {"runs": runs, "dispatch": dispatch, "settings": env}


def settings_lines(dispatch: dict[str, Any]) -> list[str]:
    lines = [f"SNIPSERVE_SOFT_NMS_DEVICE={dispatch['device']}"]
    if dispatch["device"] == "gpu":
        lines.append(f"SNIPSERVE_SOFT_NMS_GPU_MIN_BOXES={dispatch['min_boxes']}")
        if dispatch["max_group"] is not None:
            lines.append(f"SNIPSERVE_SOFT_NMS_GPU_MAX_GROUP={dispatch['max_group']}")
    return lines


# ---- pre-processing ----------------------------------------------------------------------------------------------


def test_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


def scene_image(long_side: int, seed: int) -> np.ndarray:
    """A synthetic aerial scene with objects (the project's own generator, ``models.synth``), ``uint8 [H, W, 3]``
    RGB: what calibration and detection parity need (noise images have no objects to detect)."""
    from models.synth import SynthConfig, generate_image

    side = max(256, long_side)
    return generate_image(SynthConfig(min_long_side=side, max_long_side=side), seed=seed, index=0).decode()


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


def preprocess_bench(card: Any, repeat: int, size: tuple[int, int] = (3000, 4000)) -> tuple[str, str, dict[str, Any]]:
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
    ratio = cpu / gpu
    mp = size[0] * size[1] / 1e6
    return (
        goal(ratio, GOALS["preprocess_12mp"]),
        (
            f"{size[1]}x{size[0]} ({mp:.0f} MP), default levels, {p.num_chips} chips: CPU (OpenCV+NumPy) "
            f"{cpu * 1e3:.1f} ms, GPU (upload+resize+crop) {gpu * 1e3:.1f} ms (x{ratio:.1f}; goal >= "
            f"{GOALS['preprocess_12mp']:g}x)"
        ),
        {"cpu_s": cpu, "gpu_s": gpu, "ratio": ratio, "megapixels": mp, "chips": p.num_chips},
    )


# ---- TensorRT and the ONNX Runtime GPU providers -----------------------------------------------------------------

TOLERANCES = {  # (max |diff| of every output, largest accepted tie gap at a peak flip)
    "fp32": (1e-3, 1e-4),  # TF32 off: fp32 rounding only
    "fp16": (5e-2, 5e-2),
}
# INT8 (explicit Q/DQ) is a calibrated approximation: its raw outputs are reported (INFO), and it is judged on
# detections instead -- the pipeline on the INT8 engine vs ORT CPU, each detection matched with IoU > 0.7 and a
# score within 0.1 (our acceptance for INT8, set before any device run; the FP16 goal row is stricter).
INT8_MATCH = {"iou": 0.7, "score_tol": 0.1}


def output_parity(got: list[np.ndarray], want: list[np.ndarray], raw: np.ndarray | None, names: list[str]) -> Any:
    from exporters.parity import OutputParity

    parity = OutputParity(names)
    parity.add(got, want, raw)
    return parity


def build(onnx_path: Path, work: Path, precision: str, calib: Path | None, calib_chips: int = 128) -> tuple[Path, Any]:
    from exporters.tensorrt import TensorRTExportConfig, build_engine
    from service.engines.manifest import BatchProfile

    engine = work / f"model_{precision}.engine"
    cfg = TensorRTExportConfig(
        precision=precision,  # type: ignore[arg-type]
        profile=BatchProfile(min_batch=1, opt_batch=16, max_batch=32),  # tuned for batch 16, the goal's batch
        workspace_mib=2048,
        timing_cache=work / "timing.cache",
        calibration_images=calib if precision == "int8" else None,
        calibration_chips=calib_chips,
    )
    return engine, build_engine(onnx_path, engine, cfg)


def trt_parity(engine: Path, onnx_path: Path, chips: np.ndarray, precision: str) -> tuple[bool, str, dict[str, Any]]:
    """Engine vs ONNX Runtime CPU on ``chips`` (40: split 32 + 8), peak flips judged as the ONNX exporter does."""
    from exporters.parity import Reference
    from service.engines import EngineConfig
    from service.engines.tensorrt import TensorRTEngine

    tol, tie_tol = TOLERANCES.get(precision, (np.inf, np.inf))
    trt_e = TensorRTEngine(engine, EngineConfig(kind="tensorrt", max_batch=32))
    names = list(trt_e.card.output_names or ("heatmap", "ltrb"))
    try:
        want, raw = Reference(onnx_path, names).run(chips)
        parity = output_parity(trt_e.infer(chips), want, raw, names)
    finally:
        trt_e.close()
    data = {"max_abs_diff": parity.max_abs_diff, "mean_abs_diff": parity.mean_abs_diff, "peak_flips": parity.peak_flips}
    if precision not in TOLERANCES:  # int8: reported here, judged on detections (INT8_MATCH)
        return None, f"{chips.shape[0]} chips: {parity.summary()}", data
    detail = f"{chips.shape[0]} chips: {parity.summary()} (tolerance {tol:g}, tie gap <= {tie_tol:g})"
    return parity.ok(tol, tie_tol), detail, data


def match_detections(want: Any, got: Any, score_tol: float = 0.02, min_iou: float = 0.9) -> dict[str, int]:
    """Each reference detection (``Detections``) matched to one of the same class with IoU > ``min_iou`` and score
    within ``score_tol``; unmatched ones within 0.01 of the lowest kept score (the threshold) are counted apart."""
    from service.soft_nms import box_iou_one

    used = np.zeros(len(got), bool)
    matched = near = 0
    floor = float(want.scores.min()) if len(want) else 0.0
    for i in range(len(want)):
        same = np.flatnonzero((got.classes == want.classes[i]) & ~used)
        if same.size:
            iou = box_iou_one(want.boxes[i].astype(np.float64), got.boxes[same].astype(np.float64))
            ok = (iou > min_iou) & (np.abs(got.scores[same] - want.scores[i]) <= score_tol)
            if ok.any():
                used[same[int(np.argmax(np.where(ok, iou, -1)))]] = True
                matched += 1
                continue
        near += int(abs(float(want.scores[i]) - floor) < 0.01)
    return {"reference": len(want), "got": len(got), "matched": matched, "near_threshold": near}


def trt_detections(
    engine: Path, onnx_path: Path, images: list[np.ndarray], min_iou: float = 0.9, score_tol: float = 0.02
) -> tuple[bool, str, dict[str, Any]]:
    """The goal row: the service pipeline on the TensorRT engine vs on ONNX Runtime CPU, same images: every
    detection matched (FP16: IoU > 0.9, score within 0.02), bar those at the score threshold."""
    from service.engines import EngineConfig
    from service.engines.tensorrt import TensorRTEngine
    from service.pipeline import Pipeline

    trt_e = TensorRTEngine(engine, EngineConfig(kind="tensorrt", max_batch=16))
    try:
        gpu = Pipeline(trt_e, preprocess="cpu")  # the engine's parity alone: same pre-processing on both sides
        cpu = Pipeline.load(onnx_path, EngineConfig(max_batch=16), preprocess="cpu")
        counts = [
            match_detections(cpu.detect(img).detections, gpu.detect(img).detections, score_tol, min_iou)
            for img in images
        ]
    finally:
        trt_e.close()
    total = {k: sum(c[k] for c in counts) for k in counts[0]}
    ok = total["reference"] > 0 and total["matched"] + total["near_threshold"] == total["reference"]
    return (
        ok,
        (
            f"{len(images)} images: {total['matched']}/{total['reference']} detections matched (IoU > {min_iou:g}, "
            f"score within {score_tol:g}), {total['near_threshold']} unmatched at the threshold; {total['got']} from "
            "TensorRT"
        ),
        total,
    )


def ort_ep_parity(
    onnx_path: Path, chips: np.ndarray, providers: tuple[str, ...], fp16: bool, work: Path
) -> tuple[bool, str, dict[str, Any]]:
    need("onnxruntime")
    import onnxruntime as ort

    from exporters.parity import Reference
    from service.engines import ORT_PROVIDER_NAMES, EngineConfig
    from service.engines.onnxruntime import OnnxRuntimeEngine

    if ORT_PROVIDER_NAMES[providers[0]] not in ort.get_available_providers():
        raise Skip(f"{ORT_PROVIDER_NAMES[providers[0]]} not in this onnxruntime build")
    need_gpu()
    # The TensorRT EP has no TF32 switch (the CUDA EP's is off, see service.engines.onnxruntime): fp32 allows
    # TF32-level error.
    tol, tie_tol = TOLERANCES["fp16"] if fp16 else ((5e-3, 1e-3) if providers[0] == "tensorrt" else TOLERANCES["fp32"])
    cache = work / "ort_trt_cache"
    cfg = EngineConfig(providers=providers, fp16=fp16, max_batch=chips.shape[0], trt_cache_dir=cache)
    before = set(cache.glob("*.engine")) if cache.is_dir() else set()
    gpu_e = OnnxRuntimeEngine(onnx_path, cfg)  # fails (ModelLoadError) if ORT fell back to the CPU
    try:
        names = list(gpu_e.output_names)
        gpu_e.infer(chips[:1])  # warm-up's two sizes: with the profile shapes one engine covers both
        want, raw = Reference(onnx_path, names).run(chips)
        parity = output_parity(gpu_e.infer(chips), want, raw, names)
        active = ",".join(gpu_e.providers)
    finally:
        gpu_e.close()
    trt_ep = providers[0] == "tensorrt"
    built = len(set(cache.glob("*.engine")) - before) if cache.is_dir() else 0
    ok = parity.ok(tol, tie_tol) and (not trt_ep or built <= 1)
    engines = f"; TensorRT EP engines built for batches 1 and {chips.shape[0]}: {built}" if trt_ep else ""
    detail = f"active [{active}]: {parity.summary()} (tolerance {tol:g}, tie gap <= {tie_tol:g}){engines}"
    data = {"max_abs_diff": parity.max_abs_diff, "peak_flips": parity.peak_flips, "providers": active}
    return ok, detail, {**data, "trt_ep_engines_built": built}


def engine_limit(engine: Path, batch: int, repeat: int) -> dict[str, float]:
    """TensorRT alone on a batch already in its device buffer: seconds per execution at ``batch`` chips."""
    from service.engines import EngineConfig
    from service.engines.tensorrt import TensorRTEngine

    trt_e = TensorRTEngine(engine, EngineConfig(kind="tensorrt", max_batch=batch))
    try:
        runner = trt_e._runner  # type: ignore[attr-defined]
        trt_e.input_device[:batch].fill(0)
        ready = runner.stream.record()
        seconds = median_s(lambda: runner.run_device(batch, ready), repeat)
        with_copies = median_s(
            lambda: trt_e.infer(np.zeros((batch, *trt_e.input_device.shape[1:]), np.float32)), repeat
        )
    finally:
        trt_e.close()
    return {"execute_s": seconds, "with_host_copies_s": with_copies, "batch": batch}


async def service_rate(pipeline: Any, images: list[np.ndarray], concurrency: int, max_batch: int) -> float:
    """Images/s of ``pipeline`` through a real :class:`Batcher` with ``concurrency`` requests in flight."""
    from service.batch import Batcher, BatcherConfig
    from service.options import DetectOptions

    batcher = Batcher(
        pipeline.engine,
        pipeline.adapter,
        pipeline.norm,
        BatcherConfig(max_batch=max_batch, max_delay_ms=2.0, queue_capacity=100_000, pipeline_depth=2),
        pipeline.staging,
    )
    await batcher.start()
    opts = DetectOptions()
    queue = list(images)

    async def worker() -> None:
        while queue:
            await pipeline.detect_async(queue.pop(), opts, batcher)

    try:
        await pipeline.detect_async(images[0], opts, batcher)  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(images) / (time.perf_counter() - t0)
    finally:
        await batcher.stop()


def service_vs_engine(
    engine: Path, size: tuple[int, int], n_images: int, repeat: int
) -> tuple[str, str, dict[str, Any]]:
    """The goal row: the service's images/s (batcher, GPU pre-processing, FP16, batch 16) against the TensorRT
    engine-only limit for the same chips per image (execute time at batch 16, no host work at all)."""
    from service.engines import EngineConfig
    from service.engines.tensorrt import TensorRTEngine
    from service.pipeline import Pipeline

    limit = engine_limit(engine, 16, repeat)
    trt_e = TensorRTEngine(engine, EngineConfig(kind="tensorrt", max_batch=16))
    try:
        pipeline = Pipeline(trt_e, preprocess="auto")
        images = [test_image(*size, 20 + i) for i in range(n_images)]
        chips = pyramid_plan(trt_e.card, images[0]).num_chips
        rate = asyncio.run(service_rate(pipeline, images, concurrency=8, max_batch=16))
        staging = pipeline.staging.name
    finally:
        trt_e.close()
    ceiling = 16 / limit["execute_s"] / chips
    ratio = rate / ceiling
    return (
        goal(ratio, GOALS["service_vs_engine"]),
        (
            f"{size[1]}x{size[0]}, {chips} chips/image, {staging} pre-processing: service {rate:.1f} images/s vs "
            f"engine-only limit {ceiling:.1f} images/s (TensorRT fp16 batch 16: {limit['execute_s'] * 1e3:.2f} ms; "
            f"with host copies {limit['with_host_copies_s'] * 1e3:.2f} ms) = {ratio:.2f} (goal >= "
            f"{GOALS['service_vs_engine']:g})"
        ),
        {**limit, "service_images_per_s": rate, "engine_images_per_s": ceiling, "ratio": ratio, "chips": chips},
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


@dataclass
class Sizes:
    """Work per step: the defaults are for a device; the tests pass tiny ones (emulated kernels are slow)."""

    cases: int = 3000
    repeat: int = 15
    sweep: tuple[int, ...] = (1000, 2000, 5000, 10000, 20000)
    parity_image: tuple[int, int] = (1080, 1920)
    bench_image: tuple[int, int] = (3000, 4000)  # 12 MP
    service_image: tuple[int, int] = (1080, 1920)
    service_images: int = 48
    detection_images: int = 3
    calibration_chips: int = 128

    @classmethod
    def quick(cls) -> Sizes:
        return cls(cases=300, repeat=5, sweep=(1000, 5000, 20000), service_images=16, detection_images=2)


def kernel_rows(card: Any, sizes: Sizes) -> None:
    row("GPU soft-NMS parity vs NumPy", lambda: soft_nms_parity(sizes.cases), 60)
    row("GPU pre-processing parity vs OpenCV", lambda: preprocess_parity(card, sizes.parity_image), 40)
    row("compute-sanitizer memcheck (all kernels)", lambda: run_sanitizer("memcheck", BUDGET.limit(90)), 95)
    row("compute-sanitizer racecheck (all kernels)", lambda: run_sanitizer("racecheck", BUDGET.limit(90)), 95)
    row("GPU soft-NMS vs NumPy, size sweep (goal: 10x at 20k)", lambda: soft_nms_sweep(sizes.sweep, sizes.repeat), 120)
    row(
        "GPU pre-processing vs OpenCV at 12 MP (goal: 5x)",
        lambda: preprocess_bench(card, sizes.repeat, sizes.bench_image),
        60,
    )


def trt_rows(onnx_path: Path | None, card: Any, chips: np.ndarray, work: Path, sizes: Sizes) -> None:
    engines: dict[str, Path] = {}
    reasons: dict[str, str] = {}

    def export(precision: str) -> tuple[bool, str, dict[str, Any]]:
        reasons[precision] = "its export failed"
        try:
            need_trt()
            if onnx_path is None:
                raise Skip("no ONNX model")
        except Skip as exc:
            reasons[precision] = str(exc)
            raise
        calib = work / "calib"
        if precision == "int8" and not calib.exists():
            import cv2

            calib.mkdir()
            for i in range(4):  # calibration scenes; chips are cut by the service's own pipeline
                cv2.imwrite(str(calib / f"{i}.png"), cv2.cvtColor(scene_image(1280, 10 + i), cv2.COLOR_RGB2BGR))
        engines[precision], built = build(onnx_path, work, precision, calib, sizes.calibration_chips)
        return True, built.summary(), {"build_s": built.build_s, "calibration": built.manifest.calibration}

    def engine(precision: str) -> Path:
        if precision not in engines or onnx_path is None:
            raise Skip(f"no {precision} engine: {reasons.get(precision, 'not built')}")
        return engines[precision]

    for precision in ("fp16", "fp32", "int8"):
        row(f"TensorRT export {precision}", lambda p=precision: export(p), 120)  # type: ignore[misc]
        row(
            f"TensorRT {precision} vs ONNX Runtime CPU (outputs, near-ties)",
            lambda p=precision: trt_parity(engine(p), onnx_path, chips, p),  # type: ignore[arg-type, misc]
            45,
        )
    images = [scene_image(max(sizes.service_image), 40 + i) for i in range(sizes.detection_images)]
    row(
        "TensorRT fp16 detections vs ORT CPU (goal: IoU > 0.9, scores within 0.02)",
        lambda: trt_detections(engine("fp16"), onnx_path, images),  # type: ignore[arg-type]
        90,
    )
    row(
        "TensorRT int8 detections vs ORT CPU (IoU > 0.7, scores within 0.1)",
        lambda: trt_detections(engine("int8"), onnx_path, images, INT8_MATCH["iou"], INT8_MATCH["score_tol"]),  # type: ignore[arg-type]
        90,
    )
    row(
        "Service images/s vs TensorRT engine-only limit (fp16, batch 16; goal: 0.9)",
        lambda: service_vs_engine(engine("fp16"), sizes.service_image, sizes.service_images, sizes.repeat),
        120,
    )
    row(
        "Pipeline on TensorRT fp16: GPU vs CPU pre-processing",
        lambda: staged_pipeline(engine("fp16"), sizes.repeat, sizes.parity_image),
        60,
    )


def ort_rows(onnx_path: Path | None, chips: np.ndarray, work: Path) -> None:
    for label, providers, fp16 in (
        ("ORT CUDA EP vs CPU EP", ("cuda",), False),
        ("ORT TensorRT EP (fp32) vs CPU EP", ("tensorrt", "cuda"), False),
        ("ORT TensorRT EP (fp16) vs CPU EP", ("tensorrt", "cuda"), True),
    ):

        def ep(providers: tuple[str, ...] = providers, fp16: bool = fp16) -> tuple[bool, str, dict[str, Any]]:
            if onnx_path is None:
                raise Skip("no ONNX model")
            return ort_ep_parity(onnx_path, chips, providers, fp16, work)

        row(label, ep, 90)


def load_model(arg: Path | None, work: Path) -> tuple[Path | None, Any, np.ndarray]:
    """The model, its card, and 40 chips cut from a 1080p test image by the service's own pre-processing."""
    from service.crop import Normalizer, crop_plan, resize_levels
    from service.engines import EngineConfig
    from service.engines.fake import FAKE_CARD
    from service.engines.onnxruntime import OnnxRuntimeEngine

    try:
        onnx_path, what = model_path(arg, work)
        e = OnnxRuntimeEngine(onnx_path, EngineConfig())
        card = e.card
        e.close()
        ROWS.append(Row("model", "INFO", f"{what}: {card.name}, chip {card.input_size}"))
    except (Skip, ImportError) as exc:
        ROWS.append(Row("model", f"SKIPPED ({exc})", "no ONNX model and no onnx package to make one"))
        c = FAKE_CARD.input_size
        return None, FAKE_CARD, np.random.default_rng(0).normal(0, 1, (40, 3, c, c)).astype(np.float32)
    real = test_image(1080, 1920, 5)
    p = pyramid_plan(card, real)
    real_chips = crop_plan(resize_levels(real, p), p, Normalizer.from_card(card))
    picks = np.linspace(0, p.num_chips - 1, min(40, p.num_chips)).astype(int)
    return onnx_path, card, np.ascontiguousarray(real_chips[picks])


def report(env: dict[str, str], markdown: Path | None, json_path: Path | None) -> str:
    lines = ["| environment | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in env.items()), ""]
    lines += ["| check | status | seconds | detail |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {r.status} | {r.seconds:.1f} | {r.detail} |" for r in ROWS]
    text = "\n".join(lines) + "\n"
    if markdown:
        markdown.write_text(text)
    if json_path:
        sweep = next((r.data for r in ROWS if r.check.startswith("GPU soft-NMS vs NumPy, size sweep") and r.data), {})
        payload = {
            "environment": env,
            "elapsed_s": round(time.monotonic() - BUDGET.t0, 1),
            "budget_s": BUDGET.total_s,
            "rows": [asdict(r) for r in ROWS],
            "goals": {r.check: r.status for r in ROWS if r.status.startswith("GOAL")},
            "soft_nms_dispatch": sweep.get("dispatch"),
            "soft_nms_settings": sweep.get("settings"),
        }
        json_path.write_text(json.dumps(payload, indent=2, default=str))
    return text


def run_all(model: Path | None, sizes: Sizes, files: list[str] | None = None) -> None:
    """Every step, in order (see the module docstring); rows go to :data:`ROWS`."""
    row("CUDA compile probe (NVRTC, CUDA headers)", compile_probe, 90)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        onnx_path, card, chips = load_model(model, work)
        kernel_rows(card, sizes)
        row('pytest -m "gpu or tensorrt"', lambda: run_pytest(files or gpu_test_files(), BUDGET.limit(150)), 155)
        trt_rows(onnx_path, card, chips, work, sizes)
        ort_rows(onnx_path, chips, work)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, default=None, help="ONNX model (default: the shipped one, else a tiny one)")
    ap.add_argument("--quick", action="store_true", help="fewer parity cases, sizes and repeats (for a rerun)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="overall time budget; every step stays inside it")
    ap.add_argument("--only", default=None, help="run only the rows whose name matches this regex (a rerun)")
    ap.add_argument("--json", type=Path, default=None, help="also write rows, environment and thresholds as JSON")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the Markdown table to this file")
    ap.add_argument("--kernel-driver", action="store_true", help=argparse.SUPPRESS)  # compute-sanitizer's target
    args = ap.parse_args(argv)
    if args.kernel_driver:
        kernel_driver()
        return 0
    global BUDGET
    BUDGET = Budget(args.budget_s, args.only)
    ROWS.clear()
    env = environment()
    run_all(args.onnx, Sizes.quick() if args.quick else Sizes())
    text = report(env, args.markdown, args.json)
    if args.markdown is None:
        print(text)
    return 1 if any(r.status == "FAIL" for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
