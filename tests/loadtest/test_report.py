"""Percentiles against a slow reference, run summaries (windows, classes of answers), outputs, sweep search."""

from __future__ import annotations

import csv
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.report import (
    Samples,
    Summary,
    latency_stats,
    percentile,
    plot_latency_vs_throughput,
    summarize,
    write_csv,
    write_json,
)
from loadtest.sweep import SweepConfig, find_max_rate, passes


def reference_percentile(values: list[float], p: float) -> float:
    """Nearest rank, written out in exact arithmetic: the value at 1-based rank ceil(p/100 * n)."""
    ordered = sorted(values)
    rank = math.ceil(Fraction(str(p)) * len(ordered) / 100)
    return ordered[max(rank, 1) - 1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=300),
    st.sampled_from([1.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0]),
)
def test_percentile_matches_nearest_rank_reference(values: list[float], p: float) -> None:
    assert percentile(np.asarray(values), p) == reference_percentile(values, p)


def test_percentile_is_a_real_sample_and_exact_at_known_points() -> None:
    v = np.arange(1, 1001, dtype=np.float64)  # 1..1000
    assert percentile(v, 50) == 500 and percentile(v, 99) == 990 and percentile(v, 99.9) == 999
    assert percentile(v, 100) == 1000
    assert math.isnan(percentile(np.array([]), 99))
    with pytest.raises(ValueError):
        percentile(v, 0)


def test_latency_stats_are_milliseconds() -> None:
    stats = latency_stats(np.array([0.1, 0.2, 0.3, 0.4]))
    assert stats["p50"] == pytest.approx(200) and stats["max"] == pytest.approx(400)
    assert stats["mean"] == pytest.approx(250)


def samples(rows: list[tuple[float, float, float, int]]) -> Samples:
    return Samples.from_rows([(*r, 0) for r in rows])


def test_summary_drops_warmup_and_classifies_answers() -> None:
    s = samples(
        [
            (0.5, 0.5, 0.6, 500),  # warm-up: ignored
            (0.8, 0.8, 1.2, 200),  # warm-up, but answered inside the window: counts for throughput only
            (1.0, 1.0, 1.1, 200),
            (1.5, 1.6, 1.7, 200),  # sent 0.1 late: latency counts from 1.5
            (2.0, 2.0, 2.1, 503),
            (2.5, 2.5, 3.5, 504),
            (3.0, 3.0, 3.2, -1),  # client timeout
            (3.5, 3.5, 3.6, 0),  # connection refused
            (4.0, 4.0, 4.2, 422),
            (4.5, 4.5, 5.5, 200),  # answered after the window: not in achieved throughput
            (5.0, 5.0, 5.1, 200),  # intended after the window: not measured
        ]
    )
    m = summarize(s, mode="open", arrival="constant", target_rate=2.0, concurrency=None, start=1.0, duration_s=4.0)
    assert m.requests == 8 and m.offered_rps == 2.0
    assert (m.ok, m.rejected, m.timed_out, m.errors) == (3, 1, 2, 2)
    assert m.achieved_rps == 3 / 4.0  # answered in [1, 5): the warm-up one at 1.2, and 1.1 and 1.7
    assert m.reject_rate == 1 / 8 and m.timeout_rate == 2 / 8 and m.error_rate == 2 / 8
    assert m.latency_ms["max"] == pytest.approx(1000)  # the 200 that came back at 5.5
    assert m.latency_ms["p50"] == pytest.approx(200)  # 100, 200, 1000 ms -> 200 (from intended, not sent)
    assert m.lag_ms["max"] == pytest.approx(100)


def test_json_csv_and_plot_outputs(tmp_path: Path) -> None:
    runs = [
        summarize(
            samples([(1.0 + i / 10, 1.0 + i / 10, 1.05 + i / 10 * k, 200) for i in range(20)]),
            mode="open",
            arrival="poisson",
            target_rate=float(k),
            concurrency=None,
            start=1.0,
            duration_s=2.0,
        )  # fmt: skip
        for k in (1, 2, 3)
    ]
    write_json(runs, tmp_path / "r.json", best_rate=2.0)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["best_rate"] == 2.0 and len(doc["runs"]) == 3
    assert Summary.model_validate(doc["runs"][0]) == runs[0]
    write_csv(runs, tmp_path / "r.csv")
    with (tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and "latency_p99.9_ms" in rows[0] and "lag_p99_ms" in rows[0]
    plot_latency_vs_throughput(runs, tmp_path / "r.png", slo_ms=500)
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- sweep ----------------------------------------------------------------------------------------------
def fake_run(rate: float, capacity: float = 10.0) -> Summary:
    """An M/M/1-like service of ``capacity`` req/s: p99 latency explodes as the rate approaches it."""
    util = min(rate / capacity, 0.999)
    p99 = 1000 * 4.6 / (capacity * (1 - util))  # -ln(0.01) / (mu - lambda), ms
    lat = {k: p99 for k in ("p50", "p90", "p95", "p99", "p99.9", "max", "mean")}
    return Summary(
        mode="open", arrival="poisson", target_rate=rate, concurrency=None, duration_s=10, requests=int(rate * 10),
        offered_rps=rate, achieved_rps=min(rate, capacity), ok=int(rate * 10), rejected=0, timed_out=0, errors=0,
        reject_rate=0.0, timeout_rate=0.0, error_rate=0.0, latency_ms=lat, latency_all_ms=lat, lag_ms=lat,
    )  # fmt: skip


def test_sweep_finds_the_highest_rate_under_the_slo() -> None:
    # p99 <= 1000 ms  <=>  4.6 / (10 - rate) <= 1  <=>  rate <= 5.4
    best, runs = find_max_rate(fake_run, SweepConfig(slo_p99_ms=1000, start=1, factor=2, refine=6))
    assert best is not None and 5.0 <= best <= 5.4
    assert all(passes(r, SweepConfig(slo_p99_ms=1000)) == (r.offered_rps <= 5.4) for r in runs)
    assert [r.offered_rps for r in runs][:3] == [1, 2, 4]  # geometric first, then bisection


def test_sweep_reports_none_when_even_the_first_rate_fails() -> None:
    best, runs = find_max_rate(fake_run, SweepConfig(slo_p99_ms=1, start=1, refine=0))
    assert best is None and len(runs) == 1


def test_rejections_fail_a_rate_even_with_fast_answers() -> None:
    s = fake_run(1.0).model_copy(update={"reject_rate": 0.2})
    assert not passes(s, SweepConfig(slo_p99_ms=10_000))


def test_a_rate_the_service_does_not_keep_up_with_fails() -> None:
    s = fake_run(1.0).model_copy(update={"achieved_rps": 0.5})  # fast answers, but half the arrivals pending
    assert not passes(s, SweepConfig(slo_p99_ms=10_000))
    assert passes(s, SweepConfig(slo_p99_ms=10_000, min_goodput=0.4))
