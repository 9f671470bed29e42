"""Per-request options. Frozen pydantic models, passed explicitly to each stage (never stored on the
shared model object), so concurrent requests with different options cannot interfere."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.plan import LevelSpec

MergeMethod = Literal["gaussian", "linear", "hard"]


class MergeConfig(BaseModel):
    """How detections from all chips and levels are merged (soft-NMS, DESIGN.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    method: MergeMethod = Field(default="gaussian", description="Soft-NMS decay: gaussian, linear, or hard (= NMS).")
    sigma: float = Field(default=0.5, gt=0, le=10, description="Gaussian decay width: f = exp(-IoU^2 / sigma).")
    iou_threshold: float = Field(default=0.3, ge=0, le=1, description="Nt for linear and hard decay.")
    class_agnostic: bool = Field(default=False, description="Merge across classes instead of per class.")


class DetectOptions(BaseModel):
    """Options of one detection call; every field has a default."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    preset: str = Field(default="default", description="Levels preset from the model card.")
    levels: tuple[LevelSpec, ...] | None = Field(default=None, description="Explicit levels (overrides preset).")
    min_object_size: float | None = Field(default=None, gt=0, description="Smallest object (sqrt area, original px).")
    max_object_size: float | None = Field(default=None, gt=0, description="Largest object (sqrt area, original px).")
    score_threshold: float | None = Field(default=None, ge=0, le=1, description="Minimum score; default: the card's.")
    classes: tuple[int, ...] | None = Field(default=None, description="Keep only these class ids.")
    max_detections: int = Field(default=300, ge=1, le=10000, description="Keep at most this many detections.")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="Soft-NMS settings.")
    edge_filter: bool = Field(default=True, description="Drop boxes touching an inner chip edge.")
    focus_threshold: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Preset 'focus': focus-map value at or above which finer levels run (lower = more chips); "
        "default: the card's.",
    )

    @model_validator(mode="after")
    def _check(self) -> DetectOptions:
        lo, hi = self.min_object_size, self.max_object_size
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(
                f"min_object_size ({self.min_object_size}) must be below max_object_size ({self.max_object_size})"
            )
        if self.levels is not None and (self.min_object_size is not None or self.max_object_size is not None):
            raise ValueError("give either explicit 'levels' or an object size range, not both")
        return self
