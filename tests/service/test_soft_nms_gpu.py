"""GPU soft-NMS: the kernel's parity with NumPy, its host code and its dispatch.

The parity tests take ``cupy_backend`` (tests/service/conftest.py): on every machine they run the kernel's CUDA
source compiled for the CPU by :mod:`tests.cudasim` behind the CuPy stand-in, through the real host code; on a
GPU host they run again on the device (marked ``gpu``; skipped with the reason elsewhere). The source is also
compiled to PTX with ``nvcc`` where a CUDA toolkit exists (no GPU needed).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from service import soft_nms_gpu
from service.soft_nms import SoftNMSParams, batched_soft_nms
from service.soft_nms_gpu import (
    COMPILE_OPTIONS,
    KERNEL_SOURCE,
    SoftNmsDispatch,
    batched_soft_nms_auto,
    group_candidates,
)
from tests.service import fake_gpu


def random_case(
    rng: np.random.Generator,
    n: int,
    classes: int = 3,
    extent: float = 400,
    spread: float = 6,
    max_side: float = 40,
    tie_share: int = 4,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered boxes (many overlaps) in ``[0, extent]``, ``n // tie_share`` scores duplicated (exact ties),
    float32 like the service. ``scripts/gpu_check.py`` draws its cases here too, spread over a larger image."""
    centres = rng.uniform(0, extent, (max(1, n // 8), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, spread, (n, 2))
    wh = rng.uniform(4, max_side, (n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if n > 4:
        scores[rng.integers(0, n, n // tie_share)] = scores[0]  # exact ties
    groups = rng.integers(0, classes, n).astype(np.int32)
    return boxes, scores, groups


def test_group_candidates_layout() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.2], np.float32)
    groups = np.array([2, 0, 0, 2, 5])
    order, offsets, ids = group_candidates(scores, groups, 0.15)
    assert order.tolist() == [2, 0, 3, 4]  # group 0: index 2 (1 is below threshold); group 2: 0, 3; group 5: 4
    assert offsets.tolist() == [0, 1, 3, 4]
    assert ids.tolist() == [0, 2, 5]


def test_group_candidates_empty() -> None:
    order, offsets, ids = group_candidates(np.array([0.1], np.float32), np.array([0]), 0.5)
    assert order.size == 0 and offsets.tolist() == [0] and ids.size == 0


def test_dispatcher_falls_back_to_numpy_without_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    soft_nms_gpu.gpu_available.cache_clear()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    try:
        assert soft_nms_gpu.gpu_available() is False

        def no_gpu(*args: object, **kwargs: object) -> None:
            raise AssertionError("the GPU path must not run without CuPy")

        monkeypatch.setattr(soft_nms_gpu, "soft_nms_groups_gpu", no_gpu)
        boxes, scores, groups = random_case(np.random.default_rng(1), 300)
        got = batched_soft_nms_auto(boxes, scores, groups, SoftNMSParams("gaussian", 0.5, 0.3, 0.001), GPU)
        want = batched_soft_nms(boxes, scores, groups, SoftNMSParams("gaussian", 0.5, 0.3, 0.001))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    finally:
        soft_nms_gpu.gpu_available.cache_clear()


def test_dispatcher_does_not_probe_the_gpu_for_empty_input(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe() -> bool:
        raise AssertionError("probed")

    monkeypatch.setattr(soft_nms_gpu, "gpu_available", probe)
    empty = np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int32)
    keep, kept = batched_soft_nms_auto(*empty, dispatch=GPU)
    assert keep.size == 0 and kept.size == 0


GPU = SoftNmsDispatch(device="gpu")


def test_numpy_by_default_even_with_a_device(fake_cupy: types.ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU kernel's speed is unmeasured: the default merge never chooses it, even where it would run."""

    def no_gpu(*args: object, **kwargs: object) -> None:
        raise AssertionError("GPU soft-NMS chosen by default")

    assert soft_nms_gpu.gpu_available()  # a device is there (emulated) ...
    monkeypatch.setattr(soft_nms_gpu, "soft_nms_groups_gpu", no_gpu)
    boxes, scores, groups = random_case(np.random.default_rng(4), 200, classes=3)
    got = batched_soft_nms_auto(boxes, scores, groups)  # ... and still NumPy
    np.testing.assert_array_equal(got[0], batched_soft_nms(boxes, scores, groups)[0])


def test_dispatch_by_size_thresholds() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.0005], np.float32)
    groups = np.array([0, 0, 0, 1, 1])
    assert not SoftNmsDispatch().wants_gpu(scores, groups, 0.001)
    assert SoftNmsDispatch(device="gpu").wants_gpu(scores, groups, 0.001)
    assert SoftNmsDispatch(device="gpu", min_boxes=4).wants_gpu(scores, groups, 0.001)
    assert not SoftNmsDispatch(device="gpu", min_boxes=5).wants_gpu(scores, groups, 0.001)  # 4 candidates
    assert SoftNmsDispatch(device="gpu", max_group=3).wants_gpu(scores, groups, 0.001)
    assert not SoftNmsDispatch(device="gpu", max_group=2).wants_gpu(scores, groups, 0.001)  # class 0 has 3
    assert not SoftNmsDispatch(device="gpu").wants_gpu(scores, groups, 0.95)  # no candidates


def test_explicit_gpu_soft_nms_that_cannot_run_fails_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.engines.fake import FakeEngine
    from service.errors import ModelLoadError
    from service.pipeline import Pipeline

    monkeypatch.setattr(soft_nms_gpu, "gpu_available", lambda: False)
    with pytest.raises(ModelLoadError, match="SNIPSERVE_SOFT_NMS_DEVICE=gpu, but the GPU soft-NMS kernel cannot run"):
        Pipeline(FakeEngine(), soft_nms=GPU)
    assert Pipeline(FakeEngine()).soft_nms.device == "cpu"


def test_gpu_function_validates_like_numpy() -> None:
    boxes, scores, groups = random_case(np.random.default_rng(0), 5)
    with pytest.raises(ValueError, match="method must be one of"):
        soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups, SoftNMSParams(method="box"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma must be > 0"):
        soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups, SoftNMSParams(sigma=0.0))
    with pytest.raises(ValueError, match="block_threads"):
        soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups, block_threads=100)
    # Nothing above the threshold: empty result before any CUDA call (so it runs here too).
    keep, kept = soft_nms_gpu.soft_nms_groups_gpu(boxes, scores * 0, groups, SoftNMSParams(score_threshold=0.5))
    assert keep.dtype == np.int64 and kept.dtype == np.float32 and keep.size == 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) to compile the kernel source")
def test_kernel_source_compiles_to_ptx(tmp_path: Path) -> None:
    src = tmp_path / "soft_nms.cu"
    src.write_text(KERNEL_SOURCE)
    out = tmp_path / "soft_nms.ptx"
    opts = [o for o in COMPILE_OPTIONS]
    proc = subprocess.run(
        ["nvcc", "-ptx", "-arch=sm_80", *opts, str(src), "-o", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    ptx = out.read_text()
    assert f".entry {soft_nms_gpu.KERNEL_NAME}(" in ptx  # extern "C": the name CuPy looks up is unmangled


# ---- the kernel itself: emulated on the CPU everywhere, on the device where there is one ----------------------


def emulated(backend: types.ModuleType) -> bool:
    return bool(backend.asarray is fake_gpu._asarray)


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
def test_kernel_matches_numpy(cupy_backend: types.ModuleType, method: str) -> None:
    # The emulation runs every CUDA thread as a fiber: it checks fewer, smaller cases than the device does.
    cases, biggest = (24, 160) if emulated(cupy_backend) else (200, 400)
    rng = np.random.default_rng(7)
    for _ in range(cases):
        boxes, scores, groups = random_case(rng, int(rng.integers(1, biggest)), classes=int(rng.integers(1, 6)))
        thr = float(rng.choice([0.0, 0.001, 0.3]))
        threads = int(rng.choice([32, 64, 96, 256]))  # 96: a partial last warp in the block-wide reduction
        got = soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups, SoftNMSParams(method, 0.5, 0.3, thr), threads)  # type: ignore[arg-type]
        want = batched_soft_nms(boxes, scores, groups, SoftNMSParams(method, 0.5, 0.3, thr))  # type: ignore[arg-type]
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)
        if method != "gaussian":
            np.testing.assert_array_equal(got[1], want[1])  # no exp: bit-identical, as the docstring says


def test_kernel_large_group_and_block_sizes(cupy_backend: types.ModuleType) -> None:
    n = 300 if emulated(cupy_backend) else 5000
    boxes, scores, groups = random_case(np.random.default_rng(3), n, classes=1)
    want = batched_soft_nms(boxes, scores, groups)
    for threads in (32, 256, 1024):
        got = soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups, block_threads=threads)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)


def test_dispatcher_uses_the_kernel_when_a_device_is_present(cupy_backend: types.ModuleType) -> None:
    assert soft_nms_gpu.gpu_available()  # the probe compiled and ran the kernel
    rng = np.random.default_rng(5)
    for i in range(6):
        method = ("gaussian", "linear", "hard")[i % 3]
        boxes, scores, groups = random_case(rng, int(rng.integers(1, 150)), classes=int(rng.integers(1, 5)))
        params = SoftNMSParams(method, 0.5, 0.3, 0.01)  # type: ignore[arg-type]
        got = soft_nms_gpu.batched_soft_nms_auto(boxes, scores, groups, params, GPU)
        want = batched_soft_nms(boxes, scores, groups, params)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)


MISSING_BARRIER_SCRIPT = """
import sys
import numpy as np
from service import soft_nms_gpu
from service.soft_nms import batched_soft_nms
from tests import cudasim
from tests.service import fake_gpu
from tests.service.test_soft_nms_gpu import random_case

cudasim.SEED = int(sys.argv[1])
sys.modules["cupy"], sys.modules["cupyx"] = fake_gpu.make_cupy()
tail = "    s = ws[0];\\n    i = wi[0];\\n    __syncthreads();\\n"
assert tail in soft_nms_gpu.KERNEL_SOURCE
soft_nms_gpu.KERNEL_SOURCE = soft_nms_gpu.KERNEL_SOURCE.replace(tail, "    s = ws[0];\\n    i = wi[0];\\n")
boxes, scores, groups = random_case(np.random.default_rng(11), 150, classes=2)
want = batched_soft_nms(boxes, scores, groups)
try:
    got = soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups)
except RuntimeError as exc:
    print("DEADLOCK", exc)
    sys.exit(0)
print("MATCH" if got[0].shape == want[0].shape and np.array_equal(got[0], want[0]) else "MISMATCH")
"""


def test_emulation_catches_a_missing_barrier(fake_cupy: types.ModuleType) -> None:
    """The emulated tests can fail: without block_best's last barrier, warp 0 can run ahead and overwrite the
    shared result slot of the next round before a held-back warp has read it. Depending on the schedule that
    gives wrong selections, a deadlock, or writes past the group's slice (memory corruption on a GPU, a crash
    here), so the mutant runs in a child process; it must never pass as correct."""
    root = Path(__file__).resolve().parents[2]
    outcomes = []
    for seed in (1, 2, 3):
        try:
            proc = subprocess.run(
                [sys.executable, "-c", MISSING_BARRIER_SCRIPT, str(seed)],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired:  # a selection loop that never ends: caught as well
            outcomes.append("hung")
            continue
        outcomes.append(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"crashed ({proc.returncode})")
    # A correct kernel gives MATCH under every schedule; the mutant must be caught under most of them.
    assert sum(o != "MATCH" for o in outcomes) >= 2, outcomes


def test_emulation_reports_a_divergent_barrier(fake_cupy: types.ModuleType) -> None:
    src = r"""
    extern "C" __global__ void divergent(int* out) {
        int v = threadIdx.x;
        if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);  // half a warp: the shuffle never completes
        __syncthreads();
        out[threadIdx.x] = v;
    }
    """
    kernel = fake_cupy.RawKernel(src, "divergent", options=("--fmad=false",))
    out = fake_cupy.empty(64, np.int32)
    kernel((1,), (64,), (out,))  # launches are asynchronous: the fault shows when the stream is waited for
    with pytest.raises(RuntimeError, match="barrier deadlock"):
        out.get()


def test_emulation_checks_argument_types(fake_cupy: types.ModuleType) -> None:
    kernel = fake_cupy.RawKernel(soft_nms_gpu.KERNEL_SOURCE, soft_nms_gpu.KERNEL_NAME, options=("--fmad=false",))
    a = fake_cupy.empty(4, np.float64)
    args = [a, a, a, a, np.int64(0), np.float64(0.5), np.float64(0.3), np.float64(0.0), a, a, a]
    with pytest.raises(TypeError, match="argument 4: the kernel takes a 4-byte integer, got int64"):
        kernel((1,), (32,), tuple(args))
    with pytest.raises(TypeError, match="takes 11 arguments, got 10"):
        kernel((1,), (32,), tuple(args[:-1]))
