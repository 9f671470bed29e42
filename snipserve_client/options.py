"""The request options of ``POST /v1/detect`` (and of the batch and stream routes): the one declaration.

:class:`RequestOptions` is what travels on the wire, as query parameters or form fields (strings). It drives
the server's parsing (``service.http.serving.parse_options``), the OpenAPI parameters of ``/v1/detect``, the
option flags of ``snipserve detect`` / ``snipserve stream`` and the keyword arguments of the client. It needs
pydantic only, so the client imports it without the server's dependencies.

Every bound here is there so that a hostile value costs nothing: strings are short, numbers finite, ``levels``
(a JSON list) is small and shallow; the server checks the rest (presets, class names, chip counts).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MergeMethod = Literal["gaussian", "linear", "hard"]

MAX_LEVELS = 16
"""Explicit pyramid levels per request at most."""
MAX_LEVELS_JSON = 4096
"""Characters of the ``levels`` JSON at most."""
MAX_JSON_DEPTH = 3
"""Nesting of the ``levels`` JSON at most: a list of objects holding a ``valid`` pair."""
MAX_CLASSES_CHARS = 4096
"""Characters of the ``classes`` list at most."""


class RequestOptions(BaseModel):
    """Options of one detection request, as sent; every field is optional (the server's default applies)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    preset: str | None = Field(
        default=None, max_length=64, description="Levels preset from the model card.", examples=["default"]
    )
    levels: str | None = Field(
        default=None,
        max_length=MAX_LEVELS_JSON,
        description='Explicit levels as JSON, e.g. [{"scale": 2, "valid": [-1, 40]}, {"long_side": 512}]; '
        f"at most {MAX_LEVELS} levels.",
    )
    min_object_size: float | None = Field(
        default=None, gt=0, le=1e6, description="Smallest object, sqrt(area) in original px."
    )
    max_object_size: float | None = Field(
        default=None, gt=0, le=1e6, description="Largest object, sqrt(area) in original px."
    )
    score_threshold: float | None = Field(default=None, ge=0, le=1, description="Minimum score (default: the model's).")
    classes: str | None = Field(
        default=None, max_length=MAX_CLASSES_CHARS, description="Comma-separated class names or ids to keep."
    )
    max_detections: int | None = Field(default=None, ge=1, le=10000, description="At most this many detections.")
    merge: MergeMethod | None = Field(default=None, description="Soft-NMS method: gaussian, linear or hard.")
    sigma: float | None = Field(default=None, gt=0, le=10, description="Gaussian soft-NMS sigma.")
    iou_threshold: float | None = Field(default=None, ge=0, le=1, description="Nt for linear/hard merge.")
    class_agnostic: bool | None = Field(default=None, description="Merge across classes.")
    edge_filter: bool | None = Field(default=None, description="Drop boxes cut by inner chip edges.")
    focus_threshold: float | None = Field(
        default=None, ge=0, le=1, description="Preset 'focus': focus-map threshold of finer levels (lower: more chips)."
    )


OPTION_NAMES: tuple[str, ...] = tuple(RequestOptions.model_fields)


def option_field_type(name: str) -> type[Any]:
    """The scalar type of option ``name`` (``str``, ``int``, ``float`` or ``bool``)."""
    annotation = RequestOptions.model_fields[name].annotation
    for candidate in (bool, int, float):
        if annotation == candidate | None:
            return candidate
    return str
