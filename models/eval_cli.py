"""``snipserve eval --data DIR [--model PATH] --mode single|slices|pyramid|focus [--json OUT]``.

Runs the service's in-process pipeline over a COCO dataset and writes COCO metrics, a Markdown table and a
PNG plot of AP by object size. ``--mode`` may be given several times (or ``all``) to share image decoding.
``--mode focus --sweep T1,T2,...`` compares focus with the pyramid over focus thresholds instead
(``models.focus_eval``: JSON, Markdown, and a PNG curve of chips saved against AP lost).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (images/ + annotations.json)")
    parser.add_argument("--model", type=Path, default=None, help="ONNX model (default: the shipped model)")
    parser.add_argument(
        "--mode",
        action="append",
        choices=["single", "slices", "pyramid", "focus", "all"],
        required=True,
        help="inference mode; repeat or use 'all' for several",
    )
    parser.add_argument("--json", type=Path, default=None, help="write results JSON here")
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="folder for the Markdown table and PNG plot (default: next to --json, else runs/eval)",
    )
    parser.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--preset", default="default", help="levels preset of the model card that 'pyramid' runs")
    parser.add_argument(
        "--focus-threshold", type=float, default=None, help="'focus': focus threshold (default: the card's)"
    )
    parser.add_argument(
        "--sweep",
        default=None,
        help="with --mode focus: comma-separated focus thresholds; writes the focus-vs-pyramid report "
        "(--json OUT is required: OUT.json, OUT.md, OUT_focus_curve.png)",
    )
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from models.evaluate import MODES, EvalConfig, evaluate, markdown_table, write_reports

    cfg = EvalConfig(
        max_images=args.max_images, threads=args.threads, preset=args.preset, focus_threshold=args.focus_threshold
    )
    if args.sweep is not None:
        return _sweep(args, cfg)
    modes = MODES if "all" in args.mode else tuple(dict.fromkeys(args.mode))
    results = evaluate(args.data, args.model, modes, cfg, progress=not args.no_progress)
    out_dir = args.out_dir or (args.json.parent if args.json is not None else Path("runs/eval"))
    paths = write_reports(results, args.json, out_dir)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _sweep(args: argparse.Namespace, cfg: object) -> int:
    from models.evaluate import EvalConfig
    from models.focus_eval import markdown, sweep, write

    assert isinstance(cfg, EvalConfig)
    if args.mode != ["focus"] or args.json is None:
        raise SystemExit("--sweep needs --mode focus (alone) and --json OUT")
    thresholds = [float(t) for t in args.sweep.split(",") if t.strip()]
    results = sweep(args.data, args.model, thresholds, cfg, progress=not args.no_progress)
    paths = write(results, args.json)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
