"""Stream frames over several ``WS /v1/stream`` connections, surviving replica drains: :func:`stream_spread`.

Frames are spread over ``connections`` WebSockets per endpoint: several replicas' addresses, or one Service
address connected to several times (the Service balances connections over its pods). Each connection keeps
at most ``window`` frames unanswered (or the smaller window its server granted in ``ready``) and pulls the
next frame when a reply frees a slot, so a faster replica takes more frames. Results are yielded **in input
order, exactly once per frame**, with ``seq`` the frame's input index.

Drains and failures (a replica that got SIGTERM, was scaled down or died):

- a reply ``503 not_ready`` (the replica is draining) puts the frame back and closes that connection, which
  reconnects after a back-off (through a Service address: to a ready pod);
- a reply ``503 queue_full`` puts the frame back (another connection, or this one later, sends it again);
- a connection that closes or fails puts back every frame it had not answered.

A frame put back is sent again, the lowest input index first. A reply is only ever taken from the connection
the frame was last sent on, and a frame is answered at most once, so no frame is lost or duplicated in the
output. A frame that fails ``max_attempts`` times is answered with an error ``503 unavailable``; when no
frame is answered for ``timeout`` seconds (every endpoint down) the stream raises ``SnipserveClientError``.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import json
import queue
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import websockets

from snipserve_client.client import (
    DEFAULT_TIMEOUT_S,
    ErrorInfo,
    FrameResult,
    OptionValue,
    SnipserveClientError,
    StreamFrame,
    _aiter,
    _auth,
    _frame_reply,
    _hello,
    _stream_params,
    _ws_url,
)

RETRY_CODES = ("not_ready", "queue_full")  # 503s that mean "not here, not now": send the frame again


@dataclass(order=True)
class _Frame:
    index: int
    data: bytes = field(compare=False)
    meta: Mapping[str, Any] | None = field(compare=False)
    attempts: int = field(default=0, compare=False)


@dataclass(frozen=True)
class SpreadConfig:
    """How :func:`stream_spread` uses its connections."""

    window: int = 8  # unanswered frames per connection
    connections: int = 1  # per endpoint
    max_attempts: int = 8  # sends of one frame before it is answered "unavailable"
    timeout: float = DEFAULT_TIMEOUT_S  # seconds without any answered frame before giving up
    reconnect_min_s: float = 0.05
    reconnect_max_s: float = 2.0


@dataclass
class SpreadStats:
    """What happened on the way (pass one to :func:`stream_spread` to read it): frames sent again, connections."""

    resent: int = 0  # frames put back (draining or full replica, or a connection lost with them unanswered)
    connects: int = 0  # connections opened (the first ones included)


class _Spread:
    """Shared state: frames to send (a heap by input index), answers waiting for their turn, the workers."""

    def __init__(
        self, frames: Iterable[StreamFrame] | AsyncIterable[StreamFrame], config: SpreadConfig, stats: SpreadStats
    ) -> None:
        self.config = config
        self.stats = stats
        self.source = _aiter(frames)
        self.todo: list[_Frame] = []
        self.answers: dict[int, FrameResult] = {}
        self.next_out = 0
        self.read = 0  # frames taken from the source
        self.exhausted = False
        self.failure: BaseException | None = None
        self.cond = asyncio.Condition()
        self.ahead = asyncio.Semaphore(1)  # resized in run(): frames read but not yet yielded

    @property
    def finished(self) -> bool:
        return self.failure is not None or (self.exhausted and self.next_out == self.read)

    async def feed(self) -> None:
        """Read the source into ``todo``, at most ``ahead`` frames beyond the last one yielded."""
        try:
            while True:
                await self.ahead.acquire()
                try:
                    data, meta = await self.source.__anext__()
                except StopAsyncIteration:
                    self.ahead.release()
                    break
                async with self.cond:
                    heapq.heappush(self.todo, _Frame(self.read, data, meta))
                    self.read += 1
                    self.cond.notify_all()
        except Exception as exc:  # noqa: BLE001 - a failing frame source ends the stream with its error
            self.failure = exc
        async with self.cond:
            self.exhausted = True
            self.cond.notify_all()

    async def take(self) -> _Frame | None:
        """The lowest-index frame waiting to be sent; None once the stream is finished."""
        async with self.cond:
            await self.cond.wait_for(lambda: bool(self.todo) or self.finished)
            return heapq.heappop(self.todo) if self.todo and not self.finished else None

    async def put_back(self, frames: Iterable[_Frame]) -> None:
        async with self.cond:
            for frame in frames:
                self.stats.resent += 1
                if frame.attempts >= self.config.max_attempts:
                    self._answer(frame, _unavailable(frame))
                else:
                    heapq.heappush(self.todo, frame)
            self.cond.notify_all()

    async def answer(self, frame: _Frame, reply: FrameResult) -> None:
        async with self.cond:
            self._answer(frame, reply)
            self.cond.notify_all()

    def _answer(self, frame: _Frame, reply: FrameResult) -> None:
        if frame.index >= self.next_out and frame.index not in self.answers:
            self.answers[frame.index] = reply.model_copy(update={"seq": frame.index, "meta": frame.meta})

    async def fail(self, exc: BaseException) -> None:
        async with self.cond:
            self.failure = self.failure or exc
            self.cond.notify_all()

    async def results(self) -> AsyncIterator[FrameResult]:
        """Answers in input order; raises the first fatal error, or a timeout when nothing is answered."""
        while True:
            async with self.cond:
                try:
                    await asyncio.wait_for(
                        self.cond.wait_for(lambda: self.next_out in self.answers or self.finished),
                        self.config.timeout,
                    )
                except TimeoutError:
                    raise SnipserveClientError(
                        0, "unavailable", f"no frame answered within {self.config.timeout} s on any connection"
                    ) from None
                if self.failure is not None:
                    raise self.failure
                if self.next_out not in self.answers:
                    return  # finished: every frame read was yielded
                reply = self.answers.pop(self.next_out)
                self.next_out += 1
                self.ahead.release()
                self.cond.notify_all()
            yield reply


def _unavailable(frame: _Frame) -> FrameResult:
    error = ErrorInfo(status=503, code="unavailable", message=f"no replica answered after {frame.attempts} attempts")
    return FrameResult(type="error", seq=frame.index, meta=frame.meta, error=error)


class _Connection:
    """One connection slot: connect, send while the window has room, match replies in order, reconnect."""

    def __init__(self, spread: _Spread, url: str, api_key: str | None) -> None:
        self.spread = spread
        self.url = url
        self.api_key = api_key
        self.delay = spread.config.reconnect_min_s

    async def run(self) -> None:
        cfg = self.spread.config
        while not self.spread.finished:
            try:
                async with await websockets.connect(
                    self.url, additional_headers=_auth(self.api_key), max_size=None, open_timeout=cfg.timeout
                ) as ws:
                    hello = _hello(await asyncio.wait_for(ws.recv(), cfg.timeout))
                    self.spread.stats.connects += 1
                    self.delay = cfg.reconnect_min_s
                    await self.session(ws, min(cfg.window, int(hello.get("window", cfg.window))))
            except SnipserveClientError as exc:
                if exc.status != 503:  # refused for good (bad options, wrong API key): the stream fails
                    await self.spread.fail(exc)
                    return
            except (OSError, TimeoutError, websockets.WebSocketException):
                pass  # not listening, closed, or went away: back off and reconnect
            await asyncio.sleep(self.delay)
            self.delay = min(2 * self.delay, cfg.reconnect_max_s)

    async def session(self, ws: websockets.ClientConnection, window: int) -> None:
        """Frames in flight here at most ``window``: what was asked for, or less where the server granted less."""
        pending: collections.deque[_Frame] = collections.deque()
        credit = asyncio.Semaphore(window)
        sender = asyncio.create_task(self._send(ws, pending, credit))
        receive: asyncio.Task[str | bytes] | None = None
        try:
            while not (sender.done() and not pending):
                receive = receive or asyncio.create_task(ws.recv())
                done, _ = await asyncio.wait({receive, sender}, return_when=asyncio.FIRST_COMPLETED)
                if receive not in done:
                    sender.result()  # a send failure ends the session; None: the stream is finished
                    continue
                message, receive = receive.result(), None
                if not await self._reply(message, pending, credit):
                    return  # the replica is draining: leave it
        finally:
            for task in (sender, receive):
                if task is not None:
                    task.cancel()
            await asyncio.gather(sender, *([receive] if receive else []), return_exceptions=True)
            await self.spread.put_back(pending)  # unanswered here: send them again elsewhere

    async def _send(self, ws: websockets.ClientConnection, pending: collections.deque[_Frame], credit: Any) -> None:
        while True:
            await credit.acquire()
            frame = await self.spread.take()
            if frame is None:
                return
            pending.append(frame)  # before any await: a failed send still finds it here and puts it back
            frame.attempts += 1
            if frame.meta is not None:
                await ws.send(json.dumps(dict(frame.meta)))
            await ws.send(frame.data)

    async def _reply(self, message: str | bytes, pending: collections.deque[_Frame], credit: Any) -> bool:
        """Match a reply to the oldest frame in flight here; False when the connection should be left."""
        reply = _frame_reply(message)
        frame = pending.popleft()
        credit.release()
        if frame.meta is not None and reply.meta != dict(frame.meta):
            raise SnipserveClientError(0, "protocol_error", f"reply {reply.seq} does not echo its frame's metadata")
        error = reply.error
        if reply.type == "error" and error is not None and error.status == 503 and error.code in RETRY_CODES:
            if error.code == "queue_full":  # full here now: give it a moment before it is sent again
                await asyncio.sleep(self.delay)
                self.delay = min(2 * self.delay, self.spread.config.reconnect_max_s)
            await self.spread.put_back([frame])
            return error.code != "not_ready"
        await self.spread.answer(frame, reply)
        return True


async def stream_spread(
    endpoints: Sequence[str],
    frames: Iterable[StreamFrame] | AsyncIterable[StreamFrame],
    *,
    config: SpreadConfig | None = None,
    api_key: str | None = None,
    stats: SpreadStats | None = None,
    options: Mapping[str, OptionValue] | None = None,
) -> AsyncIterator[FrameResult]:
    """Send ``frames`` over ``config.connections`` connections to each of ``endpoints`` (base URLs); yield one
    :class:`FrameResult` per frame in input order (``seq`` = input index). ``options``: the ``/v1/detect``
    options, as for :meth:`AsyncClient.stream`. See the module docstring."""
    cfg = config or SpreadConfig()
    if not endpoints:
        raise ValueError("stream_spread needs at least one endpoint")
    spread = _Spread(frames, cfg, stats if stats is not None else SpreadStats())
    slots = len(endpoints) * cfg.connections
    spread.ahead = asyncio.Semaphore(2 * slots * cfg.window)  # bounds reading ahead and the reorder buffer
    params = _stream_params(cfg.window, "block", options or {})
    workers = [_Connection(spread, _ws_url(url, params), api_key) for url in endpoints for _ in range(cfg.connections)]
    tasks = [asyncio.create_task(spread.feed())] + [asyncio.create_task(w.run()) for w in workers]
    try:
        async for reply in spread.results():
            yield reply
    finally:
        await spread.fail(asyncio.CancelledError())  # stop the workers (no-op if already failed or finished)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def stream_spread_sync(
    endpoints: Sequence[str],
    frames: Iterable[StreamFrame],
    *,
    config: SpreadConfig | None = None,
    api_key: str | None = None,
    stats: SpreadStats | None = None,
    options: Mapping[str, OptionValue] | None = None,
) -> Iterator[FrameResult]:
    """:func:`stream_spread` for synchronous code: runs it on an event loop in a helper thread."""
    out: queue.Queue[FrameResult | BaseException | None] = queue.Queue(maxsize=64)
    stop = threading.Event()

    async def pump() -> None:
        try:
            replies = stream_spread(endpoints, frames, config=config, api_key=api_key, stats=stats, options=options)
            async for reply in replies:
                while not stop.is_set():
                    try:
                        out.put(reply, timeout=0.1)
                        break
                    except queue.Full:
                        await asyncio.sleep(0)
                if stop.is_set():
                    return
            out.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            out.put(exc)

    thread = threading.Thread(target=asyncio.run, args=(pump(),), name="snipserve-spread", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(10)
