"""Evaluation: mode -> options mapping, COCO scoring, reports; end to end with the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.evaluate import (
    EvalConfig,
    breakdown,
    coco_scores,
    markdown_table,
    mode_options,
    recall_at_iou,
    write_reports,
)
from models.synth import SynthConfig, coco_dict, generate_image, write_dataset
from service.plan import LevelSpec

MODEL = Path(__file__).resolve().parents[2] / "models" / "snipserve_default.onnx"


def test_mode_options() -> None:
    cfg = EvalConfig()
    single = mode_options("single", 256, cfg)
    assert single.levels == (LevelSpec(long_side=256, valid=(-1, None)),) and single.merge.method == "hard"
    slices = mode_options("slices", 256, cfg)
    assert slices.levels == (
        LevelSpec(scale=1.0, valid=(-1, None), overlap=0.2),
        LevelSpec(long_side=256, valid=(-1, None)),
    )
    assert slices.merge.method == "hard" and slices.merge.iou_threshold == 0.5 and not slices.edge_filter
    pyramid = mode_options("pyramid", 256, cfg)
    # 'pyramid' is every chip even on a card whose default mode is focus
    assert pyramid.levels is None and pyramid.preset == "pyramid" and pyramid.merge.method == "gaussian"
    focus = mode_options("focus", 256, cfg.model_copy(update={"focus_threshold": 0.1}))
    assert focus.preset == "focus" and focus.focus_threshold == 0.1 and focus.merge.method == "gaussian"
    for o in (single, slices, pyramid, focus):
        assert o.score_threshold == 1e-3 and o.max_detections == 100
    with pytest.raises(ValueError, match="unknown mode"):
        mode_options("tiles", 256, cfg)  # type: ignore[arg-type]


def test_coco_scores_perfect_and_empty() -> None:
    pytest.importorskip("pycocotools", reason="needs the train extra (pycocotools)")
    ims = [generate_image(SynthConfig(min_long_side=300, max_long_side=400), 2, i) for i in range(2)]
    gt = coco_dict(ims, 2, SynthConfig())
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        for a in gt["annotations"]
    ]
    perfect = coco_scores(gt, dets)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    assert coco_scores(gt, [])["AP"] == 0.0


def test_breakdown_per_class_and_source_with_ignore_regions() -> None:
    pytest.importorskip("pycocotools", reason="needs the train extra (pycocotools)")
    gt = {
        "images": [
            {"id": 1, "source": "a", "width": 100, "height": 100},
            {"id": 2, "source": "b", "width": 100, "height": 100},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [50, 50, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0, 0, 30, 30], "area": 900, "iscrowd": 1},
        ],
        "categories": [{"id": 1, "name": "vehicle"}, {"id": 2, "name": "boat"}, {"id": 3, "name": "aircraft"}],
    }
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.9},
        {"image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 10], "score": 0.8},  # on the ignore region only
    ]
    out = breakdown(gt, dets)
    assert set(out["per_class"]) == {"vehicle", "boat"}  # aircraft has no ground truth
    assert out["per_class"]["vehicle"]["AP"] == pytest.approx(1.0) and out["per_class"]["boat"]["AP"] == 0.0
    assert out["per_source"]["a"]["AP50"] == pytest.approx(1.0) and out["per_source"]["b"]["AP50"] == 0.0
    assert out["per_source"]["b"]["images"] == 1
    # the detection inside the crowd region is no false positive: adding the missed boat makes source b perfect
    dets.append({"image_id": 2, "category_id": 2, "bbox": [50, 50, 20, 20], "score": 0.7})
    assert breakdown(gt, dets)["per_source"]["b"]["AP"] == pytest.approx(1.0)


def test_recall_at_iou() -> None:
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    det = np.array([[1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    assert recall_at_iou(gt, np.array([0, 1]), det, np.array([0, 0])) == (1, 2)  # class must match
    assert recall_at_iou(gt, np.array([0, 1]), det, np.array([0, 1])) == (2, 2)


@pytest.mark.slow
def test_eval_end_to_end_with_shipped_model(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="needs the cpu extra (onnxruntime)")
    pytest.importorskip("pycocotools", reason="needs the train extra (pycocotools)")
    pytest.importorskip("matplotlib", reason="needs the train extra (matplotlib)")
    from service.cli import main

    write_dataset(tmp_path / "d", 2, seed=31, cfg=SynthConfig(min_long_side=500, max_long_side=700))
    out = tmp_path / "r" / "eval.json"
    args = ["eval", "--data", str(tmp_path / "d"), "--model", str(MODEL), "--mode", "all", "--json", str(out)]
    assert main([*args, "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert set(res["modes"]) == {"single", "slices", "pyramid"}
    for r in res["modes"].values():
        for k in ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "chips_per_image", "images_per_second"):
            assert isinstance(r[k], float | int) and r[k] >= 0
    assert res["modes"]["single"]["chips_per_image"] == 1
    assert set(res["modes"]["pyramid"]["per_class"]) <= {"vehicle", "boat", "aircraft"}
    assert res["modes"]["pyramid"]["per_source"] == {}  # synthetic images carry no source
    assert (tmp_path / "r" / "eval.md").read_text().count("\n") == 5 + 6  # modes + per-class table
    assert (tmp_path / "r" / "eval_ap_by_size.png").stat().st_size > 1000
    assert markdown_table(res).startswith("| mode |")
    assert len(write_reports(res, None, tmp_path / "again")) == 2


def test_eval_without_model_uses_the_shipped_model(tmp_path: Path) -> None:
    """``snipserve eval --data DIR --mode pyramid`` (no --model, as the help and DESIGN allow) ran into a
    traceback; it evaluates the shipped model."""
    pytest.importorskip("onnxruntime", reason="needs the cpu extra (onnxruntime)")
    pytest.importorskip("pycocotools", reason="needs the train extra (pycocotools)")
    pytest.importorskip("matplotlib", reason="needs the train extra (matplotlib)")
    from service.cli import main

    write_dataset(tmp_path / "d", 1, seed=32, cfg=SynthConfig(min_long_side=300, max_long_side=400))
    out = tmp_path / "r" / "eval.json"
    args = ["eval", "--data", str(tmp_path / "d"), "--mode", "pyramid", "--json", str(out), "--no-progress"]
    assert main(args) == 0
    assert json.loads(out.read_text())["model"].endswith("snipserve_default.onnx")
