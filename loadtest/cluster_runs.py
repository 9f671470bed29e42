"""Experiments on :mod:`loadtest.cluster_sim`: ``python -m loadtest cluster-sim measure|sweep|burst|plot``.

- ``measure``: engine seconds per call of the shipped model on this CPU (ONNX Runtime), per batch size (JSON).
- ``sweep``: fixed N replicas, no autoscaler: capacity (throughput under 1.5x overload) and p99 at 70 % load,
  per balancing policy, N = 1, 2, 4, 8.
- ``burst``: one replica's worth of load at 50 %, then 10x for 60 s, then back; autoscaled on queued chips,
  per target. Steady-state p99, scale-up lag, p99 once scale-up completes, what the lag cost (503s).
- ``plot`` / ``table``: the README figure and tables from the JSON of ``sweep`` and ``burst``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.cluster_sim import (
    ASSUMED_GPU_LATENCY,
    Autoscaler,
    Cluster,
    Latency,
    Outcome,
    Policy,
    ReplicaConfig,
    ScalerConfig,
    poisson_trace,
    replay,
)

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
BASE_LOAD = 0.5  # burst scenario: offered load before and after, in replicas' engine-bound capacity
BURST_FACTOR = 10.0


def measure_cpu_latency(model: Path, repeats: int = 7) -> dict[str, Any]:
    """Median seconds per engine call for each batch size (the service's own engine, default settings)."""
    from service.crop import chip_buffer
    from service.engines import EngineConfig, create_engine

    engine = create_engine(model, EngineConfig(max_batch=max(BATCH_SIZES), fuse_preprocess=True))
    table: dict[str, float] = {}
    for b in BATCH_SIZES:
        batch = chip_buffer(engine.input_layout, b, engine.card.input_size)
        batch[...] = 0
        engine.infer(batch)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            engine.infer(batch)
            times.append(time.perf_counter() - t)
        table[str(b)] = float(np.median(times))
    return {
        "source": f"measured: {model.name}, ONNX Runtime {engine.providers}, {engine.card.input_size} px chips, "
        f"median of {repeats} calls, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start",
        "seconds_per_call": table,
    }


def load_latency(path: Path | None, which: str) -> Latency:
    if which == "gpu-assumed":
        return Latency(ASSUMED_GPU_LATENCY, "assumed GPU figure (not measured): see ASSUMED_GPU_LATENCY")
    assert path is not None, "--latency-json is needed for the measured CPU table"
    body = json.loads(path.read_text())
    return Latency({int(k): float(v) for k, v in body["seconds_per_call"].items()}, body["source"])


def stats(outcomes: list[Outcome], start: float, end: float, slo_s: float) -> dict[str, Any]:
    """Outcomes of requests that *arrived* in ``[start, end)`` (simulated s)."""
    window = [o for o in outcomes if start <= o.arrival < end]
    ok = np.array([o.latency for o in window if o.status == 200])
    statuses: dict[str, int] = {}
    for o in window:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    span = max(end - start, 1e-9)
    return {
        "requests": len(window),
        "statuses": statuses,
        "rejected_without_retry_after": sum(1 for o in window if o.status == 503 and o.retry_after is None),
        "p50_s": float(np.percentile(ok, 50)) if ok.size else None,
        "p99_s": float(np.percentile(ok, 99)) if ok.size else None,
        "throughput_rps": float(ok.size / span),
        "goodput_rps": float(np.sum(ok <= slo_s) / span),
    }


def windows(outcomes: list[Outcome], width: float, slo_s: float) -> list[dict[str, Any]]:
    """Per ``width`` seconds of arrivals: p99 of the 200s, count of 503s, goodput."""
    end = max((o.arrival for o in outcomes), default=0.0)
    out = []
    for k in range(int(end // width) + 1):
        s = stats(outcomes, k * width, (k + 1) * width, slo_s)
        out.append(
            {
                "t": k * width,
                "p99_s": s["p99_s"],
                "rejected": s["statuses"].get("503", 0),
                "goodput_rps": s["goodput_rps"],
            }
        )
    return out


def completed_rate(outcomes: list[Outcome], start: float, end: float) -> float:
    """200 responses per second that *completed* in ``[start, end)``: capacity under overload."""
    done = [o for o in outcomes if o.status == 200 and start <= o.arrival + o.latency < end]
    return len(done) / (end - start)


async def fixed_run(
    latency: Latency, cfg: ReplicaConfig, policy: Policy, n: int, rate: float, duration: float, chips: int, speed: float
) -> Cluster:
    cluster = Cluster(latency, cfg, policy, speed)
    for _ in range(n):
        await cluster.add(0.0)
    cluster.t0 = time.monotonic()
    try:
        await replay(cluster, poisson_trace([(duration, rate)], seed=n), chips)
    finally:
        await cluster.close()
    return cluster


def sweep(
    latency: Latency,
    cfg: ReplicaConfig,
    chips: int,
    speed: float,
    slo_s: float,
    policies: tuple[Policy, ...] = ("round_robin", "least_queue"),
    durations: tuple[float, float] = (30.0, 40.0),
    counts: tuple[int, ...] = (1, 2, 4, 8),
) -> dict[str, Any]:
    """Capacity and p99 against N, per policy (see the module docstring). ``durations``: simulated seconds of
    the overload run (measured over its last two thirds) and of the 70 % run (measured after its first quarter)."""
    per_replica = latency.chips_per_s(cfg.max_batch) / chips  # requests/s one replica's engine could do
    over_s, load_s = durations
    rows = []
    for policy in policies:
        for n in counts:
            over = asyncio.run(fixed_run(latency, cfg, policy, n, 1.5 * n * per_replica, over_s, chips, speed))
            load = asyncio.run(fixed_run(latency, cfg, policy, n, 0.7 * n * per_replica, load_s, chips, speed))
            row = {
                "policy": policy,
                "replicas": n,
                "capacity_rps": completed_rate(over.outcomes, over_s / 3, over_s),
                # what the simulator managed to send (1.5 x n x engine bound asked): below it, it fell behind
                "offered_rps": sum(1 for o in over.outcomes if over_s / 3 <= o.arrival < over_s) / (over_s * 2 / 3),
                "asked_rps": 1.5 * n * per_replica,
                "at_70pct": stats(load.outcomes, load_s / 4, load_s, slo_s),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    for policy in policies:
        one = next(r["capacity_rps"] for r in rows if r["policy"] == policy and r["replicas"] == 1)
        for r in rows:
            if r["policy"] == policy:
                r["linearity"] = r["capacity_rps"] / (r["replicas"] * one)
    return {"engine_bound_rps_per_replica": per_replica, "rows": rows}


def lag_summary(cluster: Cluster, burst: tuple[float, float], slo_s: float, needed: int) -> dict[str, Any]:
    """Steady state before the burst; the lag until enough replicas are ready for the burst's load (``needed``:
    its rate over one replica's engine-bound rate), and until the ready count peaks; the burst after each."""
    b0, b1 = burst
    during = [s for s in cluster.timeline if b0 <= s["t"] < b1]
    peak = max(s["ready"] for s in during)
    complete = next(s["t"] for s in during if s["ready"] == peak)
    covered = next((s["t"] for s in during if s["ready"] >= needed), b1)
    steady = stats(cluster.outcomes, 20.0, b0, slo_s)
    out: dict[str, Any] = {
        "steady": steady,
        "replicas_needed": needed,
        "covered_s": covered - b0,
        "lag": stats(cluster.outcomes, b0, covered, slo_s),
        "after_covered": stats(cluster.outcomes, covered, b1, slo_s),
        "peak_ready_replicas": peak,
        "scale_up_complete_s": complete - b0,
        "after_scale_up": stats(cluster.outcomes, complete, b1, slo_s),
        "after_burst": stats(cluster.outcomes, b1, b1 + 60.0, slo_s),
    }
    for key in ("after_covered", "after_scale_up"):
        p99 = out[key]["p99_s"]
        out[f"p99_{key}_over_steady"] = p99 / steady["p99_s"] if p99 and steady["p99_s"] else None
    return out


async def burst_run(
    latency: Latency, cfg: ReplicaConfig, scaler: ScalerConfig, policy: Policy, chips: int, speed: float
) -> tuple[Cluster, tuple[float, float]]:
    base = BASE_LOAD * latency.chips_per_s(cfg.max_batch) / chips  # one replica at 50 % of its engine
    segments = [(90.0, base), (60.0, BURST_FACTOR * base), (90.0, base)]
    cluster = Cluster(latency, cfg, policy, speed)
    for _ in range(scaler.min_replicas):
        await cluster.add(0.0)
    cluster.t0 = time.monotonic()
    autoscaler = Autoscaler(cluster, scaler)
    loops = [asyncio.create_task(autoscaler.scrape_loop()), asyncio.create_task(autoscaler.control_loop())]
    try:
        await replay(cluster, poisson_trace(segments, seed=7), chips)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await cluster.close()
    return cluster, (90.0, 150.0)


def burst(
    latency: Latency,
    cfg: ReplicaConfig,
    base_scaler: ScalerConfig,
    targets: list[float],
    policy: Policy,
    chips: int,
    speed: float,
    slo_s: float,
) -> dict[str, Any]:
    runs = []
    for target in targets:
        scaler = dataclasses.replace(base_scaler, target=target)
        cluster, window = asyncio.run(burst_run(latency, cfg, scaler, policy, chips, speed))
        needed = math.ceil(BURST_FACTOR * BASE_LOAD)  # burst rate / one replica's engine-bound rate
        run = {"target_chips": target, "policy": policy, **lag_summary(cluster, window, slo_s, needed)}
        run["timeline"] = [{k: round(v, 2) for k, v in s.items()} for s in cluster.timeline]
        run["windows"] = windows(cluster.outcomes, 5.0, slo_s)
        print(json.dumps({k: v for k, v in run.items() if k != "timeline"}), flush=True)
        runs.append(run)
    return {"burst_window_s": [90.0, 150.0], "scaler": dataclasses.asdict(base_scaler), "runs": runs}


# ---- command line --------------------------------------------------------------------------------


def add_arguments(p: Any) -> None:
    p.add_argument("action", choices=["measure", "sweep", "burst", "plot", "table"])
    p.add_argument("--model", type=Path, default=Path("models/snipserve_default.onnx"), help="measure: model")
    p.add_argument("--latency-json", type=Path, help="engine table (measure writes it; sweep/burst read it)")
    p.add_argument("--engine-figure", choices=["cpu-measured", "gpu-assumed"], default="cpu-measured")
    p.add_argument("--chips", type=int, default=35, help="chips per request (35: 1280x720, preset balanced)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--queue-capacity", type=int, default=1024, help="chips queued per replica at most")
    p.add_argument("--targets", default="64,128,256", help="burst: queued chips per replica to scale at")
    p.add_argument("--policy", choices=["round_robin", "least_queue"], default="least_queue", help="burst")
    p.add_argument("--policies", default="round_robin,least_queue", help="sweep: balancing policies")
    p.add_argument("--replica-counts", default="1,2,4,8", help="sweep: values of N")
    p.add_argument("--durations", default="30,40", help="sweep: simulated s of the overload and the 70 %% runs")
    p.add_argument("--max-replicas", type=int, default=16, help="burst: the ScaledObject's maxReplicaCount")
    p.add_argument("--pod-start-s", type=float, default=20.0, help="burst: new pod to ready (simulated s)")
    p.add_argument("--speed", type=float, default=1.0, help="time compression (all time constants / speed)")
    p.add_argument("--slo-s", type=float, default=5.0, help="goodput counts 200s at most this late")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--sweep-json", type=Path, help="plot: sweep result")
    p.add_argument("--burst-json", type=Path, action="append", help="plot/table: burst result(s)")
    p.add_argument("--png", type=Path, help="plot: output")


def run_cli(args: Any) -> int:
    if args.action == "measure":
        result: dict[str, Any] = measure_cpu_latency(args.model)
    elif args.action in ("plot", "table"):
        from loadtest.cluster_plot import markdown, plot

        bursts = [json.loads(p.read_text()) for p in args.burst_json]
        sweep_result = json.loads(args.sweep_json.read_text())
        if args.action == "plot":
            plot(sweep_result, bursts, args.png)
        else:
            print(markdown(sweep_result, bursts))
        return 0
    else:
        latency = load_latency(args.latency_json, args.engine_figure)
        cfg = ReplicaConfig(max_batch=args.max_batch, queue_capacity=args.queue_capacity)
        if args.action == "sweep":
            policies = tuple(args.policies.split(","))
            over_s, load_s = (float(x) for x in args.durations.split(","))
            counts = tuple(int(x) for x in args.replica_counts.split(","))
            result = sweep(latency, cfg, args.chips, args.speed, args.slo_s, policies, (over_s, load_s), counts)
        else:
            targets = [float(t) for t in args.targets.split(",")]
            scaler = ScalerConfig(max_replicas=args.max_replicas, pod_start_s=args.pod_start_s)
            result = burst(latency, cfg, scaler, targets, args.policy, args.chips, args.speed, args.slo_s)
        result["setup"] = {
            "engine": latency.source,
            "seconds_per_call": {str(k): v for k, v in latency.table.items()},
            "chips_per_request": args.chips,
            "replica": cfg.__dict__,
            "speed": args.speed,
            "slo_s": args.slo_s,
            "load_average_at_end": os.getloadavg(),
            "cpu_count": os.cpu_count(),
        }
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    else:
        print(text)
    return 0
