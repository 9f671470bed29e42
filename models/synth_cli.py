"""``snipserve synth --out DIR --images N --seed S``: write the synthetic aerial dataset."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from models.synth import SynthConfig, write_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (images/ + annotations.json)")
    parser.add_argument("--images", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, required=True, help="dataset seed (same seed, same bytes)")
    parser.add_argument("--min-long-side", type=int, default=None, help="override the smallest long side (px)")
    parser.add_argument("--max-long-side", type=int, default=None, help="override the largest long side (px)")


def run(args: argparse.Namespace) -> int:
    overrides = {}
    if args.min_long_side is not None:
        overrides["min_long_side"] = args.min_long_side
    if args.max_long_side is not None:
        overrides["max_long_side"] = args.max_long_side
    cfg = SynthConfig(**overrides)
    t0 = time.perf_counter()
    coco = write_dataset(args.out, args.images, args.seed, cfg, progress=True)
    dt = time.perf_counter() - t0
    print(
        f"wrote {len(coco['images'])} images, {len(coco['annotations'])} objects to {args.out} "
        f"in {dt:.1f}s ({len(coco['images']) / max(dt, 1e-9):.1f} images/s)"
    )
    return 0
