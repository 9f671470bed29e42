"""Settings from the environment (prefix ``SNIPSERVE_``), behind a cached :func:`get_settings`.

Each component gets only its own config object (``engine_config()``, ``batcher_config()``, ...).
Never built at import time; tests build ``Settings(...)`` directly or clear the cache.
"""

from __future__ import annotations

import copy
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.batch import BatcherConfig, Schedule
from service.decode import DecodeConfig
from service.engines import EngineConfig, Provider
from service.http.transport import TransportConfig
from service.security import resolve_model_path
from service.soft_nms_gpu import SoftNmsDispatch


def from_config(config: type[BaseModel], name: str, **overrides: Any) -> Any:
    """Field ``name`` of a stage's config as a settings field: same bounds, default and description (declared once,
    so a bad value fails when the settings are read, not when the stage is built); ``overrides`` (a service default
    or description that differs from the stage's) are merged in."""
    field = copy.deepcopy(config.model_fields[name])
    return FieldInfo.merge_field_infos(field, **overrides) if overrides else field


def default_model_path() -> Path:
    """The shipped default detector, ``models/snipserve_default.onnx`` (found via the ``models`` package)."""
    spec = importlib.util.find_spec("models")
    base = (
        Path(spec.origin).parent if spec is not None and spec.origin else Path(__file__).resolve().parents[1] / "models"
    )
    return base / "snipserve_default.onnx"


class Settings(BaseSettings):
    """Every setting, its environment variable (``SNIPSERVE_<NAME>``), default and meaning."""

    model_config = SettingsConfigDict(env_prefix="SNIPSERVE_", frozen=True, extra="ignore")

    # model and engine (service.engines.EngineConfig)
    models_dir: Path = Field(
        default_factory=lambda: default_model_path().parent, description="Model files must resolve inside it."
    )
    model_path: Path = Field(default_factory=default_model_path, description="ONNX model to serve (inside models_dir).")
    engine: Literal["onnxruntime", "tensorrt", "fake"] = from_config(EngineConfig, "kind")
    providers: Annotated[tuple[Provider, ...], NoDecode] = from_config(
        EngineConfig, "providers", description="ONNX Runtime providers, priority order (comma list)."
    )
    allow_cpu_fallback: bool = from_config(EngineConfig, "allow_cpu_fallback")
    intra_op_threads: int = from_config(EngineConfig, "intra_op_threads")
    inter_op_threads: int = from_config(EngineConfig, "inter_op_threads")
    fp16: bool = from_config(EngineConfig, "fp16")
    ort_spin: bool = from_config(EngineConfig, "spin")
    fuse_preprocess: bool = from_config(
        EngineConfig,
        "fuse_preprocess",
        default=True,
        description="ONNX Runtime: send raw uint8 chips and normalise inside the graph (faster on CPU).",
    )
    trt_cache_dir: Path | None = from_config(EngineConfig, "trt_cache_dir")
    preprocess: Literal["auto", "cpu", "gpu"] = Field(
        default="auto",
        description="Where levels are resized and chips cut: gpu (into a TensorRT engine's device input), cpu, "
        "or auto (gpu where the engine takes device input, else cpu). With a TensorRT engine, gpu and auto fail "
        "at startup when the kernels cannot compile (never a silent switch to the CPU).",
    )
    # where soft-NMS runs (service.soft_nms_gpu.SoftNmsDispatch)
    soft_nms_device: Literal["cpu", "gpu"] = from_config(SoftNmsDispatch, "device")
    soft_nms_gpu_min_boxes: int = from_config(SoftNmsDispatch, "min_boxes")
    soft_nms_gpu_max_group: int | None = from_config(SoftNmsDispatch, "max_group")
    # batching and admission (service.batch.BatcherConfig; max_batch also bounds EngineConfig.max_batch)
    max_batch: int = from_config(BatcherConfig, "max_batch")
    max_delay_ms: float = from_config(BatcherConfig, "max_delay_ms")
    queue_capacity: int = from_config(BatcherConfig, "queue_capacity")
    bulk_queue_capacity: int = from_config(BatcherConfig, "bulk_queue_capacity")
    pipeline_depth: int | None = from_config(BatcherConfig, "pipeline_depth")
    infer_timeout_s: float = from_config(BatcherConfig, "infer_timeout_s")
    schedule: Schedule = from_config(BatcherConfig, "schedule")
    fair_quantum: int = from_config(BatcherConfig, "fair_quantum")
    edf_stretch: float = from_config(BatcherConfig, "edf_stretch")
    edf_slack_s: float = from_config(BatcherConfig, "edf_slack_s")
    max_queue_wait_s: float | None = from_config(BatcherConfig, "max_queue_wait_s")
    drain_window_s: float = from_config(BatcherConfig, "drain_window_s")
    admission_headroom: float = from_config(BatcherConfig, "admission_headroom")
    brownout_wait_s: float = Field(
        default=0.2,
        ge=0,
        description="Brownout: a request for the model's default pyramid that would wait longer than this for other "
        "requests' chips on the current schedule (at the planning rate; its own chips not counted) runs the 'focus' "
        "preset instead (about 3x fewer chips; the response says mode 'focus'). /v1/detect requests of models with a "
        "focus head only (streams and batches keep their pyramid); preset=pyramid is never degraded; 0: never.",
    )
    max_in_flight: int = Field(default=64, ge=1, description="Concurrent detection requests at most; beyond it 503.")
    bulk_max_in_flight: int = Field(default=32, ge=1, description="Concurrent streaming/batch requests at most.")
    request_timeout_s: float = Field(default=60.0, gt=0, description="Default per-request deadline (504 past it).")
    # input limits (service.decode.DecodeConfig)
    max_image_bytes: int = from_config(DecodeConfig, "max_bytes", description="Largest accepted upload in bytes (413).")
    max_image_pixels: int = from_config(
        DecodeConfig, "max_pixels", description="Largest accepted image in pixels (413)."
    )
    max_chips: int = Field(default=4096, ge=1, description="Largest chip plan for one image (422).")
    max_pixels_in_flight: int = Field(
        default=192_000_000,
        ge=1,
        description="Decoded + resized pixels of all requests in flight at most (waits, then 503; one request "
        "above it alone: 413). Bounds the memory images take: about 3 bytes per pixel.",
    )
    # transport (service.http.transport): request heads and bodies
    max_header_bytes: int = from_config(TransportConfig, "max_header_bytes")
    header_timeout_s: float = from_config(TransportConfig, "header_timeout_s")
    body_idle_timeout_s: float = from_config(TransportConfig, "body_idle_timeout_s")
    body_grace_s: float = from_config(TransportConfig, "body_grace_s")
    min_body_rate: float = from_config(TransportConfig, "min_body_rate")
    max_batch_body_bytes: int = from_config(TransportConfig, "max_batch_body_bytes")
    max_body_bytes_in_flight: int = from_config(TransportConfig, "max_body_bytes_in_flight")
    # server
    host: str = Field(default="127.0.0.1", description="Bind address for `snipserve serve`.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port for `snipserve serve`.")
    warmup: bool = Field(default=True, description="Run warm-up batches before reporting ready.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    log_json: bool = Field(default=False, description="Structured JSON logs.")
    shutdown_timeout_s: float = Field(default=30.0, gt=0, description="On SIGTERM, wait this long for in-flight work.")
    # security
    api_key: SecretStr | None = Field(default=None, description="If set, required on all routes but health/metrics.")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(default=(), description="CORS allow-list; empty = off.")

    @field_validator("api_key", mode="after")
    @classmethod
    def _key_not_empty(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not v.get_secret_value().strip():
            raise ValueError(
                "SNIPSERVE_API_KEY is set but empty, which would leave the service open: set a key, or unset the "
                "variable to run without one"
            )
        return v

    @field_validator("providers", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(p.strip().lower() for p in v.split(",") if p.strip())
        return v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(o.strip() for o in v.split(",") if o.strip())
        return v

    @field_validator("model_path", mode="after")
    @classmethod
    def _inside_models_dir(cls, v: Path, info: ValidationInfo) -> Path:
        models_dir = info.data.get("models_dir")
        return v if models_dir is None else resolve_model_path(v, models_dir)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            kind=self.engine,
            providers=self.providers,
            allow_cpu_fallback=self.allow_cpu_fallback,
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            max_batch=self.max_batch,
            fp16=self.fp16,
            spin=self.ort_spin,
            trt_cache_dir=self.trt_cache_dir,
            fuse_preprocess=self.fuse_preprocess,
        )

    def batcher_config(self) -> BatcherConfig:
        own = type(self).model_fields  # a BatcherConfig field without a setting keeps its default
        return BatcherConfig(**{name: getattr(self, name) for name in BatcherConfig.model_fields if name in own})

    def transport_config(self) -> TransportConfig:
        """Limits at the edge; one request's body may carry ``max_image_bytes`` plus 1 MiB of form fields."""
        fields = set(TransportConfig.model_fields) - {"max_body_bytes"}
        return TransportConfig(
            max_body_bytes=self.max_image_bytes + 1024 * 1024, **{name: getattr(self, name) for name in fields}
        )

    def soft_nms_dispatch(self) -> SoftNmsDispatch:
        return SoftNmsDispatch(
            device=self.soft_nms_device,
            min_boxes=self.soft_nms_gpu_min_boxes,
            max_group=self.soft_nms_gpu_max_group,
        )

    def decode_config(self) -> DecodeConfig:
        return DecodeConfig(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings from the environment, read once; ``get_settings.cache_clear()`` re-reads."""
    return Settings()
