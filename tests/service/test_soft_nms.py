"""soft_nms against a slow, obviously-correct reference, plus threshold cases and properties."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import soft_nms
from service.soft_nms import SoftNMSParams, batched_soft_nms

soft_nms_module = importlib.import_module("service.soft_nms")  # the package re-exports the function under this name


def reference_soft_nms(boxes, scores, method, sigma, nt, thr):
    """DESIGN.md's definition, one box at a time, in plain Python floats."""
    cand = [(i, float(scores[i])) for i in range(len(scores)) if scores[i] >= thr]
    keep, kept = [], []

    def iou(a, b):
        iw = min(a[2], b[2]) - max(a[0], b[0])
        ih = min(a[3], b[3]) - max(a[1], b[1])
        inter = max(iw, 0.0) * max(ih, 0.0)
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    while cand:
        best = max(range(len(cand)), key=lambda j: (cand[j][1], -cand[j][0]))
        m, ms = cand.pop(best)
        keep.append(m)
        kept.append(ms)
        nxt = []
        for i, sc in cand:
            o = iou([float(v) for v in boxes[m]], [float(v) for v in boxes[i]])
            if method == "gaussian":
                f = math.exp(-(o * o) / sigma)
            elif method == "linear":
                f = 1.0 - o if o > nt else 1.0
            else:
                f = 0.0 if o > nt else 1.0
            sc *= f
            if sc >= thr:
                nxt.append((i, sc))
        cand = nxt
    return keep, kept


def random_case(rng: np.random.Generator, n: int, extent: float = 200.0):
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(1, extent / 4, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, n).astype(np.float32)
    if n and rng.random() < 0.3:  # exact ties
        scores[rng.integers(0, n, n // 3)] = scores[0]
    if n > 1 and rng.random() < 0.2:  # exact duplicates
        boxes[1] = boxes[0]
    return boxes, scores


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
def test_matches_reference_on_random_cases(method: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both implementations: the overlap graph + heap that ``soft_nms`` runs, and the plain vectorised loop
    (the benchmark's baseline), swapped in for it."""
    if path == "dense":
        monkeypatch.setattr(soft_nms_module, "_soft_nms_sparse", soft_nms_module._soft_nms_dense)
    rng = np.random.default_rng(1234 + len(method) + len(path))
    for case in range(500):
        n = int(rng.integers(0, 40)) if case % 10 else int(rng.integers(60, 200))
        boxes, scores = random_case(rng, n, extent=float(rng.choice([50.0, 200.0, 2000.0])))
        sigma = float(rng.uniform(0.1, 1.0))
        nt = float(rng.uniform(0.0, 0.9))
        thr = float(rng.choice([0.001, 0.05, 0.3]))
        keep, kept = soft_nms(boxes, scores, method, sigma, nt, thr)
        ref_keep, ref_kept = reference_soft_nms(boxes, scores, method, sigma, nt, thr)
        assert keep.tolist() == ref_keep, f"case {case}: order differs"
        np.testing.assert_allclose(kept, np.asarray(ref_kept, np.float32), atol=1e-6, rtol=0)


def test_threshold_cases_exact() -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float32)  # IoU = 50 / 150 = 1/3
    scores = np.array([0.9, 0.8], np.float32)
    # hard: IoU exactly at Nt is kept (the rule is IoU > Nt).
    keep, _ = soft_nms(boxes, scores, "hard", iou_threshold=1 / 3 + 1e-7, score_threshold=0.01)
    assert keep.tolist() == [0, 1]
    keep, _ = soft_nms(boxes, scores, "hard", iou_threshold=0.3, score_threshold=0.01)
    assert keep.tolist() == [0]
    # with a zero threshold a suppressed box stays a candidate at score 0 (0 < 0 is false)
    keep, kept = soft_nms(boxes, scores, "hard", iou_threshold=0.3, score_threshold=0.0)
    assert keep.tolist() == [0, 1] and kept[1] == 0.0
    # linear: 0.8 * (1 - 1/3)
    keep, kept = soft_nms(boxes, scores, "linear", iou_threshold=0.3, score_threshold=0.0)
    assert keep.tolist() == [0, 1]
    assert kept[1] == pytest.approx(0.8 * (2 / 3), abs=1e-6)
    # gaussian decays to 0.8 * exp(-1/9 / 0.5); a threshold just above that drops it.
    decayed = 0.8 * math.exp(-(1 / 9) / 0.5)
    keep, kept = soft_nms(boxes, scores, "gaussian", sigma=0.5, score_threshold=decayed - 1e-6)
    assert keep.tolist() == [0, 1] and kept[1] == pytest.approx(decayed, abs=1e-6)
    keep, _ = soft_nms(boxes, scores, "gaussian", sigma=0.5, score_threshold=decayed + 1e-6)
    assert keep.tolist() == [0]
    # a score exactly at the threshold is a candidate
    keep, _ = soft_nms(boxes[:1], np.array([0.5], np.float32), score_threshold=0.5)
    assert keep.tolist() == [0]


def test_ties_pick_lowest_index() -> None:
    boxes = np.array([[0, 0, 1, 1], [10, 10, 11, 11], [20, 20, 21, 21]], np.float32)
    keep, _ = soft_nms(boxes, np.array([0.5, 0.7, 0.7], np.float32))
    assert keep.tolist() == [1, 2, 0]


def test_empty_and_degenerate() -> None:
    keep, kept = soft_nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))
    assert keep.shape == (0,) and kept.shape == (0,) and kept.dtype == np.float32
    # zero-area boxes: union 0 -> IoU 0, nothing decays
    boxes = np.array([[1, 1, 1, 1], [1, 1, 1, 1]], np.float32)
    keep, kept = soft_nms(boxes, np.array([0.9, 0.8], np.float32))
    assert keep.tolist() == [0, 1] and kept.tolist() == pytest.approx([0.9, 0.8])


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="method"):
        soft_nms(np.zeros((1, 4), np.float32), np.ones(1, np.float32), method="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="boxes"):
        soft_nms(np.zeros((2, 3), np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="iou_threshold"):
        soft_nms(np.zeros((1, 4), np.float32), np.ones(1, np.float32), iou_threshold=-0.1)


boxes_st = st.integers(0, 60).flatmap(
    lambda n: st.tuples(
        st.lists(
            st.tuples(st.floats(0, 100), st.floats(0, 100), st.floats(0.5, 40), st.floats(0.5, 40)),
            min_size=n,
            max_size=n,
        ),
        st.lists(st.floats(0.0, 1.0, width=32), min_size=n, max_size=n),
    )
)


def _arrays(raw):
    xywh, sc = raw
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in xywh], np.float32).reshape(-1, 4)
    return boxes, np.array(sc, np.float32)


@settings(max_examples=150, deadline=None)
@given(boxes_st, st.sampled_from(["gaussian", "linear", "hard"]))
def test_never_raises_a_score(raw, method) -> None:
    boxes, scores = _arrays(raw)
    keep, kept = soft_nms(boxes, scores, method, score_threshold=0.01)
    assert np.all(kept <= scores[keep] + 1e-7)
    assert np.all(np.diff(kept) <= 1e-7)  # selected scores never increase


@settings(max_examples=150, deadline=None)
@given(boxes_st, st.randoms(use_true_random=False))
def test_permutation_invariant(raw, rnd) -> None:
    boxes, scores = _arrays(raw)
    # Ties are broken by index, so compare on distinct scores only.
    scores = scores + np.arange(len(scores), dtype=np.float32) * 1e-4
    perm = list(range(len(scores)))
    rnd.shuffle(perm)
    perm = np.array(perm, np.int64)
    keep, kept = soft_nms(boxes, scores, score_threshold=0.01)
    keep_p, kept_p = soft_nms(boxes[perm], scores[perm], score_threshold=0.01)
    assert perm[keep_p].tolist() == keep.tolist()
    np.testing.assert_allclose(kept_p, kept, atol=1e-6)


def test_batched_is_per_group() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    groups = np.array([0, 1, 0])
    keep, kept = batched_soft_nms(boxes, scores, groups, SoftNMSParams(method="hard", iou_threshold=0.5))
    assert keep.tolist() == [0, 1]  # box 2 suppressed by box 0 (same class), box 1 untouched
    assert kept.tolist() == pytest.approx([0.9, 0.8])
