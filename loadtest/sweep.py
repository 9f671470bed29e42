"""Rate sweep: the highest open-loop rate whose p99 latency meets an SLO.

Rates grow geometrically from ``start`` by ``factor`` until a run fails (p99 above the SLO, more than
``max_bad_rate`` of requests rejected, timed out or failed, or fewer answers completed in the window than
``min_goodput`` of the offered rate: a queue still growing when the window closed), then ``refine``
bisection steps between the last passing and the first failing rate. Each step is a full open-loop run
(warm-up + duration).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from loadtest.report import Summary


class SweepConfig(BaseModel):
    """How to search for the highest rate that meets the SLO."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slo_p99_ms: float = Field(default=2000.0, gt=0, description="p99 latency (from intended send) to meet.")
    max_bad_rate: float = Field(default=0.01, ge=0, le=1, description="Allowed share of 503/504/errors.")
    min_goodput: float = Field(default=0.9, ge=0, le=1, description="Achieved/offered at least this (keeping up).")
    start: float = Field(default=0.5, gt=0, description="First rate (requests/s).")
    factor: float = Field(default=1.5, gt=1, description="Growth per step until a rate fails.")
    max_rate: float = Field(default=1000.0, gt=0, description="Never offer more than this.")
    refine: int = Field(default=2, ge=0, le=10, description="Bisection steps after the first failure.")


def passes(s: Summary, config: SweepConfig) -> bool:
    """p99 of every answer within the SLO, few enough rejections, timeouts and errors, and keeping up."""
    bad = s.reject_rate + s.timeout_rate + s.error_rate
    p99 = s.latency_all_ms["p99"]
    keeping_up = s.achieved_rps >= config.min_goodput * s.offered_rps
    return p99 == p99 and p99 <= config.slo_p99_ms and bad <= config.max_bad_rate and keeping_up  # NaN != NaN


def find_max_rate(measure: Callable[[float], Summary], config: SweepConfig) -> tuple[float | None, list[Summary]]:
    """``(highest passing rate or None, every run in order)``; ``measure(rate)`` runs one open-loop test."""
    runs: list[Summary] = []
    good: float | None = None
    bad: float | None = None
    rate = config.start
    while rate <= config.max_rate:
        s = measure(rate)
        runs.append(s)
        if not passes(s, config):
            bad = rate
            break
        good = rate
        rate *= config.factor
    if bad is None:
        return good, runs
    lo = good if good is not None else 0.0
    for _ in range(config.refine):
        mid = (lo + bad) / 2
        if mid <= 0 or (good is not None and mid - lo < 1e-3 * bad):
            break
        s = measure(mid)
        runs.append(s)
        if passes(s, config):
            lo = good = mid
        else:
            bad = mid
    return good, runs
