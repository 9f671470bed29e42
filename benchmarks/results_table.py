"""Markdown tables for the README (load section) from the JSON that load_suite.sh and sahi_compare.py wrote.

    .venv/bin/python benchmarks/results_table.py runs/load runs/bench/sahi_compare.json

Numbers are copied from the measurement files, never typed by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _runs(path: Path) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = json.loads(path.read_text())["runs"]
    return runs


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def load_table(out: Path) -> str:
    header = ("Load", "offered img/s", "achieved img/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "p99.9 ms",
              "max ms", "503", "504", "errors", "gen. lag p99 ms")  # fmt: skip
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    named = [("closed loop, 4 workers", out / "closed.json")]
    named += [(f"open loop, Poisson, {f}x capacity", out / f"open_{f}.json") for f in ("0.5", "0.8", "1.0", "1.3")]
    named += [("overload: 2x capacity, queue 600 chips, deadline 10 s", out / "overload.json")]
    for path in sorted(out.glob("long_*.json")):  # optional longer runs: python -m loadtest run ... --json long_R.json
        named.append((f"open loop, Poisson, {path.stem.removeprefix('long_')}/s target, longer window", path))
    for name, path in named:
        if not path.exists():
            continue
        r = _runs(path)[0]
        lat = r["latency_all_ms"]
        name = f"{name} (n={r['requests']})"
        rows.append(
            f"| {name} | {r['offered_rps']:.2f} | {r['achieved_rps']:.2f} | {_ms(lat['p50'])} | {_ms(lat['p90'])} | "
            f"{_ms(lat['p95'])} | {_ms(lat['p99'])} | {_ms(lat['p99.9'])} | {_ms(lat['max'])} | "
            f"{r['reject_rate']:.1%} | {r['timeout_rate']:.1%} | {r['error_rate']:.1%} | {_ms(r['lag_ms']['p99'])} |"
        )
    return "\n".join(rows)


def sweep_line(out: Path) -> str:
    path = out / "sweep.json"
    if not path.exists():
        return ""
    doc = json.loads(path.read_text())
    slo = doc["sweep"]["slo_p99_ms"]
    best = doc["best_rate"]
    steps = ", ".join(f"{r['target_rate']:.2f}" for r in doc["runs"])
    return (
        f"Highest open-loop rate with p99 ≤ {slo:,.0f} ms, ≤ 1 % 503/504/errors and keeping up: "
        f"**{best:.2f} images/s** (rates tried: {steps})."
    )


def soak_line(out: Path) -> str:
    path = out / "soak.json"
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    return (
        f"Soak: {d['requests']:,} requests ({d['ok']:,} 2xx, {d['non_2xx']} other) in {d['seconds']:.0f} s; "
        f"RSS {d['rss_start_mb']:.0f} MB after warm-up → {d['rss_end_mb']:.0f} MB at the end "
        f"(growth {d['growth_mb']:+.1f} MB, {d['growth_pct']:+.1f} %; peak {d['rss_peak_mb']:.0f} MB; "
        f"slope over the second half {d['slope_mb_per_1k_second_half']:+.2f} MB per 1,000 requests)."
    )


def sahi_table(path: Path) -> str:
    d = json.loads(path.read_text())
    sahi = d["methods"]["sahi"]
    rows = ["| Method | chips/image | images/s | × SAHI | AP | AP50 | AP_small | share of engine-only limit |",
            "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    chips_per_s = d["engine_only"]["chips_per_s"]
    for name, m in d["methods"].items():
        chips = m["chips_per_image_mean"]
        share = f"{m['images_per_s'] * chips / chips_per_s:.0%}" if chips else "–"
        rows.append(
            f"| {name} | {chips:.1f} | {m['images_per_s']:.2f} | {m['images_per_s'] / sahi['images_per_s']:.2f} | "
            f"{m['AP']:.3f} | {m['AP50']:.3f} | {m['AP_small']:.3f} | {share} |"
            if chips
            else f"| {name} | – | {m['images_per_s']:.2f} | {m['images_per_s'] / sahi['images_per_s']:.2f} | "
            f"{m['AP']:.3f} | {m['AP50']:.3f} | {m['AP_small']:.3f} | – |"
        )
    head = (
        f"{d['images']} validation images, score threshold {d['score_threshold']}, slice overlap {d['overlap']}, "
        f"batch {d['batch']}, ONNX Runtime intra-op threads {d['threads']}; engine alone: {chips_per_s:.0f} chips/s."
    )
    return head + "\n\n" + "\n".join(rows)


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path("runs/load")
    print(load_table(out), end="\n\n")
    for line in (sweep_line(out), soak_line(out)):
        if line:
            print(line, end="\n\n")
    if len(argv) > 2 and Path(argv[2]).exists():
        print(sahi_table(Path(argv[2])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
