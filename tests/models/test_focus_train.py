"""The focus-head stage on a tiny detector: only the head changes, the loss falls, runs resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the train extra (torch)")

from models.focus_labels import FocusStageConfig  # noqa: E402
from models.focus_train import focus_loss  # noqa: E402
from models.net import NetConfig, TinyDet, load_weights  # noqa: E402
from models.sniper import SamplerConfig  # noqa: E402
from models.synth import SynthConfig, write_dataset  # noqa: E402
from models.train import TrainConfig, load_trained, train  # noqa: E402
from service.plan import LevelSpec  # noqa: E402

pytestmark = pytest.mark.train

TINY_NET = NetConfig(widths=(8, 16, 16, 16), head_width=8)
SAMPLER = SamplerConfig(chip_size=128, levels=(LevelSpec(scale=1.0), LevelSpec(scale=0.5), LevelSpec(long_side=128)))


def config(data: Path, out: Path, steps: int, **kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "data": data,
        "out": out,
        "steps": steps,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_steps": 2,
        "mining_step": 0,
        "checkpoint_every": 10,
        "log_every": 5,
        "net": TINY_NET,
        "sampler": SAMPLER,
    }
    return TrainConfig.model_validate(base | kw)


@pytest.fixture(scope="module")
def detector(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("focus_synth")
    write_dataset(d, 4, seed=31, cfg=SynthConfig(min_long_side=300, max_long_side=420, min_objects=12))
    model = train(config(d, tmp_path_factory.mktemp("det") / "run", steps=4), progress=False)
    return d, model


def test_focus_stage_trains_only_the_head_and_resumes(detector: tuple[Path, Path], tmp_path: Path) -> None:
    data, det = detector
    focus = FocusStageConfig(chips_per_image=8, holdout=0.25, eval_every=10)
    cfg = config(data, tmp_path / "focus", steps=40, stage="focus", init_from=det, lr=3e-2, batch_size=8, focus=focus)
    out = train(cfg, progress=False)
    net, meta = load_trained(out)
    before, _ = load_trained(det)
    assert net.cfg.focus_head and net.focus is not None and meta["focus"] == {"stride": 16, "output": "focus"}
    for k, v in before.state_dict().items():  # the detector is frozen: bit for bit
        assert torch.equal(net.state_dict()[k], v), k
    log = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["held_out"]["loss"] < 0.8 * log[0]["loss"], (log[0], log[-1])
    assert any("held_out" in r for r in log) and "recall@0.3" in meta["training"]["focus"]["held_out"]
    assert meta["training"]["stages"][-1]["stage"] == "focus"
    logits, ltrb, f = net.forward_focus(torch.zeros(2, 3, 128, 128))
    assert f.shape == (2, 1, 8, 8) and logits.shape == (2, 3, 32, 32)
    # resume: a longer run continues from step 40
    train(cfg.model_copy(update={"steps": 45}), progress=False)
    assert load_trained(out)[1]["training"]["focus"]["steps"] == 45


def test_focus_stage_refuses_another_chip_size_and_missing_init(detector: tuple[Path, Path], tmp_path: Path) -> None:
    data, det = detector
    other = SAMPLER.model_copy(update={"chip_size": 96})
    with pytest.raises(ValueError, match="chip_size"):
        train(config(data, tmp_path / "a", steps=2, stage="focus", init_from=det, sampler=other), progress=False)
    with pytest.raises(ValueError, match="init_from"):
        train(config(data, tmp_path / "b", steps=2, stage="focus"), progress=False)


def test_old_checkpoint_loads_into_a_net_with_a_focus_head() -> None:
    old = TinyDet(TINY_NET)
    new = TinyDet(TINY_NET.model_copy(update={"focus_head": True}))
    missing = load_weights(new, old.state_dict())
    assert missing and all(k.startswith("focus.") for k in missing)
    with pytest.raises(RuntimeError, match="missing"):
        load_weights(TinyDet(TINY_NET), {k: v for k, v in old.state_dict().items() if not k.startswith("cls.")})
    x = torch.randn(1, 3, 128, 128)
    new.eval()
    old.eval()
    assert torch.equal(new(x)[0], old(x)[0])


def test_focus_loss_ignores_cells() -> None:
    logits = torch.tensor(np.full((1, 1, 2, 2), 5.0, np.float32))
    labels = torch.tensor(np.array([[[1, -1], [-1, -1]]], np.int8))
    assert float(focus_loss(logits, labels)) < 0.01  # the only labelled cell is a confident positive
    labels2 = torch.tensor(np.array([[[-1, -1], [-1, 0]]], np.int8))
    assert float(focus_loss(logits, labels2)) > 4.0
