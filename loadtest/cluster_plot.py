"""The README figure of the scale-out simulation: capacity and p99 against N; replicas and p99 through a burst."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(sweep: dict[str, Any], burst: dict[str, Any], png: Path) -> None:
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
    b0, b1 = burst["burst_window_s"]
    for run in burst["runs"]:
        label = f"target {run['target_chips']:g} chips, {run['policy']}"
        t = [s["t"] for s in run["timeline"]]
        reps.plot(t, [s["ready"] for s in run["timeline"]], label=label)
        windows = [w for w in run["windows"] if w["p99_s"] is not None]
        lat.plot([w["t"] for w in windows], [w["p99_s"] for w in windows], label=label)
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
