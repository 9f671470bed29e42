"""Short SNIPER training smoke run on a tiny net: the loss falls, checkpoints resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def test_mixed_sources_ood_chips_and_ignore_regions(dataset: Path, tmp_path: Path) -> None:
    """Two sources with batch weights + OOD chips; an ignore region (iscrowd) gets no chip and no loss."""
    from models.train import BatchSampler, DataSource, add_ood_chips, build_positive_pool, load_items

    coco = json.loads((dataset / "annotations.json").read_text())
    crowd = tmp_path / "crowd"
    crowd.mkdir()
    (crowd / "images").symlink_to(dataset / "images")
    for a in coco["annotations"]:
        a["iscrowd"] = 1  # every box of this copy is an ignore region
    (crowd / "annotations.json").write_text(json.dumps(coco))
    cfg = tiny_config(dataset, tmp_path / "run", steps=4).model_copy(
        update={
            "data": [DataSource(path=dataset, weight=3.0), DataSource(path=crowd, weight=1.0, max_images=1)],
            "ood_chips": 20,
            "ood_weight": 1.0,
        }
    )
    items, source_of = load_items(cfg)
    assert source_of == [0, 0, 0, 1] and set(items[3][2].tolist()) == {-1}
    pool, _ = build_positive_pool(items, cfg, progress=False, source_of=source_of)
    assert set(pool.sources) == {0}  # the all-ignore image needs no positive chip
    add_ood_chips(pool, cfg)
    ood = [i for i, k in enumerate(pool.kinds) if k == "ood"]
    assert len(ood) == 20 and {pool.sources[i] for i in ood} == {2}
    assert all(float(pool.heat[i].max()) == 0.0 and float(pool.weight[i].min()) == 1.0 for i in ood)
    sampler = BatchSampler(pool, [3.0, 1.0, 1.0], np.random.default_rng(0))
    drawn = np.asarray(pool.sources)[np.concatenate([sampler.next(16) for _ in range(200)])]
    share = np.bincount(drawn, minlength=3) / drawn.size
    # source 1 has no chips, so its weight is dropped: 3/4 real, 1/4 OOD
    assert share[1] == 0 and abs(share[0] - 0.75) < 0.03 and abs(share[2] - 0.25) < 0.03
    _, meta = load_trained(train(cfg, progress=False))
    assert [s["images"] for s in meta["training"]["sources"]] == [3, 1] and meta["training"]["ood_chips"] == 20


def test_ood_images_cover_every_kind() -> None:
    from models.ood import KINDS, ood_chips, ood_image

    rng = np.random.default_rng(0)
    for kind in KINDS:
        img = ood_image(kind, 64, 48, rng)
        assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    chips = ood_chips(len(KINDS) * 2, 32, seed=1)
    assert chips.shape == (20, 32, 32, 3)
    np.testing.assert_array_equal(chips, ood_chips(len(KINDS) * 2, 32, seed=1))  # deterministic
    with pytest.raises(ValueError, match="unknown kind"):
        ood_image("plaid", 8, 8, rng)


def test_deeper_stage_starts_as_the_checkpoint(dataset: Path, tmp_path: Path) -> None:
    """Growing NetConfig.blocks from a checkpoint: new residual blocks start as the identity, then train."""
    from models.net import TinyDet, load_weights

    first = train(tiny_config(dataset, tmp_path / "a", steps=6), progress=False)
    small, meta = load_trained(first)
    deep_cfg = TINY_NET.model_copy(update={"blocks": (1, 2, 3, 1), "head_blocks": 1})
    deep = TinyDet(deep_cfg)
    missing = load_weights(deep, torch.load(first, weights_only=False)["model"])
    assert missing and all(k.split(".")[0] in {"stem", "s8", "s16", "head"} for k in missing)
    x = torch.randn(2, 3, 128, 128)
    small.eval(), deep.eval()
    with torch.no_grad():
        for a, b in zip(small(x), deep(x), strict=True):
            assert torch.equal(a, b)
    # a block with only some of its weights missing is a mismatch, not a new block
    state = {k: v for k, v in small.state_dict().items() if k != "s8.1.b.0.weight"}
    with pytest.raises(RuntimeError, match="s8.1.b.0.weight"):
        load_weights(TinyDet(TINY_NET), state)
    cfg = tiny_config(dataset, tmp_path / "b", steps=4).model_copy(
        update={"init_from": first, "mining_step": 0, "net": deep_cfg}
    )
    grown, meta2 = load_trained(train(cfg, progress=False))
    assert tuple(meta2["net"]["blocks"]) == (1, 2, 3, 1) and sum(p.numel() for p in grown.parameters()) > sum(
        p.numel() for p in small.parameters()
    )


def test_sensor_augmentation() -> None:
    from models.train import AugmentConfig, degrade

    im = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    state = rng.bit_generator.state
    assert degrade(im, AugmentConfig(), rng) is im  # defaults: the original jitter only, no RNG drawn
    assert rng.bit_generator.state == state
    every = AugmentConfig(channel_gain=0.2, saturation=0.5, blur_p=1.0, noise_p=1.0, jpeg_p=1.0)
    out = degrade(im, every, rng)
    assert out.shape == im.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - im.astype(int)).mean() > 5  # blur + noise + JPEG change a noise chip a lot
    blurred = degrade(im, AugmentConfig(blur_p=1.0), np.random.default_rng(2))
    assert blurred.std() < im.std()
    with pytest.raises(ValueError):
        AugmentConfig(blur_p=1.5)
