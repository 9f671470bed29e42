"""The edge against slow and oversized clients: limits on request heads and bodies, and their timeouts.

Two layers, because uvicorn's HTTP parser (httptools) has no header limit and no header or body timeout:

- :class:`GuardedHttpToolsProtocol` (the connection): the request head (request line + headers) may take at most
  ``max_header_bytes`` (else 431) and ``header_timeout_s`` from the connection's start or the previous response
  (else 408; an idle connection that never sends a request is closed at the same bound);
- :class:`BodyGuard` (ASGI middleware, every HTTP request): at most ``max_body_bytes`` per request, counted as it
  arrives, whatever the framing (chunked, multipart with text fields; else 413); at most ``body_idle_timeout_s``
  between body chunks and at least ``min_body_rate`` bytes/s once ``body_grace_s`` has passed (else 408); and at
  most ``max_body_bytes_in_flight`` of bodies being received by all requests together (else 503), which bounds
  the memory that bodies can hold.

Routes take their in-flight slot only once the body is read (:mod:`service.http.detect`), so a slow client holds a
connection, never a slot. What a reverse proxy in front should still do is in the README (Security settings).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import SnipserveError

log = logging.getLogger("snipserve.transport")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class TransportConfig(BaseModel):
    """Limits and timeouts of requests at the edge (settings: ``SNIPSERVE_<FIELD>``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_header_bytes: int = Field(default=65536, ge=1024, description="Request line + headers at most (else 431).")
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="Time to send a request head, from connect or the last response (else 408)."
    )
    body_idle_timeout_s: float = Field(default=10.0, gt=0, description="Longest pause within a body (else 408).")
    body_grace_s: float = Field(default=10.0, ge=0, description="Body time before the minimum rate applies.")
    min_body_rate: float = Field(
        default=16384.0, ge=0, description="Bytes/s a body must average after the grace period (else 408)."
    )
    max_body_bytes: int = Field(
        default=51 * 1024 * 1024, ge=1024, description="Body bytes per request at most, any framing (else 413)."
    )
    max_batch_body_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024, description="Body bytes of one POST /v1/detect/batch at most (else 413)."
    )
    max_body_bytes_in_flight: int = Field(
        default=512 * 1024 * 1024, ge=1024, description="Body bytes being received by all requests at most (503)."
    )


# ---- the connection ------------------------------------------------------------------------------


def guarded_protocol(config: TransportConfig) -> type[HttpToolsProtocol]:
    """The protocol class uvicorn should use (``uvicorn.Config(http=...)``), bound to ``config``."""
    return type("BoundGuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"transport_config": config})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head size limit and a request-head timeout.

    The timer runs from the connection's start, or from the end of the previous response, until a request head is
    complete: an idle connection is closed at the bound, a head still arriving gets 408. Only bytes of a request
    head count towards the size limit (a body still arriving after an early response does not)."""

    transport_config = TransportConfig()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._in_head = False  # a request has begun and its head is not complete
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.transport_config.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(408, "request head not received in time")
        else:
            self.transport.close()  # idle: no request began in time, nothing to answer

    def _refuse(self, status: int, message: str) -> None:
        body = json.dumps({"error": {"code": "bad_request", "message": message}}).encode()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        head += b"x-content-type-options: nosniff\r\nconnection: close\r\n\r\n"
        self.transport.write(head % (status, reason, len(body)) + body)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():  # the head began in this chunk or before
            self._head_bytes += len(data)
            if self._head_bytes > self.transport_config.max_header_bytes:
                limit = self.transport_config.max_header_bytes
                self._refuse(431, f"request head above {limit} bytes (SNIPSERVE_MAX_HEADER_BYTES)")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request on this keep-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


# ---- the body ------------------------------------------------------------------------------------


class BodyRefused(SnipserveError):
    """Raised from ``receive()`` when a body breaks a limit (413, 408 or 503); the connection is closed after."""

    def __init__(self, status: int, code: str, message: str) -> None:
        headers = {"Connection": "close"} | ({"Retry-After": "1"} if status == 503 else {})
        super().__init__(message, headers=headers)
        self.status, self.code = status, code


class BodyGuard:
    """ASGI middleware: every HTTP request body within size, pace and the global in-flight budget."""

    def __init__(self, app: ASGIApp, config: TransportConfig) -> None:
        self.app = app
        self.config = config
        self.bytes_in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        batch = scope.get("path", "").rstrip("/") == "/v1/detect/batch"
        limit = self.config.max_batch_body_bytes if batch else self.config.max_body_bytes
        name = "SNIPSERVE_MAX_BATCH_BODY_BYTES" if batch else "SNIPSERVE_MAX_IMAGE_BYTES + 1 MiB of form fields"
        declared = dict(scope.get("headers", ())).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            message = f"request body is {int(declared)} bytes, above the limit of {limit} ({name})"
            await _refuse(send, 413, "too_large", message)
            return
        arrival = time.monotonic()
        # When the request reached the service, before its body: /v1/detect's deadline and queueing bound count
        # from here, so an upload or a busy event loop is inside them (request.state.arrival).
        scope.setdefault("state", {})["arrival"] = arrival
        meter = _BodyMeter(self, limit, f"{limit} bytes ({name})", arrival)
        try:
            await self.app(scope, meter.wrap(receive), send)
        finally:
            self.bytes_in_flight -= meter.received


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BodyMeter:
    def __init__(self, guard: BodyGuard, limit: int, limit_text: str, start: float) -> None:
        self.guard, self.limit, self.limit_text, self.start = guard, limit, limit_text, start
        self.received = 0
        self.done = False

    def wrap(self, receive: Receive) -> Receive:
        async def guarded() -> Message:
            if self.done:
                return await receive()
            config = self.guard.config
            try:
                message = await asyncio.wait_for(receive(), config.body_idle_timeout_s)
            except TimeoutError:
                raise BodyRefused(408, "body_timeout", self._slow("paused")) from None
            if message["type"] != "http.request":
                return message
            self._count(len(message.get("body", b"")))
            self.done = not message.get("more_body", False)
            return message

        return guarded

    def _count(self, n: int) -> None:
        config = self.guard.config
        self.received += n
        self.guard.bytes_in_flight += n
        if self.received > self.limit:
            raise BodyRefused(413, "too_large", f"request body above the limit of {self.limit_text}")
        if self.guard.bytes_in_flight > config.max_body_bytes_in_flight:
            raise BodyRefused(
                503,
                "queue_full",
                "too many request bodies in flight (SNIPSERVE_MAX_BODY_BYTES_IN_FLIGHT); retry shortly",
            )
        elapsed = time.monotonic() - self.start
        if elapsed > config.body_grace_s and self.received < config.min_body_rate * (elapsed - config.body_grace_s):
            raise BodyRefused(408, "body_timeout", self._slow("too slow"))

    def _slow(self, how: str) -> str:
        config = self.guard.config
        return (
            f"request body {how}: {self.received} bytes in {time.monotonic() - self.start:.1f} s "
            f"(pauses up to {config.body_idle_timeout_s:g} s; at least {config.min_body_rate:g} bytes/s "
            f"after {config.body_grace_s:g} s)"
        )
