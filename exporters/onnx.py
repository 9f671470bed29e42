"""PyTorch -> ONNX export of a trained :class:`models.net.TinyDet`, with a parity check and a model card.

The exported graph takes ``images`` ``float32 [B, 3, C, C]`` (RGB, ``(x / 255 - mean) / std``) with a
dynamic batch ``B`` and returns, in this order, ``heatmap`` ``float32 [B, K, C/4, C/4]`` (class probabilities,
3x3 peak-suppressed inside the graph) and ``ltrb`` ``float32 [B, 4, C/4, C/4]`` (chip px) -- the
"snipserve" output format -- and, when the net has a focus head, ``focus`` ``float32 [B, 1, C/16, C/16]``
(FocusPixel probabilities; the card then says ``focus: {stride: 16, output: focus}``).
The :class:`service.modelcard.ModelCard` travels in the ONNX metadata (``snipserve.card``), so the file
alone is a servable model.

Parity: ONNX Runtime (CPU EP) and PyTorch run the same chips (random and, when given, real ones); the
largest absolute difference is reported and must not exceed ``tolerance`` (see :class:`Parity` for how
peak suppression's near-ties are treated: counted, reported, and required to be rounding-level ties).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.modelcard import FocusSpec, ModelCard, card_metadata
from service.plan import LevelSpec

OUTPUT_NAMES = ("heatmap", "ltrb")
FOCUS_OUTPUT = "focus"
INPUT_NAME = "images"
FOCUS_STRIDE = 16  # models.net.FOCUS_STRIDE (not imported: this module must not need torch to build cards)


def output_names(focus: bool) -> tuple[str, ...]:
    """The exported graph's outputs, in order."""
    return (*OUTPUT_NAMES, FOCUS_OUTPUT) if focus else OUTPUT_NAMES


class OnnxExportConfig(BaseModel):
    """How to export and check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    opset: int = Field(default=17, ge=13, le=21, description="ONNX opset version.")
    parity_batch: int = Field(default=4, ge=1, description="Chips per parity batch (a second batch uses 1 chip).")
    tolerance: float = Field(default=1e-4, gt=0, description="Largest allowed |onnx - torch| over both outputs.")
    tie_tolerance: float = Field(
        default=1e-5, gt=0, description="A peak flip is accepted only at a near-tie closer than this (probability)."
    )
    seed: int = Field(default=0, description="Seed of the random parity chips.")


@dataclass(frozen=True)
class ExportReport:
    """What the export produced and how well ONNX Runtime matches PyTorch."""

    path: Path
    parity: Parity
    size_bytes: int
    card: ModelCard

    @property
    def max_abs_diff(self) -> float:
        """The gated number: max |diff| over ltrb and the heatmap cells both runtimes keep/drop alike."""
        return max(self.parity.heatmap, self.parity.ltrb)

    @property
    def batches_checked(self) -> tuple[int, ...]:
        return self.parity.batches

    def summary(self) -> str:
        p = self.parity
        return (
            f"{self.path}: {self.size_bytes / 1e6:.2f} MB; parity vs PyTorch on batches {list(p.batches)}: "
            f"max |diff| = {self.max_abs_diff:.3g} (heatmap {p.heatmap:.3g}, ltrb {p.ltrb:.3g}); "
            f"peak flips at near-ties: {p.peak_flips} of {p.cells} cells (largest tie gap {p.max_tie_gap:.2g}, "
            f"heatmap max |diff| with flips {p.heatmap_all_cells:.3g})"
        )


class ParityError(RuntimeError):
    """ONNX Runtime outputs differ from PyTorch by more than the tolerance."""


def build_card(
    meta: dict[str, Any],
    name: str = "snipserve-default",
    version: str = "1",
    evaluation: dict[str, Any] | None = None,
    presets: dict[str, tuple[LevelSpec, ...]] | None = None,
    score_threshold: float = 0.3,
    max_per_chip: int = 100,
    default_mode: Literal["pyramid", "focus"] = "pyramid",
    focus_threshold: float = 0.05,
) -> ModelCard:
    """Model card for a ``model.pt`` checkpoint's metadata (see :func:`models.train.train`).

    A checkpoint with a focus head (``meta["net"]["focus_head"]``) gets ``focus: {stride, output}``;
    ``default_mode="focus"`` makes preset 'default' run FocusChips -- a decision for whoever exports, made on the
    measured focus-vs-pyramid results (``snipserve eval --mode focus``)."""
    sampler = meta["sampler"]
    levels = tuple(LevelSpec.model_validate(s) for s in sampler["levels"])
    chip = int(sampler["chip_size"])
    if presets is None:
        presets = {
            # One chip with the whole image: large objects only, the cheapest possible pass.
            "fast": (LevelSpec(long_side=chip),),
            # Native-resolution fine level instead of the upsampled one: about half the chips.
            "balanced": (LevelSpec(scale=1.0), LevelSpec(scale=0.4), LevelSpec(long_side=chip)),
        }
    training = dict(meta.get("training", {}))
    training.setdefault("method", "SNIPER chips at the default levels, invalid GT ignored, negative chip mining")
    has_focus = bool(meta.get("net", {}).get("focus_head", False))
    focus = FocusSpec(stride=FOCUS_STRIDE, output=FOCUS_OUTPUT, threshold=focus_threshold) if has_focus else None
    if default_mode == "focus" and focus is None:
        raise ValueError("default_mode 'focus' needs a checkpoint with a focus head")
    return ModelCard(
        name=name,
        version=version,
        classes=tuple(meta["classes"]),
        input_size=chip,
        channel_order="RGB",
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        output_format="snipserve",
        input_name=INPUT_NAME,
        output_names=output_names(has_focus),
        sweet_spot=tuple(sampler["sweet_spot"]),
        default_levels=levels,
        presets=presets,
        score_threshold=score_threshold,
        max_per_chip=max_per_chip,
        focus=focus,
        default_mode=default_mode,
        training=training,
        evaluation=evaluation or {},
    )


def export_module(module: Any, chip: int, path: Path, opset: int = 17, names: tuple[str, ...] = OUTPUT_NAMES) -> None:
    """Write ``module`` (``images -> (heatmap, ltrb[, focus])``, outputs ``names``) to ``path``, dynamic batch."""
    import torch

    module.eval()
    dummy = torch.zeros(2, 3, chip, chip)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript-based exporter is the one that needs no extra packages; silence its notices.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=list(names),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=opset,
            dynamo=False,
        )


def attach_card(path: Path, card: ModelCard) -> None:
    """Store ``card`` in the ONNX file's metadata (replacing an earlier card) and check the model."""
    import onnx

    model = onnx.load(str(path))
    props = card_metadata(card)
    keep = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.producer_name = "snipserve.exporters.onnx"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@dataclass(frozen=True)
class Parity:
    """ONNX Runtime vs PyTorch on the same chips.

    3x3 peak suppression is discontinuous: where a cell and a neighbour differ by a rounding error, the two
    runtimes may keep different cells (a "peak flip"). So the heatmap is compared where both runtimes made
    the same keep/drop decision, every flip must be such a near-tie (``max_tie_gap``: the reference's
    |cell - best neighbour| before suppression), and the flips are counted and reported.
    """

    heatmap: float  # max |diff| of heatmap where both runtimes agree on keep/drop
    ltrb: float  # max |diff| of ltrb, all cells (and of the focus map, when the model has one)
    heatmap_all_cells: float  # max |diff| of heatmap including peak flips
    peak_flips: int
    cells: int
    max_tie_gap: float
    batches: tuple[int, ...]


def _tie_gaps(raw: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """|value - max of the 3x3 neighbours| of ``raw`` ``[B, K, h, w]`` at ``cells`` ``[N, 4]`` indices."""
    padded = np.pad(raw, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    gaps = []
    for b, k, y, x in cells.tolist():
        win = padded[b, k, y : y + 3, x : x + 3].copy()
        win[1, 1] = -np.inf
        gaps.append(abs(float(raw[b, k, y, x]) - float(win.max())))
    return np.asarray(gaps, np.float64)


def check_parity(
    module: Any, path: Path, chip: int, cfg: OnnxExportConfig, real_chips: np.ndarray | None = None
) -> Parity:
    """Compare ONNX Runtime with PyTorch on random chips and ``real_chips`` ``float32 [N, 3, C, C]``."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(cfg.seed)
    batches = [
        rng.normal(0, 1, (cfg.parity_batch, 3, chip, chip)).astype(np.float32),
        rng.normal(0, 1, (1, 3, chip, chip)).astype(np.float32),
    ]
    if real_chips is not None and real_chips.shape[0]:
        batches.append(real_chips.astype(np.float32))
    d_heat = d_all = d_ltrb = gap = 0.0
    flips = cells = 0
    module.eval()
    for x in batches:
        with torch.no_grad():
            t = torch.from_numpy(x)
            ref = [o.numpy() for o in module(t)]
            raw = torch.sigmoid(module.net(t)[0]).numpy()
        names = [o.name for o in sess.get_outputs()]
        got = sess.run(names, {INPUT_NAME: x})
        for extra, want in zip(got[2:], ref[2:], strict=True):  # the focus map: a plain continuous output
            d_ltrb = max(d_ltrb, float(np.abs(extra - want).max()))
        diff = np.abs(got[0] - ref[0])
        flip = (got[0] > 0) != (ref[0] > 0)
        d_all = max(d_all, float(diff.max()))
        d_heat = max(d_heat, float(diff[~flip].max()))
        d_ltrb = max(d_ltrb, float(np.abs(got[1] - ref[1]).max()))
        if flip.any():
            gap = max(gap, float(_tie_gaps(raw, np.argwhere(flip)).max()))
        flips += int(flip.sum())
        cells += int(flip.size)
    return Parity(d_heat, d_ltrb, d_all, flips, cells, gap, tuple(int(b.shape[0]) for b in batches))


def export_onnx(
    weights: Path,
    out: Path,
    cfg: OnnxExportConfig | None = None,
    evaluation: dict[str, Any] | None = None,
    name: str = "snipserve-default",
    parity_data: Path | None = None,
    default_mode: Literal["pyramid", "focus"] = "pyramid",
    focus_threshold: float = 0.05,
) -> ExportReport:
    """Export ``model.pt`` at ``weights`` to ``out`` (ONNX with card); raises :class:`ParityError` on mismatch.

    Parity runs on random chips and, with ``parity_data`` (a COCO folder), on real chips cut from it.
    """
    from models.net import ExportWrapper
    from models.train import load_trained

    cfg = cfg or OnnxExportConfig()
    net, meta = load_trained(weights)
    card = build_card(
        meta, name=name, evaluation=evaluation, default_mode=default_mode, focus_threshold=focus_threshold
    )
    wrapper = ExportWrapper(net)
    export_module(wrapper, card.input_size, out, cfg.opset, card.output_names or OUTPUT_NAMES)
    attach_card(out, card)
    real = real_chips_from(parity_data, card) if parity_data is not None else None
    parity = check_parity(wrapper, out, card.input_size, cfg, real)
    report = ExportReport(path=out, parity=parity, size_bytes=out.stat().st_size, card=card)
    if report.max_abs_diff > cfg.tolerance:
        raise ParityError(f"ONNX Runtime differs from PyTorch by {report.max_abs_diff:.3g} > {cfg.tolerance:g}")
    if parity.max_tie_gap > cfg.tie_tolerance:
        raise ParityError(
            f"peak suppression differs at a cell {parity.max_tie_gap:.3g} from its best neighbour "
            f"(> {cfg.tie_tolerance:g}): not a rounding near-tie"
        )
    return report


def real_chips_from(data_dir: Path, card: ModelCard, images: int = 2, max_chips: int = 24) -> np.ndarray:
    """Normalised chips ``float32 [N, 3, C, C]`` cut from the first ``images`` images of a COCO folder by the
    service's planner at the card's default levels (for the parity check on real pixels)."""
    from models.sniper import crop_chip
    from models.synth import load_coco
    from models.train import _read_rgb, normalise
    from service.crop import resize_level
    from service.plan import PlanConfig, plan

    _, items = load_coco(data_dir)
    chips: list[np.ndarray] = []
    cfg = PlanConfig(chip_size=card.input_size, levels=card.default_levels, sweet_spot=card.sweet_spot)
    for path, _, _ in items[:images]:
        img = _read_rgb(path)
        p = plan((img.shape[1], img.shape[0]), cfg)
        limgs = [resize_level(img, lv) for lv in p.levels]
        picks = np.linspace(0, p.num_chips - 1, min(max_chips // images, p.num_chips)).astype(int)
        for lvl, x0, y0 in p.chips[picks].tolist():
            chips.append(crop_chip(limgs[lvl], x0, y0, card.input_size)[0])
    return normalise(np.stack(chips)).numpy()


def read_card(path: Path) -> ModelCard:
    """The card stored in an exported ONNX file."""
    import onnx

    from service.modelcard import CARD_METADATA_KEY

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ModelCard.model_validate(json.loads(meta[CARD_METADATA_KEY]))
