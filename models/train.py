"""SNIPER training of :class:`models.net.TinyDet` on CPU, resumable, seeded.

Schedule (SNIPER):

1. Positive chips for every training image and level (``models.sniper.positive_chips``), cropped once and
   kept in memory together with their dense targets (``models.sniper.build_targets``).
2. Train on positive chips for ``mining_step`` steps (the "short-trained model").
3. Mine negative chips: run that model over the full chip plan (``service.plan.plan``, the same tiling the
   service uses) of ``mining_images`` training images; false detections outside the positive chips are
   covered by negative chips (``models.sniper.negative_chips``), which join the pool.
4. Train on positives + negatives to ``steps``.

Loss: penalty-reduced focal loss on the class heatmap (CenterNet) + GIoU on ``ltrb`` at Gaussian-weighted
cells near box centres (TTFNet), both multiplied by the ignore map (invalid ground truth = no loss).
Augmentation (:class:`AugmentConfig`): the 8 dihedral transforms of each chip, brightness/contrast jitter, and --
for sensors the training sources do not cover -- optional per-channel gain (white balance), saturation, Gaussian
blur, sensor noise and JPEG re-compression.

Checkpoints (``<out>/last.pt``) hold model, optimiser, step, RNG states, negative chips and elapsed time; a
rerun with the same config resumes from there. The result is ``<out>/model.pt`` (weights + configs + how it
was trained), which ``snipserve export onnx`` turns into the shipped model.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from models.focus_labels import FocusStageConfig
from models.net import STRIDE, NetConfig, TinyDet, load_weights
from models.sniper import (
    ChipLabels,
    SamplerConfig,
    build_targets,
    chip_labels,
    crop_chip,
    decode,
    describe_levels,
    negative_chips,
    positive_chips,
)
from models.synth import CLASSES, load_coco
from service.crop import resize_level
from service.plan import PlanConfig, plan

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class DataSource(BaseModel):
    """One training dataset of a mixed run (sim-to-real: synthetic + real)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path = Field(description="COCO folder (`snipserve synth` or `snipserve data import` output).")
    weight: float = Field(default=1.0, gt=0, description="Share of each batch drawn from this source's chips.")
    max_images: int | None = Field(default=None, ge=1, description="Use only the first N images.")
    only: list[str] | None = Field(
        default=None, description="Keep only images whose COCO record has one of these `source` names (imports)."
    )


class AugmentConfig(BaseModel):
    """Per-chip photometric augmentation. The defaults are the original jitter only (older configs unchanged)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    contrast: tuple[float, float] = Field(default=(0.75, 1.25), description="Gain range, normalised units.")
    brightness: float = Field(default=0.3, ge=0, description="Shift range +-, normalised units.")
    channel_gain: float = Field(default=0.0, ge=0, le=0.5, description="Per-channel gain +- (white balance).")
    saturation: float = Field(default=0.0, ge=0, le=1, description="Saturation scale +- (0: off).")
    blur_p: float = Field(default=0.0, ge=0, le=1, description="Share of chips blurred.")
    blur_sigma: tuple[float, float] = Field(default=(0.4, 1.4), description="Gaussian blur sigma range, px.")
    noise_p: float = Field(default=0.0, ge=0, le=1, description="Share of chips with Gaussian sensor noise.")
    noise_sigma: tuple[float, float] = Field(default=(2.0, 10.0), description="Noise sigma range, 8-bit levels.")
    jpeg_p: float = Field(default=0.0, ge=0, le=1, description="Share of chips re-compressed as JPEG.")
    jpeg_quality: tuple[int, int] = Field(default=(30, 90), description="JPEG quality range.")


def degrade(im: np.ndarray, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """One chip ``uint8 [C, C, 3]`` through the optional sensor effects: colour, blur, noise, JPEG (in that order)."""
    out = im
    if aug.channel_gain or aug.saturation:
        f = out.astype(np.float32)
        if aug.saturation:
            grey = f.mean(axis=2, keepdims=True)
            f = grey + (f - grey) * rng.uniform(1 - aug.saturation, 1 + aug.saturation)
        if aug.channel_gain:
            f = f * rng.uniform(1 - aug.channel_gain, 1 + aug.channel_gain, 3).astype(np.float32)
        out = np.clip(f, 0, 255).astype(np.uint8)
    if aug.blur_p and rng.random() < aug.blur_p:
        out = cv2.GaussianBlur(out, (0, 0), float(rng.uniform(*aug.blur_sigma)))
    if aug.noise_p and rng.random() < aug.noise_p:
        noise = rng.normal(0.0, rng.uniform(*aug.noise_sigma), out.shape).astype(np.float32)
        out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    if aug.jpeg_p and rng.random() < aug.jpeg_p:
        q = int(rng.integers(aug.jpeg_quality[0], aug.jpeg_quality[1] + 1))
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(out), [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return out


class TrainConfig(BaseModel):
    """One training run (``models/configs/default.yaml``, ``models/configs/real.yaml``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: Path | list[DataSource] = Field(
        default=Path("data/train"),
        description="Training dataset folder (COCO), or several sources with batch weights (mixed training).",
    )
    ood_chips: int = Field(
        default=0, ge=0, description="All-background chips of noise, flat colour and gradients (models/ood.py)."
    )
    ood_weight: float = Field(default=0.05, gt=0, description="Batch share of the out-of-distribution chips.")
    out: Path = Field(default=Path("runs/default"), description="Run folder: checkpoints, log, model.pt.")
    max_images: int | None = Field(default=None, ge=1, description="Use only the first N training images.")
    seed: int = Field(default=0, description="Seed of chip sampling, initialisation and batch order.")
    steps: int = Field(default=12000, ge=1, description="Optimiser steps in total.")
    batch_size: int = Field(default=16, ge=1, description="Chips per step.")
    lr: float = Field(default=2e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(default=300, ge=0, description="Linear warm-up steps, then cosine decay to 2% of lr.")
    reg_weight: float = Field(default=5.0, gt=0, description="Weight of the GIoU term (TTFNet uses 5).")
    mining_step: int = Field(default=2500, ge=0, description="Mine negative chips after this many steps (0 = never).")
    mining_images: int = Field(default=200, ge=0, description="Training images scanned for negative chips.")
    checkpoint_every: int = Field(default=500, ge=1, description="Steps between checkpoints.")
    log_every: int = Field(
        default=20, ge=1, description="Steps between lines of <out>/log.jsonl (step 1 is logged too)."
    )
    time_budget_minutes: float | None = Field(
        default=None,
        gt=0,
        description="Stop after this much training time; the cosine schedule then runs on time "
        "(progress = max(step / steps, time / budget)), so a busy machine still anneals the learning rate.",
    )
    threads: int = Field(default=2, ge=1, description="torch CPU threads.")
    init_from: Path | None = Field(
        default=None,
        description="Start from this model.pt's weights (a second stage: fresh optimiser, schedule and mining); "
        "its training time and steps are added to this run's in the saved metadata.",
    )
    net: NetConfig = Field(default_factory=NetConfig, description="Architecture.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="SNIPER chips and levels.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Photometric augmentation per chip.")
    stage: Literal["detector", "focus"] = Field(
        default="detector",
        description="'detector': SNIPER training; 'focus': train only the focus head on a frozen detector "
        "(needs init_from; models.focus_train).",
    )
    focus: FocusStageConfig = Field(default_factory=FocusStageConfig, description="The 'focus' stage.")

    @classmethod
    def from_yaml(cls, path: Path) -> TrainConfig:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})

    def sources(self) -> list[DataSource]:
        """The datasets of this run (a single folder is one source; ``max_images`` applies to it)."""
        if isinstance(self.data, Path):
            return [DataSource(path=self.data, max_images=self.max_images)]
        return list(self.data)


@dataclass
class ChipPool:
    """Training chips in memory: pixels ``uint8 [N, C, C, 3]`` and per-chip dense targets."""

    images: list[np.ndarray] = field(default_factory=list)
    heat: list[np.ndarray] = field(default_factory=list)  # float16 [K, h, w]
    weight: list[np.ndarray] = field(default_factory=list)  # uint8 [h, w]
    reg: list[np.ndarray] = field(default_factory=list)  # float16 [4, h, w]
    reg_w: list[np.ndarray] = field(default_factory=list)  # float16 [h, w]
    kinds: list[str] = field(default_factory=list)  # "pos" | "neg" | "ood"
    sources: list[int] = field(default_factory=list)  # index of the DataSource (len(sources) for OOD chips)

    def add(
        self,
        chip: np.ndarray,
        targets: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
        kind: str,
        source: int = 0,
    ) -> None:
        heat, weight, reg, reg_w = targets
        self.images.append(chip)
        self.heat.append(heat.astype(np.float16))
        self.weight.append(weight.astype(np.uint8))
        self.reg.append(reg.astype(np.float16))
        self.reg_w.append(reg_w.astype(np.float16))
        self.kinds.append(kind)
        self.sources.append(source)

    def __len__(self) -> int:
        return len(self.images)


def _read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


Item = tuple[Path, np.ndarray, np.ndarray]


def load_items(cfg: TrainConfig) -> tuple[list[Item], list[int]]:
    """Every training image of every source, and the source index of each."""
    items: list[Item] = []
    source_of: list[int] = []
    for k, src in enumerate(cfg.sources()):
        coco, its = load_coco(src.path)
        if src.only is not None:
            its = [it for im, it in zip(coco["images"], its, strict=True) if im.get("source") in src.only]
        its = its[: src.max_images] if src.max_images is not None else its
        items += its
        source_of += [k] * len(its)
    return items, source_of


def chip_targets(labels: ChipLabels, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Dense targets of one chip's labels (``models.sniper.build_targets``) with the run's sampler and net settings."""
    sc = cfg.sampler
    return build_targets(labels, sc.chip_size, cfg.net.num_classes, regress_ignore=sc.regress_ignore)


def build_positive_pool(
    items: list[Item], cfg: TrainConfig, progress: bool = True, source_of: list[int] | None = None
) -> tuple[ChipPool, list[list[np.ndarray]]]:
    """Positive chips of every image; also returns each image's positive corners per level (for mining)."""
    rng = np.random.default_rng([cfg.seed, 1])
    pool = ChipPool()
    corners_all: list[list[np.ndarray]] = []
    it: Any = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc="positive chips", unit="img")
    sc = cfg.sampler
    for i, (path, boxes, classes) in enumerate(it):
        img = _read_rgb(path)
        # ignore regions (class -1) need no chip of their own
        per_level = positive_chips((img.shape[1], img.shape[0]), boxes[classes >= 0], sc, rng)
        corners_all.append([c for _, c in per_level])
        for lv, corners in per_level:
            if corners.shape[0] == 0:
                continue
            limg = resize_level(img, lv)
            for x0, y0 in corners.tolist():
                chip, _, _ = crop_chip(limg, x0, y0, sc.chip_size)
                labels = chip_labels(lv, x0, y0, boxes, classes, sc)
                src = source_of[i] if source_of is not None else 0
                pool.add(
                    chip,
                    chip_targets(labels, cfg),
                    "pos",
                    src,
                )
    return pool, corners_all


def add_ood_chips(pool: ChipPool, cfg: TrainConfig) -> None:
    """``cfg.ood_chips`` all-background chips (noise, flat, gradients: :mod:`models.ood`), as their own source."""
    from models.ood import ood_chips

    c, n = cfg.sampler.chip_size, cfg.sampler.chip_size // STRIDE
    empty = (
        np.zeros((cfg.net.num_classes, n, n), np.float32),
        np.ones((n, n), np.float32),
        np.zeros((4, n, n), np.float32),
        np.zeros((n, n), np.float32),
    )
    for chip in ood_chips(cfg.ood_chips, c, cfg.seed):
        pool.add(chip, empty, "ood", len(cfg.sources()))


class BatchSampler:
    """Chip indices per batch: each chip's source drawn by the sources' weights, then the next chip of that
    source's own shuffled order (a single source reduces to plain shuffled epochs)."""

    def __init__(self, pool: ChipPool, weights: list[float], rng: np.random.Generator) -> None:
        src = np.asarray(pool.sources)
        self.members = [np.flatnonzero(src == k) for k in range(len(weights))]
        w = np.array([wt if m.size else 0.0 for wt, m in zip(weights, self.members, strict=True)])
        self.p = w / w.sum()
        self.rng = rng
        self.order = [rng.permutation(m) for m in self.members]
        self.cursor = [0] * len(weights)

    def next(self, batch: int) -> np.ndarray:
        picks = self.rng.choice(len(self.p), size=batch, p=self.p)
        out = np.empty(batch, np.int64)
        for j, k in enumerate(picks.tolist()):
            if self.cursor[k] >= self.order[k].size:
                self.order[k], self.cursor[k] = self.rng.permutation(self.members[k]), 0
            out[j] = self.order[k][self.cursor[k]]
            self.cursor[k] += 1
        return out


def normalise(chips: np.ndarray) -> torch.Tensor:
    """``uint8 [B, C, C, 3]`` RGB -> ``float32 [B, 3, C, C]`` normalised with :data:`MEAN` / :data:`STD`."""
    x = torch.from_numpy(chips).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_chips(net: TinyDet, chips: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Peak-suppressed heatmaps ``[N, K, h, w]`` and ltrb ``[N, 4, h, w]`` for ``uint8 [N, C, C, 3]`` chips."""
    from models.net import peak_suppress

    net.eval()
    heats, ltrbs = [], []
    for i in range(0, chips.shape[0], batch):
        logits, ltrb = net(normalise(chips[i : i + batch]))
        heats.append(peak_suppress(torch.sigmoid(logits)).numpy())
        ltrbs.append(ltrb.numpy())
    return np.concatenate(heats), np.concatenate(ltrbs)


def mine_negatives(
    net: TinyDet,
    items: list[Item],
    corners_all: list[list[np.ndarray]],
    cfg: TrainConfig,
    pool: ChipPool,
    progress: bool = True,
    source_of: list[int] | None = None,
) -> list[tuple[int, int, int, int]]:
    """Add negative chips to ``pool``; returns ``(image index, level index, x0, y0)`` of each.

    ``mining_images`` images are scanned from each source (all of a smaller one)."""
    sc = cfg.sampler
    rng = np.random.default_rng([cfg.seed, 2])
    src = np.asarray(source_of if source_of is not None else [0] * len(items))
    members = [np.flatnonzero(src == k) for k in np.unique(src)]
    chosen = np.concatenate([rng.choice(m, size=min(cfg.mining_images, m.size), replace=False) for m in members])
    it: Any = sorted(chosen.tolist())
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="mining negatives", unit="img")
    found: list[tuple[int, int, int, int]] = []
    pcfg = PlanConfig(chip_size=sc.chip_size, levels=sc.levels, sweet_spot=sc.sweet_spot)
    for i in it:
        path, boxes, classes = items[i]
        img = _read_rgb(path)
        p = plan((img.shape[1], img.shape[0]), pcfg)
        limgs = [resize_level(img, lv) for lv in p.levels]
        chips = np.stack([crop_chip(limgs[lvl], x0, y0, sc.chip_size)[0] for lvl, x0, y0 in p.chips.tolist()])
        heat, ltrb = predict_chips(net, chips)
        for lv in p.levels:
            dets = []
            for k in np.flatnonzero(p.chips[:, 0] == lv.index):
                b, _, _ = decode(heat[k], ltrb[k], sc.neg_score, 100)
                dets.append(b + p.chips[k, 1:3].astype(np.float32).repeat(2))
            d = np.concatenate(dets) if dets else np.zeros((0, 4), np.float32)
            for x0, y0 in negative_chips(lv, d, boxes, corners_all[i][lv.index], sc).tolist():
                chip, _, _ = crop_chip(limgs[lv.index], x0, y0, sc.chip_size)
                labels = chip_labels(lv, x0, y0, boxes, classes, sc)
                pool.add(
                    chip,
                    chip_targets(labels, cfg),
                    "neg",
                    int(src[i]),
                )
                found.append((i, lv.index, x0, y0))
    return found


def _dihedral(arr: np.ndarray, code: int) -> np.ndarray:
    """Apply transform ``code`` (bit0 hflip, bit1 vflip, bit2 transpose) to the last two axes."""
    if code & 1:
        arr = arr[..., ::-1]
    if code & 2:
        arr = arr[..., ::-1, :]
    if code & 4:
        arr = np.swapaxes(arr, -1, -2)
    return arr


def _dihedral_boxes(reg: np.ndarray, code: int, c: int) -> np.ndarray:
    """Box targets ``[4, h, w]`` (x1, y1, x2, y2 chip px) under the same transform as :func:`_dihedral`."""
    x1, y1, x2, y2 = reg
    if code & 1:
        x1, x2 = c - x2, c - x1
    if code & 2:
        y1, y2 = c - y2, c - y1
    if code & 4:
        x1, y1, x2, y2 = y1, x1, y2, x2
    return np.stack([x1, y1, x2, y2])


def make_batch(
    pool: ChipPool, idx: np.ndarray, rng: np.random.Generator, chip: int, aug: AugmentConfig | None = None
) -> dict[str, torch.Tensor]:
    """Augmented batch: images, heat, weight, reg, reg_w as tensors."""
    aug = aug or AugmentConfig()
    ims, heats, ws, regs, rws = [], [], [], [], []
    for i in idx.tolist():
        code = int(rng.integers(8))
        im = degrade(pool.images[i], aug, rng)
        im_t = _dihedral(np.moveaxis(im, 2, 0), code)  # [3, C, C]
        ims.append(np.moveaxis(im_t, 0, 2))
        heats.append(_dihedral(pool.heat[i], code).astype(np.float32))
        ws.append(_dihedral(pool.weight[i], code).astype(np.float32))
        reg = _dihedral(pool.reg[i].astype(np.float32), code)
        regs.append(_dihedral_boxes(reg, code, chip))
        rws.append(_dihedral(pool.reg_w[i], code).astype(np.float32))
    x = normalise(np.ascontiguousarray(np.stack(ims)))
    # photometric jitter per chip: contrast and brightness in normalised units
    b = x.shape[0]
    gain = torch.from_numpy(rng.uniform(*aug.contrast, (b, 1, 1, 1)).astype(np.float32))
    shift = torch.from_numpy(rng.uniform(-aug.brightness, aug.brightness, (b, 1, 1, 1)).astype(np.float32))
    x = x * gain + shift
    return {
        "images": x,
        "heat": torch.from_numpy(np.stack(heats)),
        "weight": torch.from_numpy(np.stack(ws)),
        "reg": torch.from_numpy(np.stack(regs)),
        "reg_w": torch.from_numpy(np.stack(rws)),
    }


def focal_loss(logits: torch.Tensor, heat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CenterNet penalty-reduced focal loss; ``weight`` ``[B, h, w]`` zeroes ignore regions."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    w = weight[:, None]
    pos = (heat >= 1.0).float()
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos * w
    neg_loss = -torch.log(1 - p) * p**2 * (1 - heat) ** 4 * (1 - pos) * w
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


def giou_loss(ltrb: torch.Tensor, reg: torch.Tensor, reg_w: torch.Tensor) -> torch.Tensor:
    """GIoU loss of predicted ``ltrb`` ``[B, 4, h, w]`` vs target boxes ``reg`` at cells weighted by ``reg_w``."""
    b, _, h, w = ltrb.shape
    mask = reg_w > 0
    if not bool(mask.any()):
        return ltrb.sum() * 0.0
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cx = ((xs.float() + 0.5) * STRIDE).expand(b, h, w)[mask]
    cy = ((ys.float() + 0.5) * STRIDE).expand(b, h, w)[mask]
    d = ltrb.permute(0, 2, 3, 1)[mask]  # [M, 4]
    t = reg.permute(0, 2, 3, 1)[mask]  # [M, 4]
    px1, py1, px2, py2 = cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]
    tx1, ty1, tx2, ty2 = t.unbind(1)
    iw = (torch.minimum(px2, tx2) - torch.maximum(px1, tx1)).clamp(min=0)
    ih = (torch.minimum(py2, ty2) - torch.maximum(py1, ty1)).clamp(min=0)
    inter = iw * ih
    union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter
    iou = inter / union.clamp(min=1e-6)
    ew = torch.maximum(px2, tx2) - torch.minimum(px1, tx1)
    eh = torch.maximum(py2, ty2) - torch.minimum(py1, ty1)
    enclose = (ew * eh).clamp(min=1e-6)
    giou = iou - (enclose - union) / enclose
    wts = reg_w[mask]
    return ((1 - giou) * wts).sum() / wts.sum().clamp(min=1e-6)


def progress_at(step: int, seconds: float, cfg: TrainConfig) -> float:
    """Fraction of training done: by steps, or by time when a time budget is set (whichever is further)."""
    t = step / cfg.steps
    if cfg.time_budget_minutes is not None:
        t = max(t, seconds / (60.0 * cfg.time_budget_minutes))
    return t


def lr_at(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Learning rate: linear warm-up over ``warmup_steps``, then cosine to 2% of ``lr`` over the progress."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t0 = cfg.warmup_steps / cfg.steps
    t = (progress_at(step, seconds, cfg) - t0) / max(1e-9, 1 - t0)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def hardware() -> str:
    """One line describing this machine's CPU (for the model card)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Run (or resume) training; returns the path of ``model.pt``."""
    if cfg.stage == "focus":
        from models.focus_train import train_focus

        return train_focus(cfg, progress)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "config.json").write_text(cfg.model_dump_json(indent=2))
    items, source_of = load_items(cfg)
    sc = cfg.sampler
    net = TinyDet(cfg.net)
    previous: dict[str, Any] = {}
    if cfg.init_from is not None:
        init = torch.load(cfg.init_from, weights_only=False, map_location="cpu")
        load_weights(net, init["model"])
        previous = init.get("training", {})
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt_path = cfg.out / "last.pt"
    step, elapsed, negatives = 0, 0.0, []
    rng = np.random.default_rng([cfg.seed, 3])
    t_pool = time.perf_counter()
    pool, corners_all = build_positive_pool(items, cfg, progress, source_of)
    add_ood_chips(pool, cfg)
    pool_seconds = time.perf_counter() - t_pool
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optim"])
        step, elapsed, negatives = ck["step"], ck["elapsed"], ck["negatives"]
        rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        _re_add_negatives(items, negatives, cfg, pool, source_of)
        print(f"resumed from {ckpt_path} at step {step} ({len(negatives)} negative chips)")
    print(f"{len(items)} images, {len(pool)} chips; levels: {describe_levels(sc.levels)}; chip {sc.chip_size}")
    log = (cfg.out / "log.jsonl").open("a")
    bar: Any = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step")
    weights = [s.weight for s in cfg.sources()] + [cfg.ood_weight]
    sampler = BatchSampler(pool, weights, rng)
    t_last = time.perf_counter()
    mined = bool(negatives) or cfg.mining_step == 0
    while progress_at(step, elapsed + time.perf_counter() - t_last, cfg) < 1.0:
        if not mined and step >= cfg.mining_step:
            t0 = time.perf_counter()
            negatives = mine_negatives(net, items, corners_all, cfg, pool, progress, source_of)
            print(f"mined {len(negatives)} negative chips in {time.perf_counter() - t0:.0f}s; pool {len(pool)}")
            mined, sampler = True, BatchSampler(pool, weights, rng)
            _save(ckpt_path, net, opt, step, elapsed + time.perf_counter() - t_last, negatives, rng)
        idx = sampler.next(cfg.batch_size)
        batch = make_batch(pool, idx, rng, sc.chip_size, cfg.augment)
        lr = lr_at(step, cfg, elapsed + time.perf_counter() - t_last)
        for g in opt.param_groups:
            g["lr"] = lr
        net.train()
        logits, ltrb = net(batch["images"])
        l_cls = focal_loss(logits, batch["heat"], batch["weight"])
        l_reg = giou_loss(ltrb, batch["reg"], batch["reg_w"])
        loss = l_cls + cfg.reg_weight * l_reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        step += 1
        if step % cfg.log_every == 0 or step == 1:
            now = time.perf_counter()
            rec = {
                "step": step,
                "loss": loss.item(),
                "cls": l_cls.item(),
                "reg": l_reg.item(),
                "lr": lr,
                "elapsed": elapsed + now - t_last,
            }
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", cls=f"{l_cls.item():.3f}", reg=f"{l_reg.item():.3f}")
        if step % cfg.checkpoint_every == 0:
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            _save(ckpt_path, net, opt, step, elapsed, negatives, rng)
    log.close()
    if bar is not None:
        bar.close()
    elapsed += time.perf_counter() - t_last
    _save(ckpt_path, net, opt, step, elapsed, negatives, rng)
    out = cfg.out / "model.pt"
    torch.save(
        {
            "model": net.state_dict(),
            "net": cfg.net.model_dump(),
            "sampler": cfg.sampler.model_dump(mode="json"),
            "classes": list(CLASSES[: cfg.net.num_classes]),
            "mean": MEAN,
            "std": STD,
            "training": {
                "config": json.loads(cfg.model_dump_json()),
                "seed": cfg.seed,
                "steps": step + int(previous.get("steps", 0)),
                "stages": [
                    *previous.get("stages", [_stage(previous)] if previous else []),
                    {"steps": step, "train_seconds": round(elapsed, 1), "init_from": _str_or_none(cfg.init_from)},
                ],
                "images": len(items),
                "sources": [
                    {"path": str(s.path), "weight": s.weight, "images": source_of.count(k)}
                    for k, s in enumerate(cfg.sources())
                ],
                "ood_chips": cfg.ood_chips,
                "positive_chips": sum(k == "pos" for k in pool.kinds),
                "negative_chips": len(negatives),
                "train_seconds": round(elapsed + float(previous.get("train_seconds", 0.0)), 1),
                "chip_pool_seconds": round(pool_seconds, 1),
                "hardware": hardware(),
            },
        },
        out,
    )
    print(f"saved {out} after {step} steps, {elapsed / 60:.1f} min of training")
    return out


def _stage(training: dict[str, Any]) -> dict[str, Any]:
    """A compact record of an earlier training stage."""
    return {"steps": training.get("steps"), "train_seconds": training.get("train_seconds"), "init_from": None}


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _re_add_negatives(
    items: list[Item],
    negatives: list[tuple[int, int, int, int]],
    cfg: TrainConfig,
    pool: ChipPool,
    source_of: list[int],
) -> None:
    """Rebuild negative chips recorded in a checkpoint (their pixels are not stored)."""
    from models.sniper import levels_for

    sc = cfg.sampler
    by_image: dict[int, list[tuple[int, int, int]]] = {}
    for i, lvl, x0, y0 in negatives:
        by_image.setdefault(i, []).append((lvl, x0, y0))
    for i, chips in by_image.items():
        path, boxes, classes = items[i]
        img = _read_rgb(path)
        levels = levels_for((img.shape[1], img.shape[0]), sc)
        for lvl, x0, y0 in chips:
            lv = levels[lvl]
            chip, _, _ = crop_chip(resize_level(img, lv), x0, y0, sc.chip_size)
            labels = chip_labels(lv, x0, y0, boxes, classes, sc)
            pool.add(
                chip,
                chip_targets(labels, cfg),
                "neg",
                source_of[i],
            )


def _save(
    path: Path,
    net: TinyDet,
    opt: torch.optim.Optimizer,
    step: int,
    elapsed: float,
    negatives: list[tuple[int, int, int, int]],
    rng: np.random.Generator,
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "model": net.state_dict(),
            "optim": opt.state_dict(),
            "step": step,
            "elapsed": elapsed,
            "negatives": negatives,
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    tmp.replace(path)


def load_trained(path: Path) -> tuple[TinyDet, dict[str, Any]]:
    """A trained net from ``model.pt`` (eval mode) and the saved metadata."""
    ck = torch.load(path, weights_only=False, map_location="cpu")
    net = TinyDet(NetConfig.model_validate(ck["net"]))
    net.load_state_dict(ck["model"])  # strict: a model.pt always matches its own net config
    net.eval()
    return net, ck
