"""Model card: everything the service must know about a detector, validated by pydantic.

A card travels inside the ONNX file (metadata property ``snipserve.card``, JSON) and/or in a sidecar
YAML next to the model (``model.onnx`` -> ``model.yaml``); the sidecar wins field by field. Ultralytics
exports without a card are recognised from their own metadata (``names``, ``imgsz``).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import ModelLoadError
from service.plan import LevelSpec

CARD_METADATA_KEY = "snipserve.card"

OutputFormat = Literal["snipserve", "yolov8", "end2end"]
# Preset names with a meaning of their own: "default" = the card's default mode on its default levels,
# "pyramid" = the default levels, every chip; "focus" = the default levels coarse to fine in FocusChips only.
RESERVED_PRESETS = ("default", "pyramid", "focus")


class FocusSpec(BaseModel):
    """Where the model's focus map comes from (AutoFocus). Without ``output`` the service derives the map from the
    coarse level's low-confidence small detections (``service.focus``, the fallback for models without a head)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stride: int = Field(default=16, ge=1, description="Focus map stride in chip px (chip / map side).")
    output: str | None = Field(
        default=None, description="Engine output with focus probabilities [B, 1, C/stride, C/stride]; null = fallback."
    )
    threshold: float = Field(
        default=0.05, ge=0, le=1, description="Default focus threshold of the 'focus' preset (measured: README)."
    )
    # Defaults measured (README, focus section): dilating by one cell or growing regions to 128 px cost more chips
    # than they saved AP -- the labels already cover every cell an object overlaps, and snapping to whole chips
    # gives each region at least one C x C chip of context.
    dilate: int = Field(default=0, ge=0, le=16, description="Dilation of the thresholded focus map, cells.")
    min_size: int = Field(default=0, ge=0, description="FocusChips regions grow to this side, finer-level px.")
    placement: Literal["free", "tiling"] = Field(
        default="free", description="FocusChips placed on the regions, or snapped to the level's ordinary tiling."
    )
    pad: int = Field(default=8, ge=0, le=64, description="Free placement: context around each region, px.")
    with_detections: bool = Field(
        default=False, description="Models with a head: add the detection fallback's map to the head's (max)."
    )

    @property
    def source(self) -> Literal["head", "detections", "both"]:
        """Where the focus map comes from: the head, the detection fallback (no head), or both."""
        if self.output is None:
            return "detections"
        return "both" if self.with_detections else "head"


class ModelCard(BaseModel):
    """Metadata of one detector. Boxes are produced in chip pixels by the output adapter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Model id reported in responses and metrics.")
    version: str = Field(default="0", description="Model version string.")
    classes: tuple[str, ...] = Field(min_length=1, description="Class names, index = class id.")
    input_size: int = Field(ge=32, description="Chip side C in pixels; the engine input is [B, 3, C, C].")
    channel_order: Literal["RGB", "BGR"] = Field(default="RGB", description="Channel order the model expects.")
    mean: tuple[float, float, float] = Field(default=(0.0, 0.0, 0.0), description="Subtracted after scaling to [0, 1].")
    std: tuple[float, float, float] = Field(default=(1.0, 1.0, 1.0), description="Divided after mean subtraction.")
    output_format: OutputFormat = Field(default="snipserve", description="Which output adapter decodes the outputs.")
    input_name: str | None = Field(default=None, description="Engine input name; default: the model's first input.")
    output_names: tuple[str, ...] | None = Field(
        default=None, description="Engine outputs in the order the adapter expects; default: the model's order."
    )
    sweet_spot: tuple[float, float] = Field(
        default=(16.0, 128.0), description="Object sizes (sqrt area, chip pixels) the model detects well."
    )
    default_levels: tuple[LevelSpec, ...] = Field(min_length=1, description="The 'default' levels preset.")
    presets: dict[str, tuple[LevelSpec, ...]] = Field(
        default_factory=dict, description="Other named level presets (e.g. 'fast', 'accurate')."
    )
    score_threshold: float = Field(default=0.3, ge=0, le=1, description="Default minimum score in responses.")
    pre_nms_iou: float = Field(
        default=0.6, gt=0, le=1, description="Per-chip NMS IoU for formats that need it (yolov8)."
    )
    max_per_chip: int = Field(default=300, ge=1, description="At most this many candidates per chip.")
    focus: FocusSpec | None = Field(
        default=None, description="The model's focus head (AutoFocus); absent: the 'focus' preset uses the fallback."
    )
    default_mode: Literal["pyramid", "focus"] = Field(
        default="pyramid", description="What preset 'default' runs: every chip, or FocusChips coarse to fine."
    )
    training: dict[str, Any] = Field(default_factory=dict, description="How the model was trained.")
    evaluation: dict[str, Any] = Field(default_factory=dict, description="Measured evaluation results.")

    @model_validator(mode="after")
    def _check(self) -> ModelCard:
        if self.sweet_spot[0] <= 0 or self.sweet_spot[1] <= self.sweet_spot[0]:
            raise ValueError(f"sweet_spot must be 0 < lo < hi, got {self.sweet_spot}")
        reserved = [p for p in RESERVED_PRESETS if p in self.presets]
        if reserved:
            raise ValueError(f"preset names {reserved} are reserved (the default levels, all chips or FocusChips)")
        output = None if self.focus is None else self.focus.output
        if output is not None and (self.output_names is None or output not in self.output_names):
            raise ValueError(f"focus output {output!r} must be listed in output_names")
        return self

    @property
    def focus_spec(self) -> FocusSpec:
        """The focus settings, with the fallback's (stride 16, no output) for models without a focus head."""
        return self.focus or FocusSpec()

    @property
    def has_focus_head(self) -> bool:
        """Whether the model returns its own focus map (a ``focus.output``), not the detection fallback's."""
        return self.focus_spec.output is not None

    def is_focus(self, preset: str) -> bool:
        """Whether ``preset`` runs FocusChips coarse to fine."""
        return preset == "focus" or (preset == "default" and self.default_mode == "focus")

    def levels_preset(self, name: str) -> tuple[LevelSpec, ...]:
        """Levels of preset ``name`` ('default', 'pyramid' and 'focus' = the card's default levels)."""
        if name in RESERVED_PRESETS:
            return self.default_levels
        try:
            return self.presets[name]
        except KeyError:
            raise KeyError(name) from None

    @property
    def preset_names(self) -> list[str]:
        return [*RESERVED_PRESETS, *self.presets]


def _ultralytics_card(meta: dict[str, str], name: str) -> dict[str, Any]:
    """Card fields from an Ultralytics YOLO ONNX export's own metadata (``names``, ``imgsz``)."""
    names = ast.literal_eval(meta["names"])  # a Python dict literal {0: 'person', ...}
    imgsz = ast.literal_eval(meta.get("imgsz", "[640, 640]"))
    size = int(imgsz[0] if isinstance(imgsz, list | tuple) else imgsz)
    return {
        "name": name,
        "version": meta.get("version", "0"),
        "classes": [names[i] for i in sorted(names)],
        "input_size": size,
        "output_format": "yolov8",
        "sweet_spot": (16.0, size / 2),
        "default_levels": [{"long_side": size}, {"long_side": size * 2}],
    }


def load_card(model_path: Path, metadata: dict[str, str]) -> ModelCard:
    """The card of the model at ``model_path``, from its metadata and/or sidecar YAML."""
    fields: dict[str, Any] = {}
    if CARD_METADATA_KEY in metadata:
        try:
            fields.update(json.loads(metadata[CARD_METADATA_KEY]))
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{model_path}: metadata '{CARD_METADATA_KEY}' is not valid JSON: {exc}") from exc
    elif "names" in metadata:
        fields.update(_ultralytics_card(metadata, model_path.stem))
    sidecar = model_path.with_suffix(".yaml")
    if sidecar.exists():
        loaded = yaml.safe_load(sidecar.read_text())
        if not isinstance(loaded, dict):
            raise ModelLoadError(f"{sidecar}: expected a mapping of card fields")
        fields.update(loaded)
    if not fields:
        raise ModelLoadError(
            f"{model_path}: no model card (ONNX metadata '{CARD_METADATA_KEY}' or sidecar {sidecar.name})"
        )
    fields.setdefault("name", model_path.stem)
    try:
        return ModelCard.model_validate(fields)
    except ValidationError as exc:
        raise ModelLoadError(f"{model_path}: invalid model card: {exc}") from exc


def card_metadata(card: ModelCard) -> dict[str, str]:
    """ONNX metadata properties that carry ``card`` (used by the exporters)."""
    return {CARD_METADATA_KEY: card.model_dump_json(exclude_none=True)}
