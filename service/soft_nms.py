"""Soft-NMS (Bodla et al., ICCV 2017), exactly as DESIGN.md defines it.

One class: candidates are the boxes with ``score >= score_threshold``. While candidates remain, pick
the one with the highest current score (lowest index on ties), keep it with that score, remove it,
multiply every other candidate's score by ``f(IoU)`` and drop candidates whose score is now below
``score_threshold``. IoU is taken in continuous coordinates (no "+1"), 0 where the union is 0.

Decay ``f``: gaussian ``exp(-IoU^2 / sigma)``; linear ``1 - IoU if IoU > Nt else 1``;
hard ``0 if IoU > Nt else 1`` (hard is classic NMS, with scores unchanged).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

import numpy as np

Method = Literal["gaussian", "linear", "hard"]
_METHODS = ("gaussian", "linear", "hard")


def iou_pairs(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """IoU of the row pairs ``(p[e], q[e])``: ``p``, ``q`` ``[E, 4]`` xyxy (either may be ``[1, 4]``, broadcast),
    float64 or float32 -> ``[E]``. Symmetric in the pair, bit for bit (``min``, ``max`` and ``+`` commute)."""
    iw = np.minimum(p[:, 2], q[:, 2]) - np.maximum(p[:, 0], q[:, 0])
    ih = np.minimum(p[:, 3], q[:, 3]) - np.maximum(p[:, 1], q[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_q = (q[:, 2] - q[:, 0]) * (q[:, 3] - q[:, 1])
    union = area_p + area_q - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``box`` ``[4]`` with ``boxes`` ``[N, 4]`` (xyxy, float64 or float32) -> ``float64 [N]``."""
    return iou_pairs(box[None, :], boxes)


def decay(iou: np.ndarray, method: Method, sigma: float, iou_threshold: float) -> np.ndarray:
    """Score multipliers ``float64 [N]`` for overlaps ``iou`` ``[N]``."""
    if method == "gaussian":
        return np.asarray(np.exp(-(iou * iou) / sigma))
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
    keep, kept = _soft_nms_sparse(b, s, method, sigma, iou_threshold, score_threshold)
    return idx[keep], kept.astype(np.float32)


_PAIR_CHUNK = 4_000_000  # candidate pairs examined per step while building the overlap graph


def overlap_pairs(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs ``(i, j)``, ``i != j``, of boxes ``b`` ``[M, 4]`` whose intersection has positive area,
    both directions, as two ``int64`` arrays. Sort-and-sweep on x1, so the work is proportional to the
    pairs whose x-ranges overlap, not to ``M**2``."""
    order = np.argsort(b[:, 0], kind="stable")
    bs = b[order]
    # For sorted box k, candidates are the later boxes with x1 < x2_k.
    end = np.searchsorted(bs[:, 0], bs[:, 2], side="left")
    count = np.maximum(end - np.arange(len(bs)) - 1, 0)
    src_parts, dst_parts = [], []
    start = 0
    cum = np.cumsum(count)
    while start < len(bs):
        base = cum[start - 1] if start else 0
        stop = max(int(np.searchsorted(cum, base + _PAIR_CHUNK, side="right")), start + 1)
        rows = np.arange(start, stop)
        n = count[start:stop]
        i = np.repeat(rows, n)
        # j runs from i + 1 over each row's candidates: offsets within each row's run.
        first = np.repeat(np.cumsum(n) - n, n)
        j = i + 1 + (np.arange(i.size) - first)
        iw = np.minimum(bs[i, 2], bs[j, 2]) - np.maximum(bs[i, 0], bs[j, 0])
        ih = np.minimum(bs[i, 3], bs[j, 3]) - np.maximum(bs[i, 1], bs[j, 1])
        hit = (iw > 0) & (ih > 0)
        src_parts.append(order[i[hit]])
        dst_parts.append(order[j[hit]])
        start = stop
    src = np.concatenate(src_parts) if src_parts else np.empty(0, np.int64)
    dst = np.concatenate(dst_parts) if dst_parts else np.empty(0, np.int64)
    return np.concatenate([src, dst]), np.concatenate([dst, src])


def _soft_nms_sparse(
    b: np.ndarray, s: np.ndarray, method: Method, sigma: float, iou_threshold: float, score_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The same selections as :func:`_soft_nms_dense`, touching only overlapping boxes.

    A box that does not overlap the selected one is multiplied by ``f(0) == 1`` (exactly, for every
    method), so only graph neighbours change, and a box without neighbours keeps its own score. The decay
    factor of every overlapping pair is computed once, vectorised. For the rest, a heap keyed
    ``(-score, index)`` gives the highest current score with the lowest index on ties: a decay does not touch
    the heap; an entry found stale when popped goes back in at its box's current score (lazy decrease-key).
    Each box's score is multiplied by the same factors in the same order as in the dense loop.

    Selection order is ``(-kept score, index)``: scores only decrease, so when a box is selected every box
    still a candidate has a current score -- hence a kept score -- no higher, and an equal one only with a
    higher index. Boxes without neighbours therefore join the heap's selections by one sort at the end.
    """
    m = s.size
    src, dst = overlap_pairs(b)
    order = np.argsort(src, kind="stable")
    src, nbrs = src[order], dst[order]
    factor = decay(iou_pairs(b[src], b[nbrs]), method, sigma, iou_threshold)
    indptr = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(src, minlength=m), out=indptr[1:])
    linked = np.flatnonzero(indptr[1:] > indptr[:-1])
    cur = s.copy()
    alive = np.ones(m, bool)
    heap = list(zip((-s[linked]).tolist(), linked.tolist(), strict=True))
    heapq.heapify(heap)
    keep: list[int] = []
    while heap:
        neg, k = heapq.heappop(heap)
        if not alive[k]:
            continue  # selected or dropped
        if -neg != cur[k]:  # decayed since it was pushed: back in at its current score (scores only fall, so a
            heapq.heappush(heap, (-cur[k], k))  # key is never below its box's score and the top is exact once fresh)
            continue
        keep.append(k)
        alive[k] = False
        lo, hi = indptr[k], indptr[k + 1]
        nb, f = nbrs[lo:hi], factor[lo:hi]
        live = alive[nb]
        nb, f = nb[live], f[live]
        if nb.size == 0:
            continue
        cur[nb] = cur[nb] * f
        alive[nb[cur[nb] < score_threshold]] = False
    chosen = np.concatenate([np.asarray(keep, np.int64), np.flatnonzero(indptr[1:] == indptr[:-1])])
    order = np.lexsort((chosen, -cur[chosen]))
    return chosen[order], cur[chosen[order]]


def _soft_nms_dense(
    b: np.ndarray, s: np.ndarray, method: Method, sigma: float, iou_threshold: float, score_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The soft-NMS loop as DESIGN.md states it, on candidates ``b`` ``float64 [M, 4]``, ``s`` ``float64 [M]`` (all
    >= threshold): the plain baseline of ``benchmarks/bench_soft_nms.py`` and the tests' second implementation.

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


@dataclass(frozen=True)
class SoftNMSParams:
    """The arguments of :func:`soft_nms` after the boxes, as one object (the batched and GPU variants take it)."""

    method: Method = "gaussian"
    sigma: float = 0.5
    iou_threshold: float = 0.3
    score_threshold: float = 0.001


def batched_soft_nms(
    boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, params: SoftNMSParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Soft-NMS run independently per group (class): :func:`soft_nms` with ``params`` (defaults: its defaults)
    over the members of each group of ``groups`` ``int [N]``. Returns ``(keep, kept_scores)`` sorted by kept score,
    descending (stable, so ties keep selection order)."""
    p = params or SoftNMSParams()
    keeps, kepts = [], []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        k, ks = soft_nms(boxes[members], scores[members], p.method, p.sigma, p.iou_threshold, p.score_threshold)
        keeps.append(members[k])
        kepts.append(ks)
    return join_groups(keeps, kepts)


def join_groups(keeps: list[np.ndarray], kepts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-group results (in ascending group id) -> one ``(keep int64, kept float32)`` sorted by kept score,
    descending, stable (ties keep group order, then selection order). Shared by the NumPy and GPU paths."""
    if not keeps:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    keep = np.concatenate(keeps).astype(np.int64, copy=False)
    kept = np.concatenate(kepts).astype(np.float32, copy=False)
    order = np.argsort(-kept, kind="stable")
    return keep[order], kept[order]
