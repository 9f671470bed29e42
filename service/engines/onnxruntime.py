"""ONNX Runtime engine: one session over an ``.onnx`` file with a card (metadata or sidecar).

ONNX Runtime silently falls back to the CPU when a GPU provider cannot start; we compare what was asked
with ``session.get_providers()`` and fail (or, if allowed, warn) when they differ.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from service.crop import ChipLayout
from service.engines.base import ORT_PROVIDER_NAMES, EngineConfig
from service.engines.fusion import FUSED_INPUT, fuse_preprocess
from service.errors import ModelLoadError
from service.modelcard import load_card

log = logging.getLogger("snipserve.engine")


class OnnxRuntimeEngine:
    """ONNX Runtime session over one ``.onnx`` file with a card (metadata or sidecar)."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, config: EngineConfig) -> None:
        import onnxruntime as ort  # lazy: keeps `import service` light

        if not model_path.is_file():
            raise ModelLoadError(f"model file not found: {model_path}")
        available = ort.get_available_providers()
        requested = [ORT_PROVIDER_NAMES[p] for p in config.providers]
        providers: list[Any] = []
        for name in requested:
            if name not in available:
                continue
            if name == "TensorrtExecutionProvider":
                opts: dict[str, Any] = {"trt_fp16_enable": config.fp16}
                if config.trt_cache_dir is not None:
                    config.trt_cache_dir.mkdir(parents=True, exist_ok=True)
                    opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(config.trt_cache_dir)}
                providers.append((name, opts))
            else:
                providers.append(name)
        if "CPUExecutionProvider" not in [p if isinstance(p, str) else p[0] for p in providers]:
            providers.append("CPUExecutionProvider")  # ORT needs it for unsupported nodes anyway
        so = ort.SessionOptions()
        so.intra_op_num_threads = config.intra_op_threads
        so.inter_op_num_threads = config.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin else "0")
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise ModelLoadError(f"cannot load ONNX model {model_path}: {exc}") from exc
        self.input_layout: ChipLayout = "float32_nchw"
        self.providers = list(self.session.get_providers())
        gpu_asked = [p for p in requested if p != "CPUExecutionProvider"]
        missing = [p for p in gpu_asked if p not in self.providers]
        if gpu_asked and len(missing) == len(gpu_asked):
            msg = (
                f"requested providers {gpu_asked} are not active (available: {available}; active: {self.providers}); "
                "ONNX Runtime would run on the CPU"
            )
            if not config.allow_cpu_fallback:
                raise ModelLoadError(msg + ". Set SNIPSERVE_ALLOW_CPU_FALLBACK=true to accept that.")
            log.warning(msg + " (fallback allowed)")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.card = load_card(model_path, dict(meta))
        self.input_name = self.card.input_name or self.session.get_inputs()[0].name
        names = [o.name for o in self.session.get_outputs()]
        self.output_names = list(self.card.output_names or names)
        unknown = [n for n in self.output_names if n not in names]
        if unknown:
            raise ModelLoadError(f"model card names outputs {unknown} that the model lacks (it has {names})")
        shape = self.session.get_inputs()[0].shape
        c = self.card.input_size
        if len(shape) != 4 or any(
            isinstance(d, int) and d != want for d, want in zip(shape[1:], (3, c, c), strict=True)
        ):
            raise ModelLoadError(f"model input shape {shape} does not match [B, 3, {c}, {c}] from its card")
        fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.static_batch: int | None = fixed_batch  # a batch dimension fixed in the graph (see static_batch_note)
        self.max_batch = min(config.max_batch, fixed_batch) if fixed_batch else config.max_batch
        self.precision = "fp16" if config.fp16 and "TensorrtExecutionProvider" in self.providers else "fp32"
        if config.fuse_preprocess:
            fused = fuse_preprocess(model_path, self.card, self.input_name)
            try:
                self.session = ort.InferenceSession(fused, sess_options=so, providers=providers)
            except Exception as exc:
                raise ModelLoadError(f"cannot load {model_path} with fused pre-processing: {exc}") from exc
            self.input_name = FUSED_INPUT
            self.input_layout = "uint8_nhwc"

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: batch})
        return [np.asarray(o) for o in outs]

    def close(self) -> None:
        vars(self).pop("session", None)  # idempotent; ORT frees the session with its last reference
