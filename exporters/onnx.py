"""PyTorch -> ONNX export of a trained :class:`models.net.TinyDet`, with a parity check and a model card.

The exported graph takes ``images`` ``float32 [B, 3, C, C]`` (RGB, ``(x / 255 - mean) / std``) with a
dynamic batch ``B`` and returns, in this order, ``heatmap`` ``float32 [B, K, C/4, C/4]`` (class probabilities,
3x3 peak-suppressed inside the graph) and ``ltrb`` ``float32 [B, 4, C/4, C/4]`` (chip px) -- the
"snipserve" output format. The :class:`service.modelcard.ModelCard` travels in the ONNX metadata
(``snipserve.card``), so the file alone is a servable model.

Parity: ONNX Runtime (CPU EP) and PyTorch run the same chips (random and, when given, real ones); the
largest absolute difference over both outputs is reported and must not exceed ``tolerance``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from service.modelcard import ModelCard, card_metadata
from service.plan import LevelSpec

OUTPUT_NAMES = ("heatmap", "ltrb")
INPUT_NAME = "images"


class OnnxExportConfig(BaseModel):
    """How to export and check."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    opset: int = Field(default=17, ge=13, le=21, description="ONNX opset version.")
    parity_batch: int = Field(default=4, ge=1, description="Chips per parity batch (a second batch uses 1 chip).")
    tolerance: float = Field(default=1e-4, gt=0, description="Largest allowed |onnx - torch| over both outputs.")
    seed: int = Field(default=0, description="Seed of the random parity chips.")


@dataclass(frozen=True)
class ExportReport:
    """What the export produced and how well ONNX Runtime matches PyTorch."""

    path: Path
    max_abs_diff: float
    max_abs_diff_heatmap: float
    max_abs_diff_ltrb: float
    batches_checked: tuple[int, ...]
    size_bytes: int
    card: ModelCard

    def summary(self) -> str:
        return (
            f"{self.path}: {self.size_bytes / 1e6:.2f} MB; parity vs PyTorch on batches {list(self.batches_checked)}: "
            f"max |diff| = {self.max_abs_diff:.3g} (heatmap {self.max_abs_diff_heatmap:.3g}, "
            f"ltrb {self.max_abs_diff_ltrb:.3g})"
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
) -> ModelCard:
    """Model card for a ``model.pt`` checkpoint's metadata (see :func:`models.train.train`)."""
    sampler = meta["sampler"]
    levels = tuple(LevelSpec.model_validate(s) for s in sampler["levels"])
    chip = int(sampler["chip_size"])
    if presets is None:
        presets = {
            # One chip with the whole image: large objects only, the cheapest possible pass.
            "fast": (LevelSpec(long_side=chip),),
        }
    training = dict(meta.get("training", {}))
    training.setdefault("method", "SNIPER chips at the default levels, invalid GT ignored, negative chip mining")
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
        output_names=OUTPUT_NAMES,
        sweet_spot=tuple(sampler["sweet_spot"]),
        default_levels=levels,
        presets=presets,
        score_threshold=score_threshold,
        max_per_chip=max_per_chip,
        training=training,
        evaluation=evaluation or {},
    )


def export_module(module: Any, chip: int, path: Path, opset: int = 17) -> None:
    """Write ``module`` (``images -> (heatmap, ltrb)``) to ``path`` with a dynamic batch axis."""
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
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}},
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


def check_parity(
    module: Any, path: Path, chip: int, cfg: OnnxExportConfig, real_chips: np.ndarray | None = None
) -> tuple[float, float, tuple[int, ...]]:
    """Max |diff| of (heatmap, ltrb) between ONNX Runtime and PyTorch; ``real_chips`` ``float32 [N,3,C,C]``."""
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
    d_heat = d_ltrb = 0.0
    module.eval()
    for x in batches:
        with torch.no_grad():
            ref = [t.numpy() for t in module(torch.from_numpy(x))]
        got = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        d_heat = max(d_heat, float(np.abs(got[0] - ref[0]).max()))
        d_ltrb = max(d_ltrb, float(np.abs(got[1] - ref[1]).max()))
    return d_heat, d_ltrb, tuple(int(b.shape[0]) for b in batches)


def export_onnx(
    weights: Path,
    out: Path,
    cfg: OnnxExportConfig | None = None,
    evaluation: dict[str, Any] | None = None,
    name: str = "snipserve-default",
    real_chips: np.ndarray | None = None,
) -> ExportReport:
    """Export ``model.pt`` at ``weights`` to ``out`` (ONNX with card); raises :class:`ParityError` on mismatch."""
    from models.net import ExportWrapper
    from models.train import load_trained

    cfg = cfg or OnnxExportConfig()
    net, meta = load_trained(weights)
    card = build_card(meta, name=name, evaluation=evaluation)
    wrapper = ExportWrapper(net)
    export_module(wrapper, card.input_size, out, cfg.opset)
    attach_card(out, card)
    d_heat, d_ltrb, sizes = check_parity(wrapper, out, card.input_size, cfg, real_chips)
    report = ExportReport(
        path=out,
        max_abs_diff=max(d_heat, d_ltrb),
        max_abs_diff_heatmap=d_heat,
        max_abs_diff_ltrb=d_ltrb,
        batches_checked=sizes,
        size_bytes=out.stat().st_size,
        card=card,
    )
    if report.max_abs_diff > cfg.tolerance:
        raise ParityError(f"ONNX Runtime differs from PyTorch by {report.max_abs_diff:.3g} > {cfg.tolerance:g}")
    return report


def read_card(path: Path) -> ModelCard:
    """The card stored in an exported ONNX file."""
    import onnx

    from service.modelcard import CARD_METADATA_KEY

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    return ModelCard.model_validate(json.loads(meta[CARD_METADATA_KEY]))
