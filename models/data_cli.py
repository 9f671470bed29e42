"""``snipserve data import --sources YAML --root DIR --out DIR``: real datasets into the project's COCO layout.
``snipserve data rescale --data DIR --scales F,F --out DIR``: resampled copies of a training split.

See :mod:`models.dataimport` and :mod:`models.rescale`. ``scripts/fetch-real-data.sh`` fetches the pinned
sources into ``--root``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = sub.add_parser("import", help="import labelled datasets (YOLO, DOTA, COCO, VOC) with a class map")
    imp.add_argument(
        "--sources",
        type=Path,
        default=Path("models/data/real_sources.yaml"),
        help="sources YAML: repository, commit, license, format, class map, groups (default: the shipped one)",
    )
    imp.add_argument("--root", type=Path, default=Path("data/sources"), help="folder holding one clone per source")
    imp.add_argument("--out", type=Path, default=Path("data/real"), help="output folder (train/ val/ test/ + card)")
    res = sub.add_parser("rescale", help="resampled copies of a (training) COCO folder, boxes scaled with them")
    res.add_argument("--data", type=Path, required=True, help="COCO folder (images + annotations.json)")
    res.add_argument("--scales", required=True, help="comma-separated factors, e.g. 0.6,1.6")
    res.add_argument("--only", action="append", default=None, metavar="SOURCE", help="only images of this source")
    res.add_argument("--out", type=Path, required=True, help="output COCO folder")


def run(args: argparse.Namespace) -> int:
    if args.action == "rescale":
        return _rescale(args)
    from pydantic import ValidationError

    from models.dataimport import ImportConfig, run_import

    try:
        cfg = ImportConfig.from_yaml(args.sources)
    except (OSError, ValidationError, ValueError) as e:
        print(f"snipserve data import: bad sources file {args.sources}: {e}")
        return 2
    card = run_import(cfg, args.root, args.out)
    for s in card["sources"]:
        counts = ", ".join(f"{k} {v['images']}" for k, v in s["splits"].items())
        problems = ", ".join(f"{k}: {v}" for k, v in s["problems"].items()) or "none"
        print(f"{s['name']}: images {counts}; skipped and reported: {problems}")
    print(
        f"wrote {args.out}/{{train,val,test}}/annotations.json, {args.out}/DATACARD.md, datacard.json, "
        f"problems.jsonl ({card['problems']} problems)"
    )
    return 0


def _rescale(args: argparse.Namespace) -> int:
    from models.rescale import rescale_copies

    try:
        scales = [float(x) for x in args.scales.split(",")]
        summary = rescale_copies(args.data, args.out, scales, args.only)
    except (OSError, ValueError, KeyError) as e:
        print(f"snipserve data rescale: {e}")
        return 2
    for line in summary["skipped"]:
        print(f"skipped: {line}")
    print(f"wrote {args.out}/annotations.json: {summary['images']} images, {summary['boxes']} boxes")
    return 0
