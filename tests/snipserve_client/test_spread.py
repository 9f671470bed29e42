"""stream_spread over real ``snipserve serve`` processes on 127.0.0.1 (fake engine): frames spread over several
connections, a replica drained with SIGTERM mid-stream, every frame answered once, in order, by its own result."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.cli.serve_process import ServerProcess, running_server
from snipserve_client import FrameResult
from snipserve_client.spread import SpreadConfig, SpreadStats, stream_spread, stream_spread_sync
from tests.service.live_server import blob_image, png

FRAMES = 40
ENGINE_DELAY_S = 0.03

SERVER = textwrap.dedent(
    """
    import sys
    from service.cli.serve import serve_app
    from service.engines.fake import FakeEngine
    from service.http.app import create_app
    from service.settings import Settings

    delay = float(sys.argv[1])
    settings = Settings(engine="fake", warmup=False, max_batch=8, shutdown_timeout_s=5)
    app = create_app(settings, engine_factory=lambda s: FakeEngine(max_batch=8, delay=delay))
    sys.exit(serve_app(app, settings))
    """
)


def blob_x(i: int) -> int:
    return 4 + 5 * i


def frames(n: int = FRAMES) -> list[tuple[bytes, dict[str, int]]]:
    """Frame i: one red 12x12 blob at x = 4 + 5i, so a result shows which frame it belongs to."""
    return [(png(blob_image((256, 64), [(blob_x(i), 20, blob_x(i) + 12, 32, "red")])), {"frame": i}) for i in range(n)]


@contextlib.contextmanager
def replicas(tmp_path: Path, n: int, delay: float = ENGINE_DELAY_S) -> Iterator[list[ServerProcess]]:
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(
                running_server(
                    [sys.executable, "-c", SERVER, str(delay)],
                    log=tmp_path / f"server{i}.log",
                    ready_timeout_s=60.0,
                    stop_timeout_s=10.0,
                )
            )
            for i in range(n)
        ]
        yield servers


def check_exactly_once_in_order(replies: list[FrameResult], n: int = FRAMES) -> None:
    assert [r.seq for r in replies] == list(range(n))  # none lost, none duplicated, in input order
    for i, reply in enumerate(replies):
        assert reply.type == "result" and reply.result is not None, reply
        assert reply.meta == {"frame": i}
        (det,) = reply.result.detections
        assert det.box[0] == blob_x(i), (i, det.box)  # frame i's own result, not another frame's


@pytest.fixture
def two(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    with replicas(tmp_path, 2) as servers:
        yield servers


async def test_spreads_frames_over_endpoints_and_connections(two: list[ServerProcess]) -> None:
    stats = SpreadStats()
    config = SpreadConfig(window=3, connections=2)
    replies = [r async for r in stream_spread([s.url for s in two], frames(), config=config, stats=stats)]
    check_exactly_once_in_order(replies)
    assert stats.connects == 4 and stats.resent == 0


async def test_a_replica_drained_mid_stream_loses_and_duplicates_nothing(two: list[ServerProcess]) -> None:
    drained, other = two
    stats = SpreadStats()
    replies: list[FrameResult] = []
    async for reply in stream_spread([drained.url, other.url], frames(), config=SpreadConfig(window=4), stats=stats):
        replies.append(reply)
        if len(replies) == 8:
            drained.proc.send_signal(signal.SIGTERM)  # drain: readiness 503, in-flight frames answered, then exit
    check_exactly_once_in_order(replies)
    assert stats.resent >= 1  # the drain really caught frames on their way: they were sent again
    await asyncio.to_thread(drained.proc.wait, 15)
    assert drained.proc.returncode == 0 and other.proc.poll() is None


def test_sync_wrapper_and_one_address_with_several_connections(two: list[ServerProcess]) -> None:
    stats = SpreadStats()
    config = SpreadConfig(window=2, connections=3)
    replies = list(stream_spread_sync([two[0].url], frames(12), config=config, stats=stats))
    check_exactly_once_in_order(replies, 12)
    assert stats.connects == 3


async def test_refused_stream_raises_instead_of_retrying(two: list[ServerProcess]) -> None:
    from snipserve_client import SnipserveClientError

    with pytest.raises(SnipserveClientError) as info:
        async for _ in stream_spread([two[0].url], frames(2), options={"preset": "no-such-preset"}):
            pass
    assert info.value.status == 422 and info.value.code == "invalid_options"


async def test_gives_up_when_no_endpoint_answers() -> None:
    from service.cli.serve_process import free_port
    from snipserve_client import SnipserveClientError

    url = f"http://127.0.0.1:{free_port()}"
    config = SpreadConfig(timeout=1.0, reconnect_max_s=0.2)
    with pytest.raises(SnipserveClientError) as info:
        async for _ in stream_spread([url], frames(2), config=config):
            pass
    assert info.value.code == "unavailable"
