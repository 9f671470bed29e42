"""The focus-head stage (AutoFocus): train only :class:`models.net.FocusHead` on a frozen, trained detector.

Run it with ``snipserve train --config FILE`` where the YAML says ``stage: focus`` and ``init_from: <model.pt>``;
data, levels, chip size, seed, steps, batch size, learning rate, time budget and checkpointing are the same
fields as the detector's training (``models.train.TrainConfig``).

1. Chips: the service's own tiling (``service.plan.plan``) of every training image at the levels that have a
   finer level (all but the finest), at most ``focus.chips_per_image`` per image (seeded sample) -- the chips
   the focus map is computed on at inference.
2. Labels: :func:`models.sniper.focus_labels` per chip at the chip's level (positive / ignore / negative).
3. The detector is frozen and deterministic (eval mode), so the head's input (``FocusHead.inputs``:
   max-pooled stride-4 map + stride-16 map) is computed once per chip and cached in memory (float16); training
   then runs the head alone: BCE on non-ignored cells, AdamW, warm-up + cosine on steps or time.
4. Every ``focus.eval_every`` steps the head is measured on the held-out images' chips: recall of positive
   cells and the fraction of negative cells above 0.1 / 0.2 / 0.3 / 0.5 (``log.jsonl``, and in ``model.pt``).

Checkpoints (``<out>/last.pt``: head, optimiser, step, RNG, elapsed) resume a rerun of the same config (the
feature cache is rebuilt: it is a deterministic function of the config). The result, ``<out>/model.pt``, holds
the whole net (detector weights unchanged, bit for bit) with ``net.focus_head: true``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.focus_labels import focus_labels
from models.net import FOCUS_STRIDE, NetConfig, TinyDet, load_weights
from models.sniper import levels_for
from models.synth import load_coco
from models.train import MEAN, STD, TrainConfig, _read_rgb, hardware, lr_at, normalise, progress_at
from service.crop import resize_level
from service.plan import PlanConfig, plan

THRESHOLDS = (0.1, 0.2, 0.3, 0.5)


def focus_net(init_from: Path) -> tuple[TinyDet, dict[str, Any]]:
    """The checkpoint's detector with a fresh focus head; every parameter but the head's frozen."""
    init = torch.load(init_from, weights_only=False, map_location="cpu")
    cfg = NetConfig.model_validate({**init["net"], "focus_head": True})
    net = TinyDet(cfg)
    load_weights(net, init["model"])
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("focus."))
    net.eval()
    return net, init


@torch.no_grad()
def build_feature_pool(
    net: TinyDet, items: list[tuple[Path, np.ndarray, np.ndarray]], cfg: TrainConfig, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head inputs ``float16 [N, 2h, C/16, C/16]``, labels ``int8 [N, C/16, C/16]`` and image index ``[N]``."""
    assert net.focus is not None
    sc, fc = cfg.sampler, cfg.focus
    rng = np.random.default_rng([cfg.seed, 11])
    pcfg = PlanConfig(chip_size=sc.chip_size, levels=sc.levels, sweet_spot=sc.sweet_spot)
    feats: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    owner: list[int] = []
    it: Any = enumerate(items)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(items), desc="focus chips", unit="img")
    for i, (path, boxes, classes) in it:
        img = _read_rgb(path)
        size = (img.shape[1], img.shape[0])
        levels = levels_for(size, sc)
        chips = plan(size, pcfg).chips
        chips = chips[chips[:, 0] > 0]  # the finest level has no finer level to focus
        if chips.shape[0] == 0:
            continue
        if chips.shape[0] > fc.chips_per_image:
            chips = chips[np.sort(rng.choice(chips.shape[0], fc.chips_per_image, replace=False))]
        limgs = {int(k): resize_level(img, levels[int(k)]) for k in np.unique(chips[:, 0])}
        crops = np.stack([_crop(limgs[lvl], x0, y0, sc.chip_size) for lvl, x0, y0 in chips.tolist()])
        p4, p16 = net.features(normalise(crops))
        feats.append(net.focus.inputs(p4, p16).numpy().astype(np.float16))
        labels.extend(
            focus_labels(levels, lvl, x0, y0, boxes, sc.chip_size, fc.labels, classes) for lvl, x0, y0 in chips.tolist()
        )
        owner.extend([i] * chips.shape[0])
    if not feats:
        raise ValueError(f"no coarse-level chips in {cfg.data}: the levels need at least two levels per image")
    return np.concatenate(feats), np.stack(labels), np.asarray(owner, np.int64)


def _crop(level_image: np.ndarray, x0: int, y0: int, chip: int) -> np.ndarray:
    from models.sniper import crop_chip

    return crop_chip(level_image, x0, y0, chip)[0]


def training_items(cfg: TrainConfig) -> list[tuple[Path, np.ndarray, np.ndarray]]:
    """The detector training's images (``data``: one COCO folder, or -- where ``models.train`` has them -- the
    mixed sources of a sim-to-real run), so the focus stage reads the same dataset config."""
    from models import train as detector_training

    load_items = getattr(detector_training, "load_items", None)  # mixed sources (issue 11's TrainConfig)
    if load_items is not None:
        items: list[tuple[Path, np.ndarray, np.ndarray]] = load_items(cfg)[0]
        return items
    _, items = load_coco(Path(str(cfg.data)))
    return items[: cfg.max_images] if cfg.max_images is not None else items


def focus_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE of ``logits`` ``[B, 1, h, w]`` over cells with ``labels`` ``[B, h, w]`` >= 0 (-1 = ignore)."""
    keep = labels >= 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    target = (labels == 1).float()
    return F.binary_cross_entropy_with_logits(logits[:, 0][keep], target[keep])


@torch.no_grad()
def measure(net: TinyDet, feats: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Held-out: loss, recall of positive cells and fraction of negative cells above each of :data:`THRESHOLDS`."""
    assert net.focus is not None
    if feats.shape[0] == 0:
        return {}
    net.focus.eval()
    probs = []
    for i in range(0, feats.shape[0], 256):
        probs.append(torch.sigmoid(net.focus.head(torch.from_numpy(feats[i : i + 256].astype(np.float32)))))
    p = torch.cat(probs)[:, 0].numpy()  # [N, h, w]
    pos, neg = labels == 1, labels == 0
    out: dict[str, Any] = {"cells_pos": int(pos.sum()), "cells_neg": int(neg.sum())}
    for t in THRESHOLDS:
        out[f"recall@{t}"] = round(float((p[pos] >= t).mean()) if pos.any() else float("nan"), 4)
        out[f"neg_on@{t}"] = round(float((p[neg] >= t).mean()) if neg.any() else float("nan"), 4)
    logits = torch.logit(torch.from_numpy(p).clamp(1e-6, 1 - 1e-6))[:, None]
    out["loss"] = round(float(focus_loss(logits, torch.from_numpy(labels))), 5)
    return out


def _check_levels(cfg: TrainConfig, init: dict[str, Any]) -> None:
    """The head sees the detector's chips: chip size and sweet spot must be the detector's. The levels may differ
    (a card can serve other levels than the detector was trained on): the labels follow ``cfg.sampler.levels``, the
    levels the focus map will be used with, and ``model.pt`` records them."""
    theirs = init.get("sampler")
    if theirs is None:
        return
    ours = cfg.sampler.model_dump(mode="json")
    diff = [k for k in ("chip_size", "sweet_spot") if json.dumps(ours[k]) != json.dumps(theirs.get(k))]
    if diff:
        raise ValueError(
            f"sampler {diff} differ from {cfg.init_from}'s ({[theirs.get(k) for k in diff]}): "
            "the focus head must see chips as the detector does"
        )
    if json.dumps(ours["levels"]) != json.dumps(theirs.get("levels")):
        print(f"focus labels for levels {ours['levels']} (the detector was trained on {theirs.get('levels')})")


def _split(owner: np.ndarray, n_images: int, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([cfg.seed, 12])
    held = rng.random(n_images) < cfg.focus.holdout
    return np.flatnonzero(~held[owner]), np.flatnonzero(held[owner])


@dataclass
class FocusPool:
    """The cached head inputs and labels of every chip, split by image into training and held-out chips."""

    feats: np.ndarray  # float16 [N, 2h, C/16, C/16]
    labels: np.ndarray  # int8 [N, C/16, C/16]
    train_idx: np.ndarray
    held_idx: np.ndarray
    images: int
    seconds: float


@dataclass
class FocusState:
    """What a checkpoint restores: the net (head trainable), its optimiser, the batch RNG, step and time."""

    net: TinyDet
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    step: int = 0
    elapsed: float = 0.0


def train_focus(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) the focus-head stage; returns the path of ``model.pt``."""
    if cfg.init_from is None:
        raise ValueError("stage 'focus' needs init_from: the trained detector's model.pt")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    net, init = focus_net(cfg.init_from)
    assert net.focus is not None
    _check_levels(cfg, init)
    pool = _pool(net, cfg, progress)
    opt = torch.optim.AdamW(net.focus.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = FocusState(net, opt, np.random.default_rng([cfg.seed, 13]))
    ckpt_path = cfg.out / "last.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        net.focus.load_state_dict(ck["focus"])
        opt.load_state_dict(ck["optim"])
        state.step, state.elapsed = ck["step"], ck["elapsed"]
        state.rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        print(f"resumed from {ckpt_path} at step {state.step}")
    _loop(cfg, pool, state, progress)
    _save(ckpt_path, net, opt, state.step, state.elapsed, state.rng)
    held = measure(net, pool.feats[pool.held_idx], pool.labels[pool.held_idx])
    return _write_model(cfg, state, init, pool, held)


def _pool(net: TinyDet, cfg: TrainConfig, progress: bool) -> FocusPool:
    items = training_items(cfg)
    t0 = time.perf_counter()
    feats, labels, owner = build_feature_pool(net, items, cfg, progress)
    seconds = time.perf_counter() - t0
    train_idx, held_idx = _split(owner, len(items), cfg)
    if train_idx.size == 0:
        raise ValueError("no training chips left after the hold-out split; lower focus.holdout")
    pos_share = float((labels[train_idx] == 1).sum() / max((labels[train_idx] >= 0).sum(), 1))
    print(
        f"{len(items)} images, {len(owner)} chips ({train_idx.size} train, {held_idx.size} held out), "
        f"{pos_share:.1%} of labelled cells positive; pool {seconds:.0f}s"
    )
    return FocusPool(feats, labels, train_idx, held_idx, len(items), seconds)


def _loop(cfg: TrainConfig, pool: FocusPool, state: FocusState, progress: bool) -> None:
    """Steps until the step count or the time budget is spent; logs, measures, checkpoints."""
    net, opt, rng = state.net, state.opt, state.rng
    assert net.focus is not None
    log = (cfg.out / "log.jsonl").open("a")
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=state.step, desc="focus", unit="step")
    t_last = time.perf_counter()
    while progress_at(state.step, state.elapsed + time.perf_counter() - t_last, cfg) < 1.0:
        idx = rng.choice(pool.train_idx, size=min(cfg.batch_size, pool.train_idx.size), replace=False)
        lr = lr_at(state.step, cfg, state.elapsed + time.perf_counter() - t_last)
        for g in opt.param_groups:
            g["lr"] = lr
        net.focus.train()
        loss = focus_loss(net.focus.head(torch.from_numpy(pool.feats[idx].astype(np.float32))),
                          torch.from_numpy(pool.labels[idx]))  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state.step += 1
        now = time.perf_counter()
        rec: dict[str, Any] = {
            "step": state.step,
            "loss": loss.item(),
            "lr": lr,
            "elapsed": state.elapsed + now - t_last,
        }
        if state.step % cfg.focus.eval_every == 0:
            rec["held_out"] = measure(net, pool.feats[pool.held_idx], pool.labels[pool.held_idx])
        if state.step % cfg.log_every == 0 or state.step == 1 or "held_out" in rec:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if bar is not None:
            bar.update(1)
        if state.step % cfg.checkpoint_every == 0:
            state.elapsed, t_last = state.elapsed + now - t_last, now
            _save(cfg.out / "last.pt", net, opt, state.step, state.elapsed, rng)
    state.elapsed += time.perf_counter() - t_last
    log.close()
    if bar is not None:
        bar.close()


def _save(path: Path, net: TinyDet, opt: torch.optim.Optimizer, step: int, elapsed: float, rng: Any) -> None:
    assert net.focus is not None
    tmp = path.with_suffix(".tmp")
    state = {
        "focus": net.focus.state_dict(),
        "optim": opt.state_dict(),
        "step": step,
        "elapsed": elapsed,
        "rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
    }
    torch.save(state, tmp)
    tmp.replace(path)


def _write_model(
    cfg: TrainConfig, state: FocusState, init: dict[str, Any], pool: FocusPool, held: dict[str, Any]
) -> Path:
    """``<out>/model.pt``: the init checkpoint's metadata, the whole net, and this stage in ``training``."""
    net, step, elapsed = state.net, state.step, state.elapsed
    previous = dict(init.get("training", {}))
    stage = {
        "stage": "focus",
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "init_from": str(cfg.init_from),
        "images": pool.images,
        "chips": int(pool.labels.shape[0]),
        "chip_pool_seconds": round(pool.seconds, 1),
        "labels": cfg.focus.labels.model_dump(),
        "held_out": held,
        "hardware": hardware(),
    }
    stages = previous.get("stages") or [
        {"steps": previous.get("steps"), "train_seconds": previous.get("train_seconds")}
    ]
    training = {**previous, "stages": [*stages, stage], "focus": stage}
    out = cfg.out / "model.pt"
    torch.save(
        {
            **init,
            "model": net.state_dict(),
            "net": net.cfg.model_dump(),
            "sampler": cfg.sampler.model_dump(mode="json"),  # the levels the head was trained for
            "mean": init.get("mean", MEAN),
            "std": init.get("std", STD),
            "focus": {"stride": FOCUS_STRIDE, "output": "focus"},
            "training": training,
        },
        out,
    )
    print(f"saved {out} after {step} focus steps, {elapsed / 60:.1f} min; held-out {held}")
    return out
