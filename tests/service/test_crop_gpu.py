"""GPU pre-processing: the kernels vs OpenCV and vs the CPU path (service.crop).

The tests take ``cupy_backend`` (tests/service/conftest.py): on every machine the kernels' CUDA source runs
compiled for the CPU by :mod:`tests.cudasim` behind the CuPy stand-in, through the real host code; on a GPU host
the same tests run again on the device (marked ``gpu``). These back the tolerance documented in
``service/crop_gpu.py``. The source is also compiled to PTX with ``nvcc`` where a toolkit exists.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from service import crop_gpu
from service.crop import Normalizer, crop_plan, resize_levels
from service.engines.fake import FAKE_CARD
from service.plan import ChipPlan, Level, LevelSpec, PlanConfig, plan


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


def _resize_kernel(cp: types.ModuleType, img: np.ndarray, dw: int, dh: int) -> np.ndarray:
    """One level through the resize kernels, launched as ``resize_levels_gpu`` launches them."""
    lv = Level(index=0, scale=dw / img.shape[1], width=dw, height=dh, lo=-1.0, hi=math.inf, overlap=0)
    p = ChipPlan((img.shape[1], img.shape[0]), 16, (lv,), np.zeros((0, 3), np.int32), 2.0)
    (out,) = crop_gpu.resize_levels_gpu(cp.asarray(img), p)
    return np.asarray(cp.asnumpy(out))


@pytest.mark.parametrize(("h", "w", "dh", "dw"), [(150, 200, 259, 345), (97, 131, 256, 345), (64, 64, 128, 128)])
def test_linear_kernel_within_one_level_of_opencv(
    cupy_backend: types.ModuleType, h: int, w: int, dh: int, dw: int
) -> None:
    img = smooth_image(np.random.default_rng(h), h, w)
    want = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_LINEAR)
    diff = np.abs(want.astype(int) - _resize_kernel(cupy_backend, img, dw, dh))
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.99


@pytest.mark.parametrize(("h", "w", "dh", "dw"), [(300, 400, 150, 200), (300, 300, 100, 100), (300, 400, 173, 231)])
def test_area_kernel_within_one_level_of_opencv(
    cupy_backend: types.ModuleType, h: int, w: int, dh: int, dw: int
) -> None:
    img = smooth_image(np.random.default_rng(w), h, w)
    want = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_AREA)
    diff = np.abs(want.astype(int) - _resize_kernel(cupy_backend, img, dw, dh))
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.99


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) to compile the kernel source")
def test_kernel_source_compiles_to_ptx(tmp_path: Path) -> None:
    src = tmp_path / "crop.cu"
    src.write_text(crop_gpu.KERNEL_SOURCE)
    out = tmp_path / "crop.ptx"
    cmd = ["nvcc", "-ptx", "-arch=sm_80", *crop_gpu.COMPILE_OPTIONS, str(src), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ptx = out.read_text()
    for name in crop_gpu.KERNEL_NAMES:
        assert f".entry {name}(" in ptx


# ---- the whole path: emulated on the CPU everywhere, on the device where there is one ------------------------


def _plan_for(image: np.ndarray) -> object:
    levels = (LevelSpec(scale=1.7), LevelSpec(scale=1.0), LevelSpec(scale=0.45), LevelSpec(long_side=100))
    cfg = PlanConfig(chip_size=FAKE_CARD.input_size, levels=levels, sweet_spot=FAKE_CARD.sweet_spot)
    return plan((image.shape[1], image.shape[0]), cfg)


def test_resize_levels_match_opencv_within_one_level(cupy_backend: types.ModuleType) -> None:
    cp = cupy_backend
    img = smooth_image(np.random.default_rng(0), 301, 433)
    p = _plan_for(img)
    cpu = resize_levels(img, p)  # type: ignore[arg-type]
    gpu = [cp.asnumpy(x) for x in crop_gpu.resize_levels_gpu(cp.asarray(img), p)]  # type: ignore[arg-type]
    for a, b in zip(cpu, gpu, strict=True):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b).max() <= 1


@pytest.mark.parametrize("bgr", [False, True])
def test_crop_is_bit_exact_given_the_same_levels(cupy_backend: types.ModuleType, bgr: bool) -> None:
    cp = cupy_backend
    img = smooth_image(np.random.default_rng(1), 301, 433)
    p = _plan_for(img)
    card = FAKE_CARD.model_copy(update={"channel_order": "BGR" if bgr else "RGB", "mean": (0.4, 0.5, 0.6)})
    norm = Normalizer.from_card(card)
    levels = resize_levels(img, p)  # type: ignore[arg-type]
    want = crop_plan(levels, p, norm)  # type: ignore[arg-type]
    out = cp.empty(want.shape, cp.float32)
    got = crop_gpu.crop_to_device([cp.asarray(x) for x in levels], p.chips, norm, out)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(cp.asnumpy(got), want)


def test_preprocess_matches_cpu_within_tolerance(cupy_backend: types.ModuleType) -> None:
    cp = cupy_backend
    img = smooth_image(np.random.default_rng(2), 480, 640)
    p = _plan_for(img)
    norm = Normalizer.from_card(FAKE_CARD)
    want = crop_plan(resize_levels(img, p), p, norm)  # type: ignore[arg-type]
    got = cp.asnumpy(crop_gpu.preprocess_to_device(img, p, norm))  # type: ignore[arg-type]
    tol = float(norm.scale.max()) * 1.0001  # one grey level after normalisation
    assert np.abs(got - want).max() <= tol
