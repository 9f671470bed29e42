"""GPU pre-processing: the image is uploaded once, each pyramid level is resized on the GPU, and chips are
normalised and cut straight into a device batch buffer (for example :attr:`TensorRTEngine.input_device`).

Used by :class:`service.staging.DeviceStaging` when the engine takes chips on the device (TensorRT):
:func:`levels_to_device` when a request is prepared (on the preparing thread's ``levels`` stream, synchronised),
:func:`crop_to_device` (through ``TensorRTEngine.infer_staged``) for every batch, on the engine thread, on the
engine's crop stream, with TensorRT's stream ordered after it by an event (:mod:`service.cuda_streams`).

Status: written against CuPy's documented ``RawModule`` API. The kernels' CUDA source is compiled to PTX with
``nvcc`` and, in every test run, compiled for the CPU and run through this module's host code by the tests'
CUDA emulation (tests/cudasim), where it meets the tolerances below; it has not run on a GPU yet (README, GPU
path, status table). ``scripts/gpu_check.py`` measures parity and speed on a GPU host.

Parity with :mod:`service.crop` (the CPU path, OpenCV):

- Crop + normalise is bit-exact given the same level image: ``float(pixel) * scale + bias`` in float32 with
  FMA contraction off, as NumPy computes it; padding past the level is the normalised black pixel.
- Up-scaling (``cv2.INTER_LINEAR``): the same pixel-centre mapping ``src = (dst + 0.5) * (src_size /
  dst_size) - 0.5`` with OpenCV's border clamping, its 11-bit fixed-point weights and the rounding of its
  x86 SIMD vertical pass (which drops 4 bits of the horizontal sums). A NumPy emulation of this kernel
  matched ``cv2.resize`` on 99.8-99.95 % of pixels, never off by more than one grey level
  (tests/service/test_crop_gpu.py); tolerance 1 level (``1 / (255 * std)`` after normalisation).
- Down-scaling (``cv2.INTER_AREA``): each output pixel averages the source pixels its footprint covers,
  partial pixels weighted by their covered fraction (OpenCV's area table), accumulated in float64 and
  rounded half-to-even; integer factors take OpenCV's own fast path (integer sums, its rounding). OpenCV
  accumulates fractional footprints in float32 in another order: the kernel's NumPy emulation matched on
  99.8-100 % of pixels, never off by more than one grey level; tolerance 1 level.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from service.crop import Normalizer
from service.plan import ChipPlan

COMPILE_OPTIONS = ("--fmad=false", "-std=c++14")
RESIZE_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: weights are multiples of 1/2048
MODE_COPY, MODE_LINEAR, MODE_AREA = 0, 1, 2

KERNEL_SOURCE = r"""
// Images are uint8 [h, w, 3] (HWC, RGB), row-major, contiguous.

__device__ __forceinline__ void linear_tap(int d, double scale, int ssize, int& s0, int& s1, int& w0, int& w1) {
    // OpenCV resize INTER_LINEAR: fx = (d + 0.5) * scale - 0.5 in float, floor, clamp at the borders,
    // weights 1 - fx and fx as saturate_cast<short>(w * 2048) (rounded to nearest).
    float f = (float)((d + 0.5) * scale - 0.5);
    int s = (int)floorf(f);
    f -= (float)s;
    if (s < 0) { s = 0; f = 0.f; }
    if (s >= ssize - 1) { s = ssize - 1; f = 0.f; }
    s0 = s;
    s1 = min(s + 1, ssize - 1);
    w0 = __float2int_rn((1.f - f) * 2048.f);  // each weight rounded on its own, as OpenCV does
    w1 = __float2int_rn(f * 2048.f);
}

extern "C" __global__ void resize_linear(
    const unsigned char* __restrict__ src, const int sh, const int sw,
    unsigned char* __restrict__ dst, const int dh, const int dw,
    const double scale_y, const double scale_x)
{
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= dw || y >= dh) return;
    int x0, x1, ax0, ax1, y0, y1, by0, by1;
    linear_tap(x, scale_x, sw, x0, x1, ax0, ax1);
    linear_tap(y, scale_y, sh, y0, y1, by0, by1);
    for (int c = 0; c < 3; ++c) {
        // Horizontal pass in ints scaled by 2048; the vertical pass as OpenCV's x86 SIMD path computes it
        // (VResizeLinearVec_32s8u: drop 4 bits, 16x16 multiply-high, add, round off 2 bits).
        const long long a = src[(y0 * sw + x0) * 3 + c], b = src[(y0 * sw + x1) * 3 + c];
        const long long d = src[(y1 * sw + x0) * 3 + c], e = src[(y1 * sw + x1) * 3 + c];
        const long long r0 = a * ax0 + b * ax1;
        const long long r1 = d * ax0 + e * ax1;
        const long long v = ((((r0 >> 4) * by0) >> 16) + (((r1 >> 4) * by1) >> 16) + 2) >> 2;
        dst[(y * dw + x) * 3 + c] = (unsigned char)min(max(v, 0LL), 255LL);
    }
}

__device__ __forceinline__ void area_span(int d, double scale, int ssize, double& f1, double& f2, double& cell) {
    // Footprint [f1, f2) of output pixel d in source pixels, clipped at the image (OpenCV's area table).
    f1 = d * scale;
    f2 = f1 + scale;
    cell = fmin(scale, ssize - f1);
    f2 = fmin(f2, (double)ssize);
}

__device__ __forceinline__ double area_weight(int s, double f1, double f2, double cell) {
    // Covered fraction of source pixel [s, s + 1) inside [f1, f2), over the cell width.
    const double lo = fmax((double)s, f1);
    const double hi = fmin((double)(s + 1), f2);
    return hi > lo ? (hi - lo) / cell : 0.0;
}

extern "C" __global__ void resize_area(
    const unsigned char* __restrict__ src, const int sh, const int sw,
    unsigned char* __restrict__ dst, const int dh, const int dw,
    const double scale_y, const double scale_x)
{
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= dw || y >= dh) return;
    const int ix = (int)rint(scale_x), iy = (int)rint(scale_y);
    if (fabs(scale_x - ix) < 2.220446049250313e-16 && fabs(scale_y - iy) < 2.220446049250313e-16) {
        // OpenCV's integer-factor fast path: integer sums; 2x2 rounds (sum + 2) >> 2, others sum * (1/area)
        // in float, rounded half to even.
        long long sum[3] = {0, 0, 0};
        for (int sy = y * iy; sy < (y + 1) * iy; ++sy) {
            for (int sx = x * ix; sx < (x + 1) * ix; ++sx) {
                const unsigned char* p = src + (sy * sw + sx) * 3;
                sum[0] += p[0];
                sum[1] += p[1];
                sum[2] += p[2];
            }
        }
        const float inv = 1.f / (float)(ix * iy);
        for (int c = 0; c < 3; ++c) {
            const long long v = (ix == 2 && iy == 2) ? (sum[c] + 2) >> 2 : (long long)rintf((float)sum[c] * inv);
            dst[(y * dw + x) * 3 + c] = (unsigned char)min(max(v, 0LL), 255LL);
        }
        return;
    }
    double fx1, fx2, cx, fy1, fy2, cy;
    area_span(x, scale_x, sw, fx1, fx2, cx);
    area_span(y, scale_y, sh, fy1, fy2, cy);
    const int sx1 = (int)floor(fx1), sx2 = min((int)ceil(fx2), sw);
    const int sy1 = (int)floor(fy1), sy2 = min((int)ceil(fy2), sh);
    double acc[3] = {0.0, 0.0, 0.0};
    for (int sy = sy1; sy < sy2; ++sy) {
        const double wy = area_weight(sy, fy1, fy2, cy);
        if (wy <= 1e-12) continue;  // OpenCV skips slivers below 1e-3 px as well; negligible weight
        for (int sx = sx1; sx < sx2; ++sx) {
            const double w = wy * area_weight(sx, fx1, fx2, cx);
            const unsigned char* p = src + (sy * sw + sx) * 3;
            acc[0] += w * p[0];
            acc[1] += w * p[1];
            acc[2] += w * p[2];
        }
    }
    for (int c = 0; c < 3; ++c) {
        const double v = rint(acc[c]);  // half to even, like cvRound
        dst[(y * dw + x) * 3 + c] = (unsigned char)fmin(fmax(v, 0.0), 255.0);
    }
}

extern "C" __global__ void crop_normalise(
    const unsigned long long* __restrict__ level_ptrs,  // [L] device addresses of the level images
    const int* __restrict__ level_hw,                   // [L, 2] h, w
    const int* __restrict__ chips,                      // [K, 3] level, x0, y0
    const float* __restrict__ scale,                    // [3] per output channel
    const float* __restrict__ bias,                     // [3]
    const int bgr,
    const int size,                                     // chip side C
    float* __restrict__ out)                            // [K, 3, C, C]
{
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const int k = blockIdx.z;
    if (x >= size || y >= size) return;
    const int level = chips[3 * k], x0 = chips[3 * k + 1], y0 = chips[3 * k + 2];
    const int h = level_hw[2 * level], w = level_hw[2 * level + 1];
    const int lx = x0 + x, ly = y0 + y;
    const long long plane = (long long)size * size;
    float* o = out + (long long)k * 3 * plane + (long long)y * size + x;
    if (lx >= w || ly >= h) {
        for (int c = 0; c < 3; ++c) o[c * plane] = bias[c];  // normalised black: 0 * scale + bias
        return;
    }
    const unsigned char* img = (const unsigned char*)level_ptrs[level];
    const unsigned char* p = img + ((long long)ly * w + lx) * 3;
    for (int c = 0; c < 3; ++c) {
        const float v = (float)p[bgr ? 2 - c : c];
        o[c * plane] = __fadd_rn(__fmul_rn(v, scale[c]), bias[c]);  // as NumPy: product, then += bias
    }
}
"""


KERNEL_NAMES = ("resize_linear", "resize_area", "crop_normalise")


@functools.lru_cache(maxsize=1)
def _module() -> Any:
    import cupy as cp  # lazy: CPU installs never import CuPy

    return cp.RawModule(code=KERNEL_SOURCE, options=COMPILE_OPTIONS)


def compile_kernels() -> None:
    """Compile (or load from CuPy's cache) every kernel now, so a broken toolchain fails at startup."""
    mod = _module()
    for name in KERNEL_NAMES:
        mod.get_function(name)


def _grid(w: int, h: int, block: tuple[int, int]) -> tuple[int, int]:
    return (-(-w // block[0]), -(-h // block[1]))


def resize_levels_gpu(image: Any, plan: ChipPlan, block: tuple[int, int] = (32, 8)) -> list[Any]:
    """One resized copy per level of ``image`` (``cupy uint8 [H, W, 3]`` RGB, on the device): ``cupy uint8
    [h_l, w_l, 3]`` (the image itself where the level has its size), as :func:`service.crop.resize_levels`."""
    import cupy as cp

    mod = _module()
    h, w = image.shape[:2]
    out = []
    for lv in plan.levels:
        if (lv.width, lv.height) == (w, h):
            out.append(image)
            continue
        dst = cp.empty((lv.height, lv.width, 3), cp.uint8)
        # Same interpolation choice as the CPU path: area when shrinking, linear when enlarging.
        kernel = mod.get_function("resize_area" if lv.scale < 1 else "resize_linear")
        # OpenCV's scale, computed as it does: 1 / (destination size / source size), per axis, in double.
        sy, sx = 1.0 / (lv.height / h), 1.0 / (lv.width / w)
        args = (image, np.int32(h), np.int32(w), dst, np.int32(lv.height), np.int32(lv.width))
        kernel(_grid(lv.width, lv.height, block), block, (*args, np.float64(sy), np.float64(sx)))
        out.append(dst)
    return out


def crop_to_device(
    level_images: list[Any], chips: np.ndarray, norm: Normalizer, out: Any, block: tuple[int, int] = (32, 8)
) -> Any:
    """Write chips ``chips`` (``int [K, 3]`` level, x0, y0) of the device ``level_images`` into ``out``
    (``cupy float32 [>= K, 3, C, C]``, e.g. an engine's input buffer), normalised, padded past each level.
    Enqueued on the *current* stream (the caller's ``with stream:``) and not waited for: the caller orders its
    readers after it (``TensorRTEngine.infer_staged``: TensorRT's stream waits on an event recorded after it)."""
    import cupy as cp

    k, c = int(chips.shape[0]), int(out.shape[-1])
    if k == 0:
        return out[:0]
    if out.shape[0] < k or out.shape[1:] != (3, c, c) or out.dtype != cp.float32:
        raise ValueError(f"out must be float32 [>= {k}, 3, C, C], got {out.dtype} {out.shape}")
    if not all(im.flags.c_contiguous and im.dtype == cp.uint8 and im.ndim == 3 for im in level_images):
        raise ValueError("level images must be C-contiguous uint8 [h, w, 3] device arrays")
    ptrs = cp.asarray(np.array([im.data.ptr for im in level_images], np.uint64))
    hw = cp.asarray(np.array([im.shape[:2] for im in level_images], np.int32))
    d_chips = cp.asarray(np.ascontiguousarray(chips, np.int32))
    scale = cp.asarray(norm.scale.reshape(3).astype(np.float32))
    bias = cp.asarray(norm.bias.reshape(3).astype(np.float32))
    gx, gy = _grid(c, c, block)
    _module().get_function("crop_normalise")(
        (gx, gy, k), block, (ptrs, hw, d_chips, scale, bias, np.int32(norm.bgr), np.int32(c), out)
    )
    return out[:k]


def levels_to_device(image: np.ndarray, plan: ChipPlan) -> list[Any]:
    """Upload ``image`` (``uint8 [H, W, 3]`` RGB) once and resize every level of ``plan`` on the device, on this
    thread's ``levels`` stream (:mod:`service.cuda_streams`); returns when the levels are complete (that stream is
    synchronised), so any stream on any thread may crop from them afterwards."""
    import cupy as cp

    from service.cuda_streams import stage_stream

    stream = stage_stream("levels")
    with stream:
        levels = resize_levels_gpu(cp.asarray(np.ascontiguousarray(image)), plan)
    stream.synchronize()
    return levels


def preprocess_to_device(image: np.ndarray, plan: ChipPlan, norm: Normalizer, out: Any | None = None) -> Any:
    """The whole GPU path for one image: upload ``image`` (``uint8 [H, W, 3]`` RGB) once, resize every level,
    cut all of ``plan``'s chips into ``out`` (allocated ``[K, 3, C, C]`` when not given); returns the chips
    as ``cupy float32 [K, 3, C, C]``. The same values as :func:`service.crop.crop_plan` within the
    documented resize tolerance (module docstring)."""
    import cupy as cp

    from service.cuda_streams import stage_stream

    levels = levels_to_device(image, plan)
    stream = stage_stream("levels")
    with stream:
        if out is None:
            out = cp.empty((plan.num_chips, 3, plan.chip_size, plan.chip_size), cp.float32)
        chips = crop_to_device(levels, plan.chips, norm, out)
    stream.synchronize()  # complete when returned: the caller may read it on any stream
    return chips
