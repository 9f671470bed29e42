"""Python client for a snipserve server: :class:`Client` (sync) and :class:`AsyncClient` (asyncio).

A package of its own: it needs httpx, websockets and pydantic, never the server's dependencies (FastAPI,
ONNX Runtime, OpenCV; OpenCV/NumPy only to send an image given as an array). See :mod:`snipserve_client.client`.
"""

from snipserve_client.client import (
    DEFAULT_TIMEOUT_S,
    AsyncClient,
    BatchItem,
    Client,
    Detection,
    DetectionResult,
    ErrorInfo,
    FrameResult,
    ImageInput,
    ImageSize,
    LevelInfo,
    OptionValue,
    Policy,
    SnipserveClientError,
    StreamFrame,
    encode_image,
    option_params,
    raise_for_error,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AsyncClient",
    "BatchItem",
    "Client",
    "Detection",
    "DetectionResult",
    "ErrorInfo",
    "FrameResult",
    "ImageInput",
    "ImageSize",
    "LevelInfo",
    "OptionValue",
    "Policy",
    "SnipserveClientError",
    "StreamFrame",
    "encode_image",
    "option_params",
    "raise_for_error",
]
