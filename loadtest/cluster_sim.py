"""Scale-out simulation: N in-process replicas behind a load balancer, with a KEDA/HPA-style autoscaler.

Not a cluster and not a model of one: each replica runs the service's **real** :class:`service.batch.Batcher`
and the **real** admission of :func:`service.http.serving.in_flight` (503 + Retry-After past ``max_in_flight``, and the
batcher's bounded chip queue), on an event loop shared by all replicas. Only the engine is a stand-in
(:class:`TimedEngine`): it sleeps for the engine-call time of its batch size, from a table measured on this
CPU with ONNX Runtime (``python -m loadtest cluster-sim measure``) or a stated, *assumed* GPU table. Sleeping
instead of computing keeps the simulation honest on a busy machine: the replicas do not compete for cores.

Time compression: with ``speed`` s > 1 every time constant (engine times, batching window, arrival gaps,
deadlines, probe, scrape and autoscaler periods, pod start-up) is divided by s on the wall clock; every
number reported is in simulated seconds.

Autoscaler (what KEDA's Prometheus trigger with ``metricType: AverageValue`` hands the HPA, and what the HPA
does with it): Prometheus scrapes every ready pod's ``snipserve_queue_depth_chips`` each ``scrape_s``; every
``sync_s`` the HPA computes ``desired = ceil(sum / target)`` (no change within a 10 % tolerance), applies the
scale-up policy (at most +200 % or +8 pods per 15 s, whichever is more) and, for scale-down, the highest
recommendation of the last ``scale_down_window_s`` and at most one pod per minute. A new pod is routed to
only after ``pod_start_s`` (scheduling, container start, model load and warm-up: readiness turns 200).
A removed pod drains: it leaves the balancer at once and finishes its accepted work.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from service.adapters import get_adapter
from service.batch import Batcher, BatcherConfig
from service.crop import ChipLayout, Normalizer
from service.engines.fake import FAKE_CARD
from service.errors import SnipserveError
from service.http.serving import State, in_flight
from service.plan import ChipPlan, LevelSpec, PlanConfig, plan
from service.settings import Settings

Policy = Literal["round_robin", "least_queue"]
SIM_CHIP = 32  # chip side in the stand-in: cropping cost stays out of the numbers; engine time is the table's
SIM_CARD = FAKE_CARD.model_copy(update={"name": "sim", "input_size": SIM_CHIP, "max_per_chip": 1})

# Assumed, not measured (no GPU on this machine): engine seconds per call for 256 px chips of the shipped model,
# TensorRT FP16 on one data-centre GPU. A fixed 1.5 ms per call plus 0.12 ms per chip (about 8000 chips/s at
# batch 32); replace it with `snipserve bench` numbers from your GPU (`--latency-json`).
ASSUMED_GPU_LATENCY = {1: 0.00162, 8: 0.00246, 16: 0.00342, 32: 0.00534}


@dataclass(frozen=True)
class Latency:
    """Engine seconds per call by batch size (linear between the table's sizes, and beyond its largest)."""

    table: dict[int, float]
    source: str

    def __call__(self, n: int) -> float:
        sizes = sorted(self.table)
        if n <= sizes[0]:
            return self.table[sizes[0]]
        if n >= sizes[-1]:
            a, b = sizes[-2], sizes[-1]
        else:
            i = bisect.bisect_left(sizes, n)
            a, b = sizes[i - 1], sizes[i]
        ta, tb = self.table[a], self.table[b]
        return ta + (tb - ta) * (n - a) / (b - a)

    def chips_per_s(self, max_batch: int) -> float:
        return max_batch / self(max_batch)


class TimedEngine:
    """Engine stand-in: sleeps ``latency(batch)`` / ``speed`` and returns no detections (``end2end`` layout)."""

    name = "sim"

    def __init__(self, latency: Latency, max_batch: int, speed: float) -> None:
        self.card = SIM_CARD
        self.max_batch = max_batch
        self.providers = ["sim"]
        self.precision = "fp32"
        self.input_layout: ChipLayout = "uint8_nhwc"
        self.latency = latency
        self.speed = speed

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        time.sleep(self.latency(int(batch.shape[0])) / self.speed)
        return [np.zeros((batch.shape[0], 1, 6), np.float32)]

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class ReplicaConfig:
    """One replica's serving settings (the service's own fields, in simulated units)."""

    max_batch: int = 8
    max_delay_ms: float = 5.0
    queue_capacity: int = 1024
    max_in_flight: int = 64
    request_timeout_s: float = 60.0


@dataclass(frozen=True)
class ScalerConfig:
    """KEDA ScaledObject / HPA parameters (deploy/k8s), in simulated seconds."""

    target: float = 128.0  # queued chips per replica (the ScaledObject's threshold)
    min_replicas: int = 1
    max_replicas: int = 16
    scrape_s: float = 5.0  # ServiceMonitor interval
    sync_s: float = 15.0  # HPA controller period (kube-controller-manager default)
    tolerance: float = 0.1  # HPA default
    scale_up_percent: float = 200.0  # behavior.scaleUp policies, per 15 s, the larger wins
    scale_up_pods: int = 8
    scale_down_window_s: float = 300.0
    pod_start_s: float = 20.0  # scheduling on a node with the image, container start, model load, warm-up


@dataclass
class Outcome:
    """One request: simulated arrival and latency (s), HTTP status, Retry-After header if any."""

    arrival: float
    latency: float
    status: int
    retry_after: str | None = None


def request_plan(chips: int) -> tuple[ChipPlan, list[Any]]:
    """A plan of ``chips`` chips at one level (the stand-in's chip size) and its level image."""
    c = SIM_CHIP
    image = np.zeros((c, c * chips, 3), np.uint8)
    p = plan((c * chips, c), PlanConfig(chip_size=c, levels=(LevelSpec(scale=1.0, overlap=0.0),), max_chips=chips))
    assert p.num_chips == chips, p.num_chips
    return p, [image]


class Replica:
    """A pod: the real batcher and admission state over a :class:`TimedEngine`."""

    def __init__(self, index: int, latency: Latency, cfg: ReplicaConfig, speed: float, ready_at: float) -> None:
        self.index = index
        self.created = time.monotonic()
        self.ready_at = ready_at  # wall clock (time.monotonic) when readiness turns 200
        self.first_request: float | None = None  # wall clock of the first request routed here
        self.speed = speed
        settings = Settings(engine="fake", warmup=False, max_batch=cfg.max_batch, max_in_flight=cfg.max_in_flight)
        self.state = State(settings)
        engine = TimedEngine(latency, cfg.max_batch, speed)
        batcher_cfg = BatcherConfig(
            max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms / speed, queue_capacity=cfg.queue_capacity
        )
        self.batcher = Batcher(engine, get_adapter(SIM_CARD), Normalizer.from_card(SIM_CARD), batcher_cfg)
        self.state.batcher = self.batcher
        self.timeout_wall = cfg.request_timeout_s / speed
        self.started = False

    async def start(self) -> None:
        await self.batcher.start()
        self.started = True

    def ready(self, now: float) -> bool:
        return self.started and not self.state.draining and now >= self.ready_at

    async def handle(self, work_plan: ChipPlan, levels: list[Any]) -> tuple[int, str | None]:
        """Admission, queue, batches: ``(status, Retry-After)`` as the HTTP layer would answer."""
        if self.first_request is None:
            self.first_request = time.monotonic()
        try:
            with in_flight(self.state):
                deadline = time.monotonic() + self.timeout_wall
                work = await self.batcher.submit(work_plan, levels, 0.5, deadline)
                await asyncio.wait_for(work.future, self.timeout_wall)
            return 200, None
        except SnipserveError as exc:
            return exc.status, exc.headers.get("Retry-After")
        except TimeoutError:
            return 504, None

    async def drain(self) -> None:
        """Readiness 503 (the balancer stops routing), accepted work finishes, then the batcher stops."""
        self.state.draining = True
        while self.state.in_flight:
            await asyncio.sleep(0.01)
        await self.batcher.stop()


class Balancer:
    """Round-robin over ready replicas, or the ready replica with the fewest queued chips (ties: in flight)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._counter = itertools.count()

    def pick(self, ready: Sequence[Replica]) -> Replica | None:
        if not ready:
            return None
        if self.policy == "round_robin":
            return ready[next(self._counter) % len(ready)]
        start = next(self._counter) % len(ready)  # rotate ties
        rotated = list(ready[start:]) + list(ready[:start])
        return min(rotated, key=lambda r: (r.batcher.queue_depth, r.state.in_flight))


@dataclass
class Cluster:
    """Replicas, the balancer, and the record of what happened (simulated seconds since the start)."""

    latency: Latency
    replica_cfg: ReplicaConfig
    policy: Policy
    speed: float
    replicas: list[Replica] = field(default_factory=list)
    removed: list[Replica] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    timeline: list[dict[str, float]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    _draining: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.balancer = Balancer(self.policy)
        self._index = itertools.count()

    def sim_now(self) -> float:
        return (time.monotonic() - self.t0) * self.speed

    def ready(self) -> list[Replica]:
        now = time.monotonic()
        return [r for r in self.replicas if r.ready(now)]

    async def add(self, start_delay_s: float) -> None:
        replica = Replica(
            next(self._index), self.latency, self.replica_cfg, self.speed, time.monotonic() + start_delay_s / self.speed
        )
        await replica.start()
        self.replicas.append(replica)

    def remove_newest(self) -> None:
        replica = self.replicas.pop()
        self.removed.append(replica)
        task = asyncio.create_task(replica.drain())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def request(self, chips: tuple[ChipPlan, list[Any]]) -> None:
        arrival = self.sim_now()
        replica = self.balancer.pick(self.ready())
        if replica is None:  # no endpoint: the Service (or the ingress) refuses the connection
            self.outcomes.append(Outcome(arrival, 0.0, 503, None))
            return
        status, retry = await replica.handle(*chips)
        self.outcomes.append(Outcome(arrival, self.sim_now() - arrival, status, retry))

    async def close(self) -> None:
        while self.replicas:
            self.remove_newest()
        await asyncio.gather(*self._draining, return_exceptions=True)


class Autoscaler:
    """The HPA control loop over KEDA's queue-depth metric (see the module docstring)."""

    def __init__(self, cluster: Cluster, cfg: ScalerConfig) -> None:
        self.cluster = cluster
        self.cfg = cfg
        self.scraped = 0.0  # sum of queued chips over ready pods at the last scrape
        self.recommendations: list[tuple[float, int]] = []  # (sim time, desired) for scale-down stabilisation
        self.last_scale_down = -math.inf

    async def scrape_loop(self) -> None:
        while True:
            self.scraped = float(sum(r.batcher.queue_depth for r in self.cluster.ready()))
            await asyncio.sleep(self.cfg.scrape_s / self.cluster.speed)

    def desired(self, current: int, now: float) -> int:
        cfg = self.cfg
        ratio = self.scraped / (cfg.target * max(current, 1))
        raw = current if abs(ratio - 1) <= cfg.tolerance else math.ceil(self.scraped / cfg.target)
        raw = min(max(raw, cfg.min_replicas), cfg.max_replicas)
        self.recommendations = [(t, d) for t, d in self.recommendations if t > now - cfg.scale_down_window_s]
        self.recommendations.append((now, raw))
        if raw > current:  # scale-up window 0: act now, within the policy
            by_percent = math.floor(current * (1 + cfg.scale_up_percent / 100))
            return min(raw, max(by_percent, current + cfg.scale_up_pods))
        stable = max(d for _, d in self.recommendations)  # scale down only to the highest recent recommendation
        if stable < current and now - self.last_scale_down >= 60.0:
            self.last_scale_down = now
            return current - 1  # policy: one pod per minute
        return current

    async def control_loop(self) -> None:
        cluster = self.cluster
        while True:
            await asyncio.sleep(self.cfg.sync_s / cluster.speed)
            current = len(cluster.replicas)
            target = self.desired(current, cluster.sim_now())
            for _ in range(target - current):
                await cluster.add(self.cfg.pod_start_s)
            for _ in range(current - target):
                cluster.remove_newest()


async def replay(cluster: Cluster, arrivals: Sequence[float], chips: int, sample_s: float = 1.0) -> None:
    """Send one request of ``chips`` chips at each arrival (simulated seconds), record a timeline meanwhile."""
    work = request_plan(chips)
    tasks: set[asyncio.Task[None]] = set()

    async def sample() -> None:
        while True:
            cluster.timeline.append(
                {
                    "t": cluster.sim_now(),
                    "replicas": len(cluster.replicas),
                    "ready": len(cluster.ready()),
                    "queued_chips": sum(r.batcher.queue_depth for r in cluster.replicas),
                }
            )
            await asyncio.sleep(sample_s / cluster.speed)

    sampler = asyncio.create_task(sample())
    try:
        for t in arrivals:
            delay = t / cluster.speed - (time.monotonic() - cluster.t0)
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(cluster.request(work))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)


def poisson_trace(segments: Sequence[tuple[float, float]], seed: int = 0) -> list[float]:
    """Arrival times (s) of a Poisson process with piecewise-constant rate: ``[(duration_s, rate_per_s), ...]``."""
    rng = random.Random(seed)
    out: list[float] = []
    start = 0.0
    for duration, rate in segments:
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + duration:
                break
            out.append(t)
        start += duration
    return out
