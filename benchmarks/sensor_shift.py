"""A sensor-shifted copy of a labelled COCO folder: each image through a seeded, stronger-than-training mix of
white-balance shift, saturation change, defocus blur, sensor noise and JPEG re-compression, labels unchanged.

    python benchmarks/sensor_shift.py --data data/real/val --out data/real/val_shift [--seed 0]
    snipserve eval --data data/real/val_shift --mode pyramid --model M.onnx --json runs/eval/shift_M.json

A proxy for imagery from sensors the training sources do not cover (the held-out real sets are other sources and
sensors): compare models' AP on the original and the shifted copy -- the drop is what the model loses to the
sensor alone. Every image gets all five effects, at strengths drawn per image (the ranges below).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import cv2
import numpy as np

GAIN = 0.15  # per-channel gain +-
SATURATION = (0.5, 1.4)
BLUR_SIGMA = (0.6, 1.6)  # px
NOISE_SIGMA = (3.0, 9.0)  # 8-bit levels
JPEG_QUALITY = (30, 60)


def shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``uint8 [H, W, 3]`` BGR -> the same image through the five effects."""
    f = image.astype(np.float32)
    grey = f.mean(axis=2, keepdims=True)
    f = grey + (f - grey) * rng.uniform(*SATURATION)
    f *= rng.uniform(1 - GAIN, 1 + GAIN, 3).astype(np.float32)
    f = cv2.GaussianBlur(np.clip(f, 0, 255), (0, 0), float(rng.uniform(*BLUR_SIGMA)))
    f += rng.normal(0.0, rng.uniform(*NOISE_SIGMA), f.shape).astype(np.float32)
    out = np.clip(f, 0, 255).astype(np.uint8)
    q = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return np.asarray(cv2.imdecode(buf, cv2.IMREAD_COLOR))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="COCO folder: annotations.json + images/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    coco = json.loads((args.data / "annotations.json").read_text())
    for k, im in enumerate(coco["images"]):
        src = args.data / im["file_name"]
        img = cv2.imread(str(src), cv2.IMREAD_COLOR)
        if img is None:
            raise SystemExit(f"cannot read {src}")
        name = str(Path(im["file_name"]).with_suffix(".png"))  # lossless: the JPEG step is the only compression
        (args.out / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(args.out / name), shift(img, np.random.default_rng([args.seed, k])))
        im["file_name"] = name
    (args.out / "annotations.json").write_text(json.dumps(coco))
    for extra in ("DATACARD.md", "datacard.json"):
        if (args.data / extra).exists():
            shutil.copy(args.data / extra, args.out / extra)
    print(f"wrote {len(coco['images'])} shifted images to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
