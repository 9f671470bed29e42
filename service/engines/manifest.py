"""The manifest next to a serialized TensorRT engine, and the checks made before deserialising it.

A TensorRT engine runs only under the exact TensorRT version that built it and only on GPUs of the compute
capability it was built for; deserialising it elsewhere fails deep inside TensorRT with a terse message, or
not at all until the first inference. So ``snipserve export tensorrt`` writes ``<engine stem>.manifest.json``
beside the engine (versions, GPU, precision, batch profile, the source ONNX's SHA-256 and model card), and
:class:`service.engines.tensorrt.TensorRTEngine` reads and checks it first, failing with a
:class:`~service.errors.ModelLoadError` that names both sides.

Pure data and file I/O: no TensorRT or CUDA import here, so all of this is tested on CPU-only machines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ModelLoadError
from service.modelcard import CARD_METADATA_KEY, ModelCard, load_card

MANIFEST_SUFFIX = ".manifest.json"
MANIFEST_FORMAT = "snipserve.tensorrt"
Precision = Literal["fp32", "fp16", "int8"]


class BatchProfile(BaseModel):
    """The optimisation profile over the batch dimension (chip shape is fixed by the card)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_batch: int = Field(default=1, ge=1, description="Smallest batch the engine accepts.")
    opt_batch: int = Field(default=8, ge=1, description="Batch TensorRT tunes its kernels for.")
    max_batch: int = Field(default=32, ge=1, le=4096, description="Largest batch the engine accepts.")

    @model_validator(mode="after")
    def _ordered(self) -> BatchProfile:
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need min <= opt <= max batch, got {self.min_batch}, {self.opt_batch}, {self.max_batch}")
        return self


class EngineManifest(BaseModel):
    """What a serialized engine was built from, with, and for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["snipserve.tensorrt"] = Field(default="snipserve.tensorrt", description="Manifest format tag.")
    format_version: Literal[1] = Field(default=1, description="Manifest schema version.")
    tensorrt_version: str = Field(min_length=1, description="tensorrt.__version__ of the builder, e.g. '10.13.0.35'.")
    gpu_name: str = Field(min_length=1, description="Name of the GPU the engine was built on.")
    compute_capability: str = Field(pattern=r"^\d+\.\d+$", description="Its compute capability, 'major.minor'.")
    precision: Precision = Field(description="Builder precision: fp32, fp16 or int8 (+fp16 fallback).")
    profile: BatchProfile = Field(description="Batch optimisation profile.")
    input_name: str = Field(min_length=1, description="Engine input tensor name.")
    output_names: tuple[str, ...] = Field(min_length=1, description="Engine output tensor names, card order.")
    onnx_file: str = Field(description="File name of the source ONNX model.")
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the source ONNX file.")
    card: dict[str, Any] = Field(description="The source model's card (JSON fields of ModelCard).")
    workspace_mib: int = Field(ge=0, description="Builder workspace limit, MiB.")
    timing_cache: str | None = Field(default=None, description="Timing cache file used by the build, if any.")
    calibration: dict[str, Any] = Field(default_factory=dict, description="INT8 calibration data summary.")
    built_at: str = Field(default="", description="UTC build time, ISO 8601.")


def manifest_path(engine_path: Path) -> Path:
    """``model.engine`` -> ``model.manifest.json``."""
    return engine_path.with_suffix(MANIFEST_SUFFIX)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(engine_path: Path, manifest: EngineManifest) -> Path:
    """Write ``manifest`` beside ``engine_path``; returns the manifest's path."""
    path = manifest_path(engine_path)
    path.write_text(manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(engine_path: Path) -> EngineManifest:
    """The manifest beside ``engine_path``; :class:`ModelLoadError` when it is missing or invalid."""
    path = manifest_path(engine_path)
    if not path.is_file():
        raise ModelLoadError(
            f"{engine_path}: no engine manifest {path.name} beside it; build engines with "
            "`snipserve export tensorrt`, which writes one"
        )
    try:
        return EngineManifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ModelLoadError(f"{path}: invalid engine manifest: {exc}") from exc


def check_compatible(
    manifest: EngineManifest, *, tensorrt_version: str, compute_capability: str, gpu_name: str
) -> list[str]:
    """Fail with a clear :class:`ModelLoadError` where the engine cannot run here; return warnings otherwise.

    TensorRT engines are tied to the exact TensorRT version (engines are not version-compatible unless built
    so, which we do not) and to the compute capability. Another GPU model of the same capability can run it,
    possibly with tactics tuned for the other card: a warning, not an error.
    """
    if manifest.tensorrt_version != tensorrt_version:
        raise ModelLoadError(
            f"TensorRT engine was built with TensorRT {manifest.tensorrt_version}, this host has {tensorrt_version}; "
            f"rebuild it here from {manifest.onnx_file} with `snipserve export tensorrt`"
        )
    if manifest.compute_capability != compute_capability:
        raise ModelLoadError(
            f"TensorRT engine was built for compute capability {manifest.compute_capability} "
            f"({manifest.gpu_name}), this GPU is {compute_capability} ({gpu_name}); rebuild it on this GPU"
        )
    warnings = []
    if manifest.gpu_name != gpu_name:
        warnings.append(
            f"engine built on {manifest.gpu_name}, running on {gpu_name} (same compute capability "
            f"{compute_capability}): it runs, but kernel choices were tuned for the other GPU"
        )
    return warnings


def card_from_manifest(engine_path: Path, manifest: EngineManifest) -> ModelCard:
    """The model card stored at export time; a sidecar YAML beside the engine overrides it field by field."""
    return load_card(engine_path, {CARD_METADATA_KEY: json.dumps(manifest.card)})
