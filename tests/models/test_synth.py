"""Synthetic dataset: determinism, annotation validity, size mix, COCO output and CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from models.synth import CLASSES, SynthConfig, generate_image, load_coco, write_dataset

SMALL = SynthConfig(min_long_side=320, max_long_side=480)


def _digest(cfg: SynthConfig, seed: int, n: int) -> list[str]:
    return [hashlib.sha256(generate_image(cfg, seed, i).jpeg).hexdigest() for i in range(n)]


def test_same_seed_same_bytes() -> None:
    assert _digest(SMALL, 3, 3) == _digest(SMALL, 3, 3)


def test_image_independent_of_order_and_count() -> None:
    # Image i depends only on (seed, i): generating it alone gives the bytes it has in a longer run.
    assert generate_image(SMALL, 3, 2).jpeg == _digest_bytes(SMALL, 3, 3)[2]


def _digest_bytes(cfg: SynthConfig, seed: int, n: int) -> list[bytes]:
    return [generate_image(cfg, seed, i).jpeg for i in range(n)]


def test_different_seed_different_images() -> None:
    assert _digest(SMALL, 3, 2) != _digest(SMALL, 4, 2)


@pytest.mark.parametrize("index", range(4))
def test_annotations_valid(index: int) -> None:
    im = generate_image(SynthConfig(), 11, index)
    assert 1280 <= max(im.width, im.height) <= 4000
    pixels = im.decode()
    assert pixels.shape == (im.height, im.width, 3) and pixels.dtype == np.uint8
    b = im.boxes
    assert b.dtype == np.float32 and b.shape[1] == 4 and b.shape[0] > 0
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= im.width).all() and (b[:, 3] <= im.height).all()
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert set(im.classes.tolist()) <= set(range(len(CLASSES)))


def test_size_mix_and_range() -> None:
    sizes, classes, long_sides = [], [], []
    for i in range(10):
        im = generate_image(SynthConfig(), 5, i)
        sizes.append(np.sqrt((im.boxes[:, 2] - im.boxes[:, 0]) * (im.boxes[:, 3] - im.boxes[:, 1])))
        classes.append(im.classes)
        long_sides.append(max(im.width, im.height))
    s = np.concatenate(sizes)
    assert s.size > 150
    small, medium, large = (s < 32).mean(), ((s >= 32) & (s < 96)).mean(), (s >= 96).mean()
    assert 0.32 < small < 0.48 and 0.27 < medium < 0.43 and 0.17 < large < 0.33, (small, medium, large)
    assert s.min() < 8  # objects down to ~6 px
    assert s.max() > 0.15 * min(long_sides)  # and up to about a quarter of the image side
    assert set(np.concatenate(classes).tolist()) == set(range(len(CLASSES)))


def test_write_and_load_coco(tmp_path: Path) -> None:
    coco = write_dataset(tmp_path, 2, seed=9, cfg=SMALL)
    on_disk = json.loads((tmp_path / "annotations.json").read_text())
    assert on_disk["images"] == coco["images"]
    assert [c["name"] for c in on_disk["categories"]] == list(CLASSES)
    for a in on_disk["annotations"]:
        x, y, w, h = a["bbox"]
        assert w > 0 and h > 0 and a["area"] == pytest.approx(w * h, rel=1e-3)
        assert 1 <= a["category_id"] <= len(CLASSES)
    _, items = load_coco(tmp_path)
    for (path, boxes, classes), im in zip(items, (generate_image(SMALL, 9, i) for i in range(2)), strict=True):
        assert path.read_bytes() == im.jpeg
        np.testing.assert_allclose(boxes, im.boxes, atol=0.01)
        np.testing.assert_array_equal(classes, im.classes)


def test_cli(tmp_path: Path) -> None:
    from service.cli import main

    args = ["synth", "--out", str(tmp_path / "d"), "--images", "2", "--seed", "1", "--max-long-side", "400"]
    args += ["--min-long-side", "300"]
    assert main(args) == 0
    assert len(list((tmp_path / "d" / "images").glob("*.jpg"))) == 2
