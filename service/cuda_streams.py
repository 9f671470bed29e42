"""CUDA streams for the GPU stages: one non-blocking stream per stage and thread, created on first use.

Every GPU stage runs its CuPy work on a stream of its own instead of the legacy default stream, which would
serialise it with every other stage and with TensorRT's waits (the default stream synchronises with all blocking
streams). Stages: ``levels`` (upload and resize, on request-preparation threads; synchronised before the levels
are handed on), ``soft_nms`` (post-processing threads; its results are read back on the same stream). The crop into
TensorRT's input buffer runs on the engine's own crop stream and TensorRT's stream waits for it by an event
(:class:`service.engines.tensorrt.CudaRunner`). Streams are per thread because CuPy's current stream is.
"""

from __future__ import annotations

import threading
from typing import Any

_local = threading.local()


def stage_stream(stage: str) -> Any:
    """This thread's non-blocking ``cupy.cuda.Stream`` for ``stage`` on the current device."""
    import cupy as cp  # lazy: CPU installs never import CuPy

    streams: dict[tuple[Any, ...], Any] = getattr(_local, "streams", None) or {}
    _local.streams = streams
    key = (stage, cp.cuda.Stream, cp.cuda.Device().id)  # the class: a different CuPy (tests) gets new streams
    if key not in streams:
        streams[key] = cp.cuda.Stream(non_blocking=True)
    return streams[key]
