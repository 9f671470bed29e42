"""Arrival schedules for the open-loop generator: pure functions of (rate, duration, seed), no I/O.

Each function returns the *intended* send offsets in seconds from the start of the run, ascending,
``float64 [N]``. The generator sends request ``i`` at ``start + offsets[i]`` whatever happened to the
requests before it, and measures latency from that intended time (no coordinated omission).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Arrival = Literal["constant", "poisson"]


def constant_offsets(rate: float, duration_s: float) -> np.ndarray:
    """``k / rate`` for every ``k`` with ``k / rate < duration_s``; ``float64 [floor(rate*duration)]``."""
    _check(rate, duration_s)
    n = math.ceil(rate * duration_s - 1e-9)
    return np.arange(n, dtype=np.float64) / rate


def poisson_offsets(rate: float, duration_s: float, seed: int = 0) -> np.ndarray:
    """A Poisson process of intensity ``rate`` on ``[0, duration_s)``: exponential gaps of mean ``1/rate``."""
    _check(rate, duration_s)
    rng = np.random.default_rng(seed)
    expected = rate * duration_s
    n_draw = int(expected + 10 * math.sqrt(expected) + 10)  # P(more arrivals than this) is negligible
    times = np.cumsum(rng.exponential(1.0 / rate, n_draw))
    while times[-1] < duration_s:  # astronomically unlikely; keeps the function total
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, n_draw))])
    return times[times < duration_s]


def offsets(arrival: Arrival, rate: float, duration_s: float, seed: int = 0) -> np.ndarray:
    """The schedule ``arrival`` names."""
    return constant_offsets(rate, duration_s) if arrival == "constant" else poisson_offsets(rate, duration_s, seed)


def _check(rate: float, duration_s: float) -> None:
    if not (rate > 0 and math.isfinite(rate)):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration must be positive seconds, got {duration_s}")
