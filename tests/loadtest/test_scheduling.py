"""The scheduling measurement's summary: latency of admitted requests and retry hints against the wait needed."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np

from loadtest.images import parse_mix
from loadtest.scheduling import OpenLoop, best_rescale, capacity, open_loop, probe_summary, summarize, write_rows


def test_summary_compares_both_retry_hints_with_the_next_admission() -> None:
    mix = parse_mix("64x48:1,128x96:1")
    rows = [
        # intended, done, status, pick, Retry-After header, body retry_after_s, a 200's timings
        (0.5, 0.6, 200, 0, None, None, {"total": 0.05}),  # warm-up: ignored
        (1.0, 1.2, 200, 0, None, None, {"total": 0.15, "queue_wait": 0.1}),
        (2.0, 2.0, 503, 0, 2.0, 0.25, None),  # the next admitted pick-0 request was sent 0.5 s later
        (2.1, 2.1, 503, 0, 0.1, 0.02, None),  # so the needed wait of 2.0's is over 0.1 s; this one's over 0.0 s
        (2.2, 2.5, 200, 1, None, None, None),  # no timings (another server): left out of the split
        (2.5, 2.8, 200, 0, None, None, {"total": 0.2, "queue_wait": 0.0}),
        (3.0, 3.0, 503, 1, 2.0, None, None),  # no later admission of pick 1: no ratio
    ]
    s = summarize(rows, mix, warmup=1.0)
    assert (s["requests"], s["admitted"], s["refused_503"]) == (6, 3, 3)
    header, precise = s["retry_after_over_needed"], s["retry_after_s_over_needed"]
    assert header["n"] == 2 and header["p50"] == 0.25 and header["p90"] == 4.0  # 2.0 / 0.5 and 0.1 / 0.4
    assert precise["share_within_2x"] == 0.5  # 0.25 / 0.5 is within 2x; 0.02 / 0.4 is not
    # ... but 0.02 s is within 2x of a wait its bounds (0, 0.4] allow; 0.25 s of one in (0.1, 0.5]
    assert precise["share_within_2x_of_bounds"] == 1.0
    assert header["share_within_2x_of_bounds"] == 0.5  # 2.0 s is over 2x of anything in (0.1, 0.5]; 0.1 s fits
    assert set(s["retry_after_s_over_needed_by_image"]) == {mix[0].name}
    # one factor puts both precise hints within 2x (0.5 and 0.05 of needed: 10x apart, over a 4x band): not both
    assert precise["share_within_2x_best_rescale"] == 0.5
    assert s["by_image"][mix[0].name]["p50"] == 200.0  # ms, nearest rank of 200 and 300 ms
    split = s["split_ms"]  # the two timed admissions: 200 ms = 150 + 50 outside, 300 ms = 200 + 100 outside
    assert (split["handler_total"]["max"], split["queue_wait"]["max"]) == (200.0, 100.0)
    assert split["outside_handler"]["p50"] == 50.0 and split["outside_handler"]["max"] == 100.0


def test_best_rescale_tells_bias_from_spread() -> None:
    """Hints all 3x too long: a factor of 1/3 fixes every one. Needed waits spread 16x around the hint: no factor
    puts more than the ones inside a 4x band within 2x."""
    c, share = best_rescale(np.full(50, 3.0))
    assert share == 1.0 and abs(c - 1 / 3) < 1e-9
    c, share = best_rescale(np.array([0.25, 0.5, 1.0, 2.0, 4.0]))
    assert share == 0.6 and 0.5 <= c <= 2.0  # three of five ratios span 4x; a fourth would need a 8x band
    assert best_rescale(np.array([])) == (1.0, 0.0)


def test_raw_rows_are_written_one_json_object_per_request_in_send_order(tmp_path: Path) -> None:
    rows = [
        (2.0, 2.0, 503, 1, 1.0, 0.25, None),
        (1.0, 1.2, 200, 0, None, None, {"total": 0.15}),
    ]
    path = tmp_path / "rows" / "rows_3.jsonl"
    write_rows(path, rows)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["sent"] for x in lines] == [1.0, 2.0]
    assert lines[0]["timings"] == {"total": 0.15} and lines[1]["retry_after_s"] == 0.25 and lines[1]["image"] == 1


def test_retry_probes_follow_the_hint_and_score_it_per_factor() -> None:
    """A service that refuses everything until an opening time and hints exactly the wait until it: retries after
    the hint (or twice it) all get in, retries after half of it are refused again."""
    opening: list[float] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        now = time.perf_counter()
        if not opening:
            opening.append(now + 0.3)
        if now < opening[0]:
            body = {"error": {"retry_after_s": opening[0] - now}}
            return httpx.Response(503, json=body, headers={"retry-after": "1"})
        return httpx.Response(200, json={"timings": {"total": 1.0}})

    run = OpenLoop("http://svc", parse_mix("64x48:1"), rate=40.0, seconds=0.25, seed=7, probe=True)
    rows, probes = asyncio.run(open_loop(run, httpx.MockTransport(handler)))
    refused = [r for r in rows if r[2] == 503]
    assert refused and len(probes) == len(refused)
    summary = probe_summary(probes, warmup=0.0)
    assert summary["1x"]["admitted_share"] == 1.0 and summary["2x"]["admitted_share"] == 1.0
    assert summary["0.5x"]["admitted_share"] == 0.0
    assert sum(v["n"] for v in summary.values()) == len(probes)


def test_capacity_counts_admitted_images_per_second_of_the_closed_loop() -> None:
    """Workers send back to back for the run's length; only 200s count (a refusal is no capacity)."""
    statuses: list[int] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.01)
        statuses.append(503 if len(statuses) % 3 == 2 else 200)
        return httpx.Response(statuses[-1], json={"timings": {"total": 10.0}})

    t0 = time.perf_counter()
    rate = asyncio.run(capacity("http://svc", parse_mix("64x48:1"), 0.3, 2, {}, httpx.MockTransport(handler)))
    elapsed = time.perf_counter() - t0
    ok = statuses.count(200)
    assert ok > 10 and statuses.count(503) > 0  # both workers ran for the whole 0.3 s
    assert ok / elapsed <= rate <= ok / 0.3  # the 200s over the loop's own wall clock
