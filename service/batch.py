"""Dynamic batcher: chips of all in-flight requests share engine calls.

One asyncio loop, one queue of requests per lane, one wake-up event. A batch closes at
``max_batch`` chips or ``max_delay`` after its first chip was queued. Up to ``pipeline_depth`` batches
are in flight: while one runs on the engine thread, the next is cropped into its own buffer on a
worker thread, so CPU pre/post-processing overlaps inference. Admission is all-or-nothing per request
against a bounded chip queue (``QueueFull`` -> 503 + Retry-After); cancelled requests and requests past
their deadline have their queued chips dropped before inference; an engine failure fails only the
requests with chips in that batch.

Two priority lanes, each with its own chip budget: ``interactive`` (``/v1/detect``, the default) and
``bulk`` (streaming and batch uploads). Batches are filled from the interactive lane first, so a
streaming client can neither fill the interactive queue (separate budget) nor delay its chips
(strict priority); bulk chips fill whatever rows interactive work leaves free.

Scheduling within a lane (``schedule``). The batcher keeps a measured drain rate (chips completed per second of
wall clock while busy, over the batches of the last ``drain_window_s``). ``edf`` (default): earliest deadline
first on a per-request *target*, ``admission + edf_stretch x (its own chips / drain rate) + edf_slack_s``, capped
by its hard deadline (the client's deadline and ``max_queue_wait_s`` after arrival): a request's latency then
follows its own size, and an old large request's target eventually comes first (no starvation). ``fair``: round
robin, ``fair_quantum`` chips per request per turn (processor sharing). ``fifo``: first in, first out by chip.

Admission by time: a request is refused at once (``QueueFull`` -> 503 + ``Retry-After``) when it cannot complete by
its hard deadline at the planning rate (the slowest recent busy second's drain rate, less ``admission_headroom``).
Under ``edf`` the check is the schedule's own: the lane in target order with the newcomer inserted must complete
every request by its hard deadline (the newcomer, and anyone it would push late, or later when the rate has fallen
since they were admitted), so admitted requests finish within the bound as long as the rate holds; ``Retry-After``
is the least wait after which the same request sent again would be admitted on that projected schedule
(:class:`EdfSchedule`: its target and deadline move with the wait, the queue drains meanwhile at the measured rate,
faster than the admission rate).
Under ``fair`` and ``fifo`` the newcomer's own estimated completion is checked, and the hint is its lateness.
Requests admitted but still decoding hold a :class:`Reservation` and count as queued, so that many arriving at once
cannot all be let into the same room; the reservation carries the request's target for all its submissions.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service import metrics
from service.adapters import Adapter, ChipDetections, split_outputs
from service.crop import Normalizer
from service.engines import Engine, engine_on_gpu
from service.errors import DeadlineExceeded, EngineError, NotReady, QueueFull
from service.plan import ChipPlan
from service.staging import BatchPart, HostStaging, Staging

log = logging.getLogger("snipserve.batch")

Priority = Literal["interactive", "bulk"]
PRIORITIES: tuple[Priority, ...] = ("interactive", "bulk")  # batch fill order
Schedule = Literal["fair", "edf", "fifo"]


class BatcherConfig(BaseModel):
    """Dynamic batching and admission control."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch: int = Field(default=8, ge=1, le=1024, description="Chips per engine call at most.")
    max_delay_ms: float = Field(
        default=5.0, ge=0, le=10_000, description="Wait this long after a batch's first chip for more."
    )
    queue_capacity: int = Field(default=4096, ge=1, description="Chips queued at most; beyond it requests get 503.")
    bulk_queue_capacity: int = Field(
        default=1024, ge=1, description="Chips queued at most in the bulk (streaming) lane, a budget apart."
    )
    pipeline_depth: int | None = Field(
        default=None,
        ge=1,
        le=8,
        description="Batches in flight; above 1, cropping the next batch overlaps inference. Default: 2 when the "
        "engine runs on a GPU, 1 on the CPU, where overlapping threads would only compete with inference's own.",
    )
    infer_timeout_s: float = Field(default=30.0, gt=0, description="An engine call longer than this fails its batch.")
    schedule: Schedule = Field(
        default="edf", description="Order of chips within a lane: edf (size-aware targets), fair (round robin), fifo."
    )
    edf_stretch: float = Field(
        default=8.0, gt=0, description="edf: target latency = this x the request's own service time + edf_slack_s."
    )
    edf_slack_s: float = Field(default=0.05, ge=0, description="edf: constant part of a request's target latency.")
    fair_quantum: int = Field(default=2, ge=1, description="fair: chips a request gets per turn of the round robin.")
    max_queue_wait_s: float | None = Field(
        default=None,
        gt=0,
        description="Refuse (503) a request whose estimated completion at the measured drain rate is further away "
        "than this; unset: only the chip capacity and each request's deadline bound admission.",
    )
    drain_window_s: float = Field(
        default=5.0,
        gt=0,
        description="The drain rate is the chips completed over the busy seconds of the batches of this last window.",
    )
    admission_headroom: float = Field(
        default=0.15,
        ge=0,
        lt=1,
        description="Share of the admission rate held back when admission by time plans (a promise of 8 s is then "
        "planned as if the queue drained this much slower): room for the rate falling after a request is admitted. "
        "snipserve_admission_lateness_seconds shows how admitted requests' chips complete against their deadline.",
    )
    drain_smoothing: float = Field(
        default=0.2, gt=0, le=1, description="Weight of the newest request in the merge-time moving average."
    )


@dataclass(eq=False)
class Reservation:
    """A request admitted by :meth:`Batcher.admit` (after the header probe) whose chips are not queued yet (it is
    decoding, or waiting for the pixel budget): admission by time counts it as if queued, so requests decoding at
    the same time cannot all be admitted into the same room. Its submissions take their chips out of it (a focus run
    reserves its whole pyramid and submits level by level); the last one, or :meth:`Batcher.release`, ends it."""

    n: int
    target: float  # the request's edf target and hard deadline, set once at admission: its submissions keep them
    hard: float
    priority: Priority
    by_bound: bool  # the queueing bound, not the client's deadline, sets ``hard``
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def remaining(self) -> int:
        return self.n


@dataclass(frozen=True)
class Submission:
    """How a request's chips join the queue, besides the chips themselves."""

    arrival: float | None = None  # time.monotonic() when the request reached the service (the bound counts from it)
    want_focus: bool = False  # keep the chips' focus maps (models with a focus head) in ``ChipWork.focus``
    continuation: bool = False  # a later part of an admitted request (a focus run's finer level): no time check
    reservation: Reservation | None = None  # what ``admit`` returned for this request: these chips take its place
    # edf, without a reservation (which carries the request's target): the chips the target is sized by (None:
    # these chips). A focus run sizes each level by its whole pyramid, so a large image's levels, queued one after
    # another, keep a large image's target and do not pass smaller requests because each level alone is small.
    target_chips: int | None = None
    final: bool = True  # the request's last chips (a focus run's finest level): their lateness is observed


NEW_REQUEST = Submission()


@dataclass(eq=False)
class ChipWork:
    """One request's chips in the queue. Results accumulate per batch until every chip is done."""

    plan: ChipPlan
    level_images: list[Any]  # host or device arrays, as the batcher's staging made them
    threshold: float
    future: asyncio.Future[ChipDetections]
    deadline: float = math.inf  # time.monotonic()
    target: float = math.inf  # edf: the order key (size-aware target completion time)
    hard: float = math.inf  # admission's promise: complete by then (client deadline, queueing bound)
    enqueued: float = field(default_factory=time.monotonic)
    cursor: int = 0  # next chip to hand to a batch
    done: int = 0  # chips with results
    parts: list[ChipDetections] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: {"queue_wait": 0.0, "crop": 0.0, "infer": 0.0})
    started: float | None = None
    want_focus: bool = False
    focus: np.ndarray | None = None  # float32 [K, h, w]: the chips' focus maps, when ``want_focus``
    promised: bool = False  # the request's last chips, due by ``hard``: their lateness against it is observed

    @property
    def remaining(self) -> int:
        return self.plan.num_chips - self.cursor

    @property
    def dropped(self) -> bool:
        return self.future.done()


@dataclass
class _Slice:
    work: ChipWork
    start: int  # first chip index of the request in this batch
    stop: int
    row: int  # first row in the batch buffer


@dataclass(frozen=True)
class EdfSchedule:
    """A lane's projected ``edf`` schedule at the admission rate, without new arrivals: the queued requests in target
    order with their ``targets``, ``hards`` (hard deadlines) and projected completion times ``done`` (all
    ``float64 [m]``, ``time.monotonic()``), after ``head`` (when what runs or waits in higher lanes is done).

    ``speedup``: the measured drain rate over the admission rate (>= 1). Admission plans at the slowest recent
    second, so the queue usually drains faster than projected: each second of waiting takes ``speedup`` seconds of
    projected work off the queue, and a queued request's projected completion moves ``speedup - 1`` seconds earlier.
    Only :meth:`retry_after` uses it; :meth:`check` is the promise and keeps the admission rate."""

    now: float
    head: float
    targets: np.ndarray
    hards: np.ndarray
    done: np.ndarray
    speedup: float = 1.0

    def _at_risk(self, own: float) -> np.ndarray:
        """``bool [m]``: late with a newcomer of ``own`` seconds of chips ahead of them. That includes those already
        projected late (the rate fell after they were admitted): letting newcomers pass them would push the same
        admitted requests back again and again (EDF's domino effect), so nobody is inserted ahead of them."""
        return np.asarray(self.done + own > self.hards)

    def check(self, own: float, target: float) -> tuple[float, float]:
        """A newcomer of ``own`` seconds of chips with ``target``, inserted in target order (after equal targets):
        (its projected completion, the time until every request it would make late has completed -- ``now`` when
        none)."""
        k = int(np.searchsorted(self.targets, target, side="right"))
        own_done = (self.done[k - 1] if k else self.head) + own
        late = self._at_risk(own)[k:]
        return float(own_done), float(self.done[k:][late].max()) if late.any() else self.now

    def _relief(self, own: float) -> np.ndarray:
        """``float64 [m]``: the wait after which each queued request no longer stands in a newcomer's way (0 for
        those not at risk): when it has completed, or when the faster drain has moved its projected completion early
        enough that ``own`` more seconds ahead of it keep it on time."""
        left = self.done - self.now
        gone = left / self.speedup
        margin = self.done + own - self.hards
        eased = margin / (self.speedup - 1.0) if self.speedup > 1.0 else np.full_like(margin, np.inf)
        return np.where(margin > 0, np.minimum(gone, eased), 0.0)

    def retry_after(self, own: float, target: float, hard: float) -> float:
        """The least wait after which the same newcomer would be admitted, its target and hard deadline moving with
        the wait and the queue draining meanwhile (at ``speedup``): complete by its hard deadline, making no one
        late. Each insertion position holds for a range of waits (the wait moves the newcomer past queued targets);
        there the wait must also cover its own lateness and the at-risk requests behind it (:meth:`_relief`)."""
        m = self.targets.size
        after = np.maximum.accumulate(self._relief(own)[::-1])[::-1]  # the latest relief behind each position
        k0 = int(np.searchsorted(self.targets, target, side="right"))
        wait = math.inf
        for k in range(k0, m + 1):
            lo = 0.0 if k == k0 else float(self.targets[k - 1] - target)
            hi = float(self.targets[k] - target) if k < m else math.inf
            ahead = float(self.done[k - 1]) if k else self.head
            wait = max(lo, (ahead + own - hard) / self.speedup, float(after[k]) if k < m else 0.0)
            if wait < hi:
                break
        return wait  # > 0 for a refused newcomer: at wait 0 it was late, or pushed someone late


class Batcher:
    """See the module docstring. Use ``await start()`` / ``await stop()``; ``await submit(...)``."""

    def __init__(
        self,
        engine: Engine,
        adapter: Adapter,
        normalizer: Normalizer,
        config: BatcherConfig,
        staging: Staging | None = None,
    ) -> None:
        self.engine = engine
        self.adapter = adapter
        self.config = config
        # Where chips are cropped (host buffers, or the engine's device buffer): the pipeline's staging, whose
        # ``levels`` made the level images this batcher is handed.
        self.staging: Staging = staging or HostStaging(engine, normalizer)
        self.max_batch = min(config.max_batch, engine.max_batch)
        self.depth = config.pipeline_depth or (2 if engine_on_gpu(engine) else 1)
        self._buffers = [self.staging.new_buffer(self.max_batch) for _ in range(self.depth)]
        self._lanes: dict[Priority, collections.deque[ChipWork]] = {p: collections.deque() for p in PRIORITIES}
        self._lane_pending: dict[Priority, int] = dict.fromkeys(PRIORITIES, 0)  # chips queued per lane
        self._reserved: dict[Priority, list[Reservation]] = {p: [] for p in PRIORITIES}  # admitted, not queued yet
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(self.depth)
        self._engine_pool = ThreadPoolExecutor(1, thread_name_prefix="snipserve-engine")
        self._prep_pool = ThreadPoolExecutor(self.depth, thread_name_prefix="snipserve-prep")
        self._loop_task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._running: list[list[_Slice]] = []  # slices of the batches in flight (for the wait estimate)
        self._closing = False
        self._chips_per_s = 0.0  # measured drain rate (chips per wall-clock second while busy, recent window)
        self._drained: collections.deque[tuple[float, int, float]] = collections.deque()  # (done at, chips, seconds)
        self._last_done = 0.0  # time.monotonic() when the last batch completed
        self._backlogged = False  # chips were waiting (or running) when the last batch completed
        self._finish_per_chip = 0.0  # measured seconds from a request's last chip to its reply (merge), per chip
        metrics.QUEUE_CAPACITY.set(config.queue_capacity)
        metrics.QUEUE_DEPTH.set(0)

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="snipserve-batcher")

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish what was accepted (up to ``timeout``), then stop threads."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while (self._queued() or self._batches) and time.monotonic() < deadline:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for lane in self._lanes.values():
            for work in lane:
                if not work.future.done():
                    work.future.set_exception(NotReady("the service is shutting down"))
            lane.clear()
        self._engine_pool.shutdown(wait=False, cancel_futures=True)
        self._prep_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        """Chips queued in all lanes, not yet in a batch."""
        return self._pending

    @property
    def _pending(self) -> int:
        return sum(self._lane_pending.values())

    def _queued(self) -> bool:
        return any(self._lanes.values())

    def _capacity(self, priority: Priority) -> int:
        return self.config.queue_capacity if priority == "interactive" else self.config.bulk_queue_capacity

    # ---- admission -------------------------------------------------------------------------
    async def submit(
        self,
        plan: ChipPlan,
        level_images: list[Any],
        threshold: float,
        deadline: float = math.inf,
        priority: Priority = "interactive",
        how: Submission = NEW_REQUEST,
    ) -> ChipWork:
        """Queue a request's chips in the ``priority`` lane; returns its :class:`ChipWork` (await ``work.future``).
        ``how``: see :class:`Submission`.

        Raises ``QueueFull`` if the chips do not fit the lane's budget, ``NotReady`` while shutting down."""
        if how.reservation is not None:  # these chips take their place in it; a focus run's later levels take the rest
            how.reservation.n = max(how.reservation.n - plan.num_chips, 0)
            if how.reservation.n == 0:
                self.release(how.reservation)
        if self._closing:
            raise NotReady("the service is shutting down")
        n = plan.num_chips
        queued, capacity = self._lane_pending[priority], self._capacity(priority)
        if queued + n > capacity:
            retry_s = (self._pending + n) / max(self._chips_per_s, 1.0)
            raise QueueFull(
                f"queue full: {queued} {priority} chips queued, this image needs {n}, capacity {capacity}",
                retry_after_s=retry_s,
            )
        if how.reservation is not None:  # one target per request, set at its admission
            target, hard, by_bound = how.reservation.target, how.reservation.hard, how.reservation.by_bound
        else:
            target, hard, by_bound = self._targets(how.target_chips or n, deadline, how.arrival)
        if not how.continuation:
            self._admit_by_time(n, target, hard, priority, by_bound)
        fut: asyncio.Future[ChipDetections] = asyncio.get_running_loop().create_future()
        work = ChipWork(
            plan=plan,
            level_images=level_images,
            threshold=threshold,
            future=fut,
            deadline=deadline,
            target=target,
            hard=hard,
            want_focus=how.want_focus,
            promised=how.final and math.isfinite(hard),
        )
        self._lanes[priority].append(work)
        self._lane_pending[priority] += n
        metrics.QUEUE_DEPTH.set(self._pending)
        self._wakeup.set()
        return work

    @property
    def drain_rate(self) -> float:
        """Measured chips per second (0 until the first batch completes)."""
        return self._chips_per_s

    @property
    def admission_rate(self) -> float:
        """The drain rate admission by time plans with: the slowest second of the window among those mostly busy
        (at least half a second of batches), else the window's rate. A promise made at an average rate is broken
        whenever the next seconds run slower than average; this one holds unless they run slower than the slowest
        recent second."""
        buckets: dict[int, list[float]] = {}
        for done, rows, seconds in self._drained:
            b = buckets.setdefault(int(done), [0.0, 0.0])
            b[0] += rows
            b[1] += seconds
        busy = [chips / seconds for chips, seconds in buckets.values() if seconds >= 0.5]
        return min(busy) if busy else self._chips_per_s

    @property
    def planning_rate(self) -> float:
        """The rate admission by time plans with: the admission rate less ``admission_headroom``."""
        return self.admission_rate * (1.0 - self.config.admission_headroom)

    def queue_ahead_s(self, n: int, deadline: float, priority: Priority, arrival: float | None = None) -> float | None:
        """Seconds a new request of ``n`` chips would wait for other requests' chips on the lane's schedule (those
        served before it, by its target, at the planning rate) -- its own chips not counted, so a large image alone
        waits 0; None before the first batch has measured a rate."""
        rate = self.planning_rate
        if rate <= 0:
            return None
        target, _, _ = self._targets(n, deadline, arrival)
        return self.chips_ahead(n, target, priority) / rate

    def note_finish(self, seconds: float, chips: int = 1) -> None:
        """A request of ``chips`` chips took ``seconds`` from its last chip to its reply (postprocess, merge):
        admission by time keeps that much of the bound for each request, in proportion to its chips (a large image
        has more boxes to merge; a moving average per chip)."""
        self._finish_per_chip = self._smoothed(self._finish_per_chip, max(seconds, 0.0) / max(chips, 1))

    def _finish(self, n: int) -> float:
        """Seconds a request of ``n`` chips is expected to take from its last chip to its reply."""
        return n * self._finish_per_chip

    def _smoothed(self, average: float, sample: float) -> float:
        """The moving average (``drain_smoothing``) of the merge time; the first sample as is."""
        a = self.config.drain_smoothing
        return sample if average == 0 else (1 - a) * average + a * sample

    def chips_ahead(self, n: int, deadline: float, priority: Priority) -> int:
        """Chips the schedule serves before a new request of ``n`` chips completes (its own excluded).

        Higher lanes first; within the lane: ``fifo`` everything queued, ``edf`` what has an earlier or equal
        target (``deadline`` is the newcomer's target there), ``fair`` each queued request's chips up to ``n``
        (round robin ends a request's turns with its last chip); plus the chips of batches already running."""
        ahead = sum(s.stop - s.start for b in self._running for s in b)
        for lane_priority in PRIORITIES:
            if lane_priority != priority:
                ahead += self._lane_pending[lane_priority] + self._reserved_chips(lane_priority)
                continue
            waiting: list[ChipWork | Reservation] = [*self._lanes[priority], *self._reserved[priority]]
            if self.config.schedule == "fifo":
                ahead += sum(w.remaining for w in waiting)
            elif self.config.schedule == "edf":
                ahead += sum(w.remaining for w in waiting if w.target <= deadline)
            else:
                ahead += sum(min(w.remaining, n) for w in waiting)
            break
        return ahead

    def estimated_wait(self, n: int, deadline: float = math.inf, priority: Priority = "interactive") -> float | None:
        """Seconds until a new request of ``n`` chips would complete, at the measured drain rate (None: no rate)."""
        if self._chips_per_s <= 0:
            return None
        return (self.chips_ahead(n, deadline, priority) + n) / self._chips_per_s

    def admit(
        self,
        n: int,
        deadline: float = math.inf,
        priority: Priority = "interactive",
        arrival: float | None = None,
        target_chips: int | None = None,
    ) -> Reservation:
        """Refuse (``QueueFull``) now what ``submit`` would refuse by time -- before the caller decodes the image.
        Admitted: its :class:`Reservation` holds its place (``n`` chips) until its submissions (pass it in
        ``Submission``) or :meth:`release`, and its target (edf: sized by ``target_chips``, default ``n``; a focus
        run reserves the chips it is expected to run and is sized by its whole pyramid) for all its submissions."""
        target, hard, by_bound = self._targets(target_chips or n, deadline, arrival)
        self._admit_by_time(n, target, hard, priority, by_bound)
        reservation = Reservation(n, target, hard, priority, by_bound)
        self._reserved[priority].append(reservation)
        return reservation

    def release(self, reservation: Reservation) -> None:
        """Drop a reservation (its request was submitted, failed or was cancelled); releasing twice is harmless."""
        with contextlib.suppress(ValueError):
            self._reserved[reservation.priority].remove(reservation)

    def _reserved_chips(self, priority: Priority) -> int:
        return sum(r.n for r in self._reserved[priority])

    def _targets(self, n: int, deadline: float, arrival: float | None = None) -> tuple[float, float, bool]:
        """(target, hard deadline, whether the queueing bound rather than the client's deadline sets it) of a new
        request of ``n`` chips with the client's ``deadline``."""
        now = time.monotonic()
        bound = self.config.max_queue_wait_s
        start = now if arrival is None else min(arrival, now)
        by_bound = bound is not None and start + bound < deadline
        # the chips must be done early enough for the request's merge and reply (measured) to fit too
        hard = (start + bound if bound is not None and by_bound else deadline) - self._finish(n)
        if self.config.schedule != "edf" or self._chips_per_s <= 0:
            return hard, hard, by_bound
        own = n / self._chips_per_s
        return min(hard, start + self.config.edf_stretch * own + self.config.edf_slack_s), hard, by_bound

    def _admit_by_time(self, n: int, target: float, hard: float, priority: Priority, by_bound: bool) -> None:
        """Refuse at once (503) what cannot complete by its hard deadline (see the module docstring)."""
        rate = self.planning_rate
        if rate <= 0:
            return
        now = time.monotonic()
        schedule = self._edf_schedule(priority, now, rate) if self.config.schedule == "edf" else None
        if schedule is not None:
            own_done, late_until = schedule.check(n / rate, target)
        else:
            own_done, late_until = now + (self.chips_ahead(n, target, priority) + n) / rate, now
        metrics.QUEUE_ESTIMATED_WAIT.set(own_done - now)
        if own_done <= hard and late_until <= now:
            return
        if not by_bound and now + n / rate > hard:  # not even an empty queue would do: retrying cannot help
            raise DeadlineExceeded(
                f"the request's deadline ({hard - now + self._finish(n):.3f} s) is shorter than its own {n} chips "
                f"take at {rate:.0f} chips/s plus its merge ({self._finish(n) * 1000:.0f} ms)"
            )
        # Retry when it would fit: the same request sent ``retry_s`` later (its target and hard deadline that much
        # later, the queue that much drained) would be admitted -- under edf found on the schedule itself.
        if schedule is not None:
            retry_s = schedule.retry_after(n / rate, target, hard)
        else:
            retry_s = max(own_done - hard, n / rate) / self._speedup(rate)
        bound = self.config.max_queue_wait_s
        what = f"the queueing bound of {bound:g} s" if by_bound else f"the request's deadline ({hard - now:.1f} s)"
        if own_done <= hard:
            what = "the deadlines of requests it would delay"
        raise QueueFull(
            f"estimated completion in {own_done - now:.1f} s ({n} chips at {rate:.0f} chips/s) would miss {what}",
            retry_after_s=retry_s,
        )

    def _edf_schedule(self, priority: Priority, now: float, rate: float) -> EdfSchedule:
        """The lane's projected schedule in target order at ``rate`` chips/s, after what runs or is queued in
        higher lanes."""
        head = now + sum(s.stop - s.start for b in self._running for s in b) / rate
        for lane_priority in PRIORITIES:  # higher lanes are served first
            if lane_priority == priority:
                break
            head += (self._lane_pending[lane_priority] + self._reserved_chips(lane_priority)) / rate
        waiting: list[ChipWork | Reservation] = [*self._lanes[priority], *self._reserved[priority]]
        order = sorted(waiting, key=lambda w: (w.target, w.enqueued))
        done = head + np.cumsum(np.array([w.remaining for w in order], np.float64) / rate)
        targets = np.array([w.target for w in order], np.float64)
        hards = np.array([w.hard for w in order], np.float64)
        return EdfSchedule(now, head, targets, hards, done, self._speedup(rate))

    def _speedup(self, rate: float) -> float:
        """How much faster than ``rate`` (the admission rate) the queue drains: the measured rate over it, >= 1."""
        return max(self._chips_per_s / rate, 1.0)

    # ---- the loop --------------------------------------------------------------------------
    def _drop_dead(self) -> None:
        """Remove cancelled or expired requests from the queue, releasing their chips."""
        now = time.monotonic()
        for priority, lane in self._lanes.items():
            kept: collections.deque[ChipWork] = collections.deque()
            for work in lane:
                if not work.dropped and now >= work.deadline:
                    work.future.set_exception(
                        DeadlineExceeded("deadline passed while queued; chips dropped before inference")
                    )
                    metrics.REJECTIONS.labels(reason="deadline").inc()
                if work.dropped:
                    self._lane_pending[priority] -= work.remaining
                    continue
                kept.append(work)
            self._lanes[priority] = kept
        metrics.QUEUE_DEPTH.set(self._pending)

    def _take_batch(self) -> list[_Slice]:
        """Up to ``max_batch`` chips, interactive lane first; within a lane by ``config.schedule``."""
        slices: list[_Slice] = []
        rows = 0
        now = time.monotonic()
        quantum = self.config.fair_quantum if self.config.schedule == "fair" else self.max_batch
        for priority in PRIORITIES:
            lane = self._lanes[priority]
            if self.config.schedule == "edf" and len(lane) > 1:
                self._lanes[priority] = lane = collections.deque(sorted(lane, key=lambda w: (w.target, w.enqueued)))
            while lane and rows < self.max_batch:
                work = lane[0]
                take = min(work.remaining, self.max_batch - rows, quantum)
                if slices and slices[-1].work is work:  # its turn came round again within this batch
                    slices[-1].stop += take
                else:
                    slices.append(_Slice(work, work.cursor, work.cursor + take, rows))
                work.cursor += take
                rows += take
                self._lane_pending[priority] -= take
                metrics.QUEUE_WAIT.inc(take * (now - work.enqueued))
                if work.started is None:
                    work.started = now
                    work.timings["queue_wait"] = work.started - work.enqueued
                if work.remaining == 0:
                    lane.popleft()
                elif self.config.schedule == "fair":
                    lane.rotate(-1)  # next turn to the next request
        metrics.QUEUE_DEPTH.set(self._pending)
        return slices

    async def _run(self) -> None:
        while True:
            if not self._queued():
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait out the batching window, measured from the oldest queued chip's arrival.
            oldest = min(lane[0].enqueued for lane in self._lanes.values() if lane)
            window_end = oldest + self.config.max_delay_ms / 1000
            while self._pending < self.max_batch and (now := time.monotonic()) < window_end and not self._closing:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), window_end - now)
                except TimeoutError:
                    break
            await self._slots.acquire()
            self._drop_dead()
            slices = self._take_batch()
            if not slices:
                self._slots.release()
                continue
            buffer = self._buffers.pop()
            task = asyncio.create_task(self._run_batch(slices, buffer))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run_batch(self, slices: list[_Slice], buffer: Any) -> None:
        loop = asyncio.get_running_loop()
        rows = sum(s.stop - s.start for s in slices)
        started = time.monotonic()
        self._running.append(slices)
        try:
            t0 = time.perf_counter()
            thresholds, staged = await loop.run_in_executor(self._prep_pool, self._fill, slices, buffer)
            t1 = time.perf_counter()
            outputs = await asyncio.wait_for(
                loop.run_in_executor(self._engine_pool, self.staging.infer, staged),
                self.config.infer_timeout_s,
            )
            t2 = time.perf_counter()
            dets, focus = await loop.run_in_executor(self._prep_pool, self._decode, outputs, thresholds)
        except Exception as exc:  # noqa: BLE001 - any engine failure must fail only this batch
            metrics.ENGINE_ERRORS.inc()
            if isinstance(exc, TimeoutError):
                # The hung call still holds the engine thread and reads this buffer: abandon both.
                self._engine_pool.shutdown(wait=False)
                self._engine_pool = ThreadPoolExecutor(1, thread_name_prefix="snipserve-engine")
                buffer = self.staging.new_buffer(self.max_batch)
            reason = "timed out" if isinstance(exc, TimeoutError) else f"failed: {type(exc).__name__}: {exc}"
            log.error("engine call on %d chips %s", rows, reason)
            err = EngineError(f"inference {'timed out' if isinstance(exc, TimeoutError) else 'failed'}")  # no exc text
            for s in slices:
                if not s.work.future.done():
                    s.work.future.set_exception(err)
            return
        finally:
            self._running.remove(slices)
            self._buffers.append(buffer)
            self._slots.release()
            self._wakeup.set()
        self._account(rows, started)
        metrics.INFER_SECONDS.inc(rows * (t2 - t1))
        self._distribute(slices, dets, focus, t1 - t0, t2 - t1)

    def _decode(self, outputs: list[np.ndarray], thresholds: np.ndarray) -> tuple[ChipDetections, np.ndarray | None]:
        """The adapter on the detector's outputs (worker thread); the focus map, when the model has one, apart."""
        det_outputs, focus = split_outputs(outputs, self.engine.card)
        return self.adapter(det_outputs, self.engine.card, thresholds), focus

    def _fill(self, slices: list[_Slice], buffer: Any) -> tuple[np.ndarray, Any]:
        """Stage the batch's chips (worker thread): per-row score thresholds, and what ``staging.infer`` takes."""
        thresholds = np.empty(sum(s.stop - s.start for s in slices), np.float32)
        parts = []
        for s in slices:
            parts.append(BatchPart(s.work.level_images, s.work.plan.chips[s.start : s.stop], s.row))
            thresholds[s.row : s.row + s.stop - s.start] = s.work.threshold
        return thresholds, self.staging.fill(parts, buffer)

    def _account(self, rows: int, started: float) -> None:
        metrics.BATCH_SIZE.observe(rows)
        metrics.BATCH_FILL.observe(rows / self.max_batch)
        metrics.CHIPS.inc(rows)
        # Drain rate on the wall clock: this batch's chips over the time since the previous batch completed -- with
        # overlapping batches that is the rate the queue empties at. A gap before this batch started counts only
        # if chips were waiting when the previous one completed: then it is the service's own delay (an event loop
        # busy with HTTP, decoding, merging), which admission must see; after an idle queue it is not.
        now = time.monotonic()
        since = self._last_done if self._backlogged else max(self._last_done, started)
        self._last_done = now
        self._backlogged = self._queued() or bool(self._running)
        # Chips over seconds of the recent batches together (a ratio of sums: the mean of per-batch rates would be
        # biased high, and a few fast batches would read as capacity that is not there).
        window = self._drained
        window.append((now, rows, max(now - since, 1e-6)))
        while len(window) > 1 and window[0][0] < now - self.config.drain_window_s:
            window.popleft()
        self._chips_per_s = sum(r for _, r, _ in window) / sum(t for _, _, t in window)
        metrics.QUEUE_DRAIN_RATE.set(self._chips_per_s)

    def _distribute(
        self, slices: list[_Slice], dets: ChipDetections, focus: np.ndarray | None, crop_s: float, infer_s: float
    ) -> None:
        for s in slices:
            work = s.work
            n = s.stop - s.start
            if work.future.done():
                continue
            if focus is not None and work.want_focus:
                if work.focus is None:
                    work.focus = np.zeros((work.plan.num_chips, *focus.shape[2:]), np.float32)
                work.focus[s.start : s.stop] = focus[s.row : s.row + n, 0]
            rows = (dets.chip >= s.row) & (dets.chip < s.row + n)
            part = dets.select(rows)
            # batch rows -> the request's own chip indices
            work.parts.append(ChipDetections(part.chip - s.row + s.start, part.boxes, part.scores, part.classes))
            work.timings["crop"] += crop_s * n / max(1, sum(x.stop - x.start for x in slices))
            work.timings["infer"] += infer_s
            work.done += n
            if work.done == work.plan.num_chips:
                if work.promised:
                    metrics.ADMISSION_LATENESS.observe(time.monotonic() - work.hard)
                work.future.set_result(ChipDetections.concat(work.parts))
