"""The pipeline, in-process: decode -> plan -> crop -> infer -> adapt -> postprocess -> merge.

``Pipeline.detect`` runs it synchronously (CLI, evaluation, benchmarks); ``Pipeline.detect_async``
runs the same stages with inference through the shared dynamic :class:`~service.batch.Batcher`
(the HTTP service). Both call the same stage functions, so results are identical.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service import metrics
from service.adapters import Adapter, ChipDetections, get_adapter, split_outputs
from service.batch import Batcher, Priority, Reservation, Submission
from service.crop import Normalizer
from service.engines import Engine, EngineConfig, create_engine
from service.errors import InvalidOptions
from service.focus import FocusConfig, FocusRun, LevelFocus
from service.modelcard import ModelCard
from service.options import DetectOptions
from service.plan import ChipPlan, LevelSpec, PlanConfig, PlanError, levels_for_object_range, plan
from service.postprocess import Detections, merge, postprocess
from service.soft_nms_gpu import CPU_ONLY, SoftNmsDispatch, require_gpu
from service.staging import BatchPart, Preprocess, Staging, select_staging


@dataclass
class Result:
    """One image's detections (original pixels) with its plan and per-stage seconds."""

    image_size: tuple[int, int]  # (width, height)
    detections: Detections
    plan: ChipPlan
    timings: dict[str, float] = field(default_factory=dict)
    focus: list[LevelFocus] | None = None  # per level, coarse to fine, when the request ran FocusChips

    @property
    def num_chips(self) -> int:
        return self.plan.num_chips

    # Shorthands used by evaluation code.
    @property
    def boxes(self) -> np.ndarray:
        return self.detections.boxes

    @property
    def scores(self) -> np.ndarray:
        return self.detections.scores

    @property
    def classes(self) -> np.ndarray:
        return self.detections.classes

    @property
    def levels(self) -> np.ndarray:
        return self.detections.levels


@dataclass
class Prepared:
    """A planned, resized image waiting for inference."""

    plan: ChipPlan
    level_images: list[Any]  # where the pipeline's staging keeps them: host memory, or the GPU
    threshold: float
    timings: dict[str, float]


FOCUS_SHARE_WINDOW = 64  # recent focus runs (per size class) whose share of their pyramid admission plans with
FOCUS_SHARE_MIN_RUNS = 8  # before this many of its size class have run, admission reserves a focus run's pyramid


def size_class(pyramid_chips: int) -> int:
    """The size class of a request whose pyramid has ``pyramid_chips`` chips: pyramids of 2^(k-1) to 2^k - 1 chips
    share class k. The share of its pyramid a focus run needs falls with the image's size (the coarse levels always
    run whole; a large image's finest level is mostly background), so it is measured per class: measured at 3x
    overload, a 16-chip image ran 15 of its chips and a 116-chip image 25."""
    return pyramid_chips.bit_length()


def _card_levels(options: DetectOptions) -> bool:
    """Whether ``options`` run the levels of a card preset (no explicit levels or object sizes of their own)."""
    return options.levels is None and options.min_object_size is None and options.max_object_size is None


@dataclass(frozen=True)
class Admission:
    """The chips admission reserves for a request (a focus run: the share of its pyramid it is expected to run) and
    the chips its edf target is sized by (its whole pyramid, like the targets of its levels)."""

    chips: int
    pyramid: int


@dataclass(frozen=True)
class Route:
    """How one request's chips go to the shared batcher: its deadline and lane, when it reached the service (for the
    queueing bound), and what the batcher's admission returned for it (its first chips take that place)."""

    deadline: float = math.inf  # time.monotonic()
    priority: Priority = "interactive"
    arrival: float | None = None  # time.monotonic()
    reservation: Reservation | None = None


class Pipeline:
    """Stages bound to one engine and its model card. Thread-safe: holds no per-request state."""

    def __init__(
        self,
        engine: Engine,
        max_chips: int = 4096,
        edge_margin: float = 2.0,
        preprocess: Preprocess = "auto",
        soft_nms: SoftNmsDispatch = CPU_ONLY,
    ) -> None:
        self.engine = engine
        self.card: ModelCard = engine.card
        self.norm = Normalizer.from_card(self.card)
        self.adapter: Adapter = get_adapter(self.card)
        self.max_chips = max_chips
        self.edge_margin = edge_margin
        # Where resizing and cropping run (service.staging): on the GPU when the engine takes device input.
        self.staging: Staging = select_staging(engine, self.norm, preprocess)
        require_gpu(soft_nms)  # an explicit GPU soft-NMS that cannot run fails here, at startup
        self.soft_nms = soft_nms
        # chips run / pyramid chips of recent focus runs per size class: admission reserves a focus run's expected share
        self._focus_shares: collections.defaultdict[int, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=FOCUS_SHARE_WINDOW)
        )

    @classmethod
    def load(
        cls,
        model_path: str | Path | None,
        engine: EngineConfig | None = None,
        max_chips: int = 4096,
        edge_margin: float = 2.0,
        preprocess: Preprocess = "auto",
    ) -> Pipeline:
        """Load a model (ONNX Runtime on the CPU unless ``engine`` says otherwise)."""
        cfg = engine or EngineConfig()
        path = Path(model_path) if model_path is not None else None
        return cls(create_engine(path, cfg), max_chips=max_chips, edge_margin=edge_margin, preprocess=preprocess)

    # ---- stages ----------------------------------------------------------------------------
    def levels_for(self, options: DetectOptions) -> tuple[LevelSpec, ...]:
        """The level specs an options object asks for: explicit, from an object size range, or a preset."""
        if options.levels is not None:
            return options.levels
        if options.min_object_size is not None or options.max_object_size is not None:
            lo = options.min_object_size or 1.0
            hi = options.max_object_size or 1e5
            if lo >= hi:
                raise InvalidOptions(f"min_object_size {lo} must be below max_object_size {hi}")
            return levels_for_object_range(lo, hi, self.card.sweet_spot)
        try:
            return self.card.levels_preset(options.preset)
        except KeyError:
            raise InvalidOptions(
                f"unknown levels preset {options.preset!r}; this model has {self.card.preset_names}"
            ) from None

    def plan_config(self, options: DetectOptions) -> PlanConfig:
        return PlanConfig(
            chip_size=self.card.input_size,
            levels=self.levels_for(options),
            sweet_spot=self.card.sweet_spot,
            edge_margin=self.edge_margin,
            max_chips=self.max_chips,
        )

    def brownout_options(self, options: DetectOptions) -> DetectOptions | None:
        """The 'focus' variant of a request that runs the card's default pyramid (preset 'default', no explicit
        levels or object sizes), for brownout under load; None for any other request (it keeps what it asked), and
        for models without a focus head: the detection fallback's accuracy on their data is unmeasured, so their
        requests are not degraded to it behind the client's back (preset 'focus' still runs it when asked)."""
        if (
            not self.card.has_focus_head
            or not _card_levels(options)
            or options.preset != "default"
            or self.card.is_focus("default")
        ):
            return None
        return options.model_copy(update={"preset": "focus"})

    def focus_config(self, options: DetectOptions) -> FocusConfig | None:
        """FocusChips settings when ``options`` ask for the focus mode (preset 'focus', or 'default' on a card whose
        default mode is focus), else None. Models without a focus head use the detection fallback."""
        focus = _card_levels(options) and self.card.is_focus(options.preset)
        if not focus:
            if options.focus_threshold is not None:
                raise InvalidOptions(
                    f"focus_threshold applies to the 'focus' preset only (this request runs preset {options.preset!r}"
                    f"{' with explicit levels' if options.levels is not None else ''})"
                )
            return None
        spec = self.card.focus_spec
        threshold = spec.threshold if options.focus_threshold is None else options.focus_threshold
        return FocusConfig(
            threshold=threshold,
            stride=spec.stride,
            source=spec.source,
            dilate=spec.dilate,
            min_size=spec.min_size,
            placement=spec.placement,
            pad=spec.pad,
        )

    def threshold(self, options: DetectOptions) -> float:
        return self.card.score_threshold if options.score_threshold is None else options.score_threshold

    def admission_chips(self, image_size: tuple[int, int], options: DetectOptions) -> Admission:
        """What admission counts for a request, from the image size only: its pyramid's chips, or for a focus run the
        share of them that recent focus runs of its :func:`size_class` used (their mean: a queue holds many requests,
        and what the schedule needs right is their sum; the whole pyramid until ``FOCUS_SHARE_MIN_RUNS`` of the class
        have run). A focus run's levels are queued one by one without a time check of their own, so admission
        reserves them up front; each level's chips then take their place in the reservation."""
        try:
            chip_plan = plan(image_size, self.plan_config(options))
        except (PlanError, ValueError) as exc:
            raise InvalidOptions(str(exc)) from exc
        pyramid = chip_plan.num_chips
        shares = self._focus_shares.get(size_class(pyramid), ())
        if self.focus_config(options) is None or len(shares) < FOCUS_SHARE_MIN_RUNS:
            return Admission(pyramid, pyramid)
        share = float(np.mean(shares))
        return Admission(max(1, math.ceil(pyramid * min(share, 1.0))), pyramid)

    def check_classes(self, options: DetectOptions) -> None:
        if options.classes is not None:
            bad = [c for c in options.classes if not 0 <= c < len(self.card.classes)]
            if bad:
                raise InvalidOptions(f"unknown class ids {bad}; this model has ids 0..{len(self.card.classes) - 1}")

    def prepare(self, image: np.ndarray, options: DetectOptions) -> Prepared:
        """Plan and resize: ``image`` is ``uint8 [H, W, 3]`` RGB."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidOptions(f"image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        self.check_classes(options)
        t0 = time.perf_counter()
        try:
            chip_plan = plan((image.shape[1], image.shape[0]), self.plan_config(options))
        except (PlanError, ValueError) as exc:
            raise InvalidOptions(str(exc)) from exc
        t1 = time.perf_counter()
        level_images = self.staging.levels(image, chip_plan)
        t2 = time.perf_counter()
        return Prepared(chip_plan, level_images, self.threshold(options), {"plan": t1 - t0, "crop": t2 - t1})

    def infer_chips(self, prepared: Prepared) -> ChipDetections:
        """Crop and run every chip of ``prepared`` in engine-sized batches (the synchronous path)."""
        return self.run_chips(prepared, prepared.plan.chips, prepared.threshold)[0]

    def run_chips(
        self, prepared: Prepared, chips: np.ndarray, threshold: float
    ) -> tuple[ChipDetections, np.ndarray | None]:
        """Run ``chips`` (``int32 [K, 3]`` of ``prepared``'s levels) synchronously: their detections (chip = row of
        ``chips``) and, when the model has a focus head, their focus maps ``float32 [K, h, w]``."""
        b = self.engine.max_batch
        if len(chips) == 0:
            return ChipDetections.empty(), None
        buffer = self.staging.new_buffer(min(b, len(chips)))
        parts: list[ChipDetections] = []
        maps: list[np.ndarray] = []
        crop_s = infer_s = 0.0
        for start in range(0, len(chips), b):
            sub = chips[start : start + b]
            t0 = time.perf_counter()
            staged = self.staging.fill([BatchPart(prepared.level_images, sub, 0)], buffer)
            t1 = time.perf_counter()
            outputs = self.staging.infer(staged)
            t2 = time.perf_counter()
            thresholds = np.full(len(sub), threshold, np.float32)
            det_outputs, focus = split_outputs(outputs, self.card)
            d = self.adapter(det_outputs, self.card, thresholds)
            parts.append(ChipDetections(d.chip + start, d.boxes, d.scores, d.classes))
            if focus is not None:
                maps.append(focus[: len(sub), 0])
            crop_s, infer_s = crop_s + t1 - t0, infer_s + t2 - t1
        prepared.timings["crop"] += crop_s
        prepared.timings["infer"] = prepared.timings.get("infer", 0.0) + infer_s
        return ChipDetections.concat(parts), np.concatenate(maps) if maps else None

    def finish(self, prepared: Prepared, chip_dets: ChipDetections, options: DetectOptions) -> Result:
        """Postprocess and merge one image's chip detections."""
        t0 = time.perf_counter()
        dets = postprocess(chip_dets, prepared.plan, edge_filter=options.edge_filter, classes=options.classes)
        t1 = time.perf_counter()
        merged = merge(dets, options.merge, prepared.threshold, options.max_detections, self.soft_nms)
        t2 = time.perf_counter()
        prepared.timings |= {"postprocess": t1 - t0, "merge": t2 - t1}
        return Result(prepared.plan.image_size, merged, prepared.plan, prepared.timings)

    # ---- whole pipeline --------------------------------------------------------------------
    def detect(self, image: np.ndarray, options: DetectOptions | None = None) -> Result:
        """Detect objects in ``image`` (``uint8 [H, W, 3]`` RGB), synchronously, in this thread."""
        options = options or DetectOptions()
        focus = self.focus_config(options)
        prepared = self.prepare(image, options)
        if focus is None:
            return self.finish(prepared, self.infer_chips(prepared), options)
        run = FocusRun(prepared.plan, focus, prepared.threshold)
        while (chips := run.next_chips()) is not None:
            dets, maps = self.run_chips(prepared, chips, run.chip_threshold())
            run.add(chips, dets, maps)
        return self.finish_focus(prepared, run, options)

    def finish_focus(self, prepared: Prepared, run: FocusRun, options: DetectOptions) -> Result:
        """:meth:`finish` on the chips a focus run ran; the result carries its per-level focus record."""
        prepared.plan = run.plan()
        result = self.finish(prepared, run.detections(), options)
        return dataclasses.replace(result, focus=run.levels)

    async def detect_async(
        self,
        image: np.ndarray,
        options: DetectOptions,
        batcher: Batcher,
        route: Route = Route(),
    ) -> Result:
        """Same as :meth:`detect`, with inference through the shared ``batcher``, the request's chips going as
        ``route`` says (deadline, lane, arrival, admission reservation)."""
        loop = asyncio.get_running_loop()
        focus = self.focus_config(options)
        # Resizing and merging are CPU work on large arrays: keep them off the event loop.
        prepared = await loop.run_in_executor(None, self.prepare, image, options)
        prepared.timings |= {"queue_wait": 0.0, "infer": 0.0}
        if focus is None:
            metrics.CHIPS_PER_REQUEST.observe(prepared.plan.num_chips)
            chip_dets, _ = await self._submit(batcher, route, prepared, prepared.plan, prepared.threshold)
            done = time.monotonic()
            result = await loop.run_in_executor(None, self.finish, prepared, chip_dets, options)
            batcher.note_finish(time.monotonic() - done, prepared.plan.num_chips)
            return result
        # FocusChips: one level at a time, coarse to fine; each level's chips share batches with other requests.
        pyramid = prepared.plan.num_chips  # (finish_focus replaces prepared.plan with the chips that ran)
        run = FocusRun(prepared.plan, focus, prepared.threshold)
        first = True
        while (chips := run.next_chips()) is not None:
            sub = dataclasses.replace(prepared.plan, chips=chips)
            dets, maps = await self._submit(batcher, route, prepared, sub, run.chip_threshold(), not first)
            run.add(chips, dets, maps)
            first = first and sub.num_chips == 0
        done = time.monotonic()
        result = await loop.run_in_executor(None, self.finish_focus, prepared, run, options)
        batcher.note_finish(time.monotonic() - done, result.num_chips)
        metrics.CHIPS_PER_REQUEST.observe(result.num_chips)
        metrics.observe_focus(result.focus or [])
        self._focus_shares[size_class(pyramid)].append(result.num_chips / max(pyramid, 1))
        return result

    async def _submit(
        self,
        batcher: Batcher,
        route: Route,
        prepared: Prepared,
        plan: ChipPlan,
        threshold: float,
        continuation: bool = False,
    ) -> tuple[ChipDetections, np.ndarray | None]:
        """``plan``'s chips through ``batcher`` as ``route`` says; their detections and (focus-head models) focus
        maps. ``continuation``: a later part of the request (a focus run's finer level)."""
        if plan.num_chips == 0:
            return ChipDetections.empty(), None
        want_focus = self.card.has_focus_head
        final = plan is prepared.plan or bool((plan.chips[:, 0] == 0).all())  # the whole plan, or the finest level
        how = Submission(route.arrival, want_focus, continuation, route.reservation, prepared.plan.num_chips, final)
        work = await batcher.submit(plan, prepared.level_images, threshold, route.deadline, route.priority, how)
        chip_dets = await work.future
        for k in ("crop", "queue_wait", "infer"):
            prepared.timings[k] += work.timings[k]
        return chip_dets, work.focus
