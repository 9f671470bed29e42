"""Request ids, per-route metrics, structured access/error logs and ``GET /metrics``.

``instrument(app, settings)`` is called once by ``create_app()``. It installs one pure-ASGI middleware
(not ``BaseHTTPMiddleware``, which runs the app in another task and re-streams every body) that, for
every HTTP request:

1. takes the client's ``X-Request-ID`` when it is sane (1-128 of ``A-Z a-z 0-9 . _ : -``), else makes
   one (32 hex chars), puts it in ``request_id_var`` for handlers and log records, and returns it in the
   ``X-Request-ID`` response header;
2. counts ``snipserve_requests_total{route, status}`` and observes
   ``snipserve_request_duration_seconds{route}`` until the last body byte is sent, with the route
   *template* (``/v1/models/{name}``), or ``<unmatched>`` for paths no route knows, so label values stay
   bounded whatever clients send; a client that disconnects before any response counts as status 499;
3. writes one access-log record (logger ``snipserve.access``; DEBUG for successful probes and scrapes,
   INFO otherwise) and, for an exception no handler mapped,
   one error record with the traceback (logger ``snipserve.error``) and a JSON 500 carrying the id.

WebSocket connections get a request id and logs too, but no HTTP metrics.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import re
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match

from service import metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "X-Request-ID"
UNMATCHED_ROUTE = "<unmatched>"
CLIENT_CLOSED_REQUEST = 499  # status recorded when the client disconnects before any response (nginx's)
# Probes and scrapes arrive every few seconds: their successful access records go out at DEBUG.
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("snipserve_request_id", default=None)
"""The current request's id, or ``None`` outside a request (startup, the batcher's own task)."""

_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")

access_log = logging.getLogger("snipserve.access")
error_log = logging.getLogger("snipserve.error")


def new_request_id() -> str:
    """A fresh id: 32 lowercase hex characters (a UUID4 without dashes)."""
    return uuid.uuid4().hex


def accept_request_id(value: str | None) -> str:
    """The client's id if it is safe to log and echo (no spaces, quotes, control bytes), else a new one."""
    if value is not None and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


def _flat(routes: Sequence[BaseRoute]) -> Iterator[BaseRoute]:
    """Routes with included routers expanded (FastAPI keeps an included router as one entry, whose ``matches``
    does not say which of its routes matched)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _flat(inner.routes)
        else:
            yield route


def route_template(scope: Scope, routes: Sequence[BaseRoute] = ()) -> str:
    """The matched route's path template, or ``UNMATCHED_ROUTE`` (404s must not mint label values).

    Starlette's router records the route in ``scope["route"]`` (full or method-only match). A response
    sent before routing (the API-key middleware's 401) has none, so ``routes`` are matched here the same
    way: the first full match, else the first partial one.
    """
    route = scope.get("route")
    if route is None:
        partial = None
        for candidate in _flat(routes):
            match, _ = candidate.matches(scope)
            if match == Match.FULL:
                route = candidate
                break
            if match == Match.PARTIAL and partial is None:
                partial = candidate
        route = route or partial
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED_ROUTE


@dataclass(eq=False)
class _Exchange:
    """One HTTP exchange as the middleware sees it: wraps ``send`` to set ``X-Request-ID`` and to note the status
    and the body bytes sent."""

    send: Send
    request_id: str
    status: int = 500
    started: bool = False
    response_bytes: int = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = int(message["status"])
            headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
            headers.append((b"x-request-id", self.request_id.encode("ascii")))
            message["headers"] = headers
        elif message["type"] == "http.response.body":
            self.response_bytes += len(message.get("body", b""))
        await self.send(message)


class ObservabilityMiddleware:
    """Pure ASGI middleware: request id, per-route metrics, access and error logs (see the module doc)."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.routes = routes  # the app's live route list, for responses sent before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return

        request_id = accept_request_id(_header(scope, b"x-request-id"))
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        exchange = _Exchange(send, request_id)
        try:
            await self.app(scope, receive, exchange)
        except (asyncio.CancelledError, ClientDisconnect) as exc:
            # The client went away (the API cancels a detection on disconnect): nobody is left to answer,
            # and it is not a server error. Recorded as nginx's 499 "client closed request".
            if not exchange.started:
                exchange.status = CLIENT_CLOSED_REQUEST
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception as exc:
            await self._unhandled(scope, exc, exchange)
        finally:
            self._record(scope, exchange, time.perf_counter() - start)
            request_id_var.reset(token)

    async def _unhandled(self, scope: Scope, exc: Exception, exchange: _Exchange) -> None:
        """Only exceptions no handler mapped get here (SnipserveError is mapped by the API's handler): log, 500."""
        exchange.status = 500
        error_log.error(
            "unhandled %s on %s %s: %s",
            type(exc).__name__,
            scope.get("method", ""),
            scope.get("path", ""),
            exc,
            exc_info=exc,
            extra={"route": route_template(scope, self.routes), "status": exchange.status},
        )
        if exchange.started:
            raise exc  # the status line is out; let the server close the connection
        body = _error_body(exchange.request_id)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await exchange({"type": "http.response.start", "status": 500, "headers": headers})
        await exchange({"type": "http.response.body", "body": body})

    def _record(self, scope: Scope, exchange: _Exchange, elapsed: float) -> None:
        """Request metrics and the access log line."""
        route, status = route_template(scope, self.routes), exchange.status
        metrics.REQUESTS.labels(route=route, status=str(status)).inc()
        metrics.REQUEST_LATENCY.labels(route=route).observe(elapsed)
        access_log.log(
            logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO,
            "%s %s %d %.1fms",
            scope.get("method", ""),
            scope.get("path", ""),
            status,
            elapsed * 1000.0,
            extra={
                "method": scope.get("method", ""),
                "path": scope.get("path", ""),
                "route": route,
                "status": status,
                "duration_s": round(elapsed, 6),
                "response_bytes": exchange.response_bytes,
                "client": _client(scope),
                "user_agent": _header(scope, b"user-agent"),
            },
        )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = accept_request_id(_header(scope, b"x-request-id"))
        token = request_id_var.set(request_id)
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            error_log.error(
                "unhandled %s on websocket %s: %s",
                type(exc).__name__,
                scope.get("path", ""),
                exc,
                exc_info=exc,
                extra={"route": route_template(scope, self.routes)},
            )
            raise
        finally:
            elapsed = time.perf_counter() - start
            access_log.info(
                "WS %s closed after %.1fs",
                scope.get("path", ""),
                elapsed,
                extra={
                    "method": "WS",
                    "path": scope.get("path", ""),
                    "route": route_template(scope, self.routes),
                    "duration_s": round(elapsed, 6),
                    "client": _client(scope),
                },
            )
            request_id_var.reset(token)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else None


def _error_body(request_id: str) -> bytes:
    body = {"error": {"code": "internal_error", "message": "internal server error", "request_id": request_id}}
    return json.dumps(body).encode()


# -- logs ---------------------------------------------------------------------------------------------

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured duplicate of the message
}


class RequestIdFilter(logging.Filter):
    """Copies ``request_id_var`` onto every record as ``record.request_id`` (``None`` outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``request_id``, the record's ``extra`` fields, and ``exc_info`` (the traceback) when present."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exc_info"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(out, default=str)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    """``text`` with control characters (newlines included) written as ``\\xNN`` / ``\\uNNNN`` escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


class PlainFormatter(logging.Formatter):
    """``ts level logger [request_id] message key=value ...`` for humans at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        msg, args = record.msg, record.args
        record.msg, record.args = escape_control(record.getMessage()), None  # a %0a in a path forges no line
        try:
            line = super().format(record)
        finally:
            record.msg, record.args = msg, args
        fields = _fields(record)
        if fields:
            extras = " ".join(f"{k}={escape_control(str(v))}" for k, v in fields.items())
            head, sep, tail = line.partition("\n")  # keep key=value on the first line, traceback after
            line = f"{head} {extras}{sep}{tail}"
        return line


_HANDLER_NAME = "snipserve"


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in typeshed
    """Writes to whatever ``sys.stderr`` is when a record is emitted (as ``logging.lastResort`` does),
    so a replaced stderr (pytest capture, a supervisor) never leaves the handler on a closed stream."""

    def __init__(self) -> None:
        super().__init__()
        self._fixed: Any = None

    @property
    def stream(self) -> Any:
        return self._fixed if self._fixed is not None else sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        self._fixed = None if value is sys.stderr else value


def configure_logging(*, level: str | int = "INFO", json_logs: bool = False) -> logging.Handler:
    """Route all logs (ours, uvicorn's, libraries') through one stderr handler on the root logger.

    Idempotent: replaces only the handler it installed before, so test harness handlers survive.
    uvicorn's own access log is silenced (``snipserve.access`` replaces it, with route and request id).
    """
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    handler = StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if json_logs else PlainFormatter())
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    return handler


# -- wiring -------------------------------------------------------------------------------------------


async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text exposition of ``service.metrics.REGISTRY``.

    Labelled format 0.0.4, which every Prometheus 2.x/3.x and promtool read: our names are all legacy-valid,
    so the bytes equal the 1.0.0 format prometheus-client now calls ``CONTENT_TYPE_LATEST``.
    """
    # In a worker thread: collection (NVML included) must not stall the batcher's event loop.
    body = await run_in_threadpool(generate_latest, metrics.REGISTRY)
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)


def instrument(app: FastAPI, settings: Any) -> None:
    """Install logging, the observability middleware and ``GET /metrics`` on ``app`` (call once).

    Reads ``settings.log_level``, ``settings.log_json`` and, if present, ``settings.workers``; raises
    ``ValueError`` for more than one worker (see ``service.metrics.check_single_process``).
    """
    metrics.check_single_process(int(getattr(settings, "workers", 1)))
    configure_logging(
        level=getattr(settings, "log_level", "INFO"), json_logs=bool(getattr(settings, "log_json", False))
    )
    app.add_middleware(ObservabilityMiddleware, routes=app.router.routes)
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False, name="metrics")
