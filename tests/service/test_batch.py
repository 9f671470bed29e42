"""Dynamic batcher: shared batches, cancellation, error isolation, overflow, deadlines, hangs."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest

from service.adapters import get_adapter
from service.batch import Batcher, BatcherConfig
from service.crop import Normalizer
from service.engines.fake import FAKE_CARD, FakeEngine
from service.errors import DeadlineExceeded, EngineError, QueueFull
from service.plan import LevelSpec, PlanConfig, plan


def make_batcher(engine: FakeEngine, **cfg: float) -> Batcher:
    config = BatcherConfig(**({"max_batch": 8, "max_delay_ms": 30.0} | cfg))
    return Batcher(engine, get_adapter(engine.card), Normalizer.from_card(engine.card), config)


def work_for(n_chips: int, marker: int = 128):
    """A plan of ``n_chips`` chips at scale 1 over a grey image whose pixel value is ``marker``."""
    c = FAKE_CARD.input_size
    image = np.full((c, c * n_chips, 3), marker, np.uint8)
    p = plan((c * n_chips, c), PlanConfig(chip_size=c, levels=(LevelSpec(scale=1.0, overlap=0.0),)))
    assert p.num_chips == n_chips
    return p, [image]


async def test_requests_share_batches() -> None:
    engine = FakeEngine(max_batch=8)
    b = make_batcher(engine)
    await b.start()
    try:
        works = [await b.submit(*work_for(3), threshold=0.5) for _ in range(2)]
        await asyncio.gather(*(w.future for w in works))
        assert engine.calls == [6]  # both requests' chips in one engine call
    finally:
        await b.stop()


async def test_batch_closes_at_max_batch() -> None:
    engine = FakeEngine(max_batch=4)
    b = make_batcher(engine, max_batch=4, max_delay_ms=10_000)  # a window that would never close by time
    await b.start()
    try:
        w = await b.submit(*work_for(8), threshold=0.5)
        await asyncio.wait_for(w.future, 5)
        assert engine.calls == [4, 4]
    finally:
        await b.stop()


async def test_batch_closes_after_max_delay() -> None:
    engine = FakeEngine(max_batch=8)
    b = make_batcher(engine, max_delay_ms=50)
    await b.start()
    try:
        t0 = time.monotonic()
        w = await b.submit(*work_for(1), threshold=0.5)
        await asyncio.wait_for(w.future, 5)
        assert engine.calls == [1]
        assert time.monotonic() - t0 >= 0.045
    finally:
        await b.stop()


async def test_cancelled_request_chips_are_dropped() -> None:
    gate = threading.Event()
    engine = FakeEngine(max_batch=2, fail=lambda batch: gate.wait(5) and None)
    b = make_batcher(engine, max_batch=2, max_delay_ms=0, pipeline_depth=1)
    await b.start()
    try:
        first = await b.submit(*work_for(2), threshold=0.5)  # occupies the engine
        await asyncio.sleep(0.05)
        victim = await b.submit(*work_for(6), threshold=0.5)
        assert b.queue_depth == 6
        victim.future.cancel()
        gate.set()
        await asyncio.wait_for(first.future, 5)
        await asyncio.sleep(0.1)
        assert sum(engine.calls) == 2  # the cancelled request's chips never reached the engine
        assert b.queue_depth == 0
    finally:
        gate.set()
        await b.stop()


async def test_engine_error_fails_only_its_batch() -> None:
    def fail(batch: np.ndarray) -> None:  # fails batches holding a chip of pixel value 7
        if (np.abs(batch.reshape(batch.shape[0], -1).mean(axis=1) - 7 / 255) < 1e-4).any():
            raise RuntimeError("boom")

    engine = FakeEngine(max_batch=2, fail=fail)
    b = make_batcher(engine, max_batch=2, max_delay_ms=0)
    await b.start()
    try:
        bad = await b.submit(*work_for(2, marker=7), threshold=0.5)
        good = await b.submit(*work_for(2, marker=100), threshold=0.5)
        with pytest.raises(EngineError, match="^inference failed$"):  # "boom" is logged, not returned
            await asyncio.wait_for(bad.future, 5)
        await asyncio.wait_for(good.future, 5)  # the next batch is unaffected
    finally:
        await b.stop()


async def test_queue_overflow_rejects_with_retry_after() -> None:
    gate = threading.Event()
    engine = FakeEngine(max_batch=2, fail=lambda batch: gate.wait(5) and None)
    b = make_batcher(engine, max_batch=2, max_delay_ms=0, queue_capacity=5, pipeline_depth=1)
    await b.start()
    try:
        running = await b.submit(*work_for(2), threshold=0.5)
        await asyncio.sleep(0.05)
        queued = await b.submit(*work_for(4), threshold=0.5)
        with pytest.raises(QueueFull) as info:
            await b.submit(*work_for(2), threshold=0.5)
        assert "capacity 5" in info.value.message and int(info.value.headers["Retry-After"]) >= 1
        gate.set()
        await asyncio.wait_for(asyncio.gather(running.future, queued.future), 5)  # accepted work is not lost
    finally:
        gate.set()
        await b.stop()


async def test_expired_chips_dropped_before_inference() -> None:
    gate = threading.Event()
    engine = FakeEngine(max_batch=2, fail=lambda batch: gate.wait(5) and None)
    b = make_batcher(engine, max_batch=2, max_delay_ms=0, pipeline_depth=1)
    await b.start()
    try:
        running = await b.submit(*work_for(2), threshold=0.5)
        await asyncio.sleep(0.05)
        late = await b.submit(*work_for(4), threshold=0.5, deadline=time.monotonic() + 0.05)
        await asyncio.sleep(0.1)
        gate.set()
        await asyncio.wait_for(running.future, 5)
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(late.future, 5)
        assert sum(engine.calls) == 2
    finally:
        gate.set()
        await b.stop()


async def test_hung_engine_times_out_and_service_recovers() -> None:
    release = threading.Event()
    calls = {"n": 0}

    def hang_once(batch: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            release.wait(10)

    engine = FakeEngine(max_batch=2, fail=hang_once)
    b = make_batcher(engine, max_batch=2, max_delay_ms=0, infer_timeout_s=0.2)
    await b.start()
    try:
        hung = await b.submit(*work_for(2), threshold=0.5)
        with pytest.raises(EngineError, match="timed out"):
            await asyncio.wait_for(hung.future, 5)
        ok = await b.submit(*work_for(2), threshold=0.5)
        await asyncio.wait_for(ok.future, 5)  # a fresh engine thread serves the next batch
    finally:
        release.set()
        await b.stop()


async def test_results_map_back_to_each_requests_chips() -> None:
    engine = FakeEngine(max_batch=8)
    b = make_batcher(engine)
    await b.start()
    try:
        p1, imgs1 = work_for(3)
        imgs1[0][10:20, 128 * 2 + 5 : 128 * 2 + 15] = (255, 0, 0)  # a red blob in chip 2 of request 1
        p2, imgs2 = work_for(2)
        imgs2[0][30:40, 5:25] = (0, 0, 255)  # a blue blob in chip 0 of request 2
        w1 = await b.submit(p1, imgs1, threshold=0.5)
        w2 = await b.submit(p2, imgs2, threshold=0.5)
        d1, d2 = await asyncio.gather(w1.future, w2.future)
        assert d1.chip.tolist() == [2] and d1.classes.tolist() == [0]
        np.testing.assert_allclose(d1.boxes, [[5, 10, 15, 20]])
        assert d2.chip.tolist() == [0] and d2.classes.tolist() == [2]
        assert w1.timings["queue_wait"] >= 0 and w1.timings["infer"] > 0
        assert math.isinf(w1.deadline)
    finally:
        await b.stop()


def test_pipeline_depth_defaults_by_device() -> None:
    """Overlap crop with inference only where inference has its own device (see BatcherConfig)."""
    cpu = FakeEngine()
    assert make_batcher(cpu).depth == 1
    gpu = FakeEngine()
    gpu.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert make_batcher(gpu).depth == 2
    assert make_batcher(cpu, pipeline_depth=3).depth == 3


async def test_time_counters_add_chip_seconds_queued_and_in_inference() -> None:
    from service import metrics

    delay = 0.05
    engine = FakeEngine(max_batch=2, delay=delay)
    b = make_batcher(engine, max_batch=2, max_delay_ms=0, pipeline_depth=1)
    wait0, infer0 = metrics.QUEUE_WAIT._value.get(), metrics.INFER_SECONDS._value.get()
    await b.start()
    try:
        # 6 chips, 2 per call, one call at a time: chips wait 0, ~1 and ~2 engine calls (2 chips each).
        w = await b.submit(*work_for(6), threshold=0.5)
        await asyncio.wait_for(w.future, 5)
    finally:
        await b.stop()
    assert engine.calls == [2, 2, 2]
    waited = metrics.QUEUE_WAIT._value.get() - wait0
    inferred = metrics.INFER_SECONDS._value.get() - infer0
    assert inferred >= 6 * delay  # each chip adds the duration of its own engine call
    assert 2 * (1 + 2) * delay <= waited < inferred * 2  # queued behind 1 and 2 earlier calls
