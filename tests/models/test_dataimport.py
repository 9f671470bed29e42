"""The real-data importer: formats, class maps, group-safe splits, the data card, and bad input reported."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.dataimport import (
    ImportConfig,
    Record,
    SourceSpec,
    assign_splits,
    read_dota,
    read_voc,
    read_yolo,
    run_import,
)
from models.synth import load_coco

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "real"
SHIPPED_SOURCES = Path(__file__).resolve().parents[2] / "models" / "data" / "real_sources.yaml"
COMMIT = "0" * 40


def _spec(**kw: object) -> SourceSpec:
    base: dict[str, object] = {
        "name": "src",
        "repository": "someone/data",
        "commit": COMMIT,
        "license": "MIT",
        "attribution": "someone",
        "format": "yolo",
        "images": ["*.jpg"],
        "labels": ["*.txt"],
        "names": ["car", "boat", "lift"],
        "class_map": {"car": "vehicle", "boat": "boat", "lift": "ignore:boat"},
    }
    return SourceSpec.model_validate(base | kw)


def _image(path: Path, w: int = 200, h: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 120, np.uint8))


def _run(tmp_path: Path, *specs: SourceSpec, splits: dict[str, float] | None = None) -> dict:
    cfg = ImportConfig(sources=list(specs), splits=splits or {"train": 1.0, "val": 0.0, "test": 0.0})
    return run_import(cfg, tmp_path / "src", tmp_path / "out")


def _problems(tmp_path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (tmp_path / "out" / "problems.jsonl").read_text().splitlines()]


def test_read_yolo_to_pixels_and_bad_lines() -> None:
    boxes, bad = read_yolo("0 0.5 0.5 0.2 0.4\n1 oops\n\n7 0.1 0.1 0.1 0.1\n0 nan 0.5 0.1 0.1", 200, 100, ["a", "b"])
    assert [b.cls for b in boxes] == ["a", "#7"]
    np.testing.assert_allclose(boxes[0].xyxy, (80.0, 30.0, 120.0, 70.0))
    assert bad == ["1 oops", "0 nan 0.5 0.1 0.1"]


def test_read_dota_oriented_to_enclosing_box() -> None:
    text = "imagesource:x\ngsd:0.5\n10 0 20 10 10 20 0 10 plane 0\n1 2 3\n"
    boxes, bad = read_dota(text)
    assert boxes[0].cls == "plane" and boxes[0].xyxy == (0.0, 0.0, 20.0, 20.0)
    assert bad == ["1 2 3"]


def test_read_voc_one_based_inclusive() -> None:
    xml = (
        "<annotation><filename>a.jpg</filename><object><name>car</name><bndbox><xmin>1</xmin><ymin>11</ymin>"
        "<xmax>10</xmax><ymax>20</ymax></bndbox></object><object><name>car</name></object></annotation>"
    )
    boxes, bad, name = read_voc(xml)
    assert name == "a.jpg" and boxes[0].xyxy == (0.0, 10.0, 10.0, 20.0) and bad == ["car"]


def test_yolo_import_class_map_ignore_drop_and_coco_layout(tmp_path: Path) -> None:
    root = tmp_path / "src" / "src"
    _image(root / "a.jpg")
    (root / "a.txt").write_text("0 0.5 0.5 0.1 0.2\n1 0.2 0.2 0.1 0.1\n2 0.8 0.8 0.1 0.1\n")
    spec = _spec(
        names=["car", "boat", "lift", "dock"],
        class_map={"car": "vehicle", "boat": "boat", "lift": "ignore:boat", "dock": "drop"},
    )
    card = _run(tmp_path, spec)
    coco, items = load_coco(tmp_path / "out" / "train")
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    assert [cats[a["category_id"]] for a in coco["annotations"]] == ["vehicle", "boat", "boat"]
    assert [a["iscrowd"] for a in coco["annotations"]] == [0, 0, 1]
    path, boxes, classes = items[0]
    assert path.is_file() and classes.tolist() == [0, 1, -1]  # ignore regions load as class -1
    np.testing.assert_allclose(boxes[0], [90.0, 40.0, 110.0, 60.0])
    entry = card["sources"][0]
    assert entry["commit"] == COMMIT and entry["license"] == "MIT"
    assert entry["splits"]["train"]["boxes"] == {"vehicle": 1, "boat": 1}
    assert entry["splits"]["train"]["ignore_regions"] == 1
    assert "## src" in (tmp_path / "out" / "DATACARD.md").read_text()


def test_bad_input_is_reported_per_file_and_skipped(tmp_path: Path) -> None:
    root = tmp_path / "src" / "src"
    _image(root / "good.jpg")
    (root / "good.txt").write_text("0 0.5 0.5 0.1 0.1\n0 1.6 1.6 0.1 0.1\n9 0.5 0.5 0.1 0.1\nbroken\n")
    (root / "orphan.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # label without image
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "corrupt.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    _image(root / "nolabel.jpg")
    spec = _spec(names=["car"], class_map={"car": "vehicle"})
    card = _run(tmp_path, spec)
    kinds = {(p["file"], p["kind"]) for p in _problems(tmp_path)}
    assert kinds == {
        ("good.jpg", "box outside image"),
        ("good.jpg", "unknown class"),
        ("good.txt", "malformed label line"),
        ("orphan.txt", "label without image"),
        ("corrupt.jpg", "corrupt image"),
        ("nolabel.jpg", "image without label"),
    }
    coco = json.loads((tmp_path / "out" / "train" / "annotations.json").read_text())
    assert [im["file_name"].rsplit("/", 1)[1] for im in coco["images"]] == ["good.jpg"]
    assert len(coco["annotations"]) == 1
    assert card["sources"][0]["problems"]["unknown class"] == 1


def test_unknown_class_map_target_is_rejected() -> None:
    with pytest.raises(ValueError, match="class_map targets"):
        _spec(class_map={"car": "truck"})


def test_coco_and_voc_sources(tmp_path: Path) -> None:
    c_root, v_root = tmp_path / "src" / "c", tmp_path / "src" / "v"
    _image(c_root / "imgs" / "x.jpg")
    (c_root / "ann.json").write_text(
        json.dumps(
            {
                "images": [{"id": 5, "file_name": "imgs/x.jpg"}, {"id": 6, "file_name": "imgs/missing.jpg"}],
                "annotations": [{"image_id": 5, "category_id": 2, "bbox": [10, 10, 30, 20]}],
                "categories": [{"id": 2, "name": "airplane"}],
            }
        )
    )
    _image(v_root / "JPEGImages" / "y.jpg")
    (v_root / "Annotations").mkdir(parents=True)
    (v_root / "Annotations" / "y.xml").write_text(
        "<annotation><object><name>ship</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>50</xmax>"
        "<ymax>40</ymax></bndbox></object></annotation>"
    )
    (v_root / "Annotations" / "z.xml").write_text("<annotation><object>")  # corrupt XML, no image either
    _image(v_root / "JPEGImages" / "z.jpg")
    coco_spec = _spec(
        name="c",
        format="coco",
        annotations="ann.json",
        images=["imgs/*.jpg"],
        labels=[],
        class_map={"airplane": "aircraft"},
    )
    voc_spec = _spec(
        name="v", format="voc", images=["JPEGImages/*.jpg"], labels=["Annotations/*.xml"], class_map={"ship": "boat"}
    )
    card = _run(tmp_path, coco_spec, voc_spec)
    coco, items = load_coco(tmp_path / "out" / "train")
    assert sorted(im["source"] for im in coco["images"]) == ["c", "v"]
    assert sorted(int(c) for _, _, cl in items for c in cl) == [1, 2]  # boat, aircraft
    kinds = {(p["source"], p["kind"]) for p in _problems(tmp_path)}
    assert kinds == {("c", "label without image"), ("v", "corrupt label")}
    assert card["sources"][1]["splits"]["train"]["images"] == 1


def test_groups_never_straddle_splits_and_augmented_copies_count_once(tmp_path: Path) -> None:
    root = tmp_path / "src" / "src"
    for g in range(12):
        for copy in range(3):
            _image(root / f"img_{g}_jpg.rf.{copy}.jpg", 64, 64)
            (root / f"img_{g}_jpg.rf.{copy}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    spec = _spec(names=["car"], class_map={"car": "vehicle"}, group=r"^(img_\d+)", augmented_copies=True)
    _run(tmp_path, spec, splits={"train": 0.5, "val": 0.25, "test": 0.25})
    groups = {}
    for split in ("train", "val", "test"):
        coco = json.loads((tmp_path / "out" / split / "annotations.json").read_text())
        groups[split] = [im["group"] for im in coco["images"]]
    assert set(groups["train"]).isdisjoint(groups["val"]) and set(groups["val"]).isdisjoint(groups["test"])
    assert set(groups["train"]).isdisjoint(groups["test"])
    assert len(groups["train"]) == 3 * len(set(groups["train"]))  # training keeps every augmented copy
    assert len(groups["val"]) == len(set(groups["val"])) > 0  # evaluation counts each photo once
    assert len(set(groups["train"])) + len(set(groups["val"])) + len(set(groups["test"])) == 12


def test_assign_splits_fixed_groups_and_shares() -> None:
    recs = [Record(Path(f"{g}{i}"), f"{g}{i}", g, 1, 1, []) for g in "abcdefghij" for i in range(2)]
    split = assign_splits(recs, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3, fixed={"val": ["a"], "test": ["b"]})
    assert split["a"] == "val" and split["b"] == "test"
    counts = {s: sum(2 for g in split if split[g] == s) for s in ("train", "val", "test")}
    assert counts == {"train": 12, "val": 4, "test": 4}
    assert assign_splits(recs, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3) == assign_splits(
        recs, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3
    )


def test_shipped_sources_import_the_real_fixtures(tmp_path: Path) -> None:
    """The pinned sources file reads each real dataset's own layout (YOLO x2, DOTA labelTxt)."""
    cfg = ImportConfig.from_yaml(SHIPPED_SOURCES)
    assert {s.name for s in cfg.sources} == {"aerial-cars", "maritime", "airport"}
    card = run_import(
        cfg.model_copy(update={"splits": {"train": 1.0, "val": 0.0, "test": 0.0}}), FIXTURES, tmp_path / "out"
    )

    def total(name: str, key: str) -> object:
        splits = {s["name"]: s for s in card["sources"]}[name]["splits"].values()
        if key == "ignore_regions":
            return sum(v[key] for v in splits)
        out: dict[str, int] = {}
        for v in splits:
            for c, n in v["boxes"].items():
                out[c] = out.get(c, 0) + n
        return out

    assert total("airport", "boxes") == {"aircraft": 92}  # 92 oriented boxes -> axis-aligned
    assert total("aerial-cars", "boxes") == {"vehicle": 26}
    assert total("maritime", "boxes") == {"boat": 7}  # 2 boats + 5 jetskis; 6 docks dropped
    assert total("maritime", "ignore_regions") == 7  # boats on lifts
    for s in card["sources"]:
        assert len(s["commit"]) == 40 and s["license"] and s["attribution"]
    assert card["problems"] == 0
