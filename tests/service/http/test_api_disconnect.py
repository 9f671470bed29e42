"""A /v1/detect client that disconnects has its queued chips dropped (never inferred)."""

from __future__ import annotations

import asyncio

import httpx

from service.engines.fake import FakeEngine
from tests.service.live_server import app_state, await_until, blob_image, png, serve_in_loop

RED = (40, 40, 70, 70, "red")


async def test_detect_disconnect_drops_queued_chips() -> None:
    from service.http.app import create_app
    from service.settings import Settings

    engine = FakeEngine(max_batch=2, delay=0.2)
    app = create_app(Settings(engine="fake", warmup=False, max_batch=2), engine_factory=lambda s: engine)
    big = png(blob_image((1024, 1024), [RED]))  # 64 chips at scale 1 + 1 coarse chip for the fake card
    async with serve_in_loop(app) as base:
        state = app_state(app)
        async with httpx.AsyncClient(base_url=base, timeout=20) as client:
            task = asyncio.create_task(client.post("/v1/detect", content=big, headers={"content-type": "image/png"}))
            assert await await_until(lambda: state.batcher is not None and state.batcher.queue_depth > 10)
            task.cancel()  # the client goes away: httpx closes the connection
            await asyncio.gather(task, return_exceptions=True)
        assert await await_until(lambda: state.batcher is not None and state.batcher.queue_depth == 0)
        assert await await_until(lambda: state.in_flight == 0)
        await asyncio.sleep(0.5)
        inferred = sum(engine.calls)
        assert inferred < 20, f"{inferred} chips inferred after the client left; most should have been dropped"
