"""Engines: one interface, ``infer(batch) -> outputs``, with a fixed chip shape and a dynamic batch.

- :class:`OnnxRuntimeEngine`: ONNX Runtime with a provider choice (TensorRT EP, CUDA EP, CPU EP). ONNX
  Runtime silently falls back to the CPU when a GPU provider cannot start; we compare what was asked
  with ``session.get_providers()`` and fail (or, if allowed, warn) when they differ.
- :class:`FakeEngine`: deterministic, no model file: "detects" saturated red/green/blue blobs. Used by
  tests and to exercise the whole service without a trained model.

Heavy or GPU-only imports happen inside the engine that needs them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.crop import ChipLayout, chip_buffer
from service.errors import ModelLoadError
from service.modelcard import ModelCard, load_card
from service.plan import LevelSpec

log = logging.getLogger("snipserve.engine")

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


FUSED_INPUT = "chips_uint8_nhwc"


def fuse_preprocess(model_path: Path, card: ModelCard, input_name: str) -> bytes:
    """The model with its pre-processing moved into the graph, serialised.

    The new input ``chips_uint8_nhwc`` (``uint8 [B, C, C, 3]``, RGB) is cast, transposed to NCHW,
    channel-flipped for BGR models, and normalised with the card's mean/std, feeding the original input.
    The service then copies bytes instead of writing normalised floats (a quarter of the memory traffic),
    and the arithmetic runs in ONNX Runtime's own thread pool (benchmarks: ``snipserve bench``).
    """
    import onnx  # lazy: only needed when fusing
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    original = next(i for i in graph.input if i.name == input_name)
    c = card.input_size
    std = np.asarray(card.std, np.float32)
    mean = np.asarray(card.mean, np.float32)
    inits = [
        numpy_helper.from_array((255.0 * mean).reshape(1, 3, 1, 1), "pre_mean255"),
        numpy_helper.from_array((1.0 / (255.0 * std)).reshape(1, 3, 1, 1), "pre_inv_std255"),
    ]
    nodes = [
        helper.make_node("Cast", [FUSED_INPUT], ["pre_f32"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["pre_f32"], ["pre_nchw"], perm=[0, 3, 1, 2]),
    ]
    source = "pre_nchw"
    if card.channel_order == "BGR":
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), "pre_bgr"))
        nodes.append(helper.make_node("Gather", ["pre_nchw", "pre_bgr"], ["pre_ordered"], axis=1))
        source = "pre_ordered"
    nodes += [
        helper.make_node("Sub", [source, "pre_mean255"], ["pre_centred"]),
        helper.make_node("Mul", ["pre_centred", "pre_inv_std255"], [input_name]),
    ]
    batch_dim = original.type.tensor_type.shape.dim[0]
    batch: str | int = batch_dim.dim_param or batch_dim.dim_value or "batch"
    graph.input.remove(original)
    graph.input.insert(0, helper.make_tensor_value_info(FUSED_INPUT, TensorProto.UINT8, [batch, c, c, 3]))
    graph.initializer.extend(inits)
    for node in reversed(nodes):
        graph.node.insert(0, node)
    return bytes(model.SerializeToString())


FAKE_CARD = ModelCard(
    name="fake-rgb-blobs",
    version="1",
    classes=("red", "green", "blue"),
    input_size=128,
    output_format="end2end",
    sweet_spot=(8.0, 48.0),
    default_levels=(LevelSpec(scale=1.0), LevelSpec(long_side=128)),
    presets={"fast": (LevelSpec(long_side=128),)},
    score_threshold=0.3,
    max_per_chip=100,
    training={"note": "not trained: a deterministic colour-blob detector for tests"},
)


class FakeEngine:
    """Deterministic stand-in: per chip, each 4-connected blob of saturated red, green or blue pixels
    becomes a detection of class 0, 1 or 2 with its bounding box and score 0.9. Outputs the ``end2end``
    layout ``[B, M, 6]``. ``delay`` (s per call) and ``fail`` (called with the batch; raise to fail) let
    tests model slow or broken engines."""

    name = "fake"

    def __init__(
        self,
        card: ModelCard = FAKE_CARD,
        max_batch: int = 8,
        delay: float = 0.0,
        fail: Callable[[np.ndarray], None] | None = None,
    ) -> None:
        self.card = card
        self.max_batch = max_batch
        self.providers = ["cpu"]
        self.precision = "fp32"
        self.input_layout: ChipLayout = "float32_nchw"
        self.delay = delay
        self.fail = fail
        self.calls: list[int] = []  # batch sizes, for tests
        self._lock = threading.Lock()

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        import cv2

        with self._lock:
            self.calls.append(int(batch.shape[0]))
        if self.fail is not None:
            self.fail(batch)
        if self.delay:
            time.sleep(self.delay)
        m = self.card.max_per_chip
        out = np.zeros((batch.shape[0], m, 6), np.float32)
        mean = np.asarray(self.card.mean, np.float32)[:, None, None]
        std = np.asarray(self.card.std, np.float32)[:, None, None]
        for i, chip in enumerate(batch):
            pix = (chip * std + mean) * 255.0  # back to RGB pixels, [3, C, C]
            hi, lo = pix > 200, pix < 60
            dets = []
            for cls in range(3):
                others = [j for j in range(3) if j != cls]
                mask = (hi[cls] & lo[others[0]] & lo[others[1]]).astype(np.uint8)
                n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
                for x, y, w, h, _area in stats[1:]:
                    dets.append((x, y, x + w, y + h, 0.9, cls))
            dets = dets[:m]
            if dets:
                out[i, : len(dets)] = np.asarray(dets, np.float32)
        return [out]

    def close(self) -> None:
        pass


def create_engine(model_path: Path | None, config: EngineConfig) -> Engine:
    """The engine ``config.kind`` names, loaded from ``model_path`` (unused by the fake engine)."""
    if config.kind == "fake":
        return FakeEngine(max_batch=config.max_batch)
    if model_path is None:
        raise ModelLoadError("no model path given")
    if config.kind == "tensorrt":
        from service.engine_tensorrt import TensorRTEngine  # lazy: TensorRT/CuPy load only for this engine

        return TensorRTEngine(model_path, config)
    return OnnxRuntimeEngine(model_path, config)


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
