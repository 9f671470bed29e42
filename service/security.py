"""Security at the edge: optional API key, CORS allow-list, model paths confined to the models directory.

- **API key** (``SNIPSERVE_API_KEY``): when set, every route except health (``/healthz``, ``/readyz``) and
  ``/metrics`` needs ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; keys are compared with
  :func:`hmac.compare_digest` (constant time). A missing or wrong key answers 401 with the service's JSON
  error body and counts ``snipserve_rejections_total{reason="unauthorized"}``; a WebSocket handshake is
  refused with close code 1008 (policy violation) before it is accepted.
- **CORS** (``SNIPSERVE_CORS_ORIGINS``): off unless origins are allow-listed; never ``*`` with credentials.
- **Model paths** (``SNIPSERVE_MODELS_DIR``): :func:`resolve_model_path` refuses any path that resolves
  (``..``, symlinks) outside the models directory.

The key check is a plain ASGI middleware rather than a route dependency so that it also covers routes
other modules mount later (streaming, web page, static files) and WebSocket handshakes.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import SecretStr
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.errors import Unauthorized
from service.observability import request_id_var

OPEN_PATHS: frozenset[str] = frozenset({"/healthz", "/readyz", "/metrics"})
AUTH_HEADERS: tuple[str, ...] = ("X-API-Key", "Authorization")


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request presents: ``X-API-Key``, else ``Authorization: Bearer <key>``; None if neither."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        found.setdefault(name.lower(), value)
    if b"x-api-key" in found:
        return found[b"x-api-key"].decode("latin-1").strip()
    scheme, _, token = found.get(b"authorization", b"").decode("latin-1").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def key_matches(presented: str | None, expected: SecretStr) -> bool:
    """Constant-time comparison (the time taken does not reveal how many leading bytes matched)."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.get_secret_value().encode("utf-8"))


def _is_preflight(scope: Scope) -> bool:
    """A CORS preflight (browsers never send credentials on it); CORSMiddleware answers it."""
    headers = dict(scope.get("headers", []))
    return scope.get("method") == "OPTIONS" and b"access-control-request-method" in headers


class ApiKeyMiddleware:
    """Refuse requests without the right API key, except on :data:`OPEN_PATHS` and CORS preflights."""

    def __init__(self, app: ASGIApp, api_key: SecretStr, open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.api_key = api_key
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        metrics.REJECTIONS.labels(reason="unauthorized").inc()
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        await _send_unauthorized(send)

    def _allowed(self, scope: Scope) -> bool:
        if scope.get("path", "") in self.open_paths or _is_preflight(scope):
            return True
        return key_matches(presented_key(scope.get("headers", [])), self.api_key)


async def _send_unauthorized(send: Send) -> None:
    exc = Unauthorized("missing or invalid API key: send it as 'X-API-Key: <key>' or 'Authorization: Bearer <key>'")
    error = {"code": exc.code, "message": exc.message, "request_id": request_id_var.get()}
    body = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", b'Bearer realm="snipserve"'),
    ]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install(app: FastAPI, api_key: SecretStr | None, cors_origins: tuple[str, ...]) -> None:
    """Add CORS (only with allow-listed origins) and the API-key check (only with a key) to ``app``.

    Call before the observability middleware is added, so that it stays outermost and sees 401s too.
    """
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Content-Type", *AUTH_HEADERS, "X-Request-ID"],
            expose_headers=["Retry-After", "X-Request-ID"],
            allow_credentials=False,
        )
    if api_key is not None and api_key.get_secret_value():
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    app.add_middleware(SecurityHeadersMiddleware)  # outside the key check: its 401s carry the headers too


SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = ((b"x-content-type-options", b"nosniff"),)


class SecurityHeadersMiddleware:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response (browsers never sniff a JSON error into HTML)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ModelPathError(ValueError):
    """A model path that escapes the models directory."""


def resolve_model_path(path: Path, models_dir: Path) -> Path:
    """``path`` resolved (symlinks followed) and checked to lie inside ``models_dir``.

    A relative ``path`` names a file inside ``models_dir``, or, when no such file exists but one does
    relative to the working directory, that file (``--model models/x.onnx`` from the repository root);
    either way the resolved file must be inside ``models_dir``. Raises :class:`ModelPathError` otherwise.
    The file need not exist yet.
    """
    root = models_dir.expanduser().resolve()
    candidate = path.expanduser()
    if not candidate.is_absolute():
        in_root = root / candidate
        from_cwd = not in_root.exists() and (candidate.exists() or candidate.resolve().is_relative_to(root))
        candidate = candidate if from_cwd else in_root
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root):
        raise ModelPathError(
            f"model path {str(path)!r} resolves to {str(resolved)!r}, outside the models directory "
            f"{str(root)!r} (SNIPSERVE_MODELS_DIR)"
        )
    return resolved
