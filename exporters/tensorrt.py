"""ONNX -> serialized TensorRT engine with the TensorRT Python API (10.x named-tensor API), plus a manifest.

Status: written against TensorRT 10's documented Python API; never run (no GPU in the session that wrote it;
README, GPU path, status table). ``scripts/gpu_check.py`` builds FP32/FP16/INT8 engines and checks parity.

Build: parse the ONNX file, one optimisation profile over the batch dimension (min/opt/max; the chip shape
is fixed by the card), a workspace limit, a timing cache loaded from and saved back to a file (rebuilds and
the other precisions reuse kernel timings), the precision flag, ``build_serialized_network``. The engine is
written with ``<stem>.manifest.json`` beside it (:mod:`service.engines.manifest`): TensorRT version, GPU and
compute capability, precision, profile, SHA-256 and card of the source ONNX.

Precision on TensorRT versions:
- TensorRT 10.x: FP16 and INT8 through the (weak-typing) builder flags. INT8 uses post-training calibration
  with ``IInt8EntropyCalibrator2`` on chips cut by the service's own planner and pre-processing from sample
  images (deprecated since 10.1 in favour of explicit Q/DQ quantization, still offered throughout 10.x).
- TensorRT 11+ removed those flags and the calibrator: FP32 ONNX builds an FP32 engine (networks are strongly
  typed); FP16/INT8 need an ONNX that carries its precision (ModelOpt AutoCast or Q/DQ nodes), which this
  exporter does not produce. Asking for fp16/int8 there is a clear error, never a silent FP32 engine.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.engines.manifest import BatchProfile, EngineManifest, Precision, sha256_file, write_manifest
from service.modelcard import ModelCard

log = logging.getLogger("snipserve.exporters.tensorrt")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class TensorRTExportConfig(BaseModel):
    """How to build the engine."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    precision: Precision = Field(default="fp16", description="fp32, fp16, or int8 (calibrated; fp16 fallback).")
    profile: BatchProfile = Field(default_factory=BatchProfile, description="Batch optimisation profile.")
    workspace_mib: int = Field(default=2048, ge=16, description="Builder workspace memory pool limit, MiB.")
    timing_cache: Path | None = Field(default=None, description="Timing cache file, read if present, then updated.")
    calibration_images: Path | None = Field(default=None, description="Folder of sample images (INT8 only).")
    calibration_chips: int = Field(default=256, ge=8, description="Chips cut from them for INT8 calibration.")
    calibration_cache: Path | None = Field(default=None, description="INT8 calibration cache, reused if present.")


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


def _make_calibrator(trt: Any, chips: np.ndarray, batch: int, cache: Path | None, input_name: str) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``chips`` in batches of ``batch`` from one device buffer."""
    import cupy as cp

    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise ExportError(
            f"TensorRT {trt.__version__} offers no IInt8EntropyCalibrator2 (implicit INT8 calibration was removed); "
            "quantize the ONNX explicitly (Q/DQ nodes, e.g. NVIDIA ModelOpt) and build it as fp32"
        )

    class ChipCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)  # type: ignore[misc]  # TensorRT's documented requirement for Python calibrators
            self.batch = batch
            self.chips = chips
            self.cursor = 0
            self.device = cp.empty((batch, *chips.shape[1:]), cp.float32)

        def get_batch_size(self) -> int:
            return self.batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            # Whole batches only: the calibration profile fixes the batch; the remainder is not used.
            if self.cursor + self.batch > self.chips.shape[0]:
                return None
            if names != [input_name]:
                log.warning("calibrator asked for inputs %s, feeding %s", names, input_name)
            self.device.set(np.ascontiguousarray(self.chips[self.cursor : self.cursor + self.batch]))
            cp.cuda.runtime.deviceSynchronize()  # the builder reads the buffer on its own stream
            self.cursor += self.batch
            return [int(self.device.data.ptr)]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache is not None and cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            if cache is not None:
                cache.write_bytes(bytes(data))

    return ChipCalibrator()


def _parse(trt: Any, builder: Any, onnx_path: Path, logger: Any) -> tuple[Any, Any]:
    # TensorRT 10 made every network explicit-batch (the flag is ignored and deprecated): flags 0.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    return network, parser  # the parser must outlive the network's use (it owns weights)


def build_engine(onnx_path: Path, out: Path, cfg: TensorRTExportConfig) -> TensorRTExportReport:
    """Build ``out`` (a serialized engine) and its manifest from ``onnx_path``; raises :class:`ExportError`."""
    import time

    import tensorrt as trt

    from service.engines.tensorrt import device_identity

    t0 = time.perf_counter()
    card = onnx_card(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, onnx_path, logger)
    if network.num_inputs != 1:
        raise ExportError(f"expected one input, the model has {network.num_inputs}")
    inp = network.get_input(0)
    c = card.input_size
    if card.input_name is not None and inp.name != card.input_name:
        raise ExportError(f"the card names input {card.input_name!r}, the network's is {inp.name!r}")
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    p = cfg.profile

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mib << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (p.min_batch, 3, c, c), (p.opt_batch, 3, c, c), (p.max_batch, 3, c, c))
    config.add_optimization_profile(profile)

    calibration: dict[str, Any] = {}
    calibrator: Any = None
    if cfg.precision in ("fp16", "int8"):
        flag = getattr(trt.BuilderFlag, "FP16", None)
        if flag is None:
            raise ExportError(
                f"TensorRT {trt.__version__} has no FP16 builder flag (weak typing was removed); build fp32, or "
                "convert the ONNX to mixed precision first (NVIDIA ModelOpt AutoCast) and build that as fp32"
            )
        config.set_flag(flag)  # int8 also allows fp16 for layers without int8 kernels
    if cfg.precision == "int8":
        int8 = getattr(trt.BuilderFlag, "INT8", None)
        if int8 is None:
            raise ExportError(
                f"TensorRT {trt.__version__} has no INT8 builder flag; quantize the ONNX explicitly (Q/DQ)"
            )
        cached = cfg.calibration_cache is not None and cfg.calibration_cache.is_file()
        if cfg.calibration_images is None and not cached:
            raise ExportError("int8 needs --calibration-images (or an existing --calibration-cache)")
        chips = (
            calibration_chips(cfg.calibration_images, card, cfg.calibration_chips)
            if cfg.calibration_images is not None
            else np.zeros((0, 3, c, c), np.float32)
        )
        batch = min(p.opt_batch, max(1, chips.shape[0]))
        config.set_flag(int8)
        # Held in a local until the build returns: the binding may not keep the Python object alive.
        calibrator = _make_calibrator(trt, chips, batch, cfg.calibration_cache, inp.name)
        config.int8_calibrator = calibrator
        # Dynamic shapes: calibration runs at one shape, given by a profile whose min = opt = max.
        calib_profile = builder.create_optimization_profile()
        shape = (batch, 3, c, c)
        calib_profile.set_shape(inp.name, shape, shape, shape)
        config.set_calibration_profile(calib_profile)
        calibration = {
            "algorithm": "IInt8EntropyCalibrator2",
            "chips": int(chips.shape[0]),
            "batch": batch,
            "images": str(cfg.calibration_images) if cfg.calibration_images else None,
            "cache": str(cfg.calibration_cache) if cfg.calibration_cache else None,
        }

    cache_bytes = cfg.timing_cache.read_bytes() if cfg.timing_cache and cfg.timing_cache.is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a fresh one", cfg.timing_cache)
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    del calibrator  # the build is done with it
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path}; see the TensorRT log above")
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
        profile=p,
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
    """TensorRT engine vs ONNX Runtime CPU on the same chips: the largest |diff| per output."""

    max_abs_diff: dict[str, float]
    batches: tuple[int, ...]

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {v:.3g}" for k, v in self.max_abs_diff.items())
        return f"parity vs ONNX Runtime CPU on batches {list(self.batches)}: max |diff| {diffs}"


def engine_parity(engine_path: Path, onnx_path: Path, chips: np.ndarray, max_batch: int = 8) -> EngineParity:
    """Run ``chips`` ``float32 [N, 3, C, C]`` through the engine and ONNX Runtime (CPU EP); per-output max |diff|.
    Batch sizes 1, ``max_batch`` and ``N`` are all exercised (profile edges and splitting)."""
    from service.engines import EngineConfig
    from service.engines.onnxruntime import OnnxRuntimeEngine
    from service.engines.tensorrt import TensorRTEngine

    trt_engine = TensorRTEngine(engine_path, EngineConfig(kind="tensorrt", max_batch=max_batch))
    ort_engine = OnnxRuntimeEngine(onnx_path, EngineConfig(max_batch=max(max_batch, chips.shape[0])))
    names = list(ort_engine.output_names)
    worst = dict.fromkeys(names, 0.0)
    batches = sorted({1, min(max_batch, chips.shape[0]), chips.shape[0]})
    try:
        for b in batches:
            got = trt_engine.infer(chips[:b])
            ref = ort_engine.infer(chips[:b])
            for name, g, r in zip(names, got, ref, strict=True):
                worst[name] = max(worst[name], float(np.max(np.abs(g.astype(np.float64) - r))))
    finally:
        trt_engine.close()
        ort_engine.close()
    return EngineParity(worst, tuple(batches))


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
    g.add_argument("--calibration-cache", type=Path, default=None, help="int8 calibration cache file")
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
