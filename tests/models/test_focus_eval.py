"""The focus sweep's replay is exactly what the service's 'focus' preset serves; reports get written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.evaluate import EvalConfig, mode_options
from models.focus_eval import ChipCache, markdown, replay, write
from service.engines.fake import FAKE_CARD, FAKE_FOCUS_CARD
from service.modelcard import ModelCard
from tests.service.test_pipeline_focus import boxes, pipeline, scene

BOTH_CARD = FAKE_FOCUS_CARD.model_copy(
    update={"focus": FAKE_FOCUS_CARD.focus_spec.model_copy(update={"with_detections": True})}
)


@pytest.mark.parametrize("card", [FAKE_FOCUS_CARD, FAKE_CARD, BOTH_CARD], ids=["head", "fallback", "both"])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
def test_replay_equals_the_served_focus_preset(card: ModelCard, threshold: float) -> None:
    pipe = pipeline(card)
    img = scene()
    cfg = EvalConfig(focus_threshold=threshold)
    pyramid = mode_options("pyramid", pipe.card.input_size, cfg)
    focus = mode_options("focus", pipe.card.input_size, cfg)
    prepared = pipe.prepare(img, pyramid)
    cache = ChipCache(pipe, prepared)
    cache.get(prepared.plan.chips)  # the pyramid's chips first, as the sweep runs them
    replayed = replay(pipe, prepared, cache, focus)
    served = pipe.detect(img, focus)
    assert replayed.plan.chips.tolist() == served.plan.chips.tolist()
    assert boxes(replayed) == boxes(served)
    assert np.allclose(np.sort(replayed.scores), np.sort(served.scores))
    assert replayed.focus == served.focus


def test_reports(tmp_path: Path) -> None:
    row = {"AP": 0.5, "AP50": 0.8, "AP75": 0.5, "AP_S": 0.3, "AP_M": 0.6, "AP_L": 0.7, "chips_per_image": 10.0}
    results = {
        "data": "val",
        "images": 3,
        "focus_source": "head",
        "pyramid": {**row, "threshold": None, "chips_ratio": 1.0, "AP_lost_points": 0.0, "AP_S_lost_points": 0.0},
        "focus": [
            {**row, "threshold": t, "chips_ratio": r, "AP_lost_points": lost, "AP_S_lost_points": lost}
            for t, r, lost in ((0.1, 2.0, 0.2), (0.3, 3.0, 0.9))
        ],
        "goal": {"chips_ratio_at_least": 2.5, "AP_lost_points_at_most": 1.0, "met": True},
        "best_threshold": 0.3,
    }
    paths = write(results, tmp_path / "focus.json")
    assert [p.name for p in paths] == ["focus.json", "focus.md", "focus_focus_curve.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert "met at threshold 0.3" in markdown(results)


def test_sweep_without_a_model_runs_the_shipped_one(tmp_path: Path) -> None:
    """``snipserve eval --mode focus --sweep`` without ``--model`` evaluates the shipped model, as ``evaluate`` and
    the CLI's help say (it used to fail: 'no model path given'); threshold 0 is the pyramid, chip for chip."""
    from models.focus_eval import sweep
    from models.synth import SynthConfig, write_dataset

    data = tmp_path / "synth"
    write_dataset(data, 1, 5, SynthConfig(min_long_side=640, max_long_side=700))
    res = sweep(data, None, [0.0], EvalConfig(threads=1), progress=False)
    assert res["model"].endswith("snipserve_default.onnx") and res["focus_source"] == "head"
    assert res["focus"][0]["chips_per_image"] == res["pyramid"]["chips_per_image"] > 0
