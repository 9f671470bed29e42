"""Scheduling and admission by time: fair round robin, earliest deadline first, refusal with Retry-After."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from service.batch import Batcher, EdfSchedule, Submission
from service.engines.fake import FakeEngine
from service.errors import QueueFull
from tests.service.test_batch import make_batcher, work_for


async def completion_order(schedule: str, sizes: list[int], deadlines: list[float] | None = None) -> list[int]:
    """Submit requests of ``sizes`` chips at once (batch of 2 chips per engine call); indices in completion order."""
    engine = FakeEngine(max_batch=2)
    b = make_batcher(engine, max_batch=2, max_delay_ms=0.0, schedule=schedule, fair_quantum=1)
    done: list[int] = []
    await b.start()
    try:
        now = time.monotonic()
        works = []
        for i, n in enumerate(sizes):
            dl = math.inf if deadlines is None else now + deadlines[i]
            works.append(await b.submit(*work_for(n), threshold=0.5, deadline=dl))
        for i, w in enumerate(works):
            w.future.add_done_callback(lambda _f, i=i: done.append(i))
        await asyncio.wait_for(asyncio.gather(*(w.future for w in works)), 10)
        await asyncio.sleep(0)
    finally:
        await b.stop()
    return done


async def test_fair_lets_a_small_request_pass_a_large_one() -> None:
    assert await completion_order("fifo", [12, 1, 1]) == [0, 1, 2]
    assert (await completion_order("fair", [12, 1, 1]))[-1] == 0  # the small ones finish first


async def test_fair_round_robin_interleaves_chips() -> None:
    engine = FakeEngine(max_batch=3)
    b = make_batcher(engine, max_batch=3, max_delay_ms=50.0, schedule="fair", fair_quantum=1)
    await b.start()
    try:
        works = [await b.submit(*work_for(n), threshold=0.5) for n in (4, 4, 4)]
        await asyncio.wait_for(asyncio.gather(*(w.future for w in works)), 10)
        # every batch of 3 took one chip of each request (the window collects all three submissions first)
        assert engine.calls == [3, 3, 3, 3]
        assert all(w.future.result() is not None for w in works)
    finally:
        await b.stop()


async def test_edf_serves_the_earliest_deadline_first() -> None:
    assert await completion_order("edf", [6, 6, 2], deadlines=[30.0, 5.0, 60.0]) == [1, 0, 2]


async def measured(b: Batcher, chips: int = 16) -> None:
    w = await b.submit(*work_for(chips), threshold=0.5)
    await asyncio.wait_for(w.future, 10)
    assert b.drain_rate > 0


async def test_refuses_at_once_beyond_the_queueing_bound_with_retry_after_from_the_drain_rate() -> None:
    engine = FakeEngine(max_batch=4, delay=0.02)
    b = make_batcher(engine, max_batch=4, max_delay_ms=0.0, max_queue_wait_s=1.0, schedule="fifo")
    await b.start()
    try:
        await measured(b)
        rate = b.drain_rate
        backlog = int(rate * 3)  # about three seconds of work
        assert b.estimated_wait(backlog) is not None
        big = await b.submit(*work_for(backlog), threshold=0.5, how=Submission(continuation=True))  # bound not applied
        t0 = time.monotonic()
        with pytest.raises(QueueFull) as info:
            await b.submit(*work_for(4), threshold=0.5)
        assert time.monotonic() - t0 < 0.05  # refused at once, not after queueing
        wait = b.estimated_wait(4)
        assert wait is not None and wait > 1.0
        retry = int(info.value.headers["Retry-After"])
        assert retry == max(1, math.ceil(max(wait - 1.0, 4 / b.drain_rate))) or abs(retry - (wait - 1.0)) <= 1
        precise = info.value.retry_after_s  # the sub-second hint behind the whole-second header
        assert precise is not None and retry == max(1, math.ceil(precise)) and abs(precise - (wait - 1.0)) < 0.5
        assert "queueing bound" in info.value.message
        big.future.cancel()
    finally:
        await b.stop()


async def test_refuses_what_cannot_finish_within_its_deadline() -> None:
    engine = FakeEngine(max_batch=4, delay=0.02)
    b = make_batcher(engine, max_batch=4, max_delay_ms=0.0, schedule="fifo")
    await b.start()
    try:
        await measured(b)
        big = await b.submit(*work_for(int(b.drain_rate * 3)), threshold=0.5)
        with pytest.raises(QueueFull, match="deadline"):
            await b.submit(*work_for(4), threshold=0.5, deadline=time.monotonic() + 0.5)
        ok = await b.submit(*work_for(1), threshold=0.5, deadline=time.monotonic() + 60)  # fits: admitted
        assert not ok.future.done()
        big.future.cancel()
        ok.future.cancel()
    finally:
        await b.stop()


async def test_fair_admits_a_small_request_behind_a_backlog_that_fifo_refuses() -> None:
    for schedule, admitted in (("fair", True), ("fifo", False)):
        engine = FakeEngine(max_batch=4, delay=0.02)
        b = make_batcher(engine, max_batch=4, max_delay_ms=0.0, schedule=schedule, max_queue_wait_s=1.0)
        await b.start()
        try:
            await measured(b)
            big = await b.submit(*work_for(int(b.drain_rate * 3)), threshold=0.5, how=Submission(continuation=True))
            try:
                small = await b.submit(*work_for(2), threshold=0.5)
            except QueueFull:
                assert not admitted, schedule
            else:
                assert admitted, schedule
                await asyncio.wait_for(small.future, 2.0)  # served alongside the backlog, long before it drains
                assert not big.future.done()
            big.future.cancel()
        finally:
            await b.stop()


def test_drain_rate_is_chips_over_wall_clock_between_completions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chips over busy seconds of the recent window's batches together; a gap between batches counts unless the
    queue was empty when the previous one completed."""
    engine = FakeEngine(max_batch=8)
    b = make_batcher(engine, drain_window_s=1.0)
    clock = [100.0]
    monkeypatch.setattr("service.batch.time.monotonic", lambda: clock[0])
    b._account(8, started=99.9)  # first batch after idle: 8 chips in 0.1 s of its own
    assert b.drain_rate == pytest.approx(80.0)
    clock[0] = 100.2
    b._account(8, started=99.95)  # overlapped the previous batch: 8 chips since its completion (0.2 s)
    assert b.drain_rate == pytest.approx(16 / 0.3)  # a ratio of sums, not the mean of 80 and 40
    assert b.estimated_wait(10) == pytest.approx(10 / (16 / 0.3))
    clock[0] = 101.0
    b._account(6, started=100.9)  # after an idle gap: only its own 0.1 s counts
    assert b.drain_rate == pytest.approx(22 / 0.4)
    monkeypatch.setattr(b, "_queued", lambda: True)  # chips wait from here on
    clock[0] = 101.1
    b._account(6, started=101.0)  # completed with a backlog; the window drops the batches before 100.1
    assert b.drain_rate == pytest.approx(20 / 0.4)
    clock[0] = 101.5
    b._account(6, started=101.4)  # the loop started it 0.3 s after the last completion: 6 chips in 0.4 s
    assert b.drain_rate == pytest.approx(18 / 0.6)


async def test_edf_targets_follow_the_requests_own_size() -> None:
    engine = FakeEngine(max_batch=2, delay=0.01)
    b = make_batcher(engine, max_batch=2, max_delay_ms=0.0, schedule="edf")
    await b.start()
    try:
        await measured(b, chips=8)
        big = await b.submit(*work_for(30), threshold=0.5)
        small = await b.submit(*work_for(2), threshold=0.5)
        assert small.target < big.target  # its own service time is shorter
        await asyncio.wait_for(small.future, 5)
        assert not big.future.done()  # the small request did not wait for the large one ahead of it
        await asyncio.wait_for(big.future, 10)
    finally:
        await b.stop()


async def test_edf_refuses_a_request_that_would_push_an_admitted_one_late() -> None:
    engine = FakeEngine(max_batch=4, delay=0.02)
    b = make_batcher(engine, max_batch=4, max_delay_ms=0.0, schedule="edf", max_queue_wait_s=60.0)
    await b.start()
    try:
        await measured(b)
        rate = b.drain_rate
        # an admitted request with a hard deadline it just meets: ~2 s of chips, deadline 2.4 s away
        tight = await b.submit(*work_for(int(rate * 2)), threshold=0.5, deadline=time.monotonic() + 2.4)
        assert tight.hard < time.monotonic() + 2.4
        # a newcomer with an earlier target whose chips would make the tight one miss its deadline
        with pytest.raises(QueueFull, match="requests it would delay") as info:
            await b.submit(*work_for(int(rate * 1.0)), threshold=0.5, deadline=time.monotonic() + 1.5)
        retry = int(info.value.headers["Retry-After"])
        assert 1 <= retry <= 3  # until the tight request is done (about 2 s)
        tight.future.cancel()
    finally:
        await b.stop()


async def test_admission_keeps_the_measured_merge_time_inside_the_bound() -> None:
    """A request whose chips would finish just inside the bound is refused once replies are measured to take
    longer than the slack left: the bound covers the whole request, not only its chips."""
    engine = FakeEngine(max_batch=4, delay=0.02)
    b = make_batcher(engine, max_batch=4, max_delay_ms=0.0, max_queue_wait_s=1.0, schedule="fifo")
    await b.start()
    try:
        await measured(b)
        backlog = int(b.drain_rate * 0.5)  # about half a second of work ahead
        big = await b.submit(*work_for(backlog), threshold=0.5, how=Submission(continuation=True))
        b.release(b.admit(4))  # fits: ~0.5 s of chips inside the 1 s bound
        b.note_finish(0.8, 4)  # replies of 4-chip requests are measured to take 0.8 s after the last chip
        with pytest.raises(QueueFull, match="queueing bound") as info:
            b.admit(4)
        assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
        big.future.cancel()
    finally:
        await b.stop()


@pytest.mark.parametrize("schedule", ["edf", "fifo"])
async def test_requests_admitted_while_decoding_hold_their_place(schedule: str) -> None:
    """Admitted after the header probe, a request decodes before its chips are queued; meanwhile its reservation
    counts, so two arriving together cannot both take the same room. Released (failed decode) or submitted (its
    chips take its place), it no longer counts."""
    engine = FakeEngine(max_batch=4, delay=0.02)
    b = make_batcher(engine, max_batch=4, max_delay_ms=0.0, max_queue_wait_s=1.0, schedule=schedule)
    await b.start()
    try:
        await measured(b)
        n = int(b.drain_rate * 0.6)  # 0.6 s of chips: one fits the 1 s bound, two do not
        first = b.admit(n)
        with pytest.raises(QueueFull):
            b.admit(n)
        b.release(first)  # it failed to decode
        second = b.admit(n)
        work = await b.submit(*work_for(n), threshold=0.5, how=Submission(reservation=second))
        assert b.chips_ahead(1, math.inf, "interactive") <= n  # its chips, not its chips and its reservation
        await work.future
        b.release(second)  # already consumed: harmless
    finally:
        await b.stop()


async def test_a_deadline_too_short_even_for_an_empty_queue_is_504_not_503() -> None:
    """Retrying cannot help a request whose own chips take longer than its deadline: deadline_exceeded, not
    queue_full (whose Retry-After would invite the same refusal again)."""
    from service.errors import DeadlineExceeded

    engine = FakeEngine(max_batch=4, delay=0.02)
    b = make_batcher(engine, max_batch=4, max_delay_ms=0.0, schedule="edf")
    await b.start()
    try:
        await measured(b)
        n = int(b.drain_rate * 1.0)  # about a second of chips, with nothing queued
        with pytest.raises(DeadlineExceeded, match="shorter than its own"):
            b.admit(n, deadline=time.monotonic() + 0.05)
        b.admit(n, deadline=time.monotonic() + 30)  # a deadline it can meet: admitted
    finally:
        await b.stop()


def _feasible(s: EdfSchedule, own: float, target: float, hard: float, wait: float) -> bool:
    """Reference for :meth:`EdfSchedule.retry_after`, written as a simulation: ``wait`` later the queue has drained
    ``speedup x wait`` seconds of projected work from its front; the newcomer sent then joins the requests still
    queued in target order and everyone's completion is projected again from then; admitted iff it is on time and
    nobody behind it is late with it."""
    t = s.now + wait
    drained = s.speedup * wait

    def later(done: float) -> float:  # a projected completion, re-projected at the retry
        return t + (done - s.now) - drained

    queued = [(float(tg), float(h), later(d)) for tg, h, d in zip(s.targets, s.hards, s.done, strict=True)]
    queued = [q for q in queued if q[2] > t]
    before = [q for q in queued if q[0] <= target + wait]
    behind = [q for q in queued if q[0] > target + wait]
    start = before[-1][2] if before else max(t, later(s.head))
    if start + own > hard + wait + 1e-9:
        return False
    return all(d + own <= h + 1e-9 for _, h, d in behind)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0.0, 3.0), st.floats(0.01, 0.5), st.floats(0.0, 2.0)), min_size=0, max_size=12),
    st.floats(0.01, 0.5),
    st.floats(0.0, 3.0),
    st.floats(0.05, 3.0),
    st.sampled_from([1.0, 1.05, 1.3, 2.0]),
)
def test_retry_after_is_the_least_wait_that_would_be_admitted(
    queue: list[tuple[float, float, float]], own: float, target: float, bound: float, speedup: float
) -> None:
    """Queued requests (target, own seconds, slack of the hard deadline over the completion); the hint is a wait
    at which the newcomer would be admitted, and no shorter wait on a fine grid would do -- with the queue draining
    at the admission rate (speedup 1) or faster."""
    queue.sort()
    done = np.cumsum([q[1] for q in queue]) + 0.1  # 0.1 s of running chips ahead
    hards = done + np.array([q[2] - 0.3 for q in queue])  # some already late, some at risk, some safe
    s = EdfSchedule(0.0, 0.1, np.array([q[0] for q in queue]), hards, done, speedup)
    hard = bound + own
    assume(not _feasible(s, own, target, hard, 0.0))  # it is asked only of a refused newcomer
    wait = s.retry_after(own, target, hard)
    assert wait > 0
    # at the wait itself, or just after (float rounding of target + wait at a queued target's boundary)
    assert _feasible(s, own, target, hard, wait) or _feasible(s, own, target, hard, wait + 1e-7)
    grid = np.arange(0.0, wait - 0.001, 0.002)
    assert not any(_feasible(s, own, target, hard, float(w)) for w in grid)


def test_a_faster_drain_shortens_the_hint() -> None:
    """A request at risk only by a few milliseconds is relieved quickly when the queue drains 10 % faster than
    planned: the hint is that margin over the speed-up, not the wait until it completes."""
    done, hards = np.array([1.0, 6.0]), np.array([5.0, 6.01])  # the second has 10 ms of slack left
    planned = EdfSchedule(0.0, 0.1, np.array([0.5, 1.0]), hards, done, 1.0)
    faster = EdfSchedule(0.0, 0.1, np.array([0.5, 1.0]), hards, done, 1.1)
    own, target, hard = 0.02, 0.2, 8.0
    assert planned.retry_after(own, target, hard) == pytest.approx(0.8)  # passes its target (1.0 - 0.2)
    assert faster.retry_after(own, target, hard) == pytest.approx(0.01 / 0.1)


def test_admission_plans_with_the_slowest_busy_second(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine(max_batch=8)
    b = make_batcher(engine, drain_window_s=5.0)
    clock = [100.0]
    monkeypatch.setattr("service.batch.time.monotonic", lambda: clock[0])
    monkeypatch.setattr(b, "_queued", lambda: True)  # backlogged throughout: every gap counts
    assert b.admission_rate == 0.0
    clock[0] = 100.05
    b._account(8, started=100.0)
    assert b.admission_rate == b.drain_rate  # no second is mostly busy yet: the window's rate
    for k in range(1, 10):  # second 100: 10 batches of 8 chips in 0.1 s each (80 chips/s)
        clock[0] = 100.05 + 0.1 * k
        b._account(8, started=clock[0] - 0.1)
    for k in range(1, 6):  # second 101: 5 batches of 8 chips in 0.2 s each (40 chips/s)
        clock[0] = 100.95 + 0.2 * k
        b._account(8, started=clock[0] - 0.2)
    assert b.drain_rate == pytest.approx(120 / 1.95)
    assert b.admission_rate == pytest.approx(40.0)


async def test_a_focus_run_reserves_its_levels_and_each_level_takes_its_share() -> None:
    """A focus run is admitted for more chips than its first level and submits its levels one by one: each level's
    chips come out of the reservation, which keeps counting the rest until the last (or a release) ends it."""
    engine = FakeEngine(max_batch=4, delay=0.01)
    b = make_batcher(engine, max_batch=4, max_delay_ms=0.0, schedule="edf")
    await b.start()
    try:
        await measured(b)
        reservation = b.admit(10, target_chips=40)  # expected to run 10 of its pyramid's 40 chips
        first = await b.submit(*work_for(4), threshold=0.5, how=Submission(reservation=reservation))
        assert reservation.n == 6 and reservation in b._reserved["interactive"]  # the finer levels still count
        await first.future
        second = await b.submit(*work_for(6), threshold=0.5, how=Submission(continuation=True, reservation=reservation))
        assert reservation.n == 0 and reservation not in b._reserved["interactive"]
        # one target per request, set at admission and sized by the whole pyramid: the same level alone, queued
        # just after, gets an earlier one
        assert first.target == second.target == reservation.target
        alone = await b.submit(*work_for(6), threshold=0.5)
        assert alone.target < second.target
        sized = await b.submit(*work_for(6), threshold=0.5, how=Submission(target_chips=40))  # without a reservation
        assert sized.target > alone.target
        await asyncio.gather(second.future, alone.future, sized.future)
    finally:
        await b.stop()


async def test_brownout_waits_count_only_the_chips_ahead() -> None:
    """``queue_ahead_s`` (what brownout compares with its limit) is the wait for other requests' chips: a large image
    on an idle batcher waits 0 however long its own chips take; queued chips ahead of it count at the planning rate."""
    engine = FakeEngine(max_batch=2, delay=0.05)
    b = make_batcher(engine, max_batch=2, max_delay_ms=0.0, schedule="fifo")
    await b.start()
    try:
        await measured(b, chips=4)
        assert b.queue_ahead_s(10_000, math.inf, "interactive") == 0.0
        queued = await b.submit(*work_for(12), threshold=0.5)
        ahead = b.queue_ahead_s(10_000, math.inf, "interactive")
        assert ahead is not None and 0 < ahead <= 12 / b.planning_rate
        await queued.future
    finally:
        await b.stop()


def test_admission_plans_with_headroom_below_the_admission_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Admission by time plans at the admission rate less ``admission_headroom``: a request that fits the bound
    exactly at the admission rate is refused with 10 % held back, and admitted with none."""
    for headroom, admitted in ((0.0, True), (0.1, False)):
        b = make_batcher(FakeEngine(max_batch=8), max_queue_wait_s=1.0, schedule="fifo", admission_headroom=headroom)
        monkeypatch.setattr(Batcher, "admission_rate", property(lambda _self: 100.0))
        assert b.planning_rate == pytest.approx(100.0 * (1 - headroom))
        if admitted:
            b.admit(99)  # 0.99 s at 100 chips/s, within the 1 s bound
        else:
            with pytest.raises(QueueFull):
                b.admit(99)


async def test_lateness_against_the_promise_is_observed_once_per_request() -> None:
    """Each admitted request's chips, when done, are compared with the hard deadline admission held them to
    (``snipserve_admission_lateness_seconds``): once per request, at its final submission, a focus run's earlier
    levels not counted; a request with no deadline at all is not observed."""
    from service import metrics

    def sample(name: str, **labels: str) -> float:
        return metrics.REGISTRY.get_sample_value(f"snipserve_admission_lateness_seconds_{name}", labels) or 0.0

    engine = FakeEngine(max_batch=4, delay=0.01)
    b = make_batcher(engine, max_batch=4, max_delay_ms=0.0, schedule="edf", max_queue_wait_s=30.0)
    await b.start()
    try:
        await measured(b)
        count, early = sample("count"), sample("bucket", le="-10.0")
        reservation = b.admit(10, target_chips=40)
        first = await b.submit(*work_for(4), threshold=0.5, how=Submission(reservation=reservation, final=False))
        await first.future
        assert sample("count") == count and not first.promised
        how = Submission(continuation=True, reservation=reservation)
        last = await b.submit(*work_for(6), threshold=0.5, how=how)
        await last.future
        assert sample("count") == count + 1
        assert sample("bucket", le="-10.0") == early + 1  # done well inside the 30 s bound
    finally:
        await b.stop()
    unbounded = make_batcher(FakeEngine(max_batch=4), max_batch=4, max_delay_ms=0.0)
    await unbounded.start()
    try:
        work = await unbounded.submit(*work_for(2), threshold=0.5)
        await work.future
        assert not work.promised  # no bound, no deadline: nothing was promised
    finally:
        await unbounded.stop()
