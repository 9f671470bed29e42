"""Soft-NMS (Bodla et al., ICCV 2017), exactly as DESIGN.md defines it.

One class: candidates are the boxes with ``score >= score_threshold``. While candidates remain, pick
the one with the highest current score (lowest index on ties), keep it with that score, remove it,
multiply every other candidate's score by ``f(IoU)`` and drop candidates whose score is now below
``score_threshold``. IoU is taken in continuous coordinates (no "+1"), 0 where the union is 0.

Decay ``f``: gaussian ``exp(-IoU^2 / sigma)``; linear ``1 - IoU if IoU > Nt else 1``;
hard ``0 if IoU > Nt else 1`` (hard is classic NMS, with scores unchanged).
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

Method = Literal["gaussian", "linear", "hard"]
_METHODS = ("gaussian", "linear", "hard")


def box_iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``box`` ``[4]`` with ``boxes`` ``[N, 4]`` (xyxy, float64 or float32) -> ``float64 [N]``."""
    iw = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    ih = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (box[2] - box[0]) * (box[3] - box[1])
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def decay(iou: np.ndarray, method: Method, sigma: float, iou_threshold: float) -> np.ndarray:
    """Score multipliers ``float64 [N]`` for overlaps ``iou`` ``[N]``."""
    if method == "gaussian":
        return np.exp(-(iou * iou) / sigma)
    if method == "linear":
        return np.where(iou > iou_threshold, 1.0 - iou, 1.0)
    return np.where(iou > iou_threshold, 0.0, 1.0)


def soft_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    method: Method = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS over one class.

    Args:
        boxes: ``float32 [N, 4]`` xyxy in pixels (continuous coordinates).
        scores: ``float32 [N]``.
        method: ``"gaussian"``, ``"linear"`` or ``"hard"``.
        sigma: Gaussian width (``f = exp(-IoU^2 / sigma)``).
        iou_threshold: ``Nt`` for linear and hard decay.
        score_threshold: candidates below it are dropped, before and after every decay.

    Returns:
        ``(keep, kept_scores)``: ``int64 [K]`` indices into ``boxes`` in selection order and
        ``float32 [K]`` their scores when selected.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if not 0 <= iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise ValueError(f"need boxes [N, 4] and scores [N], got {boxes.shape} and {scores.shape}")
    idx = np.flatnonzero(scores >= score_threshold)
    if idx.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    b = boxes[idx].astype(np.float64)  # [M, 4]
    s = scores[idx].astype(np.float64)  # [M]
    if idx.size <= _CLUSTER_MIN:
        keep, kept = _soft_nms_dense(b, s, method, sigma, iou_threshold, score_threshold)
        return idx[keep], kept.astype(np.float32)
    # Boxes that do not overlap never decay each other (f(0) == 1 exactly for every method), so
    # soft-NMS splits into independent clusters of overlapping boxes. Each cluster's selections come out
    # ordered by (score desc, index asc), as the global loop selects them, so one sort merges them.
    labels = _overlap_clusters(b)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    keeps, kepts = [], []
    for members in np.split(order, bounds):  # members ascending: ties still go to the lowest index
        if members.size == 1:
            keeps.append(members)
            kepts.append(s[members])
            continue
        k, ks = _soft_nms_dense(b[members], s[members], method, sigma, iou_threshold, score_threshold)
        keeps.append(members[k])
        kepts.append(ks)
    keep = np.concatenate(keeps)
    kept = np.concatenate(kepts)
    final = np.lexsort((keep, -kept))
    return idx[keep[final]], kept[final].astype(np.float32)


# Below this many candidates the plain loop is faster than finding clusters (benchmarks/bench_soft_nms.py).
_CLUSTER_MIN = 64
_GRID = 1024


def _overlap_clusters(b: np.ndarray) -> np.ndarray:
    """Cluster label ``int32 [M]`` per box such that boxes with positive-area overlap share a label.

    Boxes are painted onto a coarse grid (at most ``_GRID`` cells a side); two boxes that overlap share
    a point, hence a cell, so connected components of painted cells never split an overlapping pair.
    Clusters may be coarser than necessary, which only costs time, never correctness.
    """
    x0, y0 = b[:, 0].min(), b[:, 1].min()
    extent = max(b[:, 2].max() - x0, b[:, 3].max() - y0, 1e-9)
    cell = extent / (_GRID - 1)
    c0 = np.floor((b[:, :2] - (x0, y0)) / cell).astype(np.int64)  # [M, 2] first cell
    c1 = np.maximum(np.ceil((b[:, 2:] - (x0, y0)) / cell).astype(np.int64) - 1, c0)  # [M, 2] last cell
    c1 = np.minimum(c1, _GRID - 1)
    # Paint all rectangles at once: +1/-1 at the corners of each, then a 2-D prefix sum.
    diff = np.zeros((_GRID + 1, _GRID + 1), np.int32)
    np.add.at(diff, (c0[:, 1], c0[:, 0]), 1)
    np.add.at(diff, (c0[:, 1], c1[:, 0] + 1), -1)
    np.add.at(diff, (c1[:, 1] + 1, c0[:, 0]), -1)
    np.add.at(diff, (c1[:, 1] + 1, c1[:, 0] + 1), 1)
    painted = (diff.cumsum(0).cumsum(1)[:_GRID, :_GRID] > 0).astype(np.uint8)
    _, grid_labels = cv2.connectedComponents(painted, connectivity=4)
    return grid_labels[c0[:, 1], c0[:, 0]].astype(np.int32)


def _soft_nms_dense(
    b: np.ndarray, s: np.ndarray, method: Method, sigma: float, iou_threshold: float, score_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The soft-NMS loop on candidates ``b`` ``float64 [M, 4]``, ``s`` ``float64 [M]`` (all >= threshold).

    Returns positions into ``b`` in selection order and the scores when selected (float64).
    """
    pos = np.arange(s.size)
    keep: list[int] = []
    kept: list[float] = []
    while s.size:
        i = int(np.argmax(s))  # the first maximum: lowest index on ties (pos stays ascending)
        keep.append(int(pos[i]))
        kept.append(float(s[i]))
        box = b[i]
        b = np.delete(b, i, axis=0)
        s = np.delete(s, i)
        pos = np.delete(pos, i)
        if not s.size:
            break
        s = s * decay(box_iou_one(box, b), method, sigma, iou_threshold)
        alive = s >= score_threshold
        if not alive.all():
            b, s, pos = b[alive], s[alive], pos[alive]
    return np.asarray(keep, np.int64), np.asarray(kept, np.float64)


def batched_soft_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    method: Method = "gaussian",
    sigma: float = 0.5,
    iou_threshold: float = 0.3,
    score_threshold: float = 0.001,
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS run independently per group (class); same arguments as :func:`soft_nms` plus
    ``groups`` ``int [N]``. Returns ``(keep, kept_scores)`` sorted by kept score, descending
    (stable, so ties keep selection order)."""
    keeps, kepts = [], []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        k, ks = soft_nms(boxes[members], scores[members], method, sigma, iou_threshold, score_threshold)
        keeps.append(members[k])
        kepts.append(ks)
    if not keeps:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    keep = np.concatenate(keeps)
    kept = np.concatenate(kepts)
    order = np.argsort(-kept, kind="stable")
    return keep[order], kept[order]
