"""Soft-NMS speed at 1k, 5k and 20k boxes: the shipped (cluster-split) soft_nms vs the plain O(N^2)
loop it replaces, on detection-like inputs (many objects, several overlapping candidates each).

    .venv/bin/python benchmarks/bench_soft_nms.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from service.soft_nms import _soft_nms_dense, soft_nms


def detection_like(n: int, seed: int = 0, extent: float = 4000.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` boxes around ``n / 5`` objects of 6-300 px in an ``extent``-pixel image (jittered copies)."""
    rng = np.random.default_rng(seed)
    k = max(1, n // 5)
    centres = rng.uniform(0, extent, (k, 2))
    sizes = np.exp(rng.uniform(np.log(6), np.log(300), k))
    which = rng.integers(0, k, n)
    c = centres[which] + rng.normal(0, 0.1, (n, 2)) * sizes[which, None]
    s = sizes[which, None] * rng.uniform(0.8, 1.25, (n, 2))
    boxes = np.concatenate([c - s / 2, c + s / 2], axis=1).astype(np.float32)
    return boxes, rng.uniform(0.001, 1, n).astype(np.float32)


def timed(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'boxes':>7} {'soft_nms (s)':>13} {'plain loop (s)':>15} {'speed-up':>9} {'kept':>6}")
    for n in args.sizes:
        boxes, scores = detection_like(n)
        fast = timed(lambda: soft_nms(boxes, scores, "gaussian", 0.5, 0.3, 0.001), args.repeat)  # noqa: B023
        keep, _ = soft_nms(boxes, scores, "gaussian", 0.5, 0.3, 0.001)
        b64, s64 = boxes.astype(np.float64), scores.astype(np.float64)
        plain = timed(lambda: _soft_nms_dense(b64, s64, "gaussian", 0.5, 0.3, 0.001), 1)  # noqa: B023
        print(f"{n:>7} {fast:>13.4f} {plain:>15.4f} {plain / fast:>8.1f}x {len(keep):>6}")


if __name__ == "__main__":
    main()
