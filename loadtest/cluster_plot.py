"""The README figure of the scale-out simulation: capacity and p99 against N; replicas and p99 through a burst."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(sweep: dict[str, Any], bursts: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ((cap, p99), (reps, lat)) = plt.subplots(2, 2, figsize=(12, 8))
    rows = sweep["rows"]
    for policy, marker in (("round_robin", "o"), ("least_queue", "s")):
        mine = [r for r in rows if r["policy"] == policy]
        n = [r["replicas"] for r in mine]
        cap.plot(n, [r["capacity_rps"] for r in mine], marker=marker, label=policy)
        p99.plot(n, [r["at_70pct"]["p99_s"] for r in mine], marker=marker, label=policy)
    one = next(r["capacity_rps"] for r in rows if r["replicas"] == 1 and r["policy"] == "round_robin")
    ns = sorted({r["replicas"] for r in rows})
    cap.plot(ns, [one * k for k in ns], "k--", linewidth=1, label="linear from N=1")
    cap.set(xlabel="replicas", ylabel="requests/s", title="Capacity (1.5x overload offered)")
    p99.set(xlabel="replicas", ylabel="p99 latency (s)", title="p99 at 70 % load")
    b0, b1 = bursts[0]["burst_window_s"]
    for burst in bursts:
        top = burst.get("scaler", {}).get("max_replicas", 16)
        for run in burst["runs"]:
            _burst_lines(reps, lat, run, f"target {run['target_chips']:g}, max {top}, {run['policy']}")
    for ax in (reps, lat):
        ax.axvspan(b0, b1, color="orange", alpha=0.15, label="10x burst")
    reps.set(xlabel="simulated s", ylabel="ready replicas", title="Autoscaled on queued chips per replica")
    lat.set(xlabel="simulated s (arrival)", ylabel="p99 per 5 s (s)", title="p99 through the burst")
    for ax in (cap, p99, reps, lat):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Simulated replicas, real batcher; engine: {sweep['setup']['engine'][:90]}", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _burst_lines(reps: Any, lat: Any, run: dict[str, Any], label: str) -> None:
    t = [s["t"] for s in run["timeline"]]
    reps.plot(t, [s["ready"] for s in run["timeline"]], label=label)
    windows = [w for w in run["windows"] if w["p99_s"] is not None]
    lat.plot([w["t"] for w in windows], [w["p99_s"] for w in windows], label=label)


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(sweep: dict[str, Any], bursts: list[dict[str, Any]]) -> str:
    """The README tables: capacity and p99 against N; the burst runs against the target."""
    sent = all("offered_rps" in r for r in sweep["rows"])  # older results lack it
    head = "| replicas | policy | capacity (req/s) | vs linear |" + (" sent / asked (req/s) |" if sent else "")
    head += " p50 at 70 % (s) | p99 at 70 % (s) | goodput at 70 % (req/s) | statuses at 70 % |"
    lines = [head, "|" + "---|" * head.count(" |")]
    for r in sorted(sweep["rows"], key=lambda r: (r["replicas"], r["policy"])):
        load = r["at_70pct"]
        cells = [str(r["replicas"]), r["policy"], f"{r['capacity_rps']:.2f}", f"{r['linearity']:.1%}"]
        cells += [f"{r['offered_rps']:.0f} / {r['asked_rps']:.0f}"] if sent else []
        cells += [_s(load["p50_s"]), _s(load["p99_s"]), f"{load['goodput_rps']:.2f}", str(load["statuses"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| target chips/replica | policy | max replicas | ready before (mean) | steady p99 (s) | "
        "ready for the load after (s) | "
        "lag: statuses | lag: goodput (req/s) | 503 without Retry-After | peak ready | peak after (s) | "
        "p99 after peak (s) | p99 after / steady | after the peak: goodput (req/s), statuses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for burst in bursts:
        max_replicas = burst.get("scaler", {}).get("max_replicas", 16)
        for run in burst["runs"]:
            lag, after = run["lag"], run["after_scale_up"]
            b0 = burst["burst_window_s"][0]
            before = [s["ready"] for s in run["timeline"] if 20.0 <= s["t"] < b0]
            bad = lag["rejected_without_retry_after"] + after["rejected_without_retry_after"]
            lines.append(
                f"| {run['target_chips']:g} | {run['policy']} | {max_replicas} | {sum(before) / len(before):.1f} | "
                f"{_s(run['steady']['p99_s'])} | "
                f"{run['covered_s']:.1f} | {lag['statuses']} | {lag['goodput_rps']:.2f} | {bad} | "
                f"{run['peak_ready_replicas']} | {run['scale_up_complete_s']:.1f} | {_s(after['p99_s'])} | "
                f"{_s(run['p99_after_scale_up_over_steady'])} | {after['goodput_rps']:.2f}, {after['statuses']} |"
            )
    return "\n".join(lines)
