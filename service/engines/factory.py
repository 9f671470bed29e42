"""The engine factory: the backend a config names, imported only when chosen (TensorRT/CuPy never on CPU hosts)."""

from __future__ import annotations

from pathlib import Path

from service.engines.base import Engine, EngineConfig
from service.errors import ModelLoadError


def create_engine(model_path: Path | None, config: EngineConfig) -> Engine:
    """The engine ``config.kind`` names, loaded from ``model_path`` (unused by the fake engine)."""
    if config.kind == "fake":
        from service.engines.fake import FakeEngine

        return FakeEngine(max_batch=config.max_batch)
    if model_path is None:
        raise ModelLoadError("no model path given")
    if config.kind == "tensorrt":
        from service.engines.tensorrt import TensorRTEngine  # lazy: TensorRT/CuPy load only for this engine

        return TensorRTEngine(model_path, config)
    from service.engines.onnxruntime import OnnxRuntimeEngine  # lazy: onnxruntime

    return OnnxRuntimeEngine(model_path, config)
