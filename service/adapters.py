"""Output adapters: raw engine outputs of one batch -> flat detections in chip pixels.

Every adapter returns a :class:`ChipDetections` for the whole batch (arrays, no per-box objects):
``chip int32 [N]`` (row in the batch), ``boxes float32 [N, 4]`` xyxy in chip pixels,
``scores float32 [N]``, ``classes int32 [N]``. Thresholds are per chip (``float32 [B]``), because
one batch mixes chips of requests that asked for different score thresholds.

A model with a focus head (``ModelCard.focus.output``) has one more output, the focus map ``[B, 1, h', w']``;
:func:`split_outputs` takes it out before the adapter sees the detector's outputs, so every format accepts it.

Formats (chosen by ``ModelCard.output_format``):
- ``snipserve``: ``heatmap [B, K, h, w]`` peak-suppressed class probabilities and ``ltrb [B, 4, h, w]``
  distances (chip px) from each cell centre ``((x + .5) * stride, (y + .5) * stride)`` to the box sides.
- ``yolov8``: Ultralytics YOLOv8/YOLO11 export ``[B, 4 + K, N]`` (cx, cy, w, h, class scores), per-chip NMS.
- ``end2end``: boxes/scores/classes already selected: either ``[B, M, 6]`` (x1, y1, x2, y2, score, class),
  or ``boxes [B, M, 4], scores [B, M], classes [B, M]``, optionally preceded by ``num_dets [B, 1]``
  (TensorRT EfficientNMS layout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.modelcard import ModelCard
from service.soft_nms import soft_nms


@dataclass(frozen=True)
class ChipDetections:
    """Detections of one batch, flat. See the module docstring for shapes."""

    chip: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    @classmethod
    def empty(cls) -> ChipDetections:
        return cls(np.empty(0, np.int32), np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int32))

    def __len__(self) -> int:
        return int(self.chip.shape[0])

    @classmethod
    def concat(cls, parts: Sequence[ChipDetections]) -> ChipDetections:
        """``parts`` one after the other (chip ids unchanged); :meth:`empty` for none."""
        if not parts:
            return cls.empty()
        return cls(
            *(np.concatenate(x) for x in zip(*((p.chip, p.boxes, p.scores, p.classes) for p in parts), strict=True))
        )

    def select(self, mask_or_index: np.ndarray) -> ChipDetections:
        return ChipDetections(
            self.chip[mask_or_index], self.boxes[mask_or_index], self.scores[mask_or_index], self.classes[mask_or_index]
        )


Adapter = Callable[[Sequence[np.ndarray], ModelCard, np.ndarray], ChipDetections]


def _cap_per_chip(chip: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Indices keeping the ``k`` best scores of each chip, ordered by (chip, score desc)."""
    order = np.lexsort((-scores, chip))
    chip_sorted = chip[order]
    starts = np.searchsorted(chip_sorted, chip_sorted, side="left")  # first row of each chip's run
    rank = np.arange(order.size) - starts
    return order[rank < k]


def decode_snipserve(outputs: Sequence[np.ndarray], card: ModelCard, thresholds: np.ndarray) -> ChipDetections:
    heatmap, ltrb = outputs[0], outputs[1]
    if heatmap.ndim != 4 or ltrb.ndim != 4 or ltrb.shape[1] != 4 or heatmap.shape[2:] != ltrb.shape[2:]:
        raise ValueError(
            f"snipserve format needs heatmap [B,K,h,w] and ltrb [B,4,h,w], got {heatmap.shape}, {ltrb.shape}"
        )
    stride = card.input_size / heatmap.shape[-1]
    b, c, y, x = np.nonzero(heatmap > thresholds[:, None, None, None])
    scores = heatmap[b, c, y, x].astype(np.float32)
    keep = _cap_per_chip(b, scores, card.max_per_chip)
    b, c, y, x, scores = b[keep], c[keep], y[keep], x[keep], scores[keep]
    d = ltrb[b, :, y, x]  # [N, 4]
    cx = (x + 0.5) * stride
    cy = (y + 0.5) * stride
    boxes = np.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], axis=1).astype(np.float32)
    return ChipDetections(b.astype(np.int32), boxes, scores, c.astype(np.int32))


def decode_yolov8(outputs: Sequence[np.ndarray], card: ModelCard, thresholds: np.ndarray) -> ChipDetections:
    pred = outputs[0]
    k = len(card.classes)
    if pred.ndim != 3 or pred.shape[1] != 4 + k:
        raise ValueError(f"yolov8 format needs [B, 4 + {k}, N], got {pred.shape}")
    cls_scores = pred[:, 4:, :]  # [B, K, N]
    best = cls_scores.argmax(axis=1)  # [B, N]
    score = np.take_along_axis(cls_scores, best[:, None, :], axis=1)[:, 0, :]  # [B, N]
    b, n = np.nonzero(score > thresholds[:, None])
    if b.size == 0:
        return ChipDetections.empty()
    xywh = pred[b, :4, n]  # [M, 4]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1).astype(np.float32)
    scores = score[b, n].astype(np.float32)
    classes = best[b, n].astype(np.int32)
    # Class-aware per-chip NMS in one call: shift each (chip, class) group to its own region.
    group = b.astype(np.int64) * k + classes
    offset = (group * (4.0 * card.input_size)).astype(np.float64)[:, None]
    # Any positive threshold drops suppressed boxes (hard decay sets their score to exactly 0).
    keep, _ = soft_nms(boxes + offset, scores, "hard", iou_threshold=card.pre_nms_iou, score_threshold=1e-12)
    keep = keep[_cap_per_chip(b[keep], scores[keep], card.max_per_chip)]
    return ChipDetections(b[keep].astype(np.int32), boxes[keep], scores[keep], classes[keep])


def decode_end2end(outputs: Sequence[np.ndarray], card: ModelCard, thresholds: np.ndarray) -> ChipDetections:
    outs = list(outputs)
    num: np.ndarray | None = None
    if len(outs) == 1:
        packed = outs[0]
        if packed.ndim != 3 or packed.shape[2] != 6:
            raise ValueError(f"end2end single output needs [B, M, 6], got {packed.shape}")
        boxes_b, scores_b, classes_b = packed[..., :4], packed[..., 4], packed[..., 5]
    else:
        if len(outs) == 4:
            num, outs = outs[0].reshape(-1), outs[1:]
        boxes_b, scores_b, classes_b = outs[0], outs[1], outs[2]
        if boxes_b.ndim != 3 or boxes_b.shape[2] != 4 or scores_b.shape != boxes_b.shape[:2]:
            raise ValueError(
                f"end2end needs boxes [B,M,4], scores [B,M], classes [B,M]; got {boxes_b.shape}, {scores_b.shape}"
            )
    mask = scores_b > thresholds[:, None]
    if num is not None:
        mask &= np.arange(scores_b.shape[1])[None, :] < num[:, None]
    b, m = np.nonzero(mask)
    scores = scores_b[b, m].astype(np.float32)
    keep = _cap_per_chip(b, scores, card.max_per_chip)
    b, m = b[keep], m[keep]
    return ChipDetections(
        b.astype(np.int32),
        boxes_b[b, m].astype(np.float32).reshape(-1, 4),
        scores[keep],
        classes_b[b, m].astype(np.int32),
    )


ADAPTERS: dict[str, Adapter] = {
    "snipserve": decode_snipserve,
    "yolov8": decode_yolov8,
    "end2end": decode_end2end,
}


def split_outputs(outputs: Sequence[np.ndarray], card: ModelCard) -> tuple[list[np.ndarray], np.ndarray | None]:
    """(the detector's outputs for the adapter, the focus map ``float32 [B, 1, h, w]`` or None).

    Outputs come in the card's ``output_names`` order (the engines' contract); the focus map is the one the
    card's ``focus.output`` names."""
    spec = card.focus
    if spec is None or spec.output is None or card.output_names is None:
        return list(outputs), None
    i = card.output_names.index(spec.output)
    focus = outputs[i]
    if focus.ndim != 4 or focus.shape[1] != 1:
        raise ValueError(f"focus output {spec.output!r} must be [B, 1, h, w], got {focus.shape}")
    return [o for j, o in enumerate(outputs) if j != i], focus


def get_adapter(card: ModelCard) -> Adapter:
    """The adapter for ``card.output_format``."""
    return ADAPTERS[card.output_format]
