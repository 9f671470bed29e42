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


def run(model: Path | None, seed: int, width: int, height: int) -> dict[str, Any]:
    pipe = Pipeline.load(model or REPO / "models" / "snipserve_default.onnx")
    opts = DetectOptions()
    rng = np.random.default_rng(seed)
    ood = {}
    for kind in KINDS:
        res = pipe.detect(ood_image(kind, width, height, rng), opts)
        ood[kind] = {"detections": int(res.boxes.shape[0]), "max_score": round(float(res.scores.max(initial=0)), 3)}
    photos = {}
    for name in PHOTOS:
        img = photo(name)
        res = pipe.detect(img, opts)
        mpx = img.shape[0] * img.shape[1] / 1e6
        photos[name] = {
            "size": [int(img.shape[1]), int(img.shape[0])],
            "detections": int(res.boxes.shape[0]),
            "per_megapixel": round(res.boxes.shape[0] / mpx, 2),
        }
    total_det = sum(p["detections"] for p in photos.values())
    total_mpx = sum(p["size"][0] * p["size"][1] for p in photos.values()) / 1e6
    return {
        "model": str(model or "default"),
        "score_threshold": pipe.card.score_threshold,
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
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped one)")
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--size", type=int, nargs=2, default=(1920, 1080), metavar=("W", "H"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    out = run(args.model, args.seed, *args.size)
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
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
