"""The 'focus' preset end to end: coarse-to-fine FocusChips through the pipeline and the shared batcher.

The fake engine detects saturated colour blobs; its focus stand-in marks the cells that hold one, so FocusChips
must find every blob with far fewer chips than the pyramid, and with the same detections.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from service.batch import Batcher, BatcherConfig
from service.engines.fake import FAKE_CARD, FAKE_FOCUS_CARD, FakeEngine
from service.errors import InvalidOptions
from service.modelcard import ModelCard
from service.options import DetectOptions
from service.pipeline import Admission, Pipeline, Result, size_class
from service.plan import LevelSpec

LEVELS = (LevelSpec(scale=2.0), LevelSpec(scale=1.0), LevelSpec(long_side=128))


def pipeline(card: ModelCard) -> Pipeline:
    return Pipeline(FakeEngine(card=card.model_copy(update={"default_levels": LEVELS}), max_batch=8))


def scene() -> np.ndarray:
    """900x700 grey image with three small blobs (7-10 px) in two corners: small at every level but the finest."""
    img = np.full((700, 900, 3), 128, np.uint8)
    img[60:70, 80:90] = (255, 0, 0)
    img[100:110, 120:128] = (0, 255, 0)
    img[600:607, 800:808] = (0, 0, 255)
    return img


def boxes(r: Result) -> list[tuple[int, ...]]:
    return sorted(tuple(int(round(v)) for v in b) + (int(c),) for b, c in zip(r.boxes, r.classes, strict=True))


@pytest.mark.parametrize("card", [FAKE_FOCUS_CARD, FAKE_CARD], ids=["head", "fallback"])
def test_focus_finds_the_pyramids_objects_with_fewer_chips(card: ModelCard) -> None:
    pipe = pipeline(card)
    img = scene()
    full = pipe.detect(img, DetectOptions(preset="pyramid"))
    focus = pipe.detect(img, DetectOptions(preset="focus", focus_threshold=0.5))
    assert focus.focus is not None and full.focus is None
    assert boxes(focus) == boxes(full) and len(boxes(full)) == 3
    assert focus.num_chips * 2.5 <= full.num_chips, (focus.num_chips, full.num_chips)
    # the coarse level runs first and whole, with the pyramid's own tiling; finer chips lie inside their level
    coarse = {tuple(c) for c in full.plan.chips.tolist() if c[0] == 2}
    assert {tuple(c) for c in focus.plan.chips.tolist() if c[0] == 2} == coarse
    for lv, x0, y0 in focus.plan.chips.tolist():
        level = full.plan.levels[lv]
        assert 0 <= x0 <= max(level.width - 128, 0) and 0 <= y0 <= max(level.height - 128, 0)
    assert [lv.index for lv in focus.focus] == [2, 1, 0]
    assert focus.focus[0].area == 1.0 and all(0 < lv.area < 0.5 for lv in focus.focus[1:])
    per_level = np.bincount(focus.plan.chips[:, 0], minlength=3)
    assert [lv.chips for lv in focus.focus] == [int(per_level[2]), int(per_level[1]), int(per_level[0])]


def test_tiling_placement_runs_a_subset_of_the_pyramids_chips() -> None:
    spec = FAKE_FOCUS_CARD.focus_spec.model_copy(update={"placement": "tiling"})
    pipe = pipeline(FAKE_FOCUS_CARD.model_copy(update={"focus": spec}))
    free = pipeline(FAKE_FOCUS_CARD)
    img = scene()
    full = pipe.detect(img, DetectOptions(preset="pyramid"))
    snapped = pipe.detect(img, DetectOptions(preset="focus", focus_threshold=0.5))
    placed = free.detect(img, DetectOptions(preset="focus", focus_threshold=0.5))
    assert {tuple(c) for c in snapped.plan.chips.tolist()} <= {tuple(c) for c in full.plan.chips.tolist()}
    assert boxes(snapped) == boxes(placed) == boxes(full)
    assert placed.num_chips <= snapped.num_chips


def test_head_with_detections_takes_the_max_of_both_maps() -> None:
    """A focus head that misses a blob (all-zero maps) still finds it through the coarse level's detections."""

    class BlindHead(FakeEngine):
        def _focus(self, batch: np.ndarray) -> np.ndarray:
            return np.zeros_like(super()._focus(batch))

    def run(with_detections: bool) -> Result:
        spec = FAKE_FOCUS_CARD.focus_spec.model_copy(update={"with_detections": with_detections})
        card = FAKE_FOCUS_CARD.model_copy(update={"focus": spec, "default_levels": LEVELS})
        return Pipeline(BlindHead(card=card, max_batch=8)).detect(scene(), DetectOptions(preset="focus"))

    blind, both = run(False), run(True)
    assert [lv.chips for lv in blind.focus or []][1:] == [0, 0]  # the head alone sees nothing
    assert len(boxes(both)) > len(boxes(blind)) and both.num_chips > blind.num_chips


def test_threshold_zero_runs_the_whole_pyramid_and_one_only_what_is_in_focus() -> None:
    pipe = pipeline(FAKE_FOCUS_CARD)
    img = scene()
    full = pipe.detect(img, DetectOptions(preset="pyramid"))
    every = pipe.detect(img, DetectOptions(preset="focus", focus_threshold=0.0))
    assert sorted(every.plan.chips.tolist()) == sorted(full.plan.chips.tolist())
    assert boxes(every) == boxes(full)
    blank = np.full((700, 900, 3), 128, np.uint8)
    nothing = pipe.detect(blank, DetectOptions(preset="focus", focus_threshold=1.0))
    assert nothing.num_chips == 1 and [lv.chips for lv in nothing.focus or []] == [1, 0, 0]


def test_default_mode_focus_and_option_errors() -> None:
    pipe = pipeline(FAKE_FOCUS_CARD.model_copy(update={"default_mode": "focus"}))
    assert pipe.detect(scene()).focus is not None  # preset 'default' runs focus on this card
    assert pipe.detect(scene(), DetectOptions(preset="pyramid")).focus is None
    plain = pipeline(FAKE_FOCUS_CARD)
    with pytest.raises(InvalidOptions, match="focus_threshold"):
        plain.detect(scene(), DetectOptions(focus_threshold=0.4))
    with pytest.raises(InvalidOptions, match="focus_threshold"):
        plain.detect(scene(), DetectOptions(preset="focus", levels=LEVELS, focus_threshold=0.4))


def test_focus_through_the_batcher_matches_the_synchronous_run() -> None:
    pipe = pipeline(FAKE_FOCUS_CARD)
    img = scene()
    sync = pipe.detect(img, DetectOptions(preset="focus"))

    async def run() -> list[Result]:
        batcher = Batcher(pipe.engine, pipe.adapter, pipe.norm, BatcherConfig(max_batch=8), pipe.staging)
        await batcher.start()
        try:
            opts = [DetectOptions(preset="focus"), DetectOptions(preset="pyramid"), DetectOptions(preset="focus")]
            return list(await asyncio.gather(*(pipe.detect_async(img, o, batcher) for o in opts)))
        finally:
            await batcher.stop()

    a, full, b = asyncio.run(run())
    for r in (a, b):
        assert sorted(r.plan.chips.tolist()) == sorted(sync.plan.chips.tolist())
        assert boxes(r) == boxes(sync) == boxes(full)
        assert r.focus == sync.focus
    assert {"queue_wait", "infer", "crop"} <= set(a.timings)


def test_brownout_runs_focus_only_for_requests_of_the_default_pyramid() -> None:
    pipe = pipeline(FAKE_FOCUS_CARD)
    degraded = pipe.brownout_options(DetectOptions())
    assert degraded is not None and degraded.preset == "focus" and pipe.focus_config(degraded) is not None
    # what the client chose stays as asked
    assert pipe.brownout_options(DetectOptions(preset="pyramid")) is None
    assert pipe.brownout_options(DetectOptions(levels=LEVELS)) is None
    assert pipe.brownout_options(DetectOptions(min_object_size=10)) is None
    focus_card = FAKE_FOCUS_CARD.model_copy(update={"default_mode": "focus"})
    assert pipeline(focus_card).brownout_options(DetectOptions()) is None  # its default already is focus
    assert pipeline(FAKE_CARD).brownout_options(DetectOptions()) is None  # no focus head: the fallback is not forced


def test_admission_reserves_a_focus_run_by_the_share_recent_runs_used() -> None:
    pipe = pipeline(FAKE_FOCUS_CARD)
    size = (900, 700)
    full = pipe.admission_chips(size, DetectOptions())
    assert full.chips == full.pyramid
    focus = DetectOptions(preset="focus")
    assert pipe.admission_chips(size, focus) == full  # nothing measured yet: all of it
    for _ in range(8):
        pipe.detect(scene(), focus)  # the synchronous path does not record shares
    assert pipe.admission_chips(size, focus) == full
    pipe._focus_shares[size_class(full.pyramid) + 1].extend([0.25] * 8)  # larger images' runs: not this one's
    assert pipe.admission_chips(size, focus) == full
    pipe._focus_shares[size_class(full.pyramid)].extend([0.25] * 8)
    # reserves its expected share; its target stays sized by the whole pyramid
    assert pipe.admission_chips(size, focus) == Admission(math.ceil(full.pyramid * 0.25), full.pyramid)


async def test_focus_runs_record_their_share_by_size_class() -> None:
    pipe = pipeline(FAKE_FOCUS_CARD)
    batcher = Batcher(pipe.engine, pipe.adapter, pipe.norm, BatcherConfig(max_batch=8), pipe.staging)
    await batcher.start()
    try:
        result = await pipe.detect_async(scene(), DetectOptions(preset="focus"), batcher)
    finally:
        await batcher.stop()
    pyramid = pipe.admission_chips((900, 700), DetectOptions()).pyramid
    assert result.num_chips < pyramid
    assert {k: list(v) for k, v in pipe._focus_shares.items()} == {size_class(pyramid): [result.num_chips / pyramid]}
