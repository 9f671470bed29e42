"""Open-loop schedules and the generator against in-process fake services (httpx.MockTransport).

The point of the open loop: when the service is slower than the arrival rate, latency measured from the
intended send time grows with the queue, while a closed loop only ever sees one service time
(coordinated omission); and a generator that stalls cannot hide the stall from the latencies.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from loadtest.generator import LoadConfig, run_closed, run_open
from loadtest.images import MixImage, parse_mix
from loadtest.report import summarize
from loadtest.schedule import constant_offsets, offsets, poisson_offsets

MIX = [MixImage("tiny", b"\xff\xd8fake", "image/jpeg", 1.0)]


# ---- schedules ------------------------------------------------------------------------------------------
def test_constant_schedule_is_exact() -> None:
    t = constant_offsets(4.0, 2.5)
    assert t.tolist() == [k / 4 for k in range(10)]
    assert constant_offsets(3.0, 1.0).size == 3


def test_poisson_schedule_has_the_right_rate_and_exponential_gaps() -> None:
    t = poisson_offsets(50.0, 200.0, seed=3)  # ~10,000 arrivals
    assert abs(t.size - 10_000) < 4 * np.sqrt(10_000)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: coefficient of variation 1
    assert np.all(gaps > 0) and t[-1] < 200.0
    assert np.array_equal(t, poisson_offsets(50.0, 200.0, seed=3))  # reproducible


@pytest.mark.parametrize(("rate", "duration"), [(0, 1), (-1, 1), (1, 0), (float("inf"), 1)])
def test_schedule_rejects_nonsense(rate: float, duration: float) -> None:
    with pytest.raises(ValueError):
        offsets("constant", rate, duration)


def test_image_mix_parsing() -> None:
    mix = parse_mix("64x48:3, 32x32")
    assert [(m.name, m.weight) for m in mix] == [("64x48", 3.0), ("32x32", 1.0)]
    assert mix[0].data[:2] == b"\xff\xd8"
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_mix("big")


# ---- generator ------------------------------------------------------------------------------------------
def serial_service(service_s: float) -> httpx.MockTransport:
    """One request at a time, ``service_s`` each: a queue forms when requests arrive faster."""
    lock = asyncio.Lock()

    async def handler(request: httpx.Request) -> httpx.Response:
        async with lock:
            await asyncio.sleep(service_s)
        return httpx.Response(200, json={"detections": []})

    return httpx.MockTransport(handler)


def test_open_loop_sees_the_queue_that_a_closed_loop_hides() -> None:
    service_s, rate, duration = 0.05, 40.0, 1.0  # 2x overload: 40 arrivals, 2 s of work
    open_cfg = LoadConfig(url="http://svc", mode="open", arrival="constant", rate=rate, duration_s=duration, warmup_s=0)
    open_s = asyncio.run(run_open(open_cfg, MIX, serial_service(service_s)))
    closed_cfg = LoadConfig(url="http://svc", mode="closed", concurrency=1, duration_s=duration, warmup_s=0)
    closed_s = asyncio.run(run_closed(closed_cfg, MIX, serial_service(service_s)))

    o = summarize(open_s, mode="open", arrival="constant", target_rate=rate, concurrency=None, start=0, duration_s=1)
    c = summarize(closed_s, mode="closed", arrival="closed", target_rate=None, concurrency=1, start=0, duration_s=1)
    assert o.requests == 40  # every scheduled request went out, none waited for an answer
    # the last request waits for the 39 before it: ~40 * 0.05 - 39 * 0.025 = ~1.0 s
    assert o.latency_ms["max"] > 800
    # Bounds leave room for a busy CI machine; the effect measured is ~20x (1 s of queueing vs 50 ms).
    assert o.latency_ms["p99"] > 5 * c.latency_ms["p50"]
    assert c.latency_ms["p99"] < 10 * service_s * 1000  # the closed loop only ever sees one service time
    assert o.lag_ms["p99"] < 250  # the generator kept to its schedule (far below the queueing it measures)


def test_a_stalled_generator_cannot_hide_the_stall() -> None:
    stalled = {"done": False}

    async def handler(request: httpx.Request) -> httpx.Response:
        if not stalled["done"]:
            stalled["done"] = True
            time.sleep(0.3)  # blocks the event loop: requests due meanwhile are sent late
        return httpx.Response(200)

    cfg = LoadConfig(url="http://svc", mode="open", arrival="constant", rate=50, duration_s=1.0, warmup_s=0)
    s = asyncio.run(run_open(cfg, MIX, httpx.MockTransport(handler)))
    assert s.lag.max() > 0.25  # requests intended during the stall left late ...
    assert np.all(s.latency >= s.lag - 1e-9)  # ... and their latency includes the time they were late
    late = s.lag > 0.1
    assert late.sum() >= 10 and np.all(s.latency[late] > 0.1)


def test_status_classes_reach_the_samples() -> None:
    statuses = iter([200, 503, 504, 500] * 10)

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(statuses))

    cfg = LoadConfig(url="http://svc", mode="open", arrival="constant", rate=40, duration_s=0.5, warmup_s=0)
    s = asyncio.run(run_open(cfg, MIX, httpx.MockTransport(handler)))
    m = summarize(s, mode="open", arrival="constant", target_rate=40, concurrency=None, start=0, duration_s=0.5)
    assert (m.ok, m.rejected, m.timed_out, m.errors) == (5, 5, 5, 5)


def test_transport_errors_are_recorded_not_raised() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    cfg = LoadConfig(url="http://svc", mode="open", arrival="constant", rate=20, duration_s=0.2, warmup_s=0)
    s = asyncio.run(run_open(cfg, MIX, httpx.MockTransport(handler)))
    assert len(s) == 4 and set(s.status.tolist()) == {0}
