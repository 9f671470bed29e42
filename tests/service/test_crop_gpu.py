"""GPU pre-processing: resize arithmetic vs OpenCV on any machine; the kernels vs service.crop on a GPU.

Without a GPU, NumPy emulations of the resize kernels (the same integer/float steps, written for arrays) are
checked against ``cv2.resize``: this is what backs the tolerance documented in ``service/crop_gpu.py``. The
CUDA source is compiled to PTX with ``nvcc`` where a toolkit exists. The ``gpu`` tests run the kernels.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from service import crop_gpu
from service.crop import Normalizer, crop_plan, resize_levels
from service.engine import FAKE_CARD
from service.plan import LevelSpec, PlanConfig, plan

DBL_EPS = 2.220446049250313e-16


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (the gpu extra)"
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # noqa: BLE001 - no driver raises CUDARuntimeError
        return f"no usable CUDA device: {exc}"
    return None


GPU_REASON = _gpu_reason()
requires_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=GPU_REASON or "")


# ---- NumPy emulations of the kernels (same steps, vectorised) ----------------------------------------------------


def linear_taps(n_dst: int, n_src: int, scale: float) -> tuple[np.ndarray, ...]:
    d = np.arange(n_dst)
    f = ((d + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    lo, hi = s < 0, s >= n_src - 1
    s[lo], f[lo] = 0, 0
    s[hi], f[hi] = n_src - 1, 0
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int64)
    w1 = np.rint(f * np.float32(2048)).astype(np.int64)
    return s, np.minimum(s + 1, n_src - 1), w0, w1


def emulate_linear(img: np.ndarray, dw: int, dh: int) -> np.ndarray:
    sh, sw = img.shape[:2]
    x0, x1, a0, a1 = linear_taps(dw, sw, 1.0 / (dw / sw))
    y0, y1, b0, b1 = linear_taps(dh, sh, 1.0 / (dh / sh))
    im = img.astype(np.int64)
    r0 = im[y0][:, x0] * a0[None, :, None] + im[y0][:, x1] * a1[None, :, None]  # [dh, dw, 3]
    r1 = im[y1][:, x0] * a0[None, :, None] + im[y1][:, x1] * a1[None, :, None]
    v = ((((r0 >> 4) * b0[:, None, None]) >> 16) + (((r1 >> 4) * b1[:, None, None]) >> 16) + 2) >> 2
    return np.clip(v, 0, 255).astype(np.uint8)


def area_matrix(n_dst: int, n_src: int, scale: float) -> np.ndarray:
    w = np.zeros((n_dst, n_src))
    for d in range(n_dst):
        f1 = d * scale
        f2, cell = min(f1 + scale, n_src), min(scale, n_src - f1)
        for s in range(int(np.floor(f1)), min(int(np.ceil(f2)), n_src)):
            lo, hi = max(s, f1), min(s + 1, f2)
            if hi > lo:
                w[d, s] = (hi - lo) / cell
    return w


def emulate_area(img: np.ndarray, dw: int, dh: int) -> np.ndarray:
    sh, sw = img.shape[:2]
    sx, sy = 1.0 / (dw / sw), 1.0 / (dh / sh)
    ix, iy = round(sx), round(sy)
    if abs(sx - ix) < DBL_EPS and abs(sy - iy) < DBL_EPS:
        s = img[: dh * iy, : dw * ix].astype(np.int64).reshape(dh, iy, dw, ix, 3).sum((1, 3))
        if ix == iy == 2:
            return ((s + 2) >> 2).astype(np.uint8)
        return np.rint(s.astype(np.float32) * np.float32(1.0 / (ix * iy))).astype(np.uint8)
    wx, wy = area_matrix(dw, sw, sx), area_matrix(dh, sh, sy)
    acc = np.einsum("ys,sxc->yxc", wy, np.einsum("xs,ysc->yxc", wx, img.astype(np.float64)))
    return np.clip(np.rint(acc), 0, 255).astype(np.uint8)


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)


@pytest.mark.parametrize(("h", "w", "dh", "dw"), [(150, 200, 259, 345), (97, 131, 256, 345), (64, 64, 128, 128)])
def test_linear_emulation_within_one_level_of_opencv(h: int, w: int, dh: int, dw: int) -> None:
    img = smooth_image(np.random.default_rng(h), h, w)
    diff = np.abs(cv2.resize(img, (dw, dh), interpolation=cv2.INTER_LINEAR).astype(int) - emulate_linear(img, dw, dh))
    assert diff.max() <= 1
    assert (diff == 0).mean() > 0.99


@pytest.mark.parametrize(("h", "w", "dh", "dw"), [(300, 400, 150, 200), (300, 300, 100, 100), (300, 400, 173, 231)])
def test_area_emulation_within_one_level_of_opencv(h: int, w: int, dh: int, dw: int) -> None:
    img = smooth_image(np.random.default_rng(w), h, w)
    diff = np.abs(cv2.resize(img, (dw, dh), interpolation=cv2.INTER_AREA).astype(int) - emulate_area(img, dw, dh))
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
    for name in ("resize_linear", "resize_area", "crop_normalise"):
        assert f".entry {name}(" in ptx


# ---- on a GPU ----------------------------------------------------------------------------------------------------


def _plan_for(image: np.ndarray) -> object:
    levels = (LevelSpec(scale=1.7), LevelSpec(scale=1.0), LevelSpec(scale=0.45), LevelSpec(long_side=100))
    cfg = PlanConfig(chip_size=FAKE_CARD.input_size, levels=levels, sweet_spot=FAKE_CARD.sweet_spot)
    return plan((image.shape[1], image.shape[0]), cfg)


@pytest.mark.gpu
@requires_gpu
def test_gpu_resize_matches_opencv_within_one_level() -> None:
    import cupy as cp

    img = smooth_image(np.random.default_rng(0), 301, 433)
    p = _plan_for(img)
    cpu = resize_levels(img, p)  # type: ignore[arg-type]
    gpu = [cp.asnumpy(x) for x in crop_gpu.resize_levels_gpu(cp.asarray(img), p)]  # type: ignore[arg-type]
    for a, b in zip(cpu, gpu, strict=True):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b).max() <= 1


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("bgr", [False, True])
def test_gpu_crop_is_bit_exact_given_the_same_levels(bgr: bool) -> None:
    import cupy as cp

    img = smooth_image(np.random.default_rng(1), 301, 433)
    p = _plan_for(img)
    card = FAKE_CARD.model_copy(update={"channel_order": "BGR" if bgr else "RGB", "mean": (0.4, 0.5, 0.6)})
    norm = Normalizer.from_card(card)
    levels = resize_levels(img, p)  # type: ignore[arg-type]
    want = crop_plan(levels, p, norm)  # type: ignore[arg-type]
    out = cp.empty(want.shape, cp.float32)
    got = crop_gpu.crop_to_device([cp.asarray(x) for x in levels], p.chips, norm, out)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(cp.asnumpy(got), want)


@pytest.mark.gpu
@requires_gpu
def test_gpu_preprocess_matches_cpu_within_tolerance() -> None:
    import cupy as cp

    img = smooth_image(np.random.default_rng(2), 480, 640)
    p = _plan_for(img)
    norm = Normalizer.from_card(FAKE_CARD)
    want = crop_plan(resize_levels(img, p), p, norm)  # type: ignore[arg-type]
    got = cp.asnumpy(crop_gpu.preprocess_to_device(img, p, norm))  # type: ignore[arg-type]
    tol = float(norm.scale.max()) * 1.0001  # one grey level after normalisation
    assert np.abs(got - want).max() <= tol
