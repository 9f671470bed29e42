"""WS /v1/stream and POST /v1/detect/batch against a live loopback server in the test's event loop."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets

from service.http.serving import State
from tests.service.live_server import app_state, await_until, blob_image, fake_app, png, serve_in_loop

RED = (40, 40, 70, 70, "red")
GREEN = (150, 40, 180, 70, "green")
BLUE = (40, 150, 70, 180, "blue")


def ws_url(base: str, query: str = "") -> str:
    return base.replace("http://", "ws://") + "/v1/stream" + (f"?{query}" if query else "")


def frame(n_boxes: int) -> bytes:
    return png(blob_image((256, 256), [RED, GREEN, BLUE][:n_boxes]))


async def recv_json(ws: Any) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), 10)
    reply: dict[str, Any] = json.loads(message)
    return reply


def stream_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("snipserve-stream")]


async def test_replies_in_order_with_metadata() -> None:
    async with serve_in_loop(fake_app()) as base, websockets.connect(ws_url(base, "window=3")) as ws:
        hello = await recv_json(ws)
        assert hello == {"type": "ready", "window": 3, "policy": "block", "model": "fake-rgb-blobs"}
        for i in range(6):
            await ws.send(json.dumps({"frame": i, "t": i * 0.5}))
            await ws.send(frame(i % 3 + 1))
        replies = [await recv_json(ws) for _ in range(6)]
    assert [r["seq"] for r in replies] == list(range(6))
    assert [r["meta"]["frame"] for r in replies] == list(range(6))
    assert [len(r["result"]["detections"]) for r in replies] == [i % 3 + 1 for i in range(6)]
    labels = {d["label"] for d in replies[2]["result"]["detections"]}
    assert labels == {"red", "green", "blue"}


async def test_bad_frame_is_an_error_reply_and_the_stream_stays_open() -> None:
    async with serve_in_loop(fake_app()) as base, websockets.connect(ws_url(base)) as ws:
        await recv_json(ws)
        await ws.send(frame(1))
        await ws.send(json.dumps({"frame": "broken"}))
        await ws.send(b"not an image at all")
        await ws.send("[1, 2]")  # metadata that is not an object: an error for the next frame
        await ws.send(frame(2))
        await ws.send(frame(3))
        replies = [await recv_json(ws) for _ in range(4)]
    assert [r["type"] for r in replies] == ["result", "error", "error", "result"]
    assert replies[1]["meta"] == {"frame": "broken"}
    assert replies[1]["error"]["status"] == 400 and replies[1]["error"]["code"] == "bad_image"
    assert replies[2]["error"]["code"] == "invalid_options" and "JSON object" in replies[2]["error"]["message"]
    assert len(replies[3]["result"]["detections"]) == 3


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("score_threshold=2", "score_threshold"),
        ("window=100000", "window"),
        ("policy=newest", "policy"),
        ("preset=nope", "nope"),
    ],
)
async def test_bad_connection_options_are_refused_with_a_message(query: str, needle: str) -> None:
    async with serve_in_loop(fake_app()) as base, websockets.connect(ws_url(base, query)) as ws:
        reply = await recv_json(ws)
        assert reply["type"] == "error" and reply["seq"] is None
        assert reply["error"]["status"] == 422 and needle in reply["error"]["message"]
        with pytest.raises(websockets.ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008


async def test_a_draining_replica_refuses_new_streams() -> None:
    app = fake_app()
    async with serve_in_loop(app) as base:
        app_state(app).draining = True  # what SIGTERM sets (service/cli/serve.py)
        async with websockets.connect(ws_url(base)) as ws:
            reply = await recv_json(ws)
            assert reply["type"] == "error" and reply["seq"] is None
            assert reply["error"]["status"] == 503 and reply["error"]["code"] == "not_ready"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013  # try again later (elsewhere)


async def track_in_flight(state: State, stop: asyncio.Event) -> int:
    """Largest number of detection requests in flight seen until ``stop``."""
    peak = 0
    while not stop.is_set():
        peak = max(peak, state.in_flight)
        await asyncio.sleep(0.002)
    return peak


async def test_block_policy_keeps_at_most_window_frames_in_flight() -> None:
    app = fake_app(delay=0.05)
    async with serve_in_loop(app) as base, websockets.connect(ws_url(base, "window=2")) as ws:
        await recv_json(ws)
        stop = asyncio.Event()
        peak = asyncio.create_task(track_in_flight(app_state(app), stop))
        for i in range(8):
            await ws.send(json.dumps({"frame": i}))
            await ws.send(frame(1))
        replies = [await recv_json(ws) for _ in range(8)]
        stop.set()
    assert [r["seq"] for r in replies] == list(range(8))
    assert all(r["type"] == "result" for r in replies)
    assert 1 <= await peak <= 2


async def test_drop_oldest_policy_cancels_and_counts_dropped_frames() -> None:
    app = fake_app(delay=0.2)
    async with serve_in_loop(app) as base, websockets.connect(ws_url(base, "window=2&policy=drop_oldest")) as ws:
        await recv_json(ws)
        stop = asyncio.Event()
        peak = asyncio.create_task(track_in_flight(app_state(app), stop))
        for i in range(6):
            await ws.send(json.dumps({"frame": i}))
            await ws.send(frame(1))
        replies = [await recv_json(ws) for _ in range(6)]
        stop.set()
        assert await await_until(lambda: app_state(app).batcher is not None and app_state(app).batcher.queue_depth == 0)
    assert [r["seq"] for r in replies] == list(range(6))
    assert [r["type"] for r in replies[-2:]] == ["result", "result"]
    dropped = [r for r in replies if r["type"] == "dropped"]
    assert len(dropped) == 4  # frames 0..3, each pushed out by a newer one
    assert dropped[-1]["dropped_total"] == 4 and dropped[0]["meta"] == {"frame": 0}
    assert await peak <= 2


async def test_disconnect_cancels_frames_and_releases_queued_chips() -> None:
    app = fake_app(delay=0.3, max_batch=2)
    big = png(blob_image((1024, 1024), [RED, GREEN]))  # dozens of chips per frame
    async with serve_in_loop(app) as base:
        state = app_state(app)
        async with websockets.connect(ws_url(base, "window=4")) as ws:
            await recv_json(ws)
            for _ in range(4):
                await ws.send(big)
            assert await await_until(lambda: state.batcher is not None and state.batcher.queue_depth > 0)
            assert stream_tasks()
        # the client is gone: every frame task ends, its chips leave the queue, nothing is in flight
        assert await await_until(lambda: not stream_tasks())
        assert await await_until(lambda: state.batcher is not None and state.batcher.queue_depth == 0)
        assert await await_until(lambda: state.in_flight == 0)


async def test_batch_streams_one_ndjson_line_per_image_then_a_summary() -> None:
    files = [
        ("files", ("a.png", frame(1), "image/png")),
        ("files", ("b.png", b"garbage", "image/png")),
        ("files", ("c.png", frame(3), "image/png")),
        ("files", ("d.png", frame(2), "image/png")),
    ]
    async with (
        serve_in_loop(fake_app()) as base,
        httpx.AsyncClient(base_url=base, timeout=20) as client,
        client.stream("POST", "/v1/detect/batch", files=files, data={"score_threshold": "0.5"}) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in resp.aiter_lines() if line]
    assert lines[-1] == {"type": "summary", "images": 4, "errors": 1}
    by_index = {line["index"]: line for line in lines[:-1]}
    assert sorted(by_index) == [0, 1, 2, 3]
    assert by_index[1]["type"] == "error" and by_index[1]["error"]["code"] == "bad_image"
    assert by_index[1]["filename"] == "b.png"
    assert [len(by_index[i]["result"]["detections"]) for i in (0, 2, 3)] == [1, 3, 2]


async def test_batch_refuses_bad_requests_with_4xx() -> None:
    async with serve_in_loop(fake_app()) as base, httpx.AsyncClient(base_url=base, timeout=20) as client:
        no_files = await client.post("/v1/detect/batch", files=[("file", ("a.png", frame(1), "image/png"))])
        wrong_type = await client.post("/v1/detect/batch", content=frame(1), headers={"content-type": "image/png"})
        bad_option = await client.post(
            "/v1/detect/batch", files=[("files", ("a.png", frame(1), "image/png"))], params={"merge": "nope"}
        )
    assert no_files.status_code == 400 and "'files'" in no_files.json()["error"]["message"]
    assert wrong_type.status_code == 415
    assert bad_option.status_code == 422 and "merge" in bad_option.json()["error"]["message"]


async def test_batch_client_disconnect_cancels_images_in_flight() -> None:
    app = fake_app(delay=0.3, max_batch=2)
    big = png(blob_image((1024, 1024), [RED]))
    files = [("files", (f"{i}.png", big, "image/png")) for i in range(6)]
    async with serve_in_loop(app) as base:
        state = app_state(app)
        async with (
            httpx.AsyncClient(base_url=base, timeout=20) as client,
            client.stream("POST", "/v1/detect/batch", files=files) as resp,
        ):
            assert resp.status_code == 200
            assert await await_until(lambda: state.batcher is not None and state.batcher.queue_depth > 0)
        # the response was closed before any line: the images in flight are cancelled, their chips dropped
        assert await await_until(lambda: state.in_flight == 0)
        assert await await_until(lambda: state.batcher is not None and state.batcher.queue_depth == 0)


async def test_window_is_capped_at_what_the_bulk_lane_admits() -> None:
    """The largest window used to be above the bulk in-flight limit, so a client following the protocol with
    policy=block got queue_full for the frames past the limit. The window is capped and ``ready`` says so."""
    app = fake_app(delay=0.02, bulk_max_in_flight=4)
    async with serve_in_loop(app) as base, websockets.connect(ws_url(base, "window=64")) as ws:
        hello = await recv_json(ws)
        assert hello["window"] == 4
        for _ in range(12):
            await ws.send(frame(1))
        replies = [await recv_json(ws) for _ in range(12)]
    assert [r["type"] for r in replies] == ["result"] * 12, [r.get("error") for r in replies]


async def test_streams_sharing_the_bulk_lane_wait_instead_of_failing() -> None:
    """Three streams with window 2 on a bulk lane of 2 slots: frames wait for a slot, none is refused."""
    app = fake_app(delay=0.02, bulk_max_in_flight=2)

    async def one_stream(base: str) -> list[str]:
        async with websockets.connect(ws_url(base, "window=2")) as ws:
            await recv_json(ws)
            for _ in range(5):
                await ws.send(frame(1))
            return [(await recv_json(ws))["type"] for _ in range(5)]

    async with serve_in_loop(app) as base:
        results = await asyncio.gather(*(one_stream(base) for _ in range(3)))
    assert results == [["result"] * 5] * 3


async def test_frame_bytes_held_by_streams_are_bounded_service_wide() -> None:
    """Frames received and not yet answered count against SNIPSERVE_MAX_BODY_BYTES_IN_FLIGHT: with a budget of
    about one frame, a stream with window 4 holds one frame at a time (its reader waits) and still answers all."""
    data = frame(1)
    app = fake_app(delay=0.02, max_body_bytes_in_flight=max(1024, len(data) + 10))
    state = app_state(app)
    held: list[int] = []
    async with serve_in_loop(app) as base, websockets.connect(ws_url(base, "window=4")) as ws:
        await recv_json(ws)
        for _ in range(6):
            await ws.send(data)
        replies = []
        for _ in range(6):
            held.append(state.frame_bytes)
            replies.append(await recv_json(ws))
    assert [r["type"] for r in replies] == ["result"] * 6
    assert max(held) <= len(data) and state.frame_bytes == 0
