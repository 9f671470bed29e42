"""Soak benchmark: thousands of requests against a running service while its resident memory is sampled.

A leak shows as RSS that keeps growing after warm-up; we report the growth between the first sample after
warm-up and the last one, the peak, and the slope of a straight-line fit over the second half of the run
(MB per 1,000 requests), which is what keeps growing when memory leaks and stays near zero when it does not.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from loadtest.images import MixImage, weights
from loadtest.report import latency_stats


class SoakConfig(BaseModel):
    """One soak run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(default="http://127.0.0.1:8000", description="Service base URL.")
    pid: int = Field(ge=1, description="Server process whose RSS is sampled (/proc/<pid>/status).")
    requests: int = Field(default=5000, ge=1, description="Requests to send after warm-up.")
    warmup_requests: int = Field(default=200, ge=0, description="Requests before the first RSS sample.")
    concurrency: int = Field(default=4, ge=1, description="Closed-loop workers.")
    sample_every: int = Field(default=100, ge=1, description="Sample RSS every this many requests.")
    timeout_s: float = Field(default=60.0, gt=0, description="Client timeout per request.")
    seed: int = Field(default=0, description="Seed for image picks.")
    api_key: str | None = Field(default=None, description="Sent as X-API-Key when set.")


class SoakResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    requests: int
    ok: int
    non_2xx: int
    seconds: float
    rss_start_mb: float = Field(description="After warm-up.")
    rss_end_mb: float
    rss_peak_mb: float
    growth_mb: float
    growth_pct: float
    slope_mb_per_1k_second_half: float
    latency_ms: dict[str, float]
    rss_trace_mb: list[tuple[int, float]] = Field(description="(requests sent, RSS MB) samples.")


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB, from ``/proc/<pid>/status`` (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope_per_1k(trace: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MB) per 1,000 requests over the second half of ``trace``."""
    half = trace[len(trace) // 2 :]
    if len(half) < 2:
        return 0.0
    x = np.asarray([t[0] for t in half], np.float64)
    y = np.asarray([t[1] for t in half], np.float64)
    return float(np.polyfit(x, y, 1)[0] * 1000.0)


async def _soak(config: SoakConfig, mix: list[MixImage]) -> SoakResult:
    rng = np.random.default_rng(config.seed)
    p = weights(mix)
    total = config.warmup_requests + config.requests
    counter = {"next": 0, "ok": 0, "bad": 0}
    latencies: list[float] = []
    trace: list[tuple[int, float]] = []
    headers = {"X-API-Key": config.api_key} if config.api_key else {}
    async with httpx.AsyncClient(base_url=config.url, timeout=config.timeout_s, headers=headers) as client:

        async def worker() -> None:
            while counter["next"] < total:
                i = counter["next"]
                counter["next"] += 1
                if i >= config.warmup_requests and (i - config.warmup_requests) % config.sample_every == 0:
                    trace.append((i - config.warmup_requests, rss_mb(config.pid)))
                image = mix[int(rng.choice(len(mix), p=p))]
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/detect", content=image.data, headers={"content-type": image.media_type})
                    good = 200 <= r.status_code < 300
                except httpx.HTTPError:
                    good = False
                if i >= config.warmup_requests:
                    latencies.append(time.perf_counter() - t0)
                    counter["ok" if good else "bad"] += 1

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
        seconds = time.perf_counter() - t_start
    trace.append((config.requests, rss_mb(config.pid)))
    start_mb, end_mb = trace[0][1], trace[-1][1]
    return SoakResult(
        requests=config.requests,
        ok=counter["ok"],
        non_2xx=counter["bad"],
        seconds=seconds,
        rss_start_mb=start_mb,
        rss_end_mb=end_mb,
        rss_peak_mb=max(t[1] for t in trace),
        growth_mb=end_mb - start_mb,
        growth_pct=100.0 * (end_mb - start_mb) / start_mb,
        slope_mb_per_1k_second_half=slope_per_1k(trace),
        latency_ms=latency_stats(np.asarray(latencies)),
        rss_trace_mb=trace,
    )


def run_soak(config: SoakConfig, mix: list[MixImage]) -> SoakResult:
    """Run the soak (blocking)."""
    return asyncio.run(_soak(config, mix))
