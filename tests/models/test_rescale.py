"""Resampled copies of a training split: pixels and boxes scaled together, sources kept, bad input reported."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.data_cli import add_arguments, run
from models.rescale import rescale_copies


def coco_folder(root: Path) -> Path:
    """Two images of two sources; a white box drawn where each annotation says."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i, (source, w, h) in enumerate([("maritime", 200, 100), ("airport", 120, 80)], start=1):
        im = np.zeros((h, w, 3), np.uint8)
        im[20:40, 50:90] = 255
        cv2.imwrite(str(root / f"images/{source}.png"), im)
        images.append({"id": i, "file_name": f"images/{source}.png", "width": w, "height": h, "source": source})
        annotations.append(
            {"id": i, "image_id": i, "category_id": 2, "bbox": [50, 20, 40, 20], "area": 800, "iscrowd": 0}
        )
    annotations.append({"id": 3, "image_id": 1, "category_id": 2, "bbox": [0, 60, 30, 30], "area": 900, "iscrowd": 1})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 2, "name": "boat"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


def test_copies_scale_pixels_and_boxes_together(tmp_path: Path) -> None:
    src = coco_folder(tmp_path / "train")
    summary = rescale_copies(src, tmp_path / "out", [0.5, 2.0], only=["maritime"])
    assert summary == {"images": 2, "boxes": 4, "skipped": []}
    out = json.loads((tmp_path / "out/annotations.json").read_text())
    assert [im["rescaled"] for im in out["images"]] == [0.5, 2.0]
    assert all(im["source"] == "maritime" for im in out["images"])
    for im in out["images"]:
        pixels = cv2.imread(str(tmp_path / "out" / im["file_name"]))
        assert (
            pixels.shape[:2]
            == (im["height"], im["width"])
            == (round(100 * im["rescaled"]), round(200 * im["rescaled"]))
        )
        boxes = [a for a in out["annotations"] if a["image_id"] == im["id"]]
        assert sorted(a["iscrowd"] for a in boxes) == [0, 1]  # ignore regions travel with the copy
        x, y, w, h = (round(v) for v in next(a for a in boxes if not a["iscrowd"])["bbox"])
        inside = pixels[y + 1 : y + h - 1, x + 1 : x + w - 1]
        assert inside.size and inside.min() > 200  # the drawn box is where the scaled annotation says


def test_bad_scales_and_unreadable_images(tmp_path: Path) -> None:
    src = coco_folder(tmp_path / "train")
    with pytest.raises(ValueError, match="scales"):
        rescale_copies(src, tmp_path / "out", [1.0])
    (src / "images/airport.png").write_bytes(b"not a png")
    summary = rescale_copies(src, tmp_path / "out", [0.5])
    assert summary["images"] == 1 and summary["skipped"] == ["images/airport.png: unreadable"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    src = coco_folder(tmp_path / "train")
    args = parser.parse_args(["rescale", "--data", str(src), "--scales", "0.5", "--out", str(tmp_path / "o")])
    assert run(args) == 0 and "2 images, 3 boxes" in capsys.readouterr().out
    bad = parser.parse_args(["rescale", "--data", str(src), "--scales", "x", "--out", str(tmp_path / "o")])
    assert run(bad) == 2
