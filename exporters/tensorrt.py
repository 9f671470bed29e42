"""ONNX -> serialized TensorRT engine with the TensorRT Python API (10.x named-tensor API), plus a manifest.

Status: written against TensorRT 10's documented Python API; never run (no GPU in the session that wrote it;
README, GPU path, status table). ``scripts/gpu_check.py`` builds FP32/FP16/INT8 engines and checks parity.

Build: parse the ONNX file, one optimisation profile over the batch dimension (min/opt/max; the chip shape
is fixed by the card), a workspace limit, a timing cache loaded from and saved back to a file (rebuilds and
the other precisions reuse kernel timings), the precision flag, ``build_serialized_network``. The engine is
written with ``<stem>.manifest.json`` beside it (:mod:`service.engines.manifest`): TensorRT version, GPU and
compute capability, precision, profile, SHA-256 and card of the source ONNX.

Precision on TensorRT versions:
- TF32 is cleared in every build: ``fp32`` means fp32 (TF32's 10-bit mantissa would break the 1e-3 parity).
- FP16: the (weak-typing) FP16 builder flag of TensorRT 10.x. TensorRT 11 removed it: there ``fp16`` is a clear
  error (convert the ONNX with ModelOpt AutoCast and build that as fp32), never a silent FP32 engine.
- INT8: explicit quantization, as TensorRT 10 recommends (implicit calibration -- ``IInt8EntropyCalibrator2``,
  ``int8_calibrator``, ``set_calibration_profile`` -- is deprecated since 10.1, warns, and is gone in 11). The
  ONNX is quantized with Q/DQ nodes by ONNX Runtime's static quantizer (symmetric INT8, per-channel weights),
  calibrated on chips cut by the service's own planner and pre-processing from sample images, and built as a
  strongly typed network without precision flags (works on TensorRT 10 and 11 alike).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from exporters.parity import OutputParity, Reference
from service.engines.manifest import (
    BatchProfile,
    EngineManifest,
    Precision,
    read_manifest,
    sha256_file,
    write_manifest,
)
from service.modelcard import ModelCard

log = logging.getLogger("snipserve.exporters.tensorrt")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class TensorRTExportConfig(BaseModel):
    """How to build the engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Precision = Field(default="fp16", description="fp32, fp16, or int8 (explicit Q/DQ, calibrated).")
    profile: BatchProfile = Field(default_factory=BatchProfile, description="Batch optimisation profile.")
    workspace_mib: int = Field(default=2048, ge=16, description="Builder workspace memory pool limit, MiB.")
    timing_cache: Path | None = Field(default=None, description="Timing cache file, read if present, then updated.")
    calibration_images: Path | None = Field(default=None, description="Folder of sample images (INT8 only).")
    calibration_chips: int = Field(default=256, ge=8, description="Chips cut from them for INT8 calibration.")
    calibration_cache: Path | None = Field(
        default=None, description="INT8: the calibrated Q/DQ ONNX model, written there and reused when present."
    )
    calibration_method: Literal["entropy", "minmax", "percentile"] = Field(
        default="entropy", description="INT8: how activation ranges are calibrated (ONNX Runtime's quantizer)."
    )


class ExportError(RuntimeError):
    """The engine cannot be built as asked (unsupported precision, parse or build failure)."""


@dataclass(frozen=True)
class TensorRTExportReport:
    engine_path: Path
    manifest: EngineManifest
    size_bytes: int
    build_s: float

    def summary(self) -> str:
        m = self.manifest
        p = m.profile
        return (
            f"{self.engine_path}: {self.size_bytes / 1e6:.2f} MB, TensorRT {m.tensorrt_version}, {m.precision}, "
            f"batch {p.min_batch}/{p.opt_batch}/{p.max_batch}, {m.gpu_name} (sm {m.compute_capability}), "
            f"built in {self.build_s:.1f} s; manifest beside it"
        )


def onnx_card(onnx_path: Path) -> ModelCard:
    """The card of an ONNX model (metadata and/or sidecar), read with ONNX Runtime (in the gpu extra)."""
    import onnxruntime as ort

    from service.modelcard import load_card

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return load_card(onnx_path, dict(sess.get_modelmeta().custom_metadata_map))


def calibration_chips(images_dir: Path, card: ModelCard, max_chips: int, seed: int = 0) -> np.ndarray:
    """Chips ``float32 [N, 3, C, C]`` for INT8 calibration, cut from the images in ``images_dir`` by the service's
    own planner, resizer and normaliser at the card's default levels -- exactly what the engine will be fed.
    Images are visited in name order; ``max_chips`` chips are sampled evenly (seeded) from all of them."""
    import cv2

    from service.crop import Normalizer, crop_plan, resize_levels
    from service.plan import PlanConfig, plan

    files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ExportError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {images_dir} for INT8 calibration")
    norm = Normalizer.from_card(card)
    cfg = PlanConfig(chip_size=card.input_size, levels=card.default_levels, sweet_spot=card.sweet_spot)
    chips: list[np.ndarray] = []
    per_image = max(1, -(-max_chips // len(files)))
    rng = np.random.default_rng(seed)
    for path in files:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            log.warning("skipping unreadable calibration image %s", path)
            continue
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        p = plan((img.shape[1], img.shape[0]), cfg)
        levels = resize_levels(img, p)
        all_chips = crop_plan(levels, p, norm)
        pick = rng.choice(all_chips.shape[0], min(per_image, all_chips.shape[0]), replace=False)
        chips.extend(all_chips[np.sort(pick)])
        if len(chips) >= max_chips:
            break
    if not chips:
        raise ExportError(f"no readable images under {images_dir} for INT8 calibration")
    return np.stack(chips[:max_chips]).astype(np.float32)


class _ChipReader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over calibration chips, ``batch`` at a time."""

    def __init__(self, input_name: str, chips: np.ndarray, batch: int) -> None:
        self.input_name, self.chips, self.batch, self.cursor = input_name, chips, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.cursor >= self.chips.shape[0]:
            return None
        rows = self.chips[self.cursor : self.cursor + self.batch]
        self.cursor += self.batch
        return {self.input_name: np.ascontiguousarray(rows, np.float32)}

    def rewind(self) -> None:
        self.cursor = 0


CALIBRATION_METHODS = {"entropy": "Entropy", "minmax": "MinMax", "percentile": "Percentile"}


def quantize_qdq(onnx_path: Path, chips: np.ndarray, out: Path, method: str = "entropy") -> Path:
    """``onnx_path`` with explicit INT8 quantization (Q/DQ nodes) calibrated on ``chips`` ``float32 [N, 3, C, C]``,
    written to ``out``: the INT8 path TensorRT 10 documents (implicit calibration, ``int8_calibrator`` and
    ``set_calibration_profile``, is deprecated since 10.1 and removed in 11). ONNX Runtime's static quantizer
    with TensorRT's scheme: symmetric INT8 activations and weights, per-channel weights, float biases."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if chips.shape[0] == 0:
        raise ExportError("no calibration chips")
    input_name = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(onnx_path),
        str(out),
        _ChipReader(input_name, chips, batch=8),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False},
    )
    return out


def _parse(trt: Any, builder: Any, model: bytes, logger: Any, strongly_typed: bool) -> tuple[Any, Any]:
    # TensorRT 10 made every network explicit-batch (the flag is ignored and deprecated). A Q/DQ (INT8) model is
    # built strongly typed, as TensorRT 10's explicit-quantization docs ask (no precision flags then).
    flags = 0
    if strongly_typed:
        flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is None:
            raise ExportError(f"TensorRT {trt.__version__} cannot build strongly typed networks (needed for Q/DQ INT8)")
        flags = 1 << int(flag)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected the model: {errors}")
    return network, parser  # the parser must outlive the network's use (it owns weights)


def _int8_source(onnx_path: Path, out: Path, card: ModelCard, cfg: TensorRTExportConfig) -> tuple[Path, dict[str, Any]]:
    """The Q/DQ model to build an INT8 engine from (the calibration cache when it exists, else calibrated now)."""
    qdq = cfg.calibration_cache or out.with_suffix(".qdq.onnx")
    if cfg.calibration_cache is not None and cfg.calibration_cache.is_file():
        chips = 0
    else:
        if cfg.calibration_images is None:
            raise ExportError("int8 needs --calibration-images (or an existing --calibration-cache Q/DQ model)")
        data = calibration_chips(cfg.calibration_images, card, cfg.calibration_chips)
        quantize_qdq(onnx_path, data, qdq, cfg.calibration_method)
        chips = int(data.shape[0])
    return qdq, {
        "method": f"explicit Q/DQ (onnxruntime.quantization, {cfg.calibration_method} calibration)",
        "chips": chips,
        "images": str(cfg.calibration_images) if cfg.calibration_images else None,
        "qdq_model": str(qdq),
        "qdq_sha256": sha256_file(qdq),
    }


def _builder_config(trt: Any, builder: Any, input_name: str, chip: int, cfg: TensorRTExportConfig) -> Any:
    """Workspace, the batch profile, TF32 off, the precision flag (fp16) and the timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    p = cfg.profile
    profile = builder.create_optimization_profile()
    profile.set_shape(
        input_name, (p.min_batch, 3, chip, chip), (p.opt_batch, 3, chip, chip), (p.max_batch, 3, chip, chip)
    )
    config.add_optimization_profile(profile)
    # TF32 is on by default: it rounds fp32 convolution inputs to a 10-bit mantissa, so an "fp32" engine would
    # differ from ONNX Runtime's fp32 by far more than the 1e-3 parity tolerance. fp32 means fp32.
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if tf32 is not None:
        config.clear_flag(tf32)
    if cfg.precision == "fp16":
        flag = getattr(trt.BuilderFlag, "FP16", None)
        if flag is None:
            raise ExportError(
                f"TensorRT {trt.__version__} has no FP16 builder flag (weak typing was removed); build fp32, or "
                "convert the ONNX to mixed precision first (NVIDIA ModelOpt AutoCast) and build that as fp32"
            )
        config.set_flag(flag)
    cache_bytes = cfg.timing_cache.read_bytes() if cfg.timing_cache and cfg.timing_cache.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a fresh one", cfg.timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return config


def build_engine(onnx_path: Path, out: Path, cfg: TensorRTExportConfig) -> TensorRTExportReport:
    """Build ``out`` (a serialized engine) and its manifest from ``onnx_path``; raises :class:`ExportError`."""
    import time

    import tensorrt as trt

    from service.engines.tensorrt import device_identity

    t0 = time.perf_counter()
    card = onnx_card(onnx_path)
    source, calibration = (onnx_path, {}) if cfg.precision != "int8" else _int8_source(onnx_path, out, card, cfg)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, source.read_bytes(), logger, strongly_typed=cfg.precision == "int8")
    if network.num_inputs != 1:
        raise ExportError(f"expected one input, the model has {network.num_inputs}")
    inp = network.get_input(0)
    if card.input_name is not None and inp.name != card.input_name:
        raise ExportError(f"the card names input {card.input_name!r}, the network's is {inp.name!r}")
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    config = _builder_config(trt, builder, inp.name, card.input_size, cfg)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {source}; see the TensorRT log above")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(memoryview(serialized)))
    if cfg.timing_cache is not None:
        cfg.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        cfg.timing_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    gpu_name, cc = device_identity()
    manifest = EngineManifest(
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=cc,
        precision=cfg.precision,
        profile=cfg.profile,
        input_name=inp.name,
        output_names=tuple(card.output_names or outputs),
        onnx_file=onnx_path.name,
        onnx_sha256=sha256_file(onnx_path),
        card=card.model_dump(mode="json", exclude_none=True),
        workspace_mib=cfg.workspace_mib,
        timing_cache=str(cfg.timing_cache) if cfg.timing_cache else None,
        calibration=calibration,
        built_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    write_manifest(out, manifest)
    return TensorRTExportReport(out, manifest, out.stat().st_size, time.perf_counter() - t0)


@dataclass(frozen=True)
class EngineParity:
    """TensorRT engine vs ONNX Runtime CPU on the same chips (:class:`exporters.parity.OutputParity`: largest
    |diff| per output, the heatmap's where both agree on keep/drop, and its peak flips at near-ties)."""

    outputs: OutputParity
    batches: tuple[int, ...]

    @property
    def max_abs_diff(self) -> dict[str, float]:
        return self.outputs.max_abs_diff

    def summary(self) -> str:
        return f"parity vs ONNX Runtime CPU on batches {list(self.batches)}: {self.outputs.summary()}"


def engine_parity(engine_path: Path, onnx_path: Path, chips: np.ndarray, max_batch: int = 8) -> EngineParity:
    """Run ``chips`` ``float32 [N, 3, C, C]`` through the engine and ONNX Runtime (CPU EP) and compare them with
    the near-tie handling of :mod:`exporters.parity`. Batch sizes 1, ``max_batch`` and ``N`` are all exercised
    (profile edges and splitting)."""
    from service.engines import EngineConfig
    from service.engines.tensorrt import TensorRTEngine

    trt_engine = TensorRTEngine(engine_path, EngineConfig(kind="tensorrt", max_batch=max_batch))
    names = list(trt_engine.card.output_names or read_manifest(engine_path).output_names)
    reference = Reference(onnx_path, names)
    parity = OutputParity(names)
    batches = sorted({1, min(max_batch, chips.shape[0]), chips.shape[0]})
    try:
        for b in batches:
            want, raw = reference.run(chips[:b])
            parity.add(trt_engine.infer(chips[:b]), want, raw)
    finally:
        trt_engine.close()
    return EngineParity(parity, tuple(batches))


# ---- CLI: `snipserve export tensorrt` (wired in exporters/cli.py) ------------------------------------------


def add_tensorrt_arguments(parser: Any) -> None:
    """Options of ``snipserve export tensorrt`` (``parser``: an ``argparse.ArgumentParser``)."""
    g = parser.add_argument_group("tensorrt")
    g.add_argument("--onnx", type=Path, default=Path("models/snipserve_default.onnx"), help="source ONNX model")
    g.add_argument("--engine", type=Path, default=None, help="engine file to write (default: <onnx stem>.engine)")
    g.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp16", help="engine precision")
    g.add_argument("--min-batch", type=int, default=1, help="profile: smallest batch")
    g.add_argument("--opt-batch", type=int, default=8, help="profile: batch to tune for")
    g.add_argument("--max-batch", type=int, default=32, help="profile: largest batch")
    g.add_argument("--workspace-mib", type=int, default=2048, help="builder workspace limit (MiB)")
    g.add_argument("--timing-cache", type=Path, default=None, help="timing cache file (read, then updated)")
    g.add_argument("--calibration-images", type=Path, default=None, help="sample images folder (int8)")
    g.add_argument("--calibration-chips", type=int, default=256, help="chips cut for int8 calibration")
    g.add_argument(
        "--calibration-cache",
        type=Path,
        default=None,
        help="int8: the calibrated Q/DQ ONNX (written; reused if present)",
    )
    g.add_argument(
        "--calibration-method", choices=sorted(CALIBRATION_METHODS), default="entropy", help="int8 calibration"
    )
    g.add_argument("--parity-chips", type=int, default=16, help="random chips for the ORT parity check (0: skip)")


def run_cli(args: Any) -> int:
    """Build the engine the parsed ``args`` describe, print its summary and parity; exit status."""
    import importlib.util
    import sys

    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cupy") is None:
        print(
            "snipserve export tensorrt needs TensorRT and CuPy on a GPU host: install the 'gpu' extra "
            "(pip install 'snipserve[gpu]'). Meanwhile serve the ONNX model with the ONNX Runtime engine.",
            file=sys.stderr,
        )
        return 2
    engine = args.engine or args.onnx.with_suffix(".engine")
    try:
        cfg = TensorRTExportConfig(
            precision=args.precision,
            profile=BatchProfile(min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch),
            workspace_mib=args.workspace_mib,
            timing_cache=args.timing_cache,
            calibration_images=args.calibration_images,
            calibration_chips=args.calibration_chips,
            calibration_cache=args.calibration_cache,
            calibration_method=args.calibration_method,
        )
        report = build_engine(args.onnx, engine, cfg)
    except (ExportError, ValueError) as exc:
        print(f"export tensorrt failed: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    if args.parity_chips > 0:
        c = report.manifest.card["input_size"]
        chips = np.random.default_rng(0).normal(0, 1, (args.parity_chips, 3, c, c)).astype(np.float32)
        print(engine_parity(engine, args.onnx, chips, max_batch=args.max_batch).summary())
    return 0
