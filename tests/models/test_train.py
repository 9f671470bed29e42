"""Short SNIPER training smoke run on a tiny net: the loss falls, checkpoints resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="needs the train extra (torch)")

from models.net import NetConfig  # noqa: E402
from models.sniper import SamplerConfig  # noqa: E402
from models.synth import SynthConfig, write_dataset  # noqa: E402
from models.train import TrainConfig, load_trained, train  # noqa: E402
from service.plan import LevelSpec  # noqa: E402

pytestmark = pytest.mark.train

TINY_NET = NetConfig(widths=(8, 16, 16, 16), head_width=8)


def tiny_config(data: Path, out: Path, steps: int) -> TrainConfig:
    return TrainConfig(
        data=data,
        out=out,
        steps=steps,
        batch_size=4,
        lr=3e-3,
        warmup_steps=5,
        mining_step=20,
        mining_images=2,
        checkpoint_every=10,
        log_every=5,
        net=TINY_NET,
        sampler=SamplerConfig(chip_size=128, levels=(LevelSpec(scale=1.0), LevelSpec(long_side=128))),
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("synth")
    write_dataset(d, 3, seed=21, cfg=SynthConfig(min_long_side=300, max_long_side=420, min_objects=10))
    return d


def test_loss_falls_and_resume(dataset: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_config(dataset, tmp_path / "run", steps=60)
    model = train(cfg, progress=False)
    log = [json.loads(line) for line in (cfg.out / "log.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in log[:2]) / 2  # steps 1 and 5
    last = sum(r["loss"] for r in log[-3:]) / 3  # steps 50-60
    assert last < 0.8 * first, (first, last)
    net, meta = load_trained(model)
    assert meta["training"]["steps"] == 60 and meta["classes"] == ["vehicle", "boat", "aircraft"]
    assert meta["training"]["positive_chips"] > 0
    # Resume: a longer run with the same folder continues from step 60 instead of starting again.
    cfg2 = cfg.model_copy(update={"steps": 70})
    train(cfg2, progress=False)
    _, meta2 = load_trained(model)
    assert meta2["training"]["steps"] == 70
    assert len((cfg.out / "log.jsonl").read_text().splitlines()) == len(log) + 2  # steps 65 and 70
    logits, ltrb = net(torch.zeros(1, 3, 128, 128))
    assert logits.shape == (1, 3, 32, 32) and ltrb.shape == (1, 4, 32, 32) and bool((ltrb >= 0).all())


def test_second_stage_from_weights(dataset: Path, tmp_path: Path) -> None:
    first = train(tiny_config(dataset, tmp_path / "a", steps=6), progress=False)
    cfg = tiny_config(dataset, tmp_path / "b", steps=4).model_copy(update={"init_from": first, "mining_step": 0})
    _, meta = load_trained(train(cfg, progress=False))
    t = meta["training"]
    assert t["steps"] == 10 and [s["steps"] for s in t["stages"]] == [6, 4]
    assert t["train_seconds"] >= t["stages"][1]["train_seconds"]
