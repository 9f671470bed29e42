"""The measurement tools added for the real-imagery model: sensor shift, architecture comparison, card evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))

import arch_compare  # noqa: E402
import card_evaluation  # noqa: E402
import sensor_shift  # noqa: E402

MODEL = REPO / "models" / "snipserve_default.onnx"


def test_sensor_shift_changes_pixels_not_labels(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "images" / "a").mkdir(parents=True)
    img = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    cv2.imwrite(str(src / "images" / "a" / "x.jpg"), img)
    coco = {"images": [{"id": 1, "file_name": "images/a/x.jpg", "width": 80, "height": 64}], "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 12], "area": 120, "iscrowd": 0}
    ], "categories": [{"id": 1, "name": "vehicle"}]}  # fmt: skip
    (src / "annotations.json").write_text(json.dumps(coco))
    out = tmp_path / "out"
    assert sensor_shift.main(["--data", str(src), "--out", str(out), "--seed", "3"]) == 0
    shifted = json.loads((out / "annotations.json").read_text())
    assert shifted["annotations"] == coco["annotations"]
    name = shifted["images"][0]["file_name"]
    assert name == "images/a/x.png"
    got = cv2.imread(str(out / name))
    assert (
        got.shape == img.shape
        and np.abs(got.astype(int) - cv2.imread(str(src / "images/a/x.jpg")).astype(int)).mean() > 3
    )
    again = tmp_path / "again"
    sensor_shift.main(["--data", str(src), "--out", str(again), "--seed", "3"])
    assert np.array_equal(cv2.imread(str(again / name)), got)  # seeded


def test_arch_compare_measures_each_model_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    assert arch_compare.main(["--model", str(MODEL), "--model", str(MODEL), "--seconds", "1", "--batch", "2",
                              "--threads", "1", "--json", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["models"]
    assert len(rows) == 2 and rows[0]["speed_vs_first"] == 1.0 and all(r["chips_per_s"] > 0 for r in rows)


def test_card_evaluation_replaces_only_the_evaluation(tmp_path: Path) -> None:
    card = tmp_path / "card.yaml"
    card.write_text("# kept comment\nscore_threshold: 0.5\nevaluation:\n  old: 1\n")
    mode = {"AP": 0.3, "AP50": 0.6, "chips_per_image": 5.0, "per_class": {"boat": {"AP50": 0.4}},
            "per_source": {"maritime": {"AP50": 0.2}}}  # fmt: skip
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"modes": {"pyramid": mode}, "images": 3}))
    args = ["--card", str(card), "--real-val", str(res), "--real-test", str(res), "--synth-val", str(res)]
    assert card_evaluation.main(args) == 0
    text = card.read_text()
    assert text.startswith("# kept comment\nscore_threshold: 0.5\nevaluation:\n") and "  old: 1" not in text
    import yaml

    ev = yaml.safe_load(text)["evaluation"]
    assert ev["real_val"]["pyramid"]["per_class_AP50"] == {"boat": 0.4}
    assert "per_source_AP50" not in ev["synthetic_val"]["pyramid"]


def test_focus_per_level_thresholds_span_pyramid_to_coarsest_level(tmp_path: Path) -> None:
    """Threshold 0 at every step plans exactly the pyramid (same chips, same AP); above 1 at every step only the
    coarsest level runs; a combo naming one step leaves the others at the card's threshold."""
    import focus_per_level

    from models.synth import SynthConfig, write_dataset

    data = tmp_path / "synth"
    write_dataset(data, 2, 5, SynthConfig(min_long_side=640, max_long_side=800))
    all_zero = {0: 0.0, 1: 0.0, 2: 0.0}
    out = tmp_path / "pl.json"
    assert (
        focus_per_level.main(
            [
                "--data",
                str(data),
                "--json",
                str(out),
                "--threads",
                "1",
                "--combo",
                "0=0,1=0,2=0",
                "--combo",
                "0=2,1=2,2=2",
            ]
        )
        == 0
    )
    pyramid, zero, none = json.loads(out.read_text())["rows"]
    assert zero["thresholds"] == {str(k): v for k, v in all_zero.items()}
    assert zero["chips_per_image_by_level"] == pyramid["chips_per_image_by_level"] and zero["AP"] == pyramid["AP"]
    assert none["chips_per_image_by_level"][:-1] == [0.0] * (len(pyramid["chips_per_image_by_level"]) - 1)
    assert focus_per_level.parse_combo("0=0.05,1=0.2") == {0: 0.05, 1: 0.2}


def test_focus_oracle_map_marks_only_needed_objects_where_chips_ran() -> None:
    """The oracle paints the cells of objects small enough for the finer level and seen (min_px at this level),
    only inside the chips that ran; large and ignored objects stay 0."""
    from focus_oracle import OracleRun

    from service.adapters import ChipDetections
    from service.focus import FocusConfig
    from service.plan import LevelSpec, PlanConfig, plan

    p = plan(
        (1024, 512), PlanConfig(chip_size=256, levels=(LevelSpec(scale=1.0), LevelSpec(scale=0.25)), max_chips=999)
    )
    fine, coarse = p.levels
    boxes = np.array([[100, 100, 110, 110], [600, 300, 612, 312], [700, 50, 900, 250], [40, 400, 50, 410]], np.float32)
    classes = np.array([0, 0, 0, -1])  # a small object, another, one too large for the finer level, an ignore region
    run = OracleRun(p, FocusConfig(), 0.5, boxes, classes, min_px=0)
    chips = p.chips[p.chips[:, 0] == 1]
    fmap = run.focus_map(coarse, fine, chips, ChipDetections.empty(), None)
    assert fine.hi < 200 and fmap.shape == (8, 16)  # 128 x 256 coarse px at stride 16
    assert sorted(map(tuple, np.argwhere(fmap == 1).tolist())) == [(1, 1), (4, 9)]  # 10 px at 0.25 -> one cell
    assert fmap[1, 1] == 1 and fmap.sum() == 2
    unseen = OracleRun(p, FocusConfig(), 0.5, boxes, classes, min_px=3.5)  # both small ones are 2.5-3 px at 0.25
    assert unseen.focus_map(coarse, fine, chips, ChipDetections.empty(), None).sum() == 0
    none_ran = run.focus_map(coarse, fine, chips[:0], ChipDetections.empty(), None)
    assert none_ran.sum() == 0


def test_focus_oracle_rows_span_pyramid_to_coarsest_level(tmp_path: Path) -> None:
    """min_px 0 plans no more chips than the pyramid; a min_px no object reaches runs the coarsest level alone."""
    import focus_oracle

    from models.synth import SynthConfig, write_dataset

    data = tmp_path / "synth"
    write_dataset(data, 2, 5, SynthConfig(min_long_side=640, max_long_side=800))
    out = tmp_path / "o.json"
    args = ["--data", str(data), "--json", str(out), "--threads", "1", "--min-px", "0", "--min-px", "1e6"]
    assert focus_oracle.main(args) == 0
    pyramid, oracle, blind = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in (pyramid, oracle, blind)] == ["pyramid", "oracle min_px=0", "oracle min_px=1e+06"]
    assert oracle["chips_ratio"] >= 1.0 and oracle["chips_per_image"] <= pyramid["chips_per_image"]
    levels = pyramid["chips_per_image_by_level"]
    assert blind["chips_per_image_by_level"] == [0.0] * (len(levels) - 1) + [levels[-1]]
