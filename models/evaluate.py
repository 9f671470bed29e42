"""COCO evaluation of the in-process service pipeline in three inference modes.

- ``single``: the whole image resized into one chip (long side = C), hard NMS.
- ``slices``: SAHI-style uniform tiles at native resolution (overlap 0.2 of the chip) plus a full-image
  pass, no valid ranges, no inner-edge filter, merged with hard NMS at IoU 0.5.
- ``pyramid``: the model card's default SNIP levels (or another preset of the card) with their valid
  ranges, Gaussian soft-NMS.
- ``focus``: the same levels coarse to fine in FocusChips only (AutoFocus, ``service.focus``) at the card's
  focus threshold or ``focus_threshold``; a sweep over thresholds is ``models.focus_eval``.

Every mode runs :meth:`service.pipeline.Pipeline.detect` -- the code the service runs -- and is scored with
pycocotools (AP, AP50, AP75, AP_S/M/L; ``area`` is box area) plus AP in finer size bins for the plot.
Throughput (``images_per_second``) counts the pipeline call only (plan, resize, crop, inference, decode,
postprocess, merge), not JPEG decoding, on whatever this machine is.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.synth import load_coco
from service.options import DetectOptions, MergeConfig
from service.plan import LevelSpec

Mode = Literal["single", "slices", "pyramid", "focus"]
MODES: tuple[Mode, ...] = ("single", "slices", "pyramid")  # 'all'; focus is asked for by name
METRICS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L")
# sqrt(area) bins (original px) for the AP-by-size plot; the first three edges are COCO's 32 and 96 split finer.
SIZE_BINS: tuple[tuple[float, float], ...] = ((0, 12), (12, 20), (20, 32), (32, 64), (64, 96), (96, 192), (192, 1e5))


class EvalConfig(BaseModel):
    """Evaluation settings (COCO conventions)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    score_threshold: float = Field(default=1e-3, ge=0, le=1, description="Keep detections above this score.")
    max_detections: int = Field(default=100, ge=1, description="Detections per image (COCO maxDets).")
    slice_overlap: float = Field(default=0.2, ge=0, lt=1, description="Tile overlap of 'slices', fraction of C.")
    nms_iou: float = Field(default=0.5, gt=0, le=1, description="Hard-NMS IoU of 'single' and 'slices'.")
    soft_nms_sigma: float = Field(default=0.5, gt=0, description="Gaussian soft-NMS sigma of 'pyramid'.")
    preset: str = Field(default="default", description="The model card's levels preset that 'pyramid' runs.")
    focus_threshold: float | None = Field(default=None, ge=0, le=1, description="'focus': threshold (card's).")
    max_images: int | None = Field(default=None, ge=1, description="Evaluate only the first N images.")
    threads: int = Field(default=2, ge=1, description="ONNX Runtime intra-op threads.")
    max_batch: int = Field(default=16, ge=1, description="Chips per engine call.")


def mode_options(mode: Mode, chip: int, cfg: EvalConfig) -> DetectOptions:
    """The per-request options that make ``mode``."""
    common: dict[str, Any] = {"score_threshold": cfg.score_threshold, "max_detections": cfg.max_detections}
    hard = MergeConfig(method="hard", iou_threshold=cfg.nms_iou)
    whole = LevelSpec(long_side=chip, valid=(-1, None))
    if mode == "single":
        return DetectOptions(levels=(whole,), merge=hard, **common)
    if mode == "slices":
        native = LevelSpec(scale=1.0, valid=(-1, None), overlap=cfg.slice_overlap)
        return DetectOptions(levels=(native, whole), merge=hard, edge_filter=False, **common)
    merge = MergeConfig(method="gaussian", sigma=cfg.soft_nms_sigma)
    if mode == "pyramid":
        # 'default' may mean FocusChips on a card whose default mode is focus: 'pyramid' is every chip
        return DetectOptions(preset="pyramid" if cfg.preset == "default" else cfg.preset, merge=merge, **common)
    if mode == "focus":
        return DetectOptions(preset="focus", focus_threshold=cfg.focus_threshold, merge=merge, **common)
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")


def read_rgb(path: Path) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB pixels of an image file."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def coco_scores(
    coco_gt_dict: dict[str, Any],
    dets: list[dict[str, Any]],
    cat_ids: list[int] | None = None,
    img_ids: list[int] | None = None,
) -> dict[str, Any]:
    """COCO metrics of ``dets`` (COCO result dicts) plus AP per :data:`SIZE_BINS` bin; optionally restricted
    to some categories (per-class AP) or images (per-source AP). Crowd annotations are ignore regions."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco_gt_dict
        gt.createIndex()
        if not dets:
            return {**{m: 0.0 for m in METRICS}, "AP_by_size": [0.0] * len(SIZE_BINS), "AR100": 0.0}
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        _restrict(ev, cat_ids, img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        out: dict[str, Any] = {m: float(ev.stats[i]) for i, m in enumerate(METRICS)}
        out["AR100"] = float(ev.stats[8])
        ev2 = COCOeval(gt, dt, "bbox")
        ev2.params.areaRng = [[lo * lo, hi * hi] for lo, hi in SIZE_BINS]
        ev2.params.areaRngLbl = [f"{lo:g}-{hi:g}" for lo, hi in SIZE_BINS]
        _restrict(ev2, cat_ids, img_ids)
        ev2.evaluate()
        ev2.accumulate()
    prec = ev2.eval["precision"]  # [T, R, K, A, M]
    by_size = []
    for a in range(len(SIZE_BINS)):
        p = prec[:, :, :, a, -1]
        by_size.append(float(p[p > -1].mean()) if (p > -1).any() else float("nan"))
    out["AP_by_size"] = by_size
    return out


def _restrict(ev: Any, cat_ids: list[int] | None, img_ids: list[int] | None) -> None:
    if cat_ids is not None:
        ev.params.catIds = cat_ids
    if img_ids is not None:
        ev.params.imgIds = img_ids


def breakdown(coco: dict[str, Any], dets: list[dict[str, Any]]) -> dict[str, Any]:
    """AP per class (all images) and per source (all classes; images carry ``source`` when imported)."""
    keys = ("AP", "AP50", "AP_S", "AP_M", "AP_L")
    gt_cats = {a["category_id"] for a in coco["annotations"] if not a.get("iscrowd", 0)}
    per_class = {
        c["name"]: {k: round(v, 4) for k, v in coco_scores(coco, dets, cat_ids=[c["id"]]).items() if k in keys}
        for c in coco["categories"]
        if c["id"] in gt_cats
    }
    sources = sorted({im["source"] for im in coco["images"] if "source" in im})
    per_source = {}
    for src in sources:
        ids = [im["id"] for im in coco["images"] if im.get("source") == src]
        per_source[src] = {k: round(v, 4) for k, v in coco_scores(coco, dets, img_ids=ids).items() if k in keys}
        per_source[src]["images"] = len(ids)
    return {"per_class": per_class, "per_source": per_source}


def load_dataset(data_dir: Path, max_images: int | None) -> tuple[dict[str, Any], list[Any]]:
    """The COCO dict and items of ``data_dir`` (``load_coco``), cut to the first ``max_images`` images."""
    coco, items = load_coco(data_dir)
    if max_images is None:
        return coco, items
    keep = {im["id"] for im in coco["images"][:max_images]}
    annotations = [a for a in coco["annotations"] if a["image_id"] in keep]
    return {**coco, "images": coco["images"][:max_images], "annotations": annotations}, items[:max_images]


def load_pipeline(model_path: Path, threads: int, max_batch: int) -> Any:
    """The service's ``Pipeline`` for ``model_path`` on ONNX Runtime."""
    from service.engines import EngineConfig
    from service.pipeline import Pipeline

    return Pipeline.load(model_path, EngineConfig(intra_op_threads=threads, max_batch=max_batch))


def evaluate(
    data_dir: Path,
    model_path: Path | None,
    modes: tuple[Mode, ...],
    cfg: EvalConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``modes`` over the dataset at ``data_dir`` and score them; returns the results dict."""
    from service.settings import default_model_path

    cfg = cfg or EvalConfig()
    coco, items = load_dataset(data_dir, cfg.max_images)
    model_path = model_path or default_model_path()  # no --model: the shipped model (as the CLI's help says)
    pipe = load_pipeline(model_path, cfg.threads, cfg.max_batch)
    chip = pipe.card.input_size
    options = {m: mode_options(m, chip, cfg) for m in modes}
    cat_ids = [c["id"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    dets: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    seconds = dict.fromkeys(modes, 0.0)
    chips = dict.fromkeys(modes, 0)
    pixels = dict.fromkeys(modes, 0)
    it: Any = list(zip(coco["images"], items, strict=True))
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=f"eval {'+'.join(modes)}", unit="img")
    for im, (path, _, _) in it:
        image = read_rgb(path)
        for m in modes:
            t0 = time.perf_counter()
            res = pipe.detect(image, options[m])
            seconds[m] += time.perf_counter() - t0
            chips[m] += res.num_chips
            pixels[m] += res.plan.pixels
            for box, score, cls in zip(res.boxes.tolist(), res.scores.tolist(), res.classes.tolist(), strict=True):
                x1, y1, x2, y2 = box
                dets[m].append(
                    {
                        "image_id": im["id"],
                        "category_id": cat_ids[cls],
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "score": score,
                    }
                )
    n = len(items)
    results: dict[str, Any] = {"modes": {}}
    for m in modes:
        scores = coco_scores(coco, dets[m])
        results["modes"][m] = {
            **{k: round(scores[k], 4) for k in METRICS},
            "AR100": round(scores["AR100"], 4),
            "AP_by_size": [None if math.isnan(v) else round(v, 4) for v in scores["AP_by_size"]],
            "chips_per_image": round(chips[m] / max(n, 1), 2),
            "pixels_per_image": int(pixels[m] / max(n, 1)),
            "images_per_second": round(n / max(seconds[m], 1e-9), 3),
            **breakdown(coco, dets[m]),
        }
    results["images"] = n
    results["data"] = str(data_dir)
    results["model"] = str(model_path) if model_path is not None else "default"
    results["size_bins"] = [list(b) for b in SIZE_BINS]
    results["settings"] = cfg.model_dump()
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per mode)."""
    head = "| mode | AP | AP50 | AP75 | AP_S | AP_M | AP_L | chips/img | Mpx/img | img/s |"
    rows = [head, "|" + "---|" * 10]
    for m, r in results["modes"].items():
        rows.append(
            f"| {m} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | {r['AP_S']:.3f} | {r['AP_M']:.3f} | "
            f"{r['AP_L']:.3f} | {r['chips_per_image']:.1f} | {r['pixels_per_image'] / 1e6:.2f} | "
            f"{r['images_per_second']:.2f} |"
        )
    for key, title in (("per_class", "class"), ("per_source", "source")):
        names = sorted({n for r in results["modes"].values() for n in r.get(key, {})})
        if not names:
            continue
        rows += ["", f"| AP / AP50 by {title} | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for m, r in results["modes"].items():
            cells = [f"{r[key][n]['AP']:.3f} / {r[key][n]['AP50']:.3f}" if n in r[key] else "—" for n in names]
            rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot_ap_by_size(results: dict[str, Any], path: Path) -> None:
    """PNG of AP (IoU .5:.95) per object-size bin, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{lo:g}-{hi:g}" if hi < 1e4 else f">{lo:g}" for lo, hi in results["size_bins"]]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for m, r in results["modes"].items():
        ys = [np.nan if v is None else v for v in r["AP_by_size"]]
        ax.plot(range(len(labels)), ys, marker="o", label=f"{m} (AP {r['AP']:.3f})")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("object size, sqrt(box area) in original pixels")
    ax.set_ylabel("AP @ IoU .50:.95")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"AP by object size ({results['images']} images)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(results: dict[str, Any], json_path: Path | None, out_dir: Path) -> list[Path]:
    """Write JSON (when asked), Markdown table and PNG plot; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = json_path.stem if json_path is not None else "eval"
    written = []
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2))
        written.append(json_path)
    md = out_dir / f"{stem}.md"
    md.write_text(markdown_table(results))
    png = out_dir / f"{stem}_ap_by_size.png"
    plot_ap_by_size(results, png)
    return [*written, md, png]


def recall_at_iou(
    gt_boxes: np.ndarray, gt_classes: np.ndarray, boxes: np.ndarray, classes: np.ndarray, iou: float = 0.5
) -> tuple[int, int]:
    """(matched, total): ground-truth boxes with a same-class detection at IoU >= ``iou`` (any score)."""
    from models.sniper import box_iou

    if gt_boxes.shape[0] == 0:
        return 0, 0
    if boxes.shape[0] == 0:
        return 0, int(gt_boxes.shape[0])
    m = box_iou(gt_boxes, boxes) >= iou  # [N, M]
    m &= gt_classes[:, None] == classes[None, :]
    return int(m.any(axis=1).sum()), int(gt_boxes.shape[0])
