"""Soak helpers: RSS reading and the leak slope."""

from __future__ import annotations

import os

import pytest

from loadtest.soak import rss_mb, slope_per_1k


def test_rss_of_this_process_is_plausible() -> None:
    assert 5 < rss_mb(os.getpid()) < 64_000


def test_slope_uses_the_second_half_only() -> None:
    warming = [(i * 100, 100.0 + i * 5) for i in range(10)]  # steep growth while warming up
    flat = [(1000 + i * 100, 150.0) for i in range(10)]
    assert slope_per_1k(warming + flat) == pytest.approx(0.0, abs=1e-9)
    leaking = [(i * 100, 100.0 + i * 0.2) for i in range(20)]  # 0.2 MB per 100 requests
    assert slope_per_1k(leaking) == pytest.approx(2.0)
    assert slope_per_1k([(0, 1.0)]) == 0.0
