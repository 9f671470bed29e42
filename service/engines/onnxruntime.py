"""ONNX Runtime engine: one session over an ``.onnx`` file with a card (metadata or sidecar).

ONNX Runtime silently falls back to the CPU when a GPU provider cannot start, and, after a provider fails at
run time, rebuilds the session on the remaining ones. So every session (the fused one included) has that
run-time fallback disabled, and the providers of the session that runs are compared with what was asked: a
warning for each requested provider that is not active, and a failure (or, if allowed, a warning) when no GPU
one is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
        so = ort.SessionOptions()
        so.intra_op_num_threads = config.intra_op_threads
        so.inter_op_num_threads = config.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.spin else "0")
        try:
            self.session = _session(ort, str(model_path), so, session_providers(config, available, model_path))
        except Exception as exc:  # ORT raises its own exception types for bad files
            raise ModelLoadError(f"cannot load ONNX model {model_path}: {exc}") from exc
        self.input_layout: ChipLayout = "float32_nchw"
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
        if config.fuse_preprocess:
            fused = fuse_preprocess(model_path, self.card, self.input_name)
            providers = session_providers(config, available, fused)
            try:
                self.session = _session(ort, fused, so, providers)
            except Exception as exc:
                raise ModelLoadError(f"cannot load {model_path} with fused pre-processing: {exc}") from exc
            self.input_name = FUSED_INPUT
            self.input_layout = "uint8_nhwc"
        # The providers of the session that actually runs (the fused one when fusing), checked once it exists.
        self.providers = list(self.session.get_providers())
        requested = [ORT_PROVIDER_NAMES[p] for p in config.providers]
        for warning in check_providers(requested, self.providers, available, config.allow_cpu_fallback):
            log.warning("%s", warning)
        self.precision = "fp16" if config.fp16 and "TensorrtExecutionProvider" in self.providers else "fp32"

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: batch})
        return [np.asarray(o) for o in outs]

    def close(self) -> None:
        vars(self).pop("session", None)  # idempotent; ORT frees the session with its last reference


def _session(ort: Any, model: str | bytes, so: Any, providers: list[Any]) -> Any:
    """An ``InferenceSession`` with ONNX Runtime's run-time fallback off: after a GPU provider fails during
    ``run``, ORT would otherwise rebuild the session on the remaining providers (ultimately the CPU) and go on,
    silently; with the fallback off the failing call raises and its batch fails (the batcher's contract)."""
    session = ort.InferenceSession(model, sess_options=so, providers=providers)
    session.disable_fallback()
    return session


def _graph_input(model: Path | bytes) -> tuple[str, list[int | str]] | None:
    """Name and dims (ints, or the symbolic name) of the first graph input, read with ``onnx``; None without it."""
    try:
        import onnx  # in the cpu and gpu extras; only needed for the TensorRT EP's profile shapes
    except ImportError:
        return None
    proto = (
        onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
    )
    inp = proto.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


def tensorrt_ep_options(config: EngineConfig, model: Path | bytes) -> dict[str, Any]:
    """TensorRT EP options: FP16, engine cache, and one optimisation profile over the batch dimension
    (``1 .. max_batch``, tuned for ``max_batch``) so that warm-up's batch sizes build one engine, not one per
    new shape. No TF32 switch: the TensorRT EP documents none (its fp32 parity rows allow for TF32)."""
    opts: dict[str, Any] = {"trt_fp16_enable": config.fp16}
    if config.trt_cache_dir is not None:
        config.trt_cache_dir.mkdir(parents=True, exist_ok=True)
        opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(config.trt_cache_dir)}
    graph_input = _graph_input(model)
    if graph_input is None:
        log.warning("onnx is not installed: the TensorRT EP gets no profile shapes and builds one engine per shape")
        return opts
    name, dims = graph_input
    if len(dims) == 4 and isinstance(dims[0], str) and all(isinstance(d, int) and d > 0 for d in dims[1:]):
        tail = "x".join(str(d) for d in dims[1:])
        opts |= {
            "trt_profile_min_shapes": f"{name}:1x{tail}",
            "trt_profile_opt_shapes": f"{name}:{config.max_batch}x{tail}",
            "trt_profile_max_shapes": f"{name}:{config.max_batch}x{tail}",
        }
    return opts


def session_providers(config: EngineConfig, available: Sequence[str], model: Path | bytes) -> list[Any]:
    """The providers (with options) to ask ONNX Runtime for, in ``config``'s priority order, the CPU EP last.

    Providers this ORT build lacks are left out here and reported by :func:`check_providers`. The CUDA EP runs
    with TF32 off (``use_tf32=0``; on by default in ORT): TF32 rounds fp32 convolution inputs to a 10-bit
    mantissa, which breaks fp32 parity with the CPU (README, GPU path)."""
    providers: list[Any] = []
    for p in config.providers:
        name = ORT_PROVIDER_NAMES[p]
        if name not in available:
            continue
        if p == "tensorrt":
            providers.append((name, tensorrt_ep_options(config, model)))
        elif p == "cuda":
            providers.append((name, {"use_tf32": "0"}))
        else:
            providers.append(name)
    if ORT_PROVIDER_NAMES["cpu"] not in [p if isinstance(p, str) else p[0] for p in providers]:
        providers.append(ORT_PROVIDER_NAMES["cpu"])  # ORT needs it for unsupported nodes anyway
    return providers


def check_providers(
    requested: Sequence[str], active: Sequence[str], available: Sequence[str], allow_cpu_fallback: bool
) -> list[str]:
    """Warnings for each requested provider that is not active (e.g. the TensorRT EP missing while the CUDA EP
    runs); raises :class:`ModelLoadError` when GPU providers were asked for and none is active, unless
    ``allow_cpu_fallback``. ``requested``/``active``/``available``: ORT provider names."""
    why = {True: "failed to start", False: "not in this onnxruntime build"}
    warnings = [
        f"requested provider {p} is not active ({why[p in available]}); active: {list(active)}"
        for p in requested
        if p not in active
    ]
    gpu_asked = [p for p in requested if p != ORT_PROVIDER_NAMES["cpu"]]
    if gpu_asked and not set(gpu_asked) & set(active):
        msg = (
            f"requested providers {gpu_asked} are not active (available: {list(available)}; active: {list(active)}); "
            "ONNX Runtime would run on the CPU"
        )
        if not allow_cpu_fallback:
            raise ModelLoadError(msg + ". Set SNIPSERVE_ALLOW_CPU_FALLBACK=true to accept that.")
        warnings.append(msg + " (fallback allowed)")
    return warnings
