"""snipserve_client against a live loopback server: sync and async, typed results, errors, batch, stream."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from snipserve_client import AsyncClient, Client, SnipserveClientError
from tests.service.live_server import blob_image, fake_app, png, serve_in_loop, serve_in_thread

RED = (40, 40, 70, 70, "red")
GREEN = (150, 40, 180, 70, "green")
BLUE = (40, 150, 70, 180, "blue")


def frame(n_boxes: int) -> bytes:
    return png(blob_image((256, 256), [RED, GREEN, BLUE][:n_boxes]))


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(fake_app()) as url:
        yield url


def test_detect_accepts_paths_bytes_and_arrays(base_url: str, tmp_path: Path) -> None:
    path = tmp_path / "two.png"
    path.write_bytes(frame(2))
    with Client(base_url) as client:
        assert client.ready()
        from_path = client.detect(path)
        from_bytes = client.detect(frame(2), score_threshold=0.5, classes=["red"])
        from_array = client.detect(blob_image((256, 256), [BLUE]))
    assert sorted(d.label for d in from_path.detections) == ["green", "red"]
    assert from_path.image.width == 256 and from_path.model == "fake-rgb-blobs" and "total" in from_path.timings
    assert [d.label for d in from_bytes.detections] == ["red"]
    assert from_bytes.detections[0].box == (40.0, 40.0, 70.0, 70.0)
    assert [d.class_id for d in from_array.detections] == [2]


def test_coco_and_rendered_jpeg(base_url: str) -> None:
    with Client(base_url) as client:
        coco = client.detect_coco(frame(1), image_id=7)
        jpeg = client.render(frame(1))
    assert coco == [{"image_id": 7, "category_id": 0, "bbox": [40.0, 40.0, 30.0, 30.0], "score": 0.9}]
    assert jpeg[:2] == b"\xff\xd8"


def test_server_errors_carry_status_code_and_message(base_url: str) -> None:
    with Client(base_url) as client:
        with pytest.raises(SnipserveClientError) as bad_image:
            client.detect(b"definitely not an image")
        with pytest.raises(SnipserveClientError) as bad_option:
            client.detect(frame(1), merge="sideways")
    assert (bad_image.value.status, bad_image.value.code) == (400, "bad_image")
    assert bad_option.value.status == 422 and "merge" in bad_option.value.message


def test_unreachable_server_is_a_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connection refused
        with Client(f"http://127.0.0.1:{port}", timeout=5) as client, pytest.raises(SnipserveClientError) as info:
            client.detect(frame(1))
    assert info.value.status == 0 and info.value.code == "connection_error"


def test_batch_yields_one_item_per_image(base_url: str) -> None:
    with Client(base_url) as client:
        items = list(client.detect_batch([frame(1), b"junk", frame(3)]))
    by_index = {item.index: item for item in items}
    assert sorted(by_index) == [0, 1, 2]
    assert by_index[1].error is not None and by_index[1].error.code == "bad_image"
    assert by_index[2].result is not None and len(by_index[2].result.detections) == 3


def test_sync_stream_replies_in_order(base_url: str) -> None:
    frames = [(frame(i % 3 + 1), {"i": i}) for i in range(5)] + [(b"junk", {"i": 5}), (frame(1), None)]
    with Client(base_url) as client:
        replies = list(client.stream(frames, window=2))
    assert [r.seq for r in replies] == list(range(7))
    assert [r.meta for r in replies] == [{"i": i} for i in range(6)] + [None]
    assert [r.type for r in replies] == ["result"] * 5 + ["error", "result"]
    assert [len(r.result.detections) for r in replies[:5] if r.result] == [1, 2, 3, 1, 2]


def test_sync_stream_refusal_raises(base_url: str) -> None:
    with Client(base_url) as client, pytest.raises(SnipserveClientError) as info:
        list(client.stream([(frame(1), None)], preset="nope"))
    assert info.value.status == 422 and "nope" in info.value.message


async def test_async_client_detect_batch_and_stream() -> None:
    async def frames() -> AsyncIterator[tuple[bytes, dict[str, int]]]:
        for i in range(6):
            yield frame(i % 3 + 1), {"i": i}

    async with serve_in_loop(fake_app()) as base, AsyncClient(base) as client:
        assert await client.ready()
        result = await client.detect(frame(3))
        coco = await client.detect_coco(frame(1), image_id="9")
        jpeg = await client.render(frame(1))
        items = [item async for item in client.detect_batch([frame(1), frame(2)])]
        replies = [r async for r in client.stream(frames(), window=3)]
        sync_source = [r async for r in client.stream([(frame(2), None)] * 3, policy="drop_oldest", window=8)]
        with pytest.raises(SnipserveClientError) as info:
            await client.detect(b"junk")
    assert len(result.detections) == 3 and coco[0]["image_id"] == 9 and jpeg[:2] == b"\xff\xd8"
    assert sorted(i.index for i in items) == [0, 1]
    assert [r.seq for r in replies] == list(range(6)) and [r.meta["i"] for r in replies] == list(range(6))
    assert [len(r.result.detections) for r in replies if r.result] == [1, 2, 3, 1, 2, 3]
    assert [r.type for r in sync_source] == ["result"] * 3
    assert info.value.code == "bad_image"


def test_service_client_is_the_same_client() -> None:
    import service.client
    import snipserve_client

    assert service.client.Client is snipserve_client.Client
    assert service.client.AsyncClient is snipserve_client.AsyncClient


def test_queue_full_carries_the_retry_hint() -> None:
    import httpx

    from snipserve_client.client import raise_for_error

    body = {"error": {"code": "queue_full", "message": "busy", "retry_after_s": 0.234}}
    with pytest.raises(SnipserveClientError) as precise:
        raise_for_error(httpx.Response(503, json=body, headers={"Retry-After": "1"}))
    assert (precise.value.code, precise.value.retry_after_s) == ("queue_full", 0.234)
    with pytest.raises(SnipserveClientError) as header_only:
        raise_for_error(
            httpx.Response(503, json={"error": {"code": "not_ready", "message": "x"}}, headers={"Retry-After": "2"})
        )
    assert header_only.value.retry_after_s == 2.0
    with pytest.raises(SnipserveClientError) as none:
        raise_for_error(httpx.Response(400, text="plain"))
    assert none.value.retry_after_s is None and none.value.code == "http_error"
