"""GPU soft-NMS: host-side layout and dispatch on any machine; the kernel's parity with NumPy on a GPU.

On CPU-only machines: the candidate layout and result assembly are checked against ``batched_soft_nms`` by
feeding them a NumPy emulation of the kernel's per-block loop; the dispatcher is checked to fall back to
NumPy; the CUDA source is compiled to PTX with ``nvcc`` where a CUDA toolkit exists (no GPU needed).
The ``gpu`` tests run the real kernel and skip with the reason where CuPy or a device is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from service import soft_nms_gpu
from service.soft_nms import batched_soft_nms, box_iou_one, decay
from service.soft_nms_gpu import (
    COMPILE_OPTIONS,
    KERNEL_SOURCE,
    assemble,
    batched_soft_nms_auto,
    group_candidates,
)


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (the gpu extra)"
    if not soft_nms_gpu.gpu_available():
        return "no usable CUDA device for CuPy"
    return None


GPU_REASON = _gpu_reason()
requires_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")


def random_case(rng: np.random.Generator, n: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered boxes (many overlaps), some duplicated scores (ties), float32 like the service."""
    centres = rng.uniform(0, 400, (max(1, n // 8), 2))
    c = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 6, (n, 2))
    wh = rng.uniform(4, 40, (n, 2))
    boxes = np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if n > 4:
        scores[rng.integers(0, n, n // 4)] = scores[0]  # exact ties
    groups = rng.integers(0, classes, n).astype(np.int32)
    return boxes, scores, groups


def emulate_kernel(
    boxes: np.ndarray,
    scores: np.ndarray,
    order: np.ndarray,
    offsets: np.ndarray,
    method: str,
    sigma: float,
    nt: float,
    thr: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the kernel computes, one group (block) at a time, in NumPy float64: outputs in its layout."""
    m = order.size
    keep, kept = np.full(m, -1, np.int64), np.full(m, np.nan)
    counts = np.zeros(offsets.size - 1, np.int64)
    for g in range(offsets.size - 1):
        lo, hi = int(offsets[g]), int(offsets[g + 1])
        b = boxes[order[lo:hi]].astype(np.float64)
        s = scores[order[lo:hi]].astype(np.float64)
        live = np.ones(hi - lo, bool)
        while live.any():
            cand = np.flatnonzero(live)
            k = int(cand[np.argmax(s[cand])])  # first max among live: lowest index on ties
            keep[lo + counts[g]], kept[lo + counts[g]] = k, s[k]
            counts[g] += 1
            live[k] = False
            rest = np.flatnonzero(live)
            s[rest] = s[rest] * decay(box_iou_one(b[k], b[rest]), method, sigma, nt)  # type: ignore[arg-type]
            live[rest] = s[rest] >= thr
    return keep, kept, counts


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
@pytest.mark.parametrize("seed", range(6))
def test_layout_and_assembly_match_numpy(method: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    boxes, scores, groups = random_case(rng, int(rng.integers(1, 120)), classes=int(rng.integers(1, 5)))
    thr = float(rng.choice([0.0, 0.001, 0.3]))
    order, offsets, _ = group_candidates(scores, groups, thr)
    got = assemble(order, offsets, *emulate_kernel(boxes, scores, order, offsets, method, 0.5, 0.3, thr))
    want = batched_soft_nms(boxes, scores, groups, method, 0.5, 0.3, thr)  # type: ignore[arg-type]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


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
        got = batched_soft_nms_auto(boxes, scores, groups, "gaussian", 0.5, 0.3, 0.001)
        want = batched_soft_nms(boxes, scores, groups, "gaussian", 0.5, 0.3, 0.001)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    finally:
        soft_nms_gpu.gpu_available.cache_clear()


def test_dispatcher_does_not_probe_the_gpu_for_empty_input(monkeypatch: pytest.MonkeyPatch) -> None:
    def probe() -> bool:
        raise AssertionError("probed")

    monkeypatch.setattr(soft_nms_gpu, "gpu_available", probe)
    keep, kept = batched_soft_nms_auto(np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int32))
    assert keep.size == 0 and kept.size == 0


def test_gpu_function_validates_like_numpy() -> None:
    boxes, scores, groups = random_case(np.random.default_rng(0), 5)
    with pytest.raises(ValueError, match="method must be one of"):
        soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups, method="box")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma must be > 0"):
        soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups, sigma=0.0)
    with pytest.raises(ValueError, match="block_threads"):
        soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups, block_threads=100)
    # Nothing above the threshold: empty result before any CUDA call (so it runs here too).
    keep, kept = soft_nms_gpu.soft_nms_groups_gpu(boxes, scores * 0, groups, score_threshold=0.5)
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


# ---- on a GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
def test_gpu_kernel_matches_numpy(method: str) -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        boxes, scores, groups = random_case(rng, int(rng.integers(1, 400)), classes=int(rng.integers(1, 6)))
        thr = float(rng.choice([0.0, 0.001, 0.3]))
        got = soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups, method, 0.5, 0.3, thr)  # type: ignore[arg-type]
        want = batched_soft_nms(boxes, scores, groups, method, 0.5, 0.3, thr)  # type: ignore[arg-type]
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)


@pytest.mark.gpu
@requires_gpu
def test_gpu_kernel_large_group_and_small_blocks() -> None:
    boxes, scores, groups = random_case(np.random.default_rng(3), 5000, classes=1)
    want = batched_soft_nms(boxes, scores, groups)
    for threads in (32, 256, 1024):
        got = soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups, block_threads=threads)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5)
