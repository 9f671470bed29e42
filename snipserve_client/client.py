"""Python client for a snipserve server: :class:`Client` (sync) and :class:`AsyncClient` (asyncio).

Both speak ``POST /v1/detect`` (one image), ``POST /v1/detect/batch`` (many images, NDJSON) and
``WS /v1/stream`` (frames, one reply per frame in order). Options are the ``/v1/detect`` option names as
keyword arguments (``preset="fast"``, ``score_threshold=0.5``, ``classes=["car", "truck"]``). Results
are typed (:class:`DetectionResult`; boxes ``[x1, y1, x2, y2]`` in original-image pixels). Every server
error raises :class:`SnipserveClientError` carrying the HTTP status and the server's code and message.

>>> with Client("http://127.0.0.1:8000") as client:  # doctest: +SKIP
...     result = client.detect("drone.jpg", score_threshold=0.5)
...     print(len(result.detections), result.timings["total"])
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias
from urllib.parse import urlencode

import httpx
import websockets
import websockets.sync.client
from pydantic import BaseModel, ConfigDict, Field

from snipserve_client.options import OPTION_NAMES

if TYPE_CHECKING:  # numpy and OpenCV are imported only to encode an array: the client needs neither
    import numpy as np

ImageInput: TypeAlias = "bytes | str | os.PathLike[str] | np.ndarray"
"""Encoded image bytes, a path to an image file, or a ``uint8 [H, W, 3]`` RGB array (sent as PNG)."""
OptionValue = str | int | float | bool | Sequence[str | int] | None
StreamFrame = tuple[bytes, Mapping[str, Any] | None]
"""One stream frame: encoded image bytes and optional JSON metadata echoed back with its reply."""
Policy = Literal["block", "drop_oldest"]

DEFAULT_TIMEOUT_S = 120.0


# ---- results -------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ImageSize(_Model):
    width: int = Field(description="Pixels.")
    height: int = Field(description="Pixels.")


class Detection(_Model):
    box: tuple[float, float, float, float] = Field(description="x1, y1, x2, y2 in original-image pixels.")
    score: float
    class_id: int
    label: str
    level: int = Field(description="Pyramid level the detection came from (0 = finest).")


class LevelInfo(_Model):
    index: int
    scale: float = Field(description="Level pixels per original pixel.")
    size: tuple[int, int] = Field(description="Level width, height in pixels.")
    valid: tuple[float, float | None] = Field(description="Valid range on sqrt(area), original px; -1/None open.")
    chips: int


class DetectionResult(_Model):
    """The ``/v1/detect`` JSON body."""

    image: ImageSize
    detections: list[Detection]
    model: str
    chips: int
    levels: list[LevelInfo] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict, description="Stage durations in milliseconds.")


class ErrorInfo(_Model):
    status: int
    code: str
    message: str


class FrameResult(_Model):
    """The reply to one stream frame: a result, an error, or ``dropped`` (policy ``drop_oldest``)."""

    type: Literal["result", "error", "dropped"]
    seq: int = Field(description="Frame number on this connection, from 0.")
    meta: Any = None
    result: DetectionResult | None = None
    error: ErrorInfo | None = None
    dropped_total: int | None = None


class BatchItem(_Model):
    """One line of ``POST /v1/detect/batch``: the result or error of the image at ``index``."""

    type: Literal["result", "error"]
    index: int
    filename: str | None = None
    result: DetectionResult | None = None
    error: ErrorInfo | None = None


class SnipserveClientError(Exception):
    """The server refused a request (``status`` >= 400) or could not be reached (``status`` 0)."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        # 503: when to try again -- the body's precise hint, else the Retry-After header (whole seconds)
        self.retry_after_s = retry_after_s


# ---- shared helpers ------------------------------------------------------------------------------


def encode_image(image: ImageInput) -> bytes:
    """Bytes to upload: bytes as they are, a file's contents, or an RGB array encoded as PNG."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    return _encode_array(image)


def _encode_array(image: np.ndarray) -> bytes:
    import cv2  # lazy: only arrays need it
    import numpy as np

    if not isinstance(image, np.ndarray):
        raise TypeError(f"images are bytes, a path or a uint8 [H, W, 3] RGB array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}")
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("PNG encoding failed")
    return bytes(buf)


def _name(image: ImageInput, index: int) -> str:
    return Path(image).name if isinstance(image, str | os.PathLike) else f"image{index}.png"


ROUTE_PARAMS = ("timeout", "window", "policy", "format", "image_id")
"""Parameters of the routes themselves, next to the request options (:data:`OPTION_NAMES`)."""


def option_params(options: Mapping[str, OptionValue]) -> dict[str, str]:
    """Keyword options -> the query strings ``/v1/detect`` parses (lists comma-joined, bools lower-case).

    The names are those of :class:`snipserve_client.options.RequestOptions` (the one declaration the server parses
    too); an unknown name is a ``TypeError`` here rather than an option the server would never see."""
    unknown = sorted(set(options) - set(OPTION_NAMES) - set(ROUTE_PARAMS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; the options are {list(OPTION_NAMES)} (and {list(ROUTE_PARAMS)})")
    params: dict[str, str] = {}
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            params[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            params[key] = str(value)
        else:
            params[key] = ",".join(str(v) for v in value)
    return params


def _auth(api_key: str | None) -> dict[str, str]:
    return {"X-API-Key": api_key} if api_key else {}


def raise_for_error(response: httpx.Response) -> None:
    """Raise :class:`SnipserveClientError` with the server's code and message for a non-2xx response."""
    if response.status_code < 400:
        return
    retry: float | None = None
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
        if error.get("retry_after_s") is not None:
            retry = float(error["retry_after_s"])
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = "http_error", response.text[:500] or response.reason_phrase
    if retry is None and response.headers.get("retry-after", "").isdigit():
        retry = float(response.headers["retry-after"])
    raise SnipserveClientError(response.status_code, code, message, retry)


def _ws_url(base_url: str, params: Mapping[str, str]) -> str:
    base = base_url.rstrip("/")
    scheme, sep, rest = base.partition("://")
    ws_scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    return f"{ws_scheme}{sep}{rest}/v1/stream?{urlencode(params)}"


def _refusal(body: dict[str, Any]) -> None:
    if body.get("type") == "error" and body.get("seq") is None:  # the connection itself was refused
        err = body["error"]
        raise SnipserveClientError(int(err["status"]), str(err["code"]), str(err["message"]))


def _hello(message: str | bytes) -> dict[str, Any]:
    """The server's first message: ``{"type": "ready", "window", "policy", "model"}``, or a refusal (raised)."""
    body: dict[str, Any] = json.loads(message)
    _refusal(body)
    if body.get("type") != "ready":
        raise SnipserveClientError(0, "protocol_error", f"expected a 'ready' message, got {str(body)[:200]}")
    return body


def _frame_reply(message: str | bytes) -> FrameResult:
    body = json.loads(message)
    _refusal(body)
    return FrameResult.model_validate(body)


def _stream_params(window: int, policy: Policy, options: Mapping[str, OptionValue]) -> dict[str, str]:
    return option_params({**options, "window": window, "policy": policy})


def _batch_files(images: Sequence[ImageInput]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (_name(img, i), encode_image(img), "application/octet-stream")) for i, img in enumerate(images)]


def _connection_error(exc: Exception) -> SnipserveClientError:
    return SnipserveClientError(0, "connection_error", f"{type(exc).__name__}: {exc}")


# ---- sync ----------------------------------------------------------------------------------------


class Client:
    """Synchronous client (httpx; the stream uses websockets' threaded client). Use as a context manager."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._http = httpx.Client(base_url=self.base_url, headers=_auth(api_key), timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post_image(self, image: ImageInput, params: dict[str, str]) -> httpx.Response:
        files = {"file": (_name(image, 0), encode_image(image), "application/octet-stream")}
        try:
            response = self._http.post("/v1/detect", params=params, files=files)
        except httpx.HTTPError as exc:
            raise _connection_error(exc) from exc
        raise_for_error(response)
        return response

    def detect(self, image: ImageInput, **options: OptionValue) -> DetectionResult:
        """Detections in one image."""
        return DetectionResult.model_validate(self._post_image(image, option_params(options)).json())

    def detect_coco(self, image: ImageInput, image_id: int | str = 0, **options: OptionValue) -> list[dict[str, Any]]:
        """COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``."""
        params = option_params(options) | {"format": "coco", "image_id": str(image_id)}
        body: list[dict[str, Any]] = self._post_image(image, params).json()
        return body

    def render(self, image: ImageInput, **options: OptionValue) -> bytes:
        """JPEG bytes of the image with the boxes drawn by the server."""
        return self._post_image(image, option_params(options) | {"format": "jpeg"}).content

    def detect_batch(self, images: Sequence[ImageInput], **options: OptionValue) -> Iterator[BatchItem]:
        """One :class:`BatchItem` per image, in completion order (``item.index`` is the input position)."""
        try:
            with self._http.stream(
                "POST", "/v1/detect/batch", params=option_params(options), files=_batch_files(images)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for_error(response)
                for line in response.iter_lines():
                    body = json.loads(line) if line.strip() else {}
                    if body.get("type") in ("result", "error"):
                        yield BatchItem.model_validate(body)
        except httpx.HTTPError as exc:
            raise _connection_error(exc) from exc

    def models(self) -> dict[str, Any]:
        """The ``/v1/models`` body (model card and engine)."""
        try:
            response = self._http.get("/v1/models")
        except httpx.HTTPError as exc:
            raise _connection_error(exc) from exc
        raise_for_error(response)
        body: dict[str, Any] = response.json()
        return body

    def ready(self) -> bool:
        """True when ``/readyz`` answers 200."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def stream(
        self, frames: Iterable[StreamFrame], *, window: int = 8, policy: Policy = "block", **options: OptionValue
    ) -> Iterator[FrameResult]:
        """Send ``frames`` over ``WS /v1/stream``; yields one :class:`FrameResult` per frame, in order.

        With policy ``block`` at most ``window`` frames are sent ahead of their replies."""
        url = _ws_url(self.base_url, _stream_params(window, policy, options))
        try:
            ws = websockets.sync.client.connect(
                url, additional_headers=_auth(self.api_key), max_size=None, open_timeout=self.timeout
            )
        except (OSError, websockets.WebSocketException) as exc:
            raise _connection_error(exc) from exc
        with ws:
            granted = int(_hello(ws.recv(timeout=self.timeout)).get("window", window))  # the server may cap it
            yield from _SyncStream(ws, granted if policy == "block" else None, self.timeout).run(frames)


class _SyncStream:
    """A sender thread feeding the socket; the caller's thread reads replies."""

    def __init__(self, ws: websockets.sync.client.ClientConnection, credit: int | None, timeout: float) -> None:
        self.ws = ws
        self.credit = threading.Semaphore(credit) if credit else None
        self.timeout = timeout
        self.sent = 0
        self.finished = threading.Event()
        self.failure: queue.SimpleQueue[BaseException] = queue.SimpleQueue()
        self.stop = threading.Event()

    def _send_all(self, frames: Iterable[StreamFrame]) -> None:
        try:
            for data, meta in frames:
                while self.credit is not None and not self.credit.acquire(timeout=0.1):
                    if self.stop.is_set():
                        return
                if self.stop.is_set():
                    return
                if meta is not None:
                    self.ws.send(json.dumps(dict(meta)))
                self.ws.send(data)
                self.sent += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            self.failure.put(exc)
        finally:
            self.finished.set()

    def run(self, frames: Iterable[StreamFrame]) -> Iterator[FrameResult]:
        sender = threading.Thread(target=self._send_all, args=(frames,), name="snipserve-client-sender", daemon=True)
        sender.start()
        received = 0
        try:
            while not (self.finished.is_set() and received == self.sent):
                if not self.failure.empty():
                    raise self.failure.get()
                if received == self.sent:
                    self.finished.wait(0.01)
                    continue
                try:
                    message = self.ws.recv(timeout=self.timeout)
                except TimeoutError as exc:
                    raise SnipserveClientError(0, "timeout", f"no reply within {self.timeout} s") from exc
                received += 1
                if self.credit is not None:
                    self.credit.release()
                yield _frame_reply(message)
            if not self.failure.empty():
                raise self.failure.get()
        finally:
            self.stop.set()
            sender.join(5)


# ---- async ---------------------------------------------------------------------------------------


class AsyncClient:
    """Asyncio client (httpx + websockets). Use as an async context manager."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=_auth(api_key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post_image(self, image: ImageInput, params: dict[str, str]) -> httpx.Response:
        files = {"file": (_name(image, 0), encode_image(image), "application/octet-stream")}
        try:
            response = await self._http.post("/v1/detect", params=params, files=files)
        except httpx.HTTPError as exc:
            raise _connection_error(exc) from exc
        raise_for_error(response)
        return response

    async def detect(self, image: ImageInput, **options: OptionValue) -> DetectionResult:
        """Detections in one image."""
        response = await self._post_image(image, option_params(options))
        return DetectionResult.model_validate(response.json())

    async def detect_coco(
        self, image: ImageInput, image_id: int | str = 0, **options: OptionValue
    ) -> list[dict[str, Any]]:
        """COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``."""
        params = option_params(options) | {"format": "coco", "image_id": str(image_id)}
        body: list[dict[str, Any]] = (await self._post_image(image, params)).json()
        return body

    async def render(self, image: ImageInput, **options: OptionValue) -> bytes:
        """JPEG bytes of the image with the boxes drawn by the server."""
        return (await self._post_image(image, option_params(options) | {"format": "jpeg"})).content

    async def detect_batch(self, images: Sequence[ImageInput], **options: OptionValue) -> AsyncIterator[BatchItem]:
        """One :class:`BatchItem` per image, in completion order (``item.index`` is the input position)."""
        try:
            async with self._http.stream(
                "POST", "/v1/detect/batch", params=option_params(options), files=_batch_files(images)
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise_for_error(response)
                async for line in response.aiter_lines():
                    body = json.loads(line) if line.strip() else {}
                    if body.get("type") in ("result", "error"):
                        yield BatchItem.model_validate(body)
        except httpx.HTTPError as exc:
            raise _connection_error(exc) from exc

    async def models(self) -> dict[str, Any]:
        """The ``/v1/models`` body (model card and engine)."""
        try:
            response = await self._http.get("/v1/models")
        except httpx.HTTPError as exc:
            raise _connection_error(exc) from exc
        raise_for_error(response)
        body: dict[str, Any] = response.json()
        return body

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def stream(
        self,
        frames: Iterable[StreamFrame] | AsyncIterable[StreamFrame],
        *,
        window: int = 8,
        policy: Policy = "block",
        **options: OptionValue,
    ) -> AsyncIterator[FrameResult]:
        """Send ``frames`` over ``WS /v1/stream``; yields one :class:`FrameResult` per frame, in order.

        With policy ``block`` at most ``window`` frames are sent ahead of their replies; with
        ``drop_oldest`` frames are sent as fast as they come and the server drops what it cannot keep up with.
        """
        url = _ws_url(self.base_url, _stream_params(window, policy, options))
        try:
            ws = await websockets.connect(
                url, additional_headers=_auth(self.api_key), max_size=None, open_timeout=self.timeout
            )
        except (OSError, websockets.WebSocketException) as exc:
            raise _connection_error(exc) from exc
        async with ws:
            granted = int(_hello(await asyncio.wait_for(ws.recv(), self.timeout)).get("window", window))
            session = _AsyncStream(ws, granted if policy == "block" else None, self.timeout)
            async for reply in session.run(frames):
                yield reply


class _AsyncStream:
    """A sender task feeding the socket; the caller's task reads replies."""

    def __init__(self, ws: websockets.ClientConnection, credit: int | None, timeout: float) -> None:
        self.ws = ws
        self.credit = asyncio.Semaphore(credit) if credit else None
        self.timeout = timeout
        self.sent = 0
        self.sent_event = asyncio.Event()

    async def _send_all(self, frames: Iterable[StreamFrame] | AsyncIterable[StreamFrame]) -> None:
        async for data, meta in _aiter(frames):
            if self.credit is not None:
                await self.credit.acquire()
            if meta is not None:
                await self.ws.send(json.dumps(dict(meta)))
            await self.ws.send(data)
            self.sent += 1
            self.sent_event.set()

    async def run(self, frames: Iterable[StreamFrame] | AsyncIterable[StreamFrame]) -> AsyncIterator[FrameResult]:
        sender = asyncio.create_task(self._send_all(frames), name="snipserve-client-sender")
        receiver: asyncio.Task[str | bytes] | None = None
        received = 0
        try:
            while True:
                if sender.done():
                    sender.result()  # re-raise a failure of the frame source or the socket
                    if received == self.sent:
                        return
                if receiver is None and received < self.sent:
                    receiver = asyncio.create_task(self.ws.recv())
                self.sent_event.clear()
                waiting: set[asyncio.Future[Any]] = {asyncio.ensure_future(self.sent_event.wait())}
                waiting |= {receiver} if receiver is not None else set()
                waiting |= {sender} if not sender.done() else set()
                done, _ = await asyncio.wait(waiting, timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED)
                for fut in waiting - {receiver, sender}:
                    fut.cancel()
                if not done:
                    raise SnipserveClientError(0, "timeout", f"no reply within {self.timeout} s")
                if receiver is not None and receiver in done:
                    message, receiver = receiver.result(), None
                    received += 1
                    if self.credit is not None:
                        self.credit.release()
                    yield _frame_reply(message)
        finally:
            for task in (sender, receiver):
                if task is not None:
                    task.cancel()
            await asyncio.gather(sender, *([receiver] if receiver else []), return_exceptions=True)


async def _aiter(frames: Iterable[StreamFrame] | AsyncIterable[StreamFrame]) -> AsyncIterator[StreamFrame]:
    if isinstance(frames, AsyncIterable):
        async for frame in frames:
            yield frame
    else:
        for frame in frames:
            yield frame
            await asyncio.sleep(0)  # let the receiver run between frames of a fast synchronous source
