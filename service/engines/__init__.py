"""Engines: the :class:`Engine` interface and factory; ONNX Runtime, graph fusion, fake, TensorRT, manifest.

Backends are imported lazily (``create_engine``), so ``import service.engines`` never loads ONNX Runtime,
TensorRT or CuPy.
"""

from service.engines.base import (
    ORT_PROVIDER_NAMES,
    Engine,
    EngineConfig,
    Provider,
    engine_on_gpu,
    static_batch_note,
    warm_up,
)
from service.engines.factory import create_engine

__all__ = [
    "ORT_PROVIDER_NAMES",
    "Engine",
    "EngineConfig",
    "Provider",
    "create_engine",
    "engine_on_gpu",
    "static_batch_note",
    "warm_up",
]
