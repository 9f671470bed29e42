"""Tail latency and admission under open-loop load: ``python -m loadtest.scheduling``.

Against a running service: a closed-loop run measures capacity (images/s) for the image mix; then open-loop
Poisson runs at fractions of it (default 0.3, 0.5, 0.7, 0.9) and one overload run (default 3x). Per run it reports
latency percentiles of admitted requests (overall and per image of the mix), the share refused, and for refusals
(503) how ``Retry-After`` compares with the wait that was actually needed: the time from the refusal until the
next request of the same image was admitted (an upper bound on the needed wait: arrivals sample it), and whether
the hint is within 2x of a wait between that and the last refusal of the same image before it (``--probe-retries``:
each refused client also retries once after 0.5, 1 or 2 times its hint, and the share admitted is reported per
factor -- the hint tested by clients that follow it). For admitted
requests it also splits the latency by the response's own ``timings``: the handler's ``total`` (from the body read
to the reply) and ``queue_wait``, and what lies outside the handler (connection, upload, HTTP parsing, response).

Latency is from each request's intended send time (no coordinated omission), as in ``loadtest.generator``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest.generator import fire_at
from loadtest.images import MixImage, parse_mix, weights
from loadtest.report import percentile
from loadtest.schedule import offsets

Row = tuple[float, float, int, int, float | None, float | None, dict[str, float] | None]
# intended, done, status, pick, Retry-After header (s), the body's precise retry_after_s, a 200's timings (s)


async def _send(
    client: httpx.AsyncClient, image: MixImage, params: dict[str, str]
) -> tuple[int, float | None, float | None, dict[str, float] | None]:
    """(status, Retry-After, the body's retry_after_s, a 200's timings in seconds); status 0: timed out,
    -1: transport error."""
    try:
        r = await client.post(
            "/v1/detect", content=image.data, headers={"content-type": image.media_type}, params=params
        )
    except httpx.TimeoutException:
        return 0, None, None, None
    except httpx.TransportError:
        return -1, None, None, None
    retry = r.headers.get("retry-after")
    precise = timings = None
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        if r.status_code == 503:
            precise = float(r.json()["error"]["retry_after_s"])
        elif r.status_code == 200:
            timings = {k: float(v) / 1000 for k, v in r.json()["timings"].items()}
    return r.status_code, float(retry) if retry is not None else None, precise, timings


PROBE_FACTORS = (0.5, 1.0, 2.0)  # a refused client's retry waits its retry_after_s times one of these
Probe = tuple[float, int, float, float, int]
# a refusal's retry: intended send of the refused request, pick, its retry_after_s, the factor the retry waited
# (x retry_after_s), the retry's status


@dataclass(frozen=True)
class OpenLoop:
    """One open-loop run: Poisson arrivals at ``rate`` for ``seconds`` (``seed``), images drawn from ``mix``, query
    ``params`` on every request. ``probe``: every refused request whose body has ``retry_after_s`` is sent once more
    after that hint times a factor drawn from :data:`PROBE_FACTORS` -- clients that honour the hint, early or late:
    how often each gets in says whether the hint is the wait needed."""

    url: str
    mix: list[MixImage]
    rate: float
    seconds: float
    seed: int
    params: dict[str, str] = field(default_factory=dict)
    probe: bool = False


async def open_loop(run: OpenLoop, transport: httpx.AsyncBaseTransport | None = None) -> tuple[list[Row], list[Probe]]:
    """The rows of ``run``'s requests, and its retry probes (empty without ``run.probe``)."""
    schedule = offsets("poisson", run.rate, run.seconds, run.seed)
    rng = np.random.default_rng(run.seed + 1)
    picks = rng.choice(len(run.mix), size=schedule.size, p=weights(run.mix))
    rows: list[Row] = []
    probes: list[Probe] = []
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=run.url, timeout=120.0, limits=limits, transport=transport) as client:
        start = time.perf_counter()

        async def one(intended: float, pick: int) -> None:
            status, retry, precise, timings = await _send(client, run.mix[pick], run.params)
            rows.append((intended, time.perf_counter() - start, status, pick, retry, precise, timings))
            if run.probe and status == 503 and precise is not None:
                factor = float(rng.choice(PROBE_FACTORS))
                await asyncio.sleep(factor * precise)
                again = (await _send(client, run.mix[pick], run.params))[0]
                probes.append((intended, pick, precise, factor, again))

        await fire_at(schedule, picks, start, one)
    return rows, probes


def probe_summary(probes: list[Probe], warmup: float) -> dict[str, dict[str, float]]:
    """Per factor: retries sent after ``factor x retry_after_s`` and the share admitted. A hint within 2x of the
    needed wait has most retries at 2x admitted; an exact one about as many at 1x, and fewer at 0.5x."""
    out = {}
    for f in PROBE_FACTORS:
        got = [p[4] == 200 for p in probes if p[3] == f and p[0] >= warmup]
        if got:
            out[f"{f:g}x"] = {"n": len(got), "admitted_share": round(float(np.mean(got)), 3)}
    return out


async def capacity(
    url: str,
    mix: list[MixImage],
    seconds: float,
    workers: int,
    params: dict[str, str],
    transport: httpx.AsyncBaseTransport | None = None,
) -> float:
    """Images/s admitted (200) with ``workers`` clients back to back (closed loop), the mix drawn by its weights."""
    rng = np.random.default_rng(7)
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=120.0, transport=transport) as client:
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                status, *_ = await _send(client, mix[int(rng.choice(len(mix), p=weights(mix)))], params)
                done += status == 200

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return done / (time.perf_counter() - t0)


def _stats(lat: np.ndarray) -> dict[str, float | None]:
    if lat.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    return {k: round(percentile(lat, q) * 1000, 1) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))} | {
        "max": round(float(lat.max()) * 1000, 1)
    }


def _retry_waits(rows: list[Row], col: int, warmup: float) -> np.ndarray:
    """``float64 [n, 4]``, per refusal after the warm-up with a hint in column ``col``: (its image's index in the mix,
    the hint, a lower and an upper bound of the wait actually needed). The upper bound is the time until the next
    admitted request of the same image was sent; the lower bound the time until the last one refused before it (0
    when none): arrivals sample the needed wait, so it lies between the two."""
    waits = []
    for i, r in enumerate(rows):
        hint = r[col]
        if r[2] != 503 or hint is None or r[0] < warmup:
            continue
        lower = 0.0
        for q in rows[i + 1 :]:
            if q[3] != r[3]:
                continue
            if q[2] == 200:
                waits.append((r[3], hint, lower, q[0] - r[0]))
                break
            lower = q[0] - r[0]
    return np.asarray(waits, np.float64).reshape(-1, 4)


def best_rescale(ratios: np.ndarray) -> tuple[float, float]:
    """(c, share): the constant ``c`` for which hints ``c x hint`` would be within 2x of the needed wait for the
    largest share of refusals, and that share (``ratios``: hint over needed). It tells bias from spread: when the
    best share is hardly above the hints' own, no calibration of the hint by a factor can close the gap -- the
    needed wait varies more than 4x (a 2x band each way) around any multiple of the hint."""
    logs = np.sort(np.log(np.maximum(ratios, 1e-9)))
    if logs.size == 0:
        return 1.0, 0.0
    ends = np.searchsorted(logs, logs + np.log(4.0), side="right")  # hints c x r within [r / 2, 2r] of needed
    i = int(np.argmax(ends - np.arange(logs.size)))
    centre = (logs[i] + logs[ends[i] - 1]) / 2  # the middle of the covered ratios, in log
    return float(np.exp(-centre)), float((ends[i] - i) / logs.size)


def _retry_summary(waits: np.ndarray) -> dict[str, float]:
    """The hint over the needed wait's upper bound (percentiles, share within 2x), the share of hints within 2x of
    some wait the bounds allow (the sampling of arrivals cannot tell those apart from exact ones), and the best
    share any constant multiple of the hint would reach (:func:`best_rescale`)."""
    _, hint, lower, upper = waits.T
    ratios = hint / np.maximum(upper, 1e-3)
    c, share = best_rescale(ratios)
    return {
        "n": int(ratios.size),
        "p10": round(percentile(ratios, 10), 2),
        "p50": round(percentile(ratios, 50), 2),
        "p90": round(percentile(ratios, 90), 2),
        "share_within_2x": round(float(((ratios >= 0.5) & (ratios <= 2.0)).mean()), 3),
        "share_within_2x_of_bounds": round(float(((upper >= hint / 2) & (lower < 2 * hint)).mean()), 3),
        "best_rescale": round(c, 3),
        "share_within_2x_best_rescale": round(share, 3),
    }


def _split(rows: list[Row]) -> dict[str, dict[str, float | None]]:
    """Admitted requests' latency split by their timings: the handler's total, its queue wait, and the rest (outside
    the handler); percentiles of each part on its own."""
    timed = [(r[1] - r[0], r[6]) for r in rows if r[2] == 200 and r[6] is not None and "total" in r[6]]
    parts = {
        "handler_total": [t["total"] for _, t in timed],
        "queue_wait": [t.get("queue_wait", 0.0) for _, t in timed],
        "infer": [t.get("infer", 0.0) for _, t in timed],
        "decode_crop_merge": [t.get("decode", 0.0) + t.get("crop", 0.0) + t.get("merge", 0.0) for _, t in timed],
        "outside_handler": [latency - t["total"] for latency, t in timed],
    }
    return {k: _stats(np.asarray(v, np.float64)) for k, v in parts.items()}


def summarize(rows: list[Row], mix: list[MixImage], warmup: float) -> dict[str, Any]:
    """Per run: admitted latency (ms) overall and per image, refusals, Retry-After vs the needed wait."""
    rows = sorted(rows)
    kept = [r for r in rows if r[0] >= warmup]
    ok = np.array([r[1] - r[0] for r in kept if r[2] == 200])
    out: dict[str, Any] = {
        "requests": len(kept),
        "admitted": int(ok.size),
        "refused_503": sum(r[2] == 503 for r in kept),
        "other": sum(r[2] not in (200, 503) for r in kept),
        "latency_ms": _stats(ok),
        "by_image": {
            m.name: _stats(np.array([r[1] - r[0] for r in kept if r[2] == 200 and r[3] == k]))
            for k, m in enumerate(mix)
        },
        "split_ms": _split(kept),
        "split_ms_by_image": {m.name: _split([r for r in kept if r[3] == k]) for k, m in enumerate(mix)},
    }
    for key, col in (("retry_after_over_needed", 4), ("retry_after_s_over_needed", 5)):
        if (waits := _retry_waits(rows, col, warmup)).size:
            out[key] = _retry_summary(waits)
            out[key + "_by_image"] = {
                m.name: _retry_summary(waits[waits[:, 0] == k]) for k, m in enumerate(mix) if (waits[:, 0] == k).any()
            }
    return out


def write_rows(path: Path, rows: list[Row]) -> None:
    """One JSON object per request: intended send and completion (s from the run's start), HTTP status, the mix
    image's index, Retry-After (header, s), ``retry_after_s`` (body) and a 200's timings (s)."""
    keys = ("sent", "done", "status", "image", "retry_after", "retry_after_s", "timings")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(dict(zip(keys, r, strict=True))) + "\n" for r in sorted(rows)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--mix", default="640x480:4,1920x1080:1", help="image sizes and weights")
    p.add_argument("--loads", default="0.3,0.5,0.7,0.9,3.0", help="fractions of the measured capacity")
    p.add_argument("--seconds", type=float, default=25.0, help="per run, warm-up included")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--capacity-seconds", type=float, default=20.0)
    p.add_argument("--capacity", type=float, default=None, help="skip the closed-loop run: images/s")
    p.add_argument("--workers", type=int, default=4, help="closed-loop clients for the capacity run")
    p.add_argument("--param", action="append", default=[], metavar="K=V", help="query option for every request")
    p.add_argument("--label", default="", help="name of this configuration in the report")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--rows", type=Path, default=None, help="also write each load's raw rows here (rows_LOAD.jsonl)")
    p.add_argument(
        "--probe-retries",
        action="store_true",
        help="resend each refused request once after its retry_after_s x 0.5, 1 or 2 (at random): share admitted",
    )
    args = p.parse_args(argv)
    params = dict(kv.split("=", 1) for kv in args.param)
    mix = parse_mix(args.mix)
    cap = args.capacity or asyncio.run(capacity(args.url, mix, args.capacity_seconds, args.workers, params))
    print(f"capacity {cap:.2f} images/s", flush=True)
    runs = []
    for k, f in enumerate(float(x) for x in args.loads.split(",")):
        run = OpenLoop(args.url, mix, f * cap, args.seconds, 100 + k, params, args.probe_retries)
        rows, probes = asyncio.run(open_loop(run))
        s = {"load": f, "rate": round(f * cap, 3)} | summarize(rows, mix, args.warmup)
        if args.probe_retries:
            s["retry_probe"] = probe_summary(probes, args.warmup)
        if args.rows is not None:
            write_rows(args.rows / f"rows_{f:g}.jsonl", rows)
        print(json.dumps(s), flush=True)
        runs.append(s)
    report = {"label": args.label, "mix": args.mix, "capacity_images_per_s": round(cap, 3), "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
