"""The engine interface: ``infer(batch) -> outputs``, a fixed chip shape and a dynamic batch up to ``max_batch``.

Implementations (each in its own module, imported lazily by :func:`service.engines.factory.create_engine`):

- :mod:`service.engines.onnxruntime`: ONNX Runtime with a provider choice (TensorRT EP, CUDA EP, CPU EP), with
  graph-side pre-processing from :mod:`service.engines.fusion`;
- :mod:`service.engines.tensorrt`: a serialized TensorRT engine with its manifest (:mod:`service.engines.manifest`);
- :mod:`service.engines.fake`: deterministic, no model file, for tests.

Heavy or GPU-only imports happen inside the engine that needs them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.crop import ChipLayout, chip_buffer
from service.modelcard import ModelCard

Provider = Literal["tensorrt", "cuda", "cpu"]
ORT_PROVIDER_NAMES: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


class EngineConfig(BaseModel):
    """How to run the model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["onnxruntime", "tensorrt", "fake"] = Field(default="onnxruntime", description="Engine backend.")
    providers: tuple[Provider, ...] = Field(default=("cpu",), description="ONNX Runtime providers, in priority order.")
    allow_cpu_fallback: bool = Field(
        default=False, description="Start on the CPU when a requested GPU provider is unavailable (else fail)."
    )
    intra_op_threads: int = Field(default=0, ge=0, description="ONNX Runtime intra-op threads (0 = one per core).")
    inter_op_threads: int = Field(default=1, ge=0, description="ONNX Runtime inter-op threads.")
    max_batch: int = Field(default=8, ge=1, le=1024, description="Largest batch one engine call takes.")
    spin: bool = Field(
        default=False,
        description="Let ONNX Runtime's intra-op threads spin between calls. Off: pre/post-processing threads "
        "share the cores with inference, and spinning threads would steal them (see README, benchmarks).",
    )
    fp16: bool = Field(default=False, description="FP16 for the TensorRT EP.")
    fuse_preprocess: bool = Field(
        default=False,
        description="Feed raw uint8 NHWC chips and normalise inside the ONNX graph (see fuse_preprocess()).",
    )
    trt_cache_dir: Path | None = Field(default=None, description="TensorRT EP engine cache directory.")


class Engine(Protocol):
    """What the pipeline needs from an inference backend."""

    card: ModelCard
    name: str  # backend name, e.g. "onnxruntime"
    providers: list[str]  # providers actually active
    precision: str
    max_batch: int
    input_layout: ChipLayout  # what ``infer`` takes: normalised float32 NCHW, or raw uint8 NHWC

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """``batch`` in ``input_layout`` (B <= max_batch chips) -> outputs in the card's order."""
        ...

    def close(self) -> None: ...


def engine_on_gpu(engine: Engine) -> bool:
    """True when inference runs on a GPU (TensorRT, or an ONNX Runtime GPU provider is active)."""
    gpu_providers = {ORT_PROVIDER_NAMES["cuda"], ORT_PROVIDER_NAMES["tensorrt"]}
    return engine.name == "tensorrt" or bool(gpu_providers & set(engine.providers))


def warm_up(engine: Engine, sizes: Sequence[int] = (1,)) -> float:
    """Run zero batches of the given sizes once (first-call allocations, kernel selection); returns seconds."""
    c = engine.card.input_size
    t0 = time.perf_counter()
    for b in sizes:
        batch = chip_buffer(engine.input_layout, min(b, engine.max_batch), c)
        batch[...] = 0
        engine.infer(batch)
    return time.perf_counter() - t0


def static_batch_note(engine: Engine) -> str | None:
    """What to tell an operator when the model's batch dimension is fixed in its graph (else None).

    A static batch of 1 (the default of ``yolo export format=onnx``) serves correctly, but every chip is one
    engine call: the batcher cannot put chips of several requests into one call."""
    fixed = getattr(engine, "static_batch", None)
    if not isinstance(fixed, int):
        return None
    return (
        f"the model's batch dimension is fixed at {fixed} in its graph, so at most {fixed} chip(s) run per engine "
        "call and batching across requests is limited; for throughput export it with a dynamic batch, e.g. "
        "`yolo export model=yolov8n.pt format=onnx dynamic=True` (Ultralytics) or torch.onnx.export(..., "
        "dynamic_axes={'images': {0: 'batch'}})"
    )
