"""ONNX export of a tiny model: parity with PyTorch, dynamic batch, model card in the metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the train extra (torch)")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime")
pytest.importorskip("onnx", reason="needs the export extra (onnx)")

from exporters.onnx import OUTPUT_NAMES, OnnxExportConfig, export_onnx, read_card  # noqa: E402
from models.net import NetConfig, TinyDet  # noqa: E402
from models.sniper import SamplerConfig  # noqa: E402
from models.train import MEAN, STD  # noqa: E402
from service.modelcard import load_card  # noqa: E402
from service.plan import LevelSpec  # noqa: E402

pytestmark = pytest.mark.train


@pytest.fixture
def tiny_weights(tmp_path: Path) -> Path:
    return make_weights(tmp_path, focus=False)


def make_weights(tmp_path: Path, focus: bool) -> Path:
    torch.manual_seed(0)
    cfg = NetConfig(widths=(8, 16, 16, 16), head_width=8, focus_head=focus)
    net = TinyDet(cfg)
    # Spread-out class scores: with the untrained prior every cell scores ~0.01, and near-ties make 3x3 peak
    # suppression ill-conditioned (a 1-ulp difference decides whether a cell survives), which is not what
    # this test is about.
    torch.nn.init.normal_(net.cls.weight, std=1.0)
    # Non-trivial BN statistics, so the export exercises folded normalisation.
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(4, 3, 64, 64))
    sampler = SamplerConfig(chip_size=64, levels=(LevelSpec(scale=1.0), LevelSpec(long_side=64)))
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "model.pt"
    torch.save(
        {
            "model": net.state_dict(),
            "net": cfg.model_dump(),
            "sampler": sampler.model_dump(mode="json"),
            "classes": ["vehicle", "boat", "aircraft"],
            "mean": MEAN,
            "std": STD,
            "training": {"steps": 0},
        },
        path,
    )
    return path


def test_export_parity_and_card(tiny_weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.onnx"
    report = export_onnx(tiny_weights, out, OnnxExportConfig(), evaluation={"note": "none"}, name="tiny")
    assert report.max_abs_diff <= 1e-4
    assert report.parity.ltrb <= 1e-4 and report.parity.max_tie_gap <= 1e-5
    assert report.batches_checked[:2] == (4, 1)
    card = read_card(out)
    assert card == report.card
    assert (
        card.input_size == 64 and card.output_format == "snipserve" and card.classes == ("vehicle", "boat", "aircraft")
    )
    assert card.default_levels == (LevelSpec(scale=1.0), LevelSpec(long_side=64)) and card.evaluation == {
        "note": "none"
    }
    # The service's loader reads the same card from the file's metadata.
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert load_card(out, dict(sess.get_modelmeta().custom_metadata_map)) == card
    # Dynamic batch, output order and shapes, peak suppression.
    x = np.random.default_rng(1).normal(size=(3, 3, 64, 64)).astype(np.float32)
    heat, ltrb = sess.run(list(OUTPUT_NAMES), {"images": x})
    assert [o.name for o in sess.get_outputs()] == list(OUTPUT_NAMES)
    assert heat.shape == (3, 3, 16, 16) and ltrb.shape == (3, 4, 16, 16)
    assert (heat >= 0).all() and (heat <= 1).all() and (ltrb >= 0).all()
    pooled = torch.nn.functional.max_pool2d(torch.from_numpy(heat), 3, 1, 1).numpy()
    nz = heat > 0
    assert np.array_equal(heat[nz], pooled[nz])  # every surviving cell is a local maximum


def test_tie_gaps_measure_distance_to_best_neighbour() -> None:
    from exporters.onnx import _tie_gaps

    raw = np.zeros((1, 1, 3, 3), np.float64)
    raw[0, 0, 1, 1], raw[0, 0, 1, 2] = 0.5, 0.5 + 1e-7
    gaps = _tie_gaps(raw, np.array([[0, 0, 1, 1], [0, 0, 0, 0]]))
    assert gaps[0] == pytest.approx(1e-7, abs=1e-8) and gaps[1] == pytest.approx(0.5 + 1e-7)


def test_tensorrt_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    assert main(["export", "tensorrt"]) == 2
    assert "gpu" in capsys.readouterr().err


def test_export_with_focus_head(tmp_path: Path) -> None:
    from exporters.onnx import build_card
    from service.adapters import split_outputs
    from service.engines import EngineConfig
    from service.engines.onnxruntime import OnnxRuntimeEngine

    weights = make_weights(tmp_path, focus=True)
    out = tmp_path / "focus.onnx"
    report = export_onnx(weights, out, OnnxExportConfig(), name="tiny-focus", default_mode="focus")
    assert report.max_abs_diff <= 1e-4
    card = read_card(out)
    assert card.focus is not None and card.focus.stride == 16 and card.focus.output == "focus"
    assert card.output_names == ("heatmap", "ltrb", "focus") and card.default_mode == "focus"
    x = np.random.default_rng(2).normal(size=(2, 3, 64, 64)).astype(np.float32)
    pixels = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    for fuse in (False, True):
        eng = OnnxRuntimeEngine(out, EngineConfig(fuse_preprocess=fuse))
        outs = eng.infer(pixels if fuse else x)
        det, focus = split_outputs(outs, eng.card)
        assert len(det) == 2 and focus is not None and focus.shape == (2, 1, 4, 4)
        assert ((focus >= 0) & (focus <= 1)).all()
    # Without a head the card has no focus entry, and 'focus' as the default mode is refused.
    plain = torch.load(make_weights(tmp_path / "plain", focus=False), weights_only=False)
    assert build_card(plain).focus is None
    with pytest.raises(ValueError, match="focus head"):
        build_card(plain, default_mode="focus")
