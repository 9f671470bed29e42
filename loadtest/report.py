"""Load-test statistics and reports: nearest-rank percentiles, a run summary, JSON/CSV, a PNG plot.

Latency is ``done - intended``: from the moment the schedule said the request should go out, not from
when the generator managed to send it, so a stalled generator or a server that holds connections cannot
hide queueing (coordinated omission). ``lag = sent - intended`` is reported separately: a large lag means
the generator itself could not keep up and the run should be repeated with fewer arrivals per core.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0, 99.9)
REJECTED, TIMED_OUT = 503, 504
TRANSPORT_ERROR, CLIENT_TIMEOUT = 0, -1  # pseudo-statuses recorded by the generator


def percentile(values: np.ndarray, p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``p`` % of the values at or below it.

    Never interpolates (a reported p99 is a latency some request really had); NaN for no values."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    if values.size == 0:
        return math.nan
    ordered = np.sort(values, kind="stable")
    rank = math.ceil(p * ordered.size / 100.0 - 1e-9)  # 1-based; the epsilon absorbs 99.9 * n float error
    return float(ordered[max(rank, 1) - 1])


def latency_stats(seconds: np.ndarray) -> dict[str, float]:
    """p50/p90/p95/p99/p99.9/max/mean in milliseconds (NaN where there are no samples)."""
    stats = {f"p{p:g}": percentile(seconds, p) * 1000 for p in PERCENTILES}
    stats["max"] = float(seconds.max()) * 1000 if seconds.size else math.nan
    stats["mean"] = float(seconds.mean()) * 1000 if seconds.size else math.nan
    return stats


@dataclass
class Samples:
    """Per-request records of one run; times in seconds from the run's start, ``float64 [N]``.

    ``status`` is the HTTP status; 0 for a transport error (refused, reset), -1 for a client-side timeout."""

    intended: np.ndarray
    sent: np.ndarray
    done: np.ndarray
    status: np.ndarray  # int32 [N]
    image: np.ndarray  # int32 [N], index into the image mix

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[float, float, float, int, int]]) -> Samples:
        a = np.asarray(rows, np.float64).reshape(-1, 5)
        return cls(a[:, 0], a[:, 1], a[:, 2], a[:, 3].astype(np.int32), a[:, 4].astype(np.int32))

    def window(self, start: float, stop: float) -> Samples:
        """The requests whose intended send time is in ``[start, stop)`` (warm-up excluded)."""
        keep = (self.intended >= start) & (self.intended < stop)
        return Samples(self.intended[keep], self.sent[keep], self.done[keep], self.status[keep], self.image[keep])

    @property
    def latency(self) -> np.ndarray:
        """Seconds from intended send to answer (coordinated-omission free), ``float64 [N]``."""
        out: np.ndarray = self.done - self.intended
        return out

    @property
    def lag(self) -> np.ndarray:
        """Seconds the generator sent late, ``float64 [N]``."""
        out: np.ndarray = self.sent - self.intended
        return out

    def __len__(self) -> int:
        return int(self.intended.size)


class Summary(BaseModel):
    """One run (or one rate of a sweep), as written to JSON/CSV."""

    model_config = ConfigDict(frozen=True)

    mode: Literal["open", "closed"]
    arrival: str = Field(description="constant | poisson (open loop) or 'closed'.")
    target_rate: float | None = Field(description="Requests/s the schedule asked for (open loop).")
    concurrency: int | None = Field(description="Workers (closed loop).")
    duration_s: float
    requests: int = Field(description="Requests intended inside the measurement window.")
    offered_rps: float
    achieved_rps: float = Field(description="2xx answers completed inside the window (whenever sent), per second.")
    ok: int
    rejected: int = Field(description="503 answers (queue full, in-flight limit, not ready).")
    timed_out: int = Field(description="504 answers (deadline) plus client-side timeouts.")
    errors: int = Field(description="Every other non-2xx answer and transport error.")
    reject_rate: float
    timeout_rate: float
    error_rate: float
    latency_ms: dict[str, float] = Field(description="Of 2xx answers, from the intended send time.")
    latency_all_ms: dict[str, float] = Field(description="Of every answer, from the intended send time.")
    lag_ms: dict[str, float] = Field(description="Generator lag: actual minus intended send time.")


def summarize(
    samples: Samples,
    *,
    mode: Literal["open", "closed"],
    arrival: str,
    target_rate: float | None,
    concurrency: int | None,
    start: float,
    duration_s: float,
) -> Summary:
    """Statistics of the requests intended in ``[start, start + duration_s)``."""
    w = samples.window(start, start + duration_s)
    n = max(len(w), 1)
    ok = (w.status >= 200) & (w.status < 300)
    rejected = w.status == REJECTED
    timed_out = (w.status == TIMED_OUT) | (w.status == CLIENT_TIMEOUT)
    errors = ~(ok | rejected | timed_out)
    # Throughput is what completes inside the window, whenever it was sent: warm-up requests finishing
    # early in the window stand in for the window's last requests, which finish after it closes.
    all_ok = (samples.status >= 200) & (samples.status < 300)
    completed_in_window = all_ok & (samples.done >= start) & (samples.done < start + duration_s)
    return Summary(
        mode=mode,
        arrival=arrival,
        target_rate=target_rate,
        concurrency=concurrency,
        duration_s=duration_s,
        requests=len(w),
        offered_rps=len(w) / duration_s,
        achieved_rps=int(completed_in_window.sum()) / duration_s,
        ok=int(ok.sum()),
        rejected=int(rejected.sum()),
        timed_out=int(timed_out.sum()),
        errors=int(errors.sum()),
        reject_rate=float(rejected.sum()) / n,
        timeout_rate=float(timed_out.sum()) / n,
        error_rate=float(errors.sum()) / n,
        latency_ms=latency_stats(w.latency[ok]),
        latency_all_ms=latency_stats(w.latency),
        lag_ms=latency_stats(w.lag),
    )


# ---- output ---------------------------------------------------------------------------------------------
def write_json(summaries: Sequence[Summary], path: Path, **extra: object) -> None:
    """``{"runs": [...], **extra}`` (NaN written as null)."""
    doc = {"runs": [s.model_dump(mode="json") for s in summaries], **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(doc), indent=2) + "\n")


def summary_row(s: Summary) -> dict[str, object]:
    """One flat CSV row: scalar fields plus ``latency_<stat>_ms`` and ``lag_<stat>_ms`` columns."""
    row: dict[str, object] = {k: v for k, v in s.model_dump().items() if not isinstance(v, dict)}
    row |= {f"latency_{k}_ms": round(v, 3) for k, v in s.latency_ms.items()}
    row |= {f"lag_{k}_ms": round(v, 3) for k, v in s.lag_ms.items()}
    return row


def write_csv(summaries: Sequence[Summary], path: Path) -> None:
    rows = [summary_row(s) for s in summaries]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["mode"])
        writer.writeheader()
        writer.writerows(rows)


def write_samples_csv(samples: Samples, path: Path) -> None:
    """Per-request records (seconds from the start of the run), for offline analysis."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["intended_s", "sent_s", "done_s", "status", "image", "latency_ms", "lag_ms"])
        for i in range(len(samples)):
            lat, lag = samples.latency[i] * 1000, samples.lag[i] * 1000
            writer.writerow(
                [f"{samples.intended[i]:.6f}", f"{samples.sent[i]:.6f}", f"{samples.done[i]:.6f}",
                 int(samples.status[i]), int(samples.image[i]), f"{lat:.3f}", f"{lag:.3f}"]
            )  # fmt: skip


def plot_latency_vs_throughput(summaries: Sequence[Summary], path: Path, slo_ms: float | None = None) -> None:
    """PNG, two panels over the offered rate: p50/p99/p99.9 latency (log scale, SLO line), and achieved
    against offered throughput (the diagonal is "keeping up"; where the points fall below it, saturation).

    matplotlib is imported here only (``pip install snipserve[load]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(summaries, key=lambda s: s.offered_rps)
    x = [s.offered_rps for s in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    for key, style in (("p50", "o-"), ("p99", "s-"), ("p99.9", "^--")):
        left.plot(x, [s.latency_all_ms[key] for s in runs], style, label=key)
    if slo_ms is not None:
        left.axhline(slo_ms, color="red", lw=1, ls=":", label=f"SLO p99 {slo_ms:g} ms")
    left.set_yscale("log")
    left.set_xlabel("offered rate (requests/s)")
    left.set_ylabel("latency from intended send (ms)")
    left.set_title("latency vs offered load (open loop)")
    left.legend()
    right.plot(x, [s.achieved_rps for s in runs], "o-", label="achieved (2xx/s)")
    right.plot(
        x,
        [s.offered_rps * (s.reject_rate + s.timeout_rate + s.error_rate) for s in runs],
        "x:",
        label="503/504/errors per s",
    )
    top = max(x, default=1.0)
    right.plot([0, top], [0, top], color="grey", lw=1, ls="--", label="offered = achieved")
    right.set_xlabel("offered rate (requests/s)")
    right.set_ylabel("throughput (requests/s)")
    right.set_title("throughput vs offered load")
    right.legend()
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _nan_to_none(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return value


def format_summary(s: Summary) -> str:
    """One human-readable line per run."""
    lat = s.latency_all_ms
    rate = f"{s.target_rate:g}/s {s.arrival}" if s.mode == "open" else f"closed x{s.concurrency}"
    return (
        f"{rate:>18} | offered {s.offered_rps:7.2f}/s achieved {s.achieved_rps:7.2f}/s | "
        f"p50 {lat['p50']:8.1f} p90 {lat['p90']:8.1f} p99 {lat['p99']:8.1f} p99.9 {lat['p99.9']:8.1f} "
        f"max {lat['max']:8.1f} ms | 503 {s.reject_rate:6.1%} 504 {s.timeout_rate:6.1%} err {s.error_rate:6.1%} | "
        f"lag p99 {s.lag_ms['p99']:6.1f} ms"
    )
