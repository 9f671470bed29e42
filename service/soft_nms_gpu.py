"""GPU soft-NMS: one CUDA thread block per group (class, or image x class), exactly :mod:`service.soft_nms`.

Status: written against CuPy's documented ``RawKernel`` API. The kernel source compiles to PTX with ``nvcc``,
and in every test run it is compiled for the CPU and run through this module's host code by the tests' CUDA
emulation (tests/cudasim: a fiber per CUDA thread, real barriers and warp shuffles, warps held back at random),
where it gives the NumPy reference's exact result. It has not run on a GPU yet (README, GPU path, status
table); ``scripts/gpu_check.py`` runs the parity check and the benchmarks on a GPU host.

Exactness. The NumPy reference works in float64 on float32 inputs; so does the kernel, with the same
order of operations (IoU as ``inter / ((area_a + area_b) - inter)``, Gaussian ``exp(-(iou * iou) / sigma)``,
``score * f``) and fused multiply-add contraction switched off (``--fmad=false``) so that every ``+``, ``-``,
``*`` and ``/`` is one IEEE-rounded double operation, as in NumPy. The one operation that is not
bit-for-bit specified is ``exp`` (CUDA's double ``exp`` is within 1 ulp; NumPy's is within 1 ulp of the
true value as well): a Gaussian decay can differ in the last bit, which can only change the selection
order where two current scores are within ~1e-16 relative of each other. Exactly equal scores stay exactly
equal on both sides (same inputs, same function), so lowest-index tie-breaking agrees. Linear and hard
decay are bit-identical.

Algorithm per block (group of ``n`` candidates, all ``>= score_threshold`` on entry, as in the reference):
each thread owns candidates ``tid, tid + blockDim, ...``. A round is: block-wide argmax over
``(score desc, index asc)`` -> thread 0 records the selection -> every thread decays its live candidates
in parallel, drops those now below the threshold and, in the same pass, finds its local best for the next
round. One pass over the group per selection, no host round trips.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.errors import ModelLoadError
from service.soft_nms import _METHODS, SoftNMSParams, batched_soft_nms, join_groups

log = logging.getLogger("snipserve.soft_nms_gpu")

KERNEL_NAME = "soft_nms_groups"
# Block size: a multiple of the warp size (the reduction assumes it). 256 keeps enough warps per block to
# hide the double-precision latency of the decay pass; tune with scripts/gpu_check.py's benchmark.
BLOCK_THREADS = 256
# No FMA contraction: NumPy rounds every product and sum separately; so must we (module docstring).
COMPILE_OPTIONS = ("--fmad=false", "-std=c++14")
METHOD_CODES: dict[str, int] = {"gaussian": 0, "linear": 1, "hard": 2}

KERNEL_SOURCE = r"""
// Soft-NMS per group; see service/soft_nms_gpu.py for the contract and service/soft_nms.py for the reference.
// boxes   double [M, 4] xyxy, candidates of all groups, group by group (offsets)
// scores  double [M]    current scores, decayed in place
// alive   uchar  [M]    1 = still a candidate (all 1 on entry)
// offsets long long [G + 1]
// keep    long long [M] group-local positions in selection order (first counts[g] of each group's slice)
// kept    double [M]    scores when selected
// counts  long long [G]

__device__ __forceinline__ bool better(double sa, long long ia, double sb, long long ib) {
    // Total order used by the reference: higher score first, lower index on ties; index -1 = "none".
    if (ia < 0) return false;
    if (ib < 0) return true;
    return sa > sb || (sa == sb && ia < ib);
}

__device__ __forceinline__ void warp_best(double& s, long long& i) {
    for (int off = 16; off > 0; off >>= 1) {
        double os = __shfl_down_sync(0xffffffffu, s, off);
        long long oi = __shfl_down_sync(0xffffffffu, i, off);
        if (better(os, oi, s, i)) { s = os; i = oi; }
    }
}

// Block-wide best (score, index); every thread returns with the result. Ends with a barrier so the shared
// slots can be reused by the next call.
__device__ void block_best(double& s, long long& i, double* ws, long long* wi) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = (blockDim.x + 31) >> 5;
    warp_best(s, i);
    if (lane == 0) { ws[warp] = s; wi[warp] = i; }
    __syncthreads();
    if (warp == 0) {
        s = lane < nwarps ? ws[lane] : 0.0;
        i = lane < nwarps ? wi[lane] : -1;
        warp_best(s, i);
        if (lane == 0) { ws[0] = s; wi[0] = i; }
    }
    __syncthreads();
    s = ws[0];
    i = wi[0];
    __syncthreads();
}

__device__ __forceinline__ double iou_of(const double* a, const double* b) {
    // Same operations, same order, as service.soft_nms.box_iou_one (float64).
    double iw = fmin(a[2], b[2]) - fmax(a[0], b[0]);
    double ih = fmin(a[3], b[3]) - fmax(a[1], b[1]);
    double inter = fmax(iw, 0.0) * fmax(ih, 0.0);
    double area_a = (a[2] - a[0]) * (a[3] - a[1]);
    double area_b = (b[2] - b[0]) * (b[3] - b[1]);
    double uni = (area_a + area_b) - inter;
    return uni > 0.0 ? inter / uni : 0.0;
}

__device__ __forceinline__ double decay_of(double iou, int method, double sigma, double nt) {
    if (method == 0) return exp(-(iou * iou) / sigma);
    if (method == 1) return iou > nt ? 1.0 - iou : 1.0;
    return iou > nt ? 0.0 : 1.0;
}

extern "C" __global__ void soft_nms_groups(
    const double* __restrict__ boxes,
    double* __restrict__ scores,
    unsigned char* __restrict__ alive,
    const long long* __restrict__ offsets,
    const int method,
    const double sigma,
    const double iou_threshold,
    const double score_threshold,
    long long* __restrict__ keep,
    double* __restrict__ kept,
    long long* __restrict__ counts)
{
    __shared__ double ws[32];
    __shared__ long long wi[32];
    const long long start = offsets[blockIdx.x];
    const long long n = offsets[blockIdx.x + 1] - start;
    const double* b = boxes + 4 * start;
    double* s = scores + start;
    unsigned char* live = alive + start;

    // Local best of this thread's candidates (all alive on entry).
    double best_s = 0.0;
    long long best_i = -1;
    for (long long j = threadIdx.x; j < n; j += blockDim.x) {
        if (live[j] && better(s[j], j, best_s, best_i)) { best_s = s[j]; best_i = j; }
    }
    long long count = 0;
    while (true) {
        block_best(best_s, best_i, ws, wi);
        if (best_i < 0) break;
        const long long k = best_i;
        if (threadIdx.x == 0) {
            keep[start + count] = k;
            kept[start + count] = best_s;
        }
        ++count;
        const double kb[4] = {b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]};
        best_s = 0.0;
        best_i = -1;
        // Only the owner of candidate j reads or writes s[j] and live[j]: no races between threads.
        for (long long j = threadIdx.x; j < n; j += blockDim.x) {
            if (!live[j]) continue;
            if (j == k) { live[j] = 0; continue; }
            const double ns = s[j] * decay_of(iou_of(kb, b + 4 * j), method, sigma, iou_threshold);
            s[j] = ns;
            if (!(ns >= score_threshold)) { live[j] = 0; continue; }
            if (better(ns, j, best_s, best_i)) { best_s = ns; best_i = j; }
        }
    }
    if (threadIdx.x == 0) counts[blockIdx.x] = count;
}
"""


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    import cupy as cp  # lazy: CPU installs never import CuPy

    return cp.RawKernel(KERNEL_SOURCE, KERNEL_NAME, options=COMPILE_OPTIONS)


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when CuPy imports, a CUDA device is visible and the kernel compiles and runs (checked once)."""
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() < 1:
            return False
        # One tiny run compiles the kernel (cached on disk by CuPy) and proves the device works.
        k, _ = soft_nms_groups_gpu(
            np.array([[0, 0, 1, 1]], np.float32), np.array([1.0], np.float32), np.zeros(1, np.int64)
        )
        return bool(k.tolist() == [0])
    except Exception as exc:  # noqa: BLE001 - any CUDA/driver/compiler failure means "use NumPy"
        log.warning("GPU soft-NMS unavailable, using NumPy: %s: %s", type(exc).__name__, exc)
        return False


def _check_args(method: str, sigma: float, iou_threshold: float) -> None:
    # The same checks, and messages, as service.soft_nms.soft_nms.
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")


def group_candidates(
    scores: np.ndarray, groups: np.ndarray, score_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates of every group, laid out group by group for the kernel.

    Args:
        scores: ``float32 [N]``.
        groups: ``int [N]`` group id per box.
        score_threshold: candidates are ``score >= score_threshold`` (as in the reference).

    Returns:
        ``(order, offsets, group_ids)``: ``int64 [M]`` original indices of the candidates, by group
        (ascending id) and ascending index inside a group; ``int64 [G + 1]`` slice bounds into ``order``;
        ``groups.dtype [G]`` the ids of the non-empty groups.
    """
    cand = np.flatnonzero(scores >= score_threshold)
    # Stable sort by group keeps ascending index inside each group: the reference's candidate order.
    order = cand[np.argsort(groups[cand], kind="stable")]
    group_ids, counts = np.unique(groups[order], return_counts=True)
    offsets = np.zeros(group_ids.size + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return order.astype(np.int64), offsets, group_ids


def soft_nms_groups_gpu(
    boxes: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    params: SoftNMSParams | None = None,
    block_threads: int = BLOCK_THREADS,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS per group on the GPU; the same arguments and result as
    :func:`service.soft_nms.batched_soft_nms` (``keep`` ``int64 [K]``, ``kept`` ``float32 [K]``, sorted by
    kept score descending, stable). ``groups`` may encode ``(image, class)`` pairs: one block per group."""
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    groups = np.asarray(groups)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],) or groups.shape != scores.shape:
        raise ValueError(
            f"need boxes [N, 4], scores [N], groups [N], got {boxes.shape}, {scores.shape}, {groups.shape}"
        )
    if block_threads % 32 or not 32 <= block_threads <= 1024:
        raise ValueError(f"block_threads must be a multiple of 32 in [32, 1024], got {block_threads}")
    p = params or SoftNMSParams()
    method, sigma, iou_threshold, score_threshold = p.method, p.sigma, p.iou_threshold, p.score_threshold
    if groups.size:
        _check_args(method, sigma, iou_threshold)  # the reference validates once it has a group
    order, offsets, _ = group_candidates(scores, groups, score_threshold)
    if order.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    import cupy as cp

    from service.cuda_streams import stage_stream

    # This thread's stream, not the legacy default one (which serialises with every stage); get() waits for it.
    with stage_stream("soft_nms"):
        g = offsets.size - 1
        d_boxes = cp.asarray(boxes[order].astype(np.float64))  # [M, 4], same float32 -> float64 as the reference
        d_scores = cp.asarray(scores[order].astype(np.float64))  # [M]
        d_alive = cp.ones(order.size, cp.uint8)
        d_offsets = cp.asarray(offsets)
        d_keep = cp.empty(order.size, cp.int64)
        d_kept = cp.empty(order.size, cp.float64)
        d_counts = cp.empty(g, cp.int64)
        _kernel()(
            (g,),
            (block_threads,),
            (
                d_boxes,
                d_scores,
                d_alive,
                d_offsets,
                np.int32(METHOD_CODES[method]),
                np.float64(sigma),
                np.float64(iou_threshold),
                np.float64(score_threshold),
                d_keep,
                d_kept,
                d_counts,
            ),
        )
        keep_local, kept64, counts = d_keep.get(), d_kept.get(), d_counts.get()
    return assemble(order, offsets, keep_local, kept64, counts)


def assemble(
    order: np.ndarray, offsets: np.ndarray, keep_local: np.ndarray, kept64: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Kernel outputs -> ``batched_soft_nms``'s result: per group, the first ``counts[g]`` entries of its slice
    (group-local positions) mapped to original indices; groups concatenated in ascending id; then a stable
    sort by float32 score, descending -- the same steps, in the same order, as the reference."""
    keeps, kepts = [], []
    for gi in range(offsets.size - 1):
        lo = int(offsets[gi])
        n = int(counts[gi])
        keeps.append(order[lo + keep_local[lo : lo + n]])
        kepts.append(kept64[lo : lo + n].astype(np.float32))
    return join_groups(keeps, kepts)


class SoftNmsDispatch(BaseModel):
    """Where the soft-NMS merge runs. NumPy by default: the GPU kernel's speed has never been measured, and
    choosing it blindly could make the merge slower (one block per group: a single large class costs
    O(kept x group / threads) on one SM). ``scripts/gpu_check.py`` measures both at several sizes and writes the
    crossover as ``min_boxes`` / ``max_group`` (``SNIPSERVE_SOFT_NMS_GPU_MIN_BOXES`` / ``..._MAX_GROUP``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Literal["cpu", "gpu"] = Field(
        default="cpu",
        description="Where soft-NMS runs: cpu (NumPy), or gpu (the CUDA kernel, within the size thresholds; fails "
        "at startup if it cannot run). cpu until the GPU's speed is measured (scripts/gpu_check.py).",
    )
    min_boxes: int = Field(
        default=0, ge=0, description="GPU soft-NMS only for at least this many candidates (gpu_check's crossover)."
    )
    max_group: int | None = Field(
        default=None, ge=1, description="GPU soft-NMS only while no class has more candidates than this."
    )

    def wants_gpu(self, scores: np.ndarray, groups: np.ndarray, score_threshold: float) -> bool:
        """True when this merge (``scores`` ``float32 [N]``, ``groups`` ``int [N]``) falls in the GPU's range."""
        if self.device != "gpu" or scores.size == 0:
            return False
        live = groups[scores >= score_threshold]
        if live.size < max(self.min_boxes, 1):
            return False
        if self.max_group is None:
            return True
        _, counts = np.unique(live, return_counts=True)
        return int(counts.max()) <= self.max_group


CPU_ONLY = SoftNmsDispatch()


def require_gpu(dispatch: SoftNmsDispatch) -> None:
    """At startup: ``device="gpu"`` needs CuPy, a device and a kernel that compiles; else :class:`ModelLoadError`
    (an explicit GPU choice never degrades silently)."""
    if dispatch.device == "gpu" and not gpu_available():
        raise ModelLoadError(
            "SNIPSERVE_SOFT_NMS_DEVICE=gpu, but the GPU soft-NMS kernel cannot run here (CuPy, a CUDA device and "
            "NVRTC with the CUDA headers are needed; the log above says which failed). Use "
            "SNIPSERVE_SOFT_NMS_DEVICE=cpu."
        )


def batched_soft_nms_auto(
    boxes: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    params: SoftNMSParams | None = None,
    dispatch: SoftNmsDispatch = CPU_ONLY,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`service.soft_nms.batched_soft_nms` on the GPU where ``dispatch`` says so (and a device works,
    checked once per process), else the NumPy function itself, unchanged. Same arguments, same result."""
    threshold = (params or SoftNMSParams()).score_threshold
    if dispatch.wants_gpu(np.asarray(scores), np.asarray(groups), threshold) and gpu_available():
        return soft_nms_groups_gpu(boxes, scores, groups, params)
    return batched_soft_nms(boxes, scores, groups, params)
