"""``python -m loadtest run|sweep|soak|plot``: load tests against a running snipserve.

See the README, "Load, overload, bad input and security".

Examples::

    python -m loadtest run --url http://127.0.0.1:8000 --rate 2 --arrival poisson --duration 60 --warmup 10 \\
        --mix 1920x1080:3,4000x3000:1 --json runs/load/run.json --csv runs/load/run.csv
    python -m loadtest run --mode closed --concurrency 8 --duration 60
    python -m loadtest sweep --slo-ms 2000 --start 0.5 --factor 1.5 \\
        --json runs/load/sweep.json --plot runs/load/sweep.png
    python -m loadtest cluster-sim burst --latency-json docs/measurements/cluster_sim_cpu_latency.json \\
        --json docs/measurements/cluster_sim_burst.json
    python -m loadtest soak --pid $(pgrep -f 'snipserve serve' | head -1) --requests 5000 --json runs/load/soak.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtest.generator import LoadConfig, run
from loadtest.images import MixImage, directory_mix, parse_mix
from loadtest.report import (
    Summary,
    format_summary,
    plot_latency_vs_throughput,
    write_csv,
    write_json,
    write_samples_csv,
)
from loadtest.soak import SoakConfig, run_soak
from loadtest.sweep import SweepConfig, find_max_rate


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="service base URL")
    p.add_argument("--mix", default="1920x1080", help="synthetic image sizes and weights, e.g. 1920x1080:3,4000x3000:1")
    p.add_argument("--images", type=Path, help="use the images in this directory instead of --mix")
    p.add_argument("--max-images", type=int, help="at most this many files from --images")
    p.add_argument("--api-key", help="sent as X-API-Key")
    p.add_argument("--param", action="append", default=[], metavar="K=V", help="query option for every request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    p.add_argument("--json", type=Path, help="write the summary as JSON")


def _load(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["open", "closed"], default="open")
    p.add_argument("--arrival", choices=["constant", "poisson"], default="poisson")
    p.add_argument("--rate", type=float, default=1.0, help="open loop: requests/s")
    p.add_argument("--concurrency", type=int, default=4, help="closed loop: workers")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring")
    p.add_argument("--csv", type=Path, help="write the summary as CSV")
    p.add_argument("--plot", type=Path, help="latency-vs-throughput PNG")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one open- or closed-loop run")
    _common(r)
    _load(r)
    r.add_argument("--samples-csv", type=Path, help="write every request's timings as CSV")
    s = sub.add_parser("sweep", help="highest open-loop rate with p99 under the SLO")
    _common(s)
    _load(s)
    s.add_argument("--slo-ms", type=float, default=2000.0, help="p99 latency SLO (ms)")
    s.add_argument("--max-bad-rate", type=float, default=0.01, help="allowed share of 503/504/errors")
    s.add_argument("--min-goodput", type=float, default=0.9, help="achieved/offered throughput at least this")
    s.add_argument("--start", type=float, default=0.5, help="first rate")
    s.add_argument("--factor", type=float, default=1.5, help="rate growth per step")
    s.add_argument("--max-rate", type=float, default=1000.0)
    s.add_argument("--refine", type=int, default=2, help="bisection steps after the first failure")
    k = sub.add_parser("soak", help="N requests while sampling the server's RSS")
    _common(k)
    k.add_argument("--pid", type=int, required=True, help="server process id (RSS from /proc)")
    k.add_argument("--requests", type=int, default=5000)
    k.add_argument("--warmup-requests", type=int, default=200)
    k.add_argument("--concurrency", type=int, default=4)
    k.add_argument("--sample-every", type=int, default=100)
    c = sub.add_parser("cluster-sim", help="simulated replicas + autoscaler (loadtest/cluster_sim.py)")
    from loadtest.cluster_runs import add_arguments as add_cluster_arguments

    add_cluster_arguments(c)
    pl = sub.add_parser("plot", help="latency-vs-throughput PNG from a run/sweep JSON")
    pl.add_argument("json_in", type=Path)
    pl.add_argument("png_out", type=Path)
    pl.add_argument("--slo-ms", type=float)
    return parser


def _mix(args: argparse.Namespace) -> list[MixImage]:
    if args.images is not None:
        return directory_mix(args.images, args.max_images)
    return parse_mix(args.mix, args.seed)


def _config(args: argparse.Namespace, **overrides: object) -> LoadConfig:
    params = dict(p.split("=", 1) for p in args.param)
    fields = dict(
        url=args.url, mode=args.mode, arrival=args.arrival, rate=args.rate, concurrency=args.concurrency,
        duration_s=args.duration, warmup_s=args.warmup, timeout_s=args.timeout, seed=args.seed,
        api_key=args.api_key, params=params,
    )  # fmt: skip
    return LoadConfig.model_validate(fields | overrides)


def _outputs(args: argparse.Namespace, runs: list[Summary], slo_ms: float | None = None, **extra: object) -> None:
    if args.json:
        write_json(runs, args.json, **extra)
    if getattr(args, "csv", None):
        write_csv(runs, args.csv)
    if getattr(args, "plot", None):
        plot_latency_vs_throughput(runs, args.plot, slo_ms)


def cmd_run(args: argparse.Namespace) -> int:
    samples, summary = run(_config(args), _mix(args))
    print(format_summary(summary))
    _outputs(args, [summary])
    if args.samples_csv:
        write_samples_csv(samples, args.samples_csv)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    mix = _mix(args)
    config = SweepConfig(
        slo_p99_ms=args.slo_ms, max_bad_rate=args.max_bad_rate, min_goodput=args.min_goodput, start=args.start,
        factor=args.factor,
        max_rate=args.max_rate, refine=args.refine,
    )  # fmt: skip

    def measure(rate: float) -> Summary:
        # A fresh arrival realisation per step: with one seed, every rate would replay the same (scaled) gaps.
        _, s = run(_config(args, mode="open", rate=rate, seed=args.seed + round(rate * 1000)), mix)
        print(format_summary(s), flush=True)
        return s

    best, runs = find_max_rate(measure, config)
    print(f"highest rate with p99 <= {config.slo_p99_ms:g} ms and <= {config.max_bad_rate:.1%} bad: {best}")
    _outputs(args, runs, config.slo_p99_ms, best_rate=best, sweep=config.model_dump())
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    config = SoakConfig(
        url=args.url, pid=args.pid, requests=args.requests, warmup_requests=args.warmup_requests,
        concurrency=args.concurrency, sample_every=args.sample_every, timeout_s=args.timeout, seed=args.seed,
        api_key=args.api_key,
    )  # fmt: skip
    result = run_soak(config, _mix(args))
    doc = result.model_dump(exclude={"rss_trace_mb"})
    print(json.dumps(doc, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(result.model_dump_json(indent=2) + "\n")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    runs = [Summary.model_validate(r) for r in json.loads(args.json_in.read_text())["runs"]]
    plot_latency_vs_throughput(runs, args.png_out, args.slo_ms)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "cluster-sim":
        from loadtest.cluster_runs import run_cli

        return run_cli(args)
    commands = {"run": cmd_run, "sweep": cmd_sweep, "soak": cmd_soak, "plot": cmd_plot}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
