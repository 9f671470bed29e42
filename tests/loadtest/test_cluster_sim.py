"""loadtest.cluster_sim: the engine table, the HPA control law, the balancer, and short runs of the real batcher."""

from __future__ import annotations

import asyncio

import pytest

from loadtest.cluster_sim import (
    Autoscaler,
    Balancer,
    Cluster,
    Latency,
    ReplicaConfig,
    ScalerConfig,
    poisson_trace,
    replay,
    request_plan,
)

TABLE = Latency({1: 0.002, 8: 0.009, 16: 0.017}, "test")


def test_latency_interpolates_and_extrapolates() -> None:
    assert TABLE(1) == 0.002 and TABLE(8) == 0.009
    assert TABLE(4) == pytest.approx(0.002 + 0.007 * 3 / 7)
    assert TABLE(24) == pytest.approx(0.025)  # beyond the table: the last segment's slope
    assert TABLE.chips_per_s(8) == pytest.approx(8 / 0.009)


def scaler(**cfg: float) -> Autoscaler:
    return Autoscaler(Cluster(TABLE, ReplicaConfig(), "round_robin", 1.0), ScalerConfig(**cfg))  # type: ignore[arg-type]


def test_hpa_law_tolerance_and_scale_up_policy() -> None:
    a = scaler(target=100, max_replicas=40)
    a.scraped = 2 * 100 * 1.05  # within 10 % of 2 replicas' target
    assert a.desired(2, 0.0) == 2
    a.scraped = 2 * 100 * 1.5
    assert a.desired(2, 15.0) == 3  # ceil(300 / 100)
    a.scraped = 5000.0
    assert a.desired(2, 30.0) == 10  # wants 50; +8 pods beats +200 % (6) per step
    assert a.desired(10, 45.0) == 30  # +200 % beats +8
    assert a.desired(30, 60.0) == 40  # capped at max_replicas


def test_hpa_scale_down_waits_for_the_window_and_goes_one_pod_a_minute() -> None:
    a = scaler(target=100, scale_down_window_s=300)
    a.scraped = 800.0
    assert a.desired(8, 0.0) == 8
    a.scraped = 0.0
    assert [a.desired(8, t) for t in (60.0, 150.0, 299.0)] == [8, 8, 8]  # 8 was recommended within 300 s
    assert a.desired(8, 301.0) == 7 and a.desired(7, 320.0) == 7  # then one pod per 60 s
    assert a.desired(7, 361.0) == 6


async def test_least_queue_routes_to_the_emptier_replica() -> None:
    cluster = Cluster(TABLE, ReplicaConfig(), "least_queue", 1.0)
    await cluster.add(0.0)
    await cluster.add(0.0)
    try:
        busy, idle = cluster.replicas
        work = await busy.batcher.submit(*request_plan(6), threshold=0.5)  # queued: no await since
        least, robin = Balancer("least_queue"), Balancer("round_robin")
        assert {least.pick(cluster.ready()) for _ in range(4)} == {idle}
        assert {robin.pick(cluster.ready()) for _ in range(4)} == {busy, idle}
        await work.future
    finally:
        await cluster.close()


async def test_overload_is_answered_200_or_503_with_retry_after() -> None:
    speed = 20.0  # 6 simulated seconds in 0.3 s
    cfg = ReplicaConfig(max_batch=8, queue_capacity=64)
    cluster = Cluster(TABLE, cfg, "round_robin", speed)
    await cluster.add(0.0)
    capacity = TABLE.chips_per_s(8) / 16  # requests/s of 16 chips
    await replay(cluster, poisson_trace([(6.0, 3 * capacity)], seed=1), 16)
    await cluster.close()
    statuses = {o.status for o in cluster.outcomes}
    assert statuses == {200, 503}
    assert all(o.retry_after for o in cluster.outcomes if o.status == 503)


async def test_autoscaler_adds_replicas_that_serve_after_their_start_up() -> None:
    speed = 20.0
    cluster = Cluster(TABLE, ReplicaConfig(max_batch=8, queue_capacity=256), "least_queue", speed)
    await cluster.add(0.0)
    autoscaler = Autoscaler(cluster, ScalerConfig(target=32, scrape_s=0.5, sync_s=1.0, pod_start_s=2.0))
    loops = [asyncio.create_task(autoscaler.scrape_loop()), asyncio.create_task(autoscaler.control_loop())]
    capacity = TABLE.chips_per_s(8) / 16
    try:
        await replay(cluster, poisson_trace([(8.0, 3 * capacity)], seed=2), 16, sample_s=0.5)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await cluster.close()
    pods = cluster.removed  # close() drained every replica
    added = [r for r in pods if r.ready_at > r.created]  # the autoscaler's (the first one was ready at once)
    assert len(added) >= 2  # scaled out under 3x overload
    served = [r for r in added if r.first_request is not None]
    assert served  # and the new pods took requests
    for r in added:
        assert (r.ready_at - r.created) * speed == pytest.approx(2.0, abs=0.05)  # pod_start_s
        assert r.first_request is None or r.first_request >= r.ready_at  # never routed to before ready
