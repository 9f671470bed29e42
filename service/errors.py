"""One exception hierarchy for the service; ``api`` maps each class to an HTTP status in one handler."""

from __future__ import annotations

import math


class SnipserveError(Exception):
    """Base class. ``status`` is the HTTP status; ``code`` a stable machine-readable name."""

    status: int = 500
    code: str = "internal_error"

    def __init__(
        self, message: str, *, headers: dict[str, str] | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        # the precise retry hint (seconds, sub-second) in the error body, behind the whole-second Retry-After header
        # (at least 1, as HTTP has it) that it sets unless one was given
        self.retry_after_s = retry_after_s
        if retry_after_s is not None:
            self.headers.setdefault("Retry-After", str(max(1, math.ceil(retry_after_s))))


class BadRequest(SnipserveError):
    status, code = 400, "bad_request"


class BadImage(BadRequest):
    """The bytes are not an image we can decode (empty, truncated, unknown format)."""

    status, code = 400, "bad_image"


class UnsupportedMediaType(SnipserveError):
    status, code = 415, "unsupported_media_type"


class ImageTooLarge(SnipserveError):
    """Too many bytes or pixels; the message names the limit."""

    status, code = 413, "too_large"


class InvalidOptions(SnipserveError):
    """Request options that parse but make no sense (bad levels, unknown class or preset)."""

    status, code = 422, "invalid_options"


class Unauthorized(SnipserveError):
    status, code = 401, "unauthorized"


class QueueFull(SnipserveError):
    """Admission control: the chip queue cannot take this request now."""

    status, code = 503, "queue_full"


class NotReady(SnipserveError):
    status, code = 503, "not_ready"


class DeadlineExceeded(SnipserveError):
    status, code = 504, "deadline_exceeded"


class EngineError(SnipserveError):
    """The inference engine failed on a batch this request was part of."""

    status, code = 500, "engine_error"


class ModelLoadError(SnipserveError):
    """The model file or its card is missing or invalid (a startup error)."""

    status, code = 500, "model_load_error"
