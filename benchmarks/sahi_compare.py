"""snipserve's pipeline vs SAHI on the same ONNX model and the same validation images.

Run it from SAHI's own environment, so SAHI's non-headless OpenCV never enters the service's::

    python3 -m venv benchmarks/.venv-sahi
    benchmarks/.venv-sahi/bin/pip install sahi onnxruntime pycocotools prometheus_client pydantic pyyaml
    benchmarks/.venv-sahi/bin/python benchmarks/sahi_compare.py --model models/snipserve_default.onnx \\
        --data data/val --images 60 --json runs/bench/sahi_compare.json

Both sides run in this one process, on the same ONNX Runtime session settings (``--threads``), on the
same decoded RGB images, with the same score threshold; images are decoded outside the timed region.
For every image both methods run back to back, in alternating order, so CPU contention from anything
else on the machine hits both equally. Accuracy: COCO AP (pycocotools) on the same image subset.

Configurations (all on the same model):

- ``sahi``: ``get_sliced_prediction`` with slices of the model's input size ``C``, overlap ``--overlap``,
  the full-image pass (``perform_standard_pred``), NMS/IOU 0.5 merge, ``batch_size=--batch`` (SAHI's
  batched path, with our wrapper running each batch as one ONNX Runtime call, its best case).
- ``snipserve-equal``: our pipeline with *the same slicing*: one level at scale 1 with the same overlap,
  plus one whole-image level (long side ``C``): equal chips, so the ratio measures the implementation.
- ``snipserve-default``: our pipeline with the model card's default pyramid (what the service runs).
- ``snipserve-focus`` (every card has the preset; models without a focus head use the detection fallback) and
  ``snipserve-focus-t<T>`` for each ``--focus-threshold T``: the default levels coarse to fine in FocusChips only.

- ``snipserve-default-service`` (with ``--in-flight K``): the default pyramid through the service's
  dynamic batcher with ``K`` images in flight, as ``snipserve serve`` runs it under load (cropping of the
  next batch overlaps inference; one image's merge overlaps the next one's chips). Measured in a phase of
  its own after the interleaved ones (images decoded beforehand), so compare it at a quiet moment.

Also reported: the engine-only limit (images/s if the engine were the only cost: chips per image of
``snipserve-default`` divided into the engine's chips/s at ``--batch``) and the pipeline's share of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sahi.models.base import DetectionModel  # noqa: E402
from sahi.predict import get_sliced_prediction  # noqa: E402
from sahi.prediction import ObjectPrediction  # noqa: E402

from service.adapters import get_adapter  # noqa: E402
from service.batch import Batcher, BatcherConfig  # noqa: E402
from service.crop import Normalizer, chip_buffer, write_chip_as  # noqa: E402
from service.engines import EngineConfig  # noqa: E402
from service.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402
from service.options import DetectOptions  # noqa: E402
from service.pipeline import Pipeline  # noqa: E402
from service.plan import LevelSpec, plan  # noqa: E402

Boxes = tuple[np.ndarray, np.ndarray, np.ndarray]  # xyxy float32 [N, 4], scores [N], classes int32 [N]
ENGINE_ONLY = "engine-only-default"


# ---- SAHI wrapper -------------------------------------------------------------------------------------------
class SnipserveOnnxModel(DetectionModel):  # type: ignore[misc]
    """A SAHI ``DetectionModel`` running our ONNX model through ONNX Runtime and decoding its outputs with
    our adapter. A slice (or the whole image, for SAHI's standard pass) larger than the model input is
    resized to fit, keeping its aspect ratio; every input is padded to ``C x C`` at the top left."""

    def load_model(self) -> None:
        raise RuntimeError("pass model=OnnxRuntimeEngine(...)")

    def set_model(self, model: Any, **kwargs: Any) -> None:
        self.model = model
        self.norm = Normalizer.from_card(model.card)
        self.adapter = get_adapter(model.card)
        self.category_mapping = {str(i): name for i, name in enumerate(model.card.classes)}
        self.slices = 0  # model inputs so far (slices plus whole-image passes)

    def _prepare(self, image: np.ndarray, buffer: np.ndarray) -> float:
        """Write ``image`` (``uint8 [H, W, 3]`` RGB) into ``buffer`` (one chip in the engine's input layout);
        returns the resize factor."""
        c = self.model.card.input_size
        h, w = image.shape[:2]
        scale = min(1.0, c / max(h, w))
        if scale < 1.0:
            image = cv2.resize(
                image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
            )
        write_chip_as(self.model.input_layout, buffer, image, 0, 0, self.norm)  # the pipeline's own chip writer
        return scale

    def _run(self, images: Sequence[np.ndarray]) -> list[Boxes]:
        self.slices += len(images)
        c = self.model.card.input_size
        batch = chip_buffer(self.model.input_layout, len(images), c)
        scales = [self._prepare(img, batch[i]) for i, img in enumerate(images)]
        outputs = self.model.infer(batch)
        thresholds = np.full(len(images), self.confidence_threshold, np.float32)
        dets = self.adapter(outputs, self.model.card, thresholds)
        per_image = []
        for i, scale in enumerate(scales):
            keep = dets.chip == i
            per_image.append((dets.boxes[keep] / scale, dets.scores[keep], dets.classes[keep]))
        return per_image

    def perform_inference(self, image: np.ndarray) -> None:
        self._original_predictions = self._run([image])

    def perform_batch_inference(self, images: list[np.ndarray]) -> None:
        self._batch_images = None  # native batching: SAHI must not re-run images one by one
        self._original_predictions = self._run(images)

    def _create_object_prediction_list_from_original_predictions(
        self,
        shift_amount_list: list[list[int | float]] | None = None,
        full_shape_list: list[list[int | float]] | None = None,
    ) -> None:
        shifts = _as_list_of_pairs(shift_amount_list or [[0, 0]])
        shapes = _as_list_of_pairs(full_shape_list) if full_shape_list else None
        result = []
        for i, (boxes, scores, classes) in enumerate(self._original_predictions):
            preds = []
            for box, score, cls in zip(boxes.tolist(), scores.tolist(), classes.tolist(), strict=True):
                if box[2] <= box[0] or box[3] <= box[1]:
                    continue
                preds.append(
                    ObjectPrediction(
                        bbox=box,
                        category_id=int(cls),
                        category_name=self.category_mapping[str(int(cls))],
                        score=float(score),
                        shift_amount=shifts[i],
                        full_shape=shapes[i] if shapes else None,
                    )
                )
            result.append(preds)
        self._object_prediction_list_per_image = result


def _as_list_of_pairs(value: Any) -> list[list[int | float]]:
    """SAHI passes ``[x, y]`` for one image and ``[[x, y], ...]`` for several."""
    if value and not isinstance(value[0], list | tuple):
        return [list(value)]
    return [list(v) for v in value]


# ---- the methods --------------------------------------------------------------------------------------------
@dataclass
class Method:
    name: str
    detect: Callable[[np.ndarray], Boxes]
    seconds: list[float] = field(default_factory=list)
    chips: list[int] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)


def sahi_method(name: str, engine: OnnxRuntimeEngine, args: argparse.Namespace, batch: int) -> Method:
    model = SnipserveOnnxModel(model=engine, confidence_threshold=args.score_threshold, device="cpu")
    c = engine.card.input_size
    chips: list[int] = []

    def detect(image: np.ndarray) -> Boxes:
        before = model.slices
        result = get_sliced_prediction(
            image, model, slice_height=c, slice_width=c,
            overlap_height_ratio=args.overlap, overlap_width_ratio=args.overlap,
            perform_standard_pred=True, postprocess_type="NMS", postprocess_match_metric="IOU",
            postprocess_match_threshold=0.5, verbose=0, batch_size=batch, force_postprocess_type=True,
        )  # fmt: skip
        chips.append(model.slices - before)
        preds = result.object_prediction_list
        boxes = np.asarray([p.bbox.to_xyxy() for p in preds], np.float32).reshape(-1, 4)
        scores = np.asarray([p.score.value for p in preds], np.float32)
        classes = np.asarray([p.category.id for p in preds], np.int32)
        return boxes, scores, classes

    return Method(name, detect, chips=chips)


def pipeline_method(name: str, pipeline: Pipeline, options: DetectOptions, chips: list[int]) -> Method:
    def detect(image: np.ndarray) -> Boxes:
        result = pipeline.detect(image, options)
        chips.append(result.num_chips)
        return result.boxes, result.scores, result.classes

    return Method(name, detect, chips=chips)


def equal_slicing_options(card: Any, overlap: float, threshold: float) -> DetectOptions:
    """SAHI's slicing in our terms: one level at scale 1 (overlap as SAHI's) plus one whole-image level."""
    levels = (LevelSpec(scale=1.0, overlap=overlap), LevelSpec(long_side=card.input_size))
    return DetectOptions(levels=levels, score_threshold=threshold, max_detections=1000)


async def _service_run(
    pipeline: Pipeline, images: list[np.ndarray], options: DetectOptions, in_flight: int, batch: int
) -> tuple[float, list[Boxes], list[int]]:
    """All ``images`` through a :class:`Batcher` with ``in_flight`` at a time: (wall seconds, boxes, chips)."""
    config = BatcherConfig(max_batch=batch, max_delay_ms=2.0)
    batcher = Batcher(pipeline.engine, pipeline.adapter, pipeline.norm, config, pipeline.staging)
    await batcher.start()
    gate = asyncio.Semaphore(in_flight)

    async def one(image: np.ndarray) -> tuple[Boxes, int]:
        async with gate:
            r = await pipeline.detect_async(image, options, batcher)
            return (r.boxes, r.scores, r.classes), r.num_chips

    try:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(im) for im in images))
        wall = time.perf_counter() - t0
    finally:
        await batcher.stop()
    return wall, [d[0] for d in done], [d[1] for d in done]


def service_method(
    pipeline: Pipeline, images: list[np.ndarray], options: DetectOptions, args: argparse.Namespace, label: str
) -> Method:
    """``options`` (the default pyramid, or focus) through the dynamic batcher, ``--in-flight`` images at a time
    (one timed phase): requests' chips share engine batches, as in the service."""
    wall, boxes, chips = asyncio.run(_service_run(pipeline, images, options, args.in_flight, args.batch))
    m = Method(f"snipserve-{label}-service{args.in_flight}", lambda image: boxes[0], chips=chips)
    m.seconds = [wall / len(images)] * len(images)
    m.boxes = boxes  # type: ignore[attr-defined]
    return m


# ---- data and scoring ---------------------------------------------------------------------------------------
def load_coco(data: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((data / "annotations.json").read_text())
    return doc


def coco_results(image_id: int, boxes: Boxes, class_to_category: dict[int, int]) -> list[dict[str, Any]]:
    b, s, k = boxes
    return [
        {"image_id": image_id, "category_id": class_to_category[int(c)],
         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(sc)}
        for (x1, y1, x2, y2), sc, c in zip(b.tolist(), s.tolist(), k.tolist(), strict=True)
    ]  # fmt: skip


def coco_ap(gt_path: Path, results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, float]:
    """AP, AP50, AP75, AP_small, AP_medium, AP_large (pycocotools; -1 where undefined)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        if not results:
            return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "AP_small": 0.0, "AP_medium": 0.0, "AP_large": 0.0}
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    names = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")
    return {n: float(v) for n, v in zip(names, ev.stats[:6], strict=True)}


def engine_only_method(pipeline: Pipeline, options: DetectOptions, batch: int) -> Method:
    """The engine alone on as many chips as ``options`` plans for each image (zero inputs, batches of
    ``batch``): the images/s limit if cropping, decoding outputs and merging cost nothing. Interleaved
    with the other methods, so it sees the same CPU contention."""
    x = chip_buffer(pipeline.engine.input_layout, batch, pipeline.card.input_size)
    x[...] = 0
    chips: list[int] = []

    def detect(image: np.ndarray) -> Boxes:
        n = plan((image.shape[1], image.shape[0]), pipeline.plan_config(options)).num_chips  # microseconds
        for start in range(0, n, batch):
            pipeline.engine.infer(x[: min(batch, n - start)])
        chips.append(n)
        return np.empty((0, 4), np.float32), np.empty(0, np.float32), np.empty(0, np.int32)

    return Method(ENGINE_ONLY, detect, chips=chips)


def comparisons(methods: dict[str, dict[str, Any]], chips_per_s: float) -> list[dict[str, Any]]:
    """Every snipserve configuration against both SAHI runs: throughput ratio and AP difference, plus the
    configuration's engine-only limit (engine chips/s over its chips per image) and its share of it."""
    rows = []
    for name, ours in methods.items():
        if not name.startswith("snipserve"):
            continue
        limit = chips_per_s / ours["chips_per_image_mean"]
        for ref in (m for m in methods if m.startswith("sahi")):
            rows.append(
                {"ours": name, "sahi": ref,
                 "throughput_ratio": ours["images_per_s"] / methods[ref]["images_per_s"],
                 "AP_diff": ours["AP"] - methods[ref]["AP"], "AP50_diff": ours["AP50"] - methods[ref]["AP50"],
                 "engine_limit_images_per_s": limit, "share_of_engine_limit": ours["images_per_s"] / limit}
            )  # fmt: skip
    return rows


# ---- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=REPO / "models" / "snipserve_default.onnx")
    p.add_argument("--data", type=Path, default=REPO / "data" / "val", help="images/ + annotations.json (COCO)")
    p.add_argument("--images", type=int, default=60, help="first N images of the set")
    p.add_argument("--score-threshold", type=float, default=0.05, help="the same for every method")
    p.add_argument("--overlap", type=float, default=0.2, help="slice overlap ratio (SAHI) = level overlap (ours)")
    p.add_argument("--batch", type=int, default=8, help="chips per engine call, both sides")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    p.add_argument("--seed", type=int, default=0, help="order of the methods per image")
    p.add_argument("--in-flight", type=int, default=4, help="images in flight for the service-path phase (0: skip)")
    p.add_argument(
        "--levels", action="append", default=[], metavar="NAME=JSON",
        help='extra snipserve configuration, e.g. coarse=\'[{"scale": 0.6}, {"long_side": 256}]\'',
    )  # fmt: skip
    p.add_argument(
        "--focus-threshold", type=float, action="append", default=[],
        help="one more focus row (snipserve-focus-t<T>) at this focus threshold; repeat for several",
    )  # fmt: skip
    p.add_argument(
        "--service-focus-threshold", type=float, action="append", default=[],
        help="with --in-flight: also run focus at this threshold through the batcher; repeat for several",
    )  # fmt: skip
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = EngineConfig(max_batch=args.batch, intra_op_threads=args.threads)
    engine = OnnxRuntimeEngine(args.model, config)
    card = engine.card
    pipeline = Pipeline(engine)
    coco = load_coco(args.data)
    by_name = {c["name"]: c["id"] for c in coco["categories"]}
    class_to_category = {i: by_name[name] for i, name in enumerate(card.classes)}
    images = coco["images"][: args.images]

    threshold = args.score_threshold
    default_opts = DetectOptions(score_threshold=threshold, max_detections=1000)
    methods = [
        sahi_method("sahi", engine, args, batch=1),  # SAHI's default: one slice per model call
        sahi_method(f"sahi-batch{args.batch}", engine, args, batch=args.batch),
        pipeline_method("snipserve-equal", pipeline, equal_slicing_options(card, args.overlap, threshold), []),
    ]
    methods.append(engine_only_method(pipeline, default_opts, args.batch))
    for preset in card.preset_names:
        if preset == "pyramid" and card.default_mode == "pyramid":
            continue  # the same run as snipserve-default
        opts = DetectOptions(preset=preset, score_threshold=threshold, max_detections=1000)
        methods.append(pipeline_method(f"snipserve-{preset}", pipeline, opts, []))
    for t in args.focus_threshold:
        opts = DetectOptions(preset="focus", focus_threshold=t, score_threshold=threshold, max_detections=1000)
        methods.append(pipeline_method(f"snipserve-focus-t{t:g}", pipeline, opts, []))
    for item in args.levels:
        name, _, levels = item.partition("=")
        opts = DetectOptions.model_validate(
            {"levels": json.loads(levels), "score_threshold": threshold, "max_detections": 1000}
        )
        methods.append(pipeline_method(f"snipserve-{name}", pipeline, opts, []))
    warm = cv2.cvtColor(cv2.imread(str(args.data / images[0]["file_name"])), cv2.COLOR_BGR2RGB)
    for m in methods:  # first-call allocations out of the timings
        m.detect(warm)
        m.chips.clear()
    rng = random.Random(args.seed)
    for k, info in enumerate(images):
        image = cv2.cvtColor(cv2.imread(str(args.data / info["file_name"])), cv2.COLOR_BGR2RGB)
        for m in rng.sample(methods, len(methods)):
            t0 = time.perf_counter()
            boxes = m.detect(image)
            m.seconds.append(time.perf_counter() - t0)
            m.results += coco_results(info["id"], boxes, class_to_category)
        print(f"{k + 1}/{len(images)} " + " ".join(f"{m.name} {m.seconds[-1]:.2f}s" for m in methods), flush=True)

    if args.in_flight > 0:
        decoded = [cv2.cvtColor(cv2.imread(str(args.data / i["file_name"])), cv2.COLOR_BGR2RGB) for i in images]
        phases = [("default", default_opts)] + [
            (
                f"focus-t{t:g}",
                DetectOptions(preset="focus", focus_threshold=t, score_threshold=threshold, max_detections=1000),
            )
            for t in args.service_focus_threshold
        ]
        for label, opts in phases:
            m = service_method(pipeline, decoded, opts, args, label)
            for info, boxes in zip(images, m.boxes, strict=True):  # type: ignore[attr-defined]
                m.results += coco_results(info["id"], boxes, class_to_category)
            methods.append(m)
            print(f"{m.name}: {len(images) / sum(m.seconds):.2f} images/s", flush=True)
        del decoded

    image_ids = [i["id"] for i in images]
    report: dict[str, Any] = {
        "model": str(args.model), "card": card.name, "images": len(images), "score_threshold": args.score_threshold,
        "overlap": args.overlap, "batch": args.batch, "threads": args.threads, "methods": {},
    }  # fmt: skip
    for m in methods:
        total = sum(m.seconds)
        report["methods"][m.name] = {
            "images_per_s": len(images) / total,
            "seconds_per_image_mean": total / len(images),
            "chips_per_image_mean": float(np.mean(m.chips)) if m.chips else None,
            "detections": len(m.results),
            **(coco_ap(args.data / "annotations.json", m.results, image_ids) if m.name != ENGINE_ONLY else {}),
        }
    engine_only = report["methods"].pop(ENGINE_ONLY)
    chips_per_s = engine_only["images_per_s"] * engine_only["chips_per_image_mean"]
    report["engine_only"] = {"chips_per_s": chips_per_s, "default_images_per_s_limit": engine_only["images_per_s"]}
    report["comparisons"] = comparisons(report["methods"], chips_per_s)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
