"""Resampled copies of a COCO folder: scale augmentation for sources with few instances.

``snipserve data rescale --data data/real/train --only maritime --scales 0.6,1.6 --out data/real/train_rescaled``
writes every selected image once per factor -- resized (area interpolation down, linear up), its boxes and ignore
regions scaled with it -- as a COCO folder of its own that a training config adds as one more ``data:`` source.
SNIPER trains each level on a fixed band of object sizes, so a source whose objects all have similar sizes (65 boats
from one lake shore) teaches every level little; copies at other scales move the same objects into other levels'
bands. Records keep their ``source`` (``only:`` filters still apply) and ``group``, and say where they came from
(``original``, ``rescaled``). Only ever made from a training split: a copy of a val/test image in training would leak.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2

MAX_SIDE = 8192  # a copy larger than this on either side is skipped (and reported)


def rescale_copies(data: Path, out: Path, scales: list[float], only: list[str] | None = None) -> dict[str, Any]:
    """Write ``out/annotations.json`` + ``out/images/`` with each image of ``data`` (of the ``only`` sources, if
    given) at every factor of ``scales``. Returns a summary: images and boxes written, and what was skipped."""
    if not scales or any(not 0.05 <= s <= 8 or s == 1 for s in scales):
        raise ValueError(f"scales must be factors in [0.05, 8] other than 1, got {scales}")
    coco = json.loads((data / "annotations.json").read_text())
    by_image: dict[int, list[dict[str, Any]]] = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    skipped: list[str] = []
    for im in coco["images"]:
        if only is not None and im.get("source") not in only:
            continue
        pixels = cv2.imread(str(data / im["file_name"]), cv2.IMREAD_COLOR)
        if pixels is None:
            skipped.append(f"{im['file_name']}: unreadable")
            continue
        for s in scales:
            w, h = round(im["width"] * s), round(im["height"] * s)
            if max(w, h) > MAX_SIDE or min(w, h) < 16:
                skipped.append(f"{im['file_name']} x{s:g}: {w}x{h} outside 16..{MAX_SIDE} px")
                continue
            interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
            copy = cv2.resize(pixels, (w, h), interpolation=interp)
            name = Path(im["file_name"])
            rel = name.with_name(f"{name.stem}_x{s:g}{name.suffix}")
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / rel), copy)
            record = im | {"id": len(images) + 1, "file_name": str(rel), "width": w, "height": h, "rescaled": s}
            images.append(record)
            sx, sy = w / im["width"], h / im["height"]
            for a in by_image.get(im["id"], []):
                x, y, bw, bh = a["bbox"]
                box = [x * sx, y * sy, bw * sx, bh * sy]
                annotations.append(
                    a | {"id": len(annotations) + 1, "image_id": record["id"], "bbox": box, "area": box[2] * box[3]}
                )
    info = coco.get("info", {}) | {"rescaled_from": str(data), "scales": scales, "only": only}
    out.mkdir(parents=True, exist_ok=True)
    result = {"info": info, "images": images, "annotations": annotations, "categories": coco["categories"]}
    (out / "annotations.json").write_text(json.dumps(result))
    return {"images": len(images), "boxes": len(annotations), "skipped": skipped}
