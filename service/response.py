"""Response shaping: pipeline results -> JSON-ready dicts (the only place boxes leave the xyxy arrays)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from service.modelcard import ModelCard
from service.pipeline import Result
from service.postprocess import Detections


def _bound(x: float) -> float | None:
    return None if math.isinf(x) else round(x, 3)


def detection_dicts(d: Detections, card: ModelCard) -> list[dict[str, Any]]:
    """``[{"box", "score", "class_id", "label", "level"}]``: boxes xyxy in original pixels, rounded for JSON."""
    boxes = d.boxes.astype(np.float64).round(2).tolist()  # float64 first: no float32 repr noise in JSON
    scores = d.scores.astype(np.float64).round(5).tolist()
    return [
        {"box": b, "score": s, "class_id": c, "label": card.classes[c], "level": lv}
        for b, s, c, lv in zip(boxes, scores, d.classes.tolist(), d.levels.tolist(), strict=True)
    ]


def detection_response(result: Result, card: ModelCard) -> dict[str, Any]:
    """The ``/v1/detect`` JSON body. Boxes are xyxy in original pixels; timings in milliseconds."""
    chip_levels = result.plan.chips[:, 0].tolist()
    focus_area = {f.index: f.area for f in result.focus or []}
    body = {
        "image": {"width": result.image_size[0], "height": result.image_size[1]},
        "detections": detection_dicts(result.detections, card),
        "model": card.name,
        "chips": result.num_chips,
        "levels": [
            {
                "index": lv.index,
                "scale": round(lv.scale, 6),
                "size": [lv.width, lv.height],
                "valid": [_bound(lv.lo) if lv.lo >= 0 else -1, _bound(lv.hi)],
                "chips": chip_levels.count(lv.index),
                **({"focus_area": focus_area.get(lv.index, 0.0)} if result.focus is not None else {}),
            }
            for lv in result.plan.levels
        ],
        "timings": {k: round(v * 1000, 3) for k, v in result.timings.items()},
    }
    if result.focus is not None:
        body["mode"] = "focus"
    return body


def coco_results(result: Result, image_id: int | str = 0) -> list[dict[str, Any]]:
    """COCO results format: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``."""
    d = result.detections
    xywh = d.boxes.astype(np.float64)
    xywh[:, 2:] -= xywh[:, :2]
    iid: int | str = int(image_id) if isinstance(image_id, str) and image_id.isdigit() else image_id
    return [
        {"image_id": iid, "category_id": c, "bbox": b, "score": s}
        for b, s, c in zip(
            xywh.round(2).tolist(), d.scores.astype(np.float64).round(5).tolist(), d.classes.tolist(), strict=True
        )
    ]
