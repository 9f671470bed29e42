"""Does the default request stay quiet where there is nothing to find?

    python benchmarks/calibration.py [--model PATH] [--json runs/bench/calibration.json]

Two measurements, both with the default request (the card's default levels and score threshold), through
the in-process pipeline (``service.pipeline.Pipeline.detect``, the code the service runs):

1. **Out-of-distribution images**, 1920x1080: uniform noise, Gaussian noise, flat grey, linear and radial
   gradients, plus every other kind of ``models/ood.py`` — detections per image (goal: at most 5 each).
   Seeds here (``--seed``, default 12345) differ from the training chips' (the training config's seed).
2. **Non-aerial photographs** that scikit-image ships (portraits, a cat, coffee, a rocket, coins, a
   motorcycle, astronomy and microscopy images): false positives per megapixel — every detection on them
   is false. Grey images are converted to RGB. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.ood import KINDS, ood_image  # noqa: E402
from service.options import DetectOptions  # noqa: E402
from service.pipeline import Pipeline  # noqa: E402

# scikit-image's bundled images (skimage.data), none of them aerial; those needing a download are absent.
PHOTOS = (
    "astronaut",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "rocket",
    "stereo_motorcycle",
    "clock",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "moon",
    "page",
    "text",
    "brick",
    "grass",
    "gravel",
)


def photo(name: str) -> np.ndarray:
    """``uint8 [H, W, 3]`` RGB of one bundled scikit-image picture."""
    from skimage import data

    img = getattr(data, name)()
    if isinstance(img, tuple):  # stereo pair
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


SWEEP = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)


def f1_by_threshold(pipe: Pipeline, data: Path, thresholds: tuple[float, ...]) -> dict[float, dict[str, Any]]:
    """Per threshold: precision / recall / F1 at IoU 0.5 per class on a labelled COCO folder (ignore
    regions neither count as misses nor turn detections on them into false positives)."""
    from models.evaluate import read_rgb
    from models.sniper import box_iou
    from models.synth import load_coco

    _, items = load_coco(data)
    k = len(pipe.card.classes)
    tp = np.zeros((len(thresholds), k))
    fp = np.zeros_like(tp)
    n_gt = np.zeros(k)
    opts = DetectOptions(score_threshold=min(thresholds), max_detections=3000)
    for path, boxes, classes in items:
        res = pipe.detect(read_rgb(path), opts)
        ignore = boxes[classes < 0]
        for c in range(k):
            gt = boxes[classes == c]
            n_gt[c] += len(gt)
            sel = np.flatnonzero(res.classes == c)
            order = sel[np.argsort(-res.scores[sel], kind="stable")]
            iou = box_iou(res.boxes[order], gt) if len(gt) else np.zeros((len(order), 0))
            on_ignore = np.zeros(len(order), bool)
            if len(ignore):
                on_ignore = (box_iou(res.boxes[order], ignore) >= 0.5).any(axis=1)
            for t, thr in enumerate(thresholds):
                used = np.zeros(len(gt), bool)
                for j in np.flatnonzero(res.scores[order] >= thr):
                    cand = np.flatnonzero((iou[j] >= 0.5) & ~used)
                    if cand.size:
                        used[cand[np.argmax(iou[j, cand])]] = True
                        tp[t, c] += 1
                    elif not on_ignore[j]:
                        fp[t, c] += 1
    out = {}
    for t, thr in enumerate(thresholds):
        has = n_gt > 0
        prec = tp[t] / np.maximum(tp[t] + fp[t], 1)
        rec = tp[t] / np.maximum(n_gt, 1)
        f1 = 2 * prec * rec / np.maximum(prec + rec, 1e-9)
        per_class = {
            pipe.card.classes[c]: {
                "precision": round(float(prec[c]), 3),
                "recall": round(float(rec[c]), 3),
                "f1": round(float(f1[c]), 3),
            }
            for c in range(k)
            if has[c]
        }
        out[thr] = {"per_class": per_class, "mean_f1": round(float(f1[has].mean()), 4)}
    return out


def _scores(pipe: Pipeline, img: np.ndarray, floor: float) -> np.ndarray:
    """Scores of the default request's detections down to ``floor`` (so any threshold above can be read)."""
    res = pipe.detect(img, DetectOptions(score_threshold=floor, max_detections=3000))
    return res.scores


def run(
    model: Path | None, seed: int, width: int, height: int, data: Path | None = None, max_ood: int = 5
) -> dict[str, Any]:
    pipe = Pipeline.load(model or REPO / "models" / "snipserve_default.onnx")
    thr = pipe.card.score_threshold
    floor = min(thr, *SWEEP)
    rng = np.random.default_rng(seed)
    ood_scores = {kind: _scores(pipe, ood_image(kind, width, height, rng), floor) for kind in KINDS}
    photo_scores, sizes = {}, {}
    for name in PHOTOS:
        img = photo(name)
        sizes[name] = (int(img.shape[1]), int(img.shape[0]))
        photo_scores[name] = _scores(pipe, img, floor)
    ood = {
        kind: {"detections": int((s >= thr).sum()), "max_score": round(float(s.max(initial=0)), 3)}
        for kind, s in ood_scores.items()
    }
    photos = {}
    for name, s in photo_scores.items():
        n = int((s >= thr).sum())
        mpx = sizes[name][0] * sizes[name][1] / 1e6
        photos[name] = {"size": list(sizes[name]), "detections": n, "per_megapixel": round(n / mpx, 2)}
    total_det = sum(p["detections"] for p in photos.values())
    total_mpx = sum(p["size"][0] * p["size"][1] for p in photos.values()) / 1e6
    sweep: dict[str, Any] = {}
    if data is not None:
        f1 = f1_by_threshold(pipe, data, SWEEP)
        rows = {}
        for t in SWEEP:
            worst = max(int((s >= t).sum()) for s in ood_scores.values())
            fp = sum(int((s >= t).sum()) for s in photo_scores.values())
            rows[str(t)] = f1[t] | {"ood_max": worst, "photo_fp_per_megapixel": round(fp / total_mpx, 2)}
        ok = [t for t in SWEEP if rows[str(t)]["ood_max"] <= max_ood] or [max(SWEEP)]
        best = max(ok, key=lambda t: (rows[str(t)]["mean_f1"], -t))
        sweep = {"data": str(data), "max_ood": max_ood, "thresholds": rows, "chosen": best}
    return {
        "model": str(model or "default"),
        "score_threshold": thr,
        "classes": list(pipe.card.classes),
        "ood": {
            "size": [width, height],
            "seed": seed,
            "images": ood,
            "max_detections": max(v["detections"] for v in ood.values()),
        },
        "photos": {
            "images": photos,
            "detections": total_det,
            "megapixels": round(total_mpx, 2),
            "false_positives_per_megapixel": round(total_det / total_mpx, 2),
        },
        "threshold_sweep": sweep,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--size", type=int, nargs=2, default=(1920, 1080), metavar=("W", "H"))
    ap.add_argument("--data", type=Path, default=None, help="labelled split for the threshold sweep")
    ap.add_argument("--max-ood", type=int, default=5, help="most detections allowed on any OOD image")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = run(args.model, args.seed, *args.size, data=args.data, max_ood=args.max_ood)
    print(f"score threshold {out['score_threshold']}")
    print("| OOD image 1920x1080 | detections | max score |\n|---|---|---|")
    for k, v in out["ood"]["images"].items():
        print(f"| {k} | {v['detections']} | {v['max_score']} |")
    print("\n| photo | size | detections | per Mpx |\n|---|---|---|---|")
    for k, v in out["photos"]["images"].items():
        print(f"| {k} | {v['size'][0]}x{v['size'][1]} | {v['detections']} | {v['per_megapixel']} |")
    p = out["photos"]
    print(
        f"\nnon-aerial photos: {p['detections']} false positives on {p['megapixels']} Mpx = "
        f"{p['false_positives_per_megapixel']} per Mpx; OOD max per image: {out['ood']['max_detections']}"
    )
    sw = out["threshold_sweep"]
    if sw:
        names = out["classes"]
        print(
            "\n| threshold | mean F1 (IoU .5) | " + " | ".join(f"F1 {c}" for c in names) + " | OOD max | photo FP/Mpx |"
        )
        print("|---" * (4 + len(names)) + "|")
        for t, r in sw["thresholds"].items():
            cells = " | ".join(str(r["per_class"].get(c, {}).get("f1", "—")) for c in names)
            print(f"| {t} | {r['mean_f1']} | {cells} | {r['ood_max']} | {r['photo_fp_per_megapixel']} |")
        print(f"chosen threshold: {sw['chosen']} (best mean F1 with every OOD image <= {sw['max_ood']})")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
