"""Open-loop and closed-loop HTTP load generators (asyncio + httpx).

**Open loop** (``mode="open"``): requests leave on a schedule fixed in advance (constant or Poisson
arrivals at ``rate``), each in its own task, whether or not earlier ones were answered: the service sees
the rate users would send. Latency is measured from each request's *intended* send time, so neither a
slow service nor a momentarily stalled generator can hide queueing (no coordinated omission).

**Closed loop** (``mode="closed"``): ``concurrency`` workers, each sending its next request when the
previous answer arrives. This measures capacity, not latency at a rate: the service slows the clients
down. Intended = actual send time there.

Both record ``(intended, sent, done, status, image)`` per request (seconds from the start of the run),
then :func:`loadtest.report.summarize` drops the warm-up and computes the statistics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import httpx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from loadtest.images import MixImage, weights
from loadtest.report import CLIENT_TIMEOUT, TRANSPORT_ERROR, Samples, Summary, summarize
from loadtest.schedule import Arrival, offsets

Row = tuple[float, float, float, int, int]


class LoadConfig(BaseModel):
    """One load-test run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(default="http://127.0.0.1:8000", description="Service base URL (loopback in this project).")
    path: str = Field(default="/v1/detect", description="Route to POST images to.")
    mode: Literal["open", "closed"] = Field(default="open", description="Open loop (a rate) or closed (workers).")
    arrival: Arrival = Field(default="poisson", description="Open-loop arrival process.")
    rate: float = Field(default=1.0, gt=0, description="Open loop: requests per second.")
    concurrency: int = Field(default=4, ge=1, description="Closed loop: workers.")
    duration_s: float = Field(default=30.0, gt=0, description="Measured seconds (after warm-up).")
    warmup_s: float = Field(default=5.0, ge=0, description="Seconds of load before measuring.")
    timeout_s: float = Field(default=60.0, gt=0, description="Client-side timeout per request.")
    max_connections: int = Field(default=512, ge=1, description="HTTP connection pool size (open loop).")
    seed: int = Field(default=0, description="Seed for the schedule and the image picks.")
    api_key: str | None = Field(default=None, description="Sent as X-API-Key when set.")
    params: dict[str, str] = Field(default_factory=dict, description="Query options for every request.")


def _client(config: LoadConfig, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=config.max_connections)
    headers = {"X-API-Key": config.api_key} if config.api_key else {}
    return httpx.AsyncClient(
        base_url=config.url, timeout=config.timeout_s, limits=limits, headers=headers, transport=transport
    )


async def fire_at(
    schedule: np.ndarray, picks: np.ndarray, start: float, one: Callable[[float, int], Awaitable[None]]
) -> None:
    """Open loop: start ``one(intended, pick)`` at each intended time (seconds after ``start``, on
    ``time.perf_counter``), never waiting for earlier replies; return when all have finished."""
    tasks = []
    for intended, pick in zip(schedule.tolist(), picks.tolist(), strict=True):
        delay = start + intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(intended, pick)))
    await asyncio.gather(*tasks)


async def _send(client: httpx.AsyncClient, config: LoadConfig, image: MixImage) -> int:
    """POST one image; the HTTP status, or a pseudo-status for client timeouts and transport errors."""
    try:
        r = await client.post(
            config.path, content=image.data, headers={"content-type": image.media_type}, params=config.params
        )
    except httpx.TimeoutException:
        return CLIENT_TIMEOUT
    except httpx.TransportError:
        return TRANSPORT_ERROR
    return r.status_code


async def run_open(
    config: LoadConfig, mix: list[MixImage], transport: httpx.AsyncBaseTransport | None = None
) -> Samples:
    """Send on the precomputed schedule; each request in its own task (see the module docstring)."""
    schedule = offsets(config.arrival, config.rate, config.warmup_s + config.duration_s, config.seed)
    picks = np.random.default_rng(config.seed + 1).choice(len(mix), size=schedule.size, p=weights(mix))
    rows: list[Row] = []
    async with _client(config, transport) as client:
        start = time.perf_counter()

        async def one(intended: float, pick: int) -> None:
            sent = time.perf_counter() - start
            status = await _send(client, config, mix[pick])
            rows.append((intended, sent, time.perf_counter() - start, status, pick))

        await fire_at(schedule, picks, start, one)
    return Samples.from_rows(rows)


async def run_closed(
    config: LoadConfig, mix: list[MixImage], transport: httpx.AsyncBaseTransport | None = None
) -> Samples:
    """``concurrency`` workers, back to back, until warm-up plus duration has passed."""
    rng = np.random.default_rng(config.seed + 1)
    p = weights(mix)
    rows: list[Row] = []
    async with _client(config, transport) as client:
        start = time.perf_counter()
        stop = config.warmup_s + config.duration_s

        async def worker() -> None:
            while (sent := time.perf_counter() - start) < stop:
                pick = int(rng.choice(len(mix), p=p))
                status = await _send(client, config, mix[pick])
                rows.append((sent, sent, time.perf_counter() - start, status, pick))

        await asyncio.gather(*(worker() for _ in range(config.concurrency)))
    return Samples.from_rows(rows)


def run(
    config: LoadConfig, mix: list[MixImage], transport: httpx.AsyncBaseTransport | None = None
) -> tuple[Samples, Summary]:
    """Run one load test (blocking) and summarise its measurement window."""
    runner = run_open if config.mode == "open" else run_closed
    samples = asyncio.run(runner(config, mix, transport))
    summary = summarize(
        samples,
        mode=config.mode,
        arrival=config.arrival if config.mode == "open" else "closed",
        target_rate=config.rate if config.mode == "open" else None,
        concurrency=config.concurrency if config.mode == "closed" else None,
        start=config.warmup_s,
        duration_s=config.duration_s,
    )
    return samples, summary
