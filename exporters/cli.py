"""``snipserve export onnx|tensorrt``: export a trained model.

``onnx``: ``model.pt`` (from ``snipserve train``) -> ONNX with dynamic batch, checked against PyTorch, with the
model card in its metadata. ``tensorrt``: ONNX -> serialized TensorRT engine + manifest (:mod:`exporters.tensorrt`;
needs the ``gpu`` extra on a GPU host).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=["onnx", "tensorrt"], help="export target")
    parser.add_argument("--weights", type=Path, default=Path("runs/default/model.pt"), help="trained model.pt")
    parser.add_argument("--out", type=Path, default=Path("models/snipserve_default.onnx"), help="output file")
    parser.add_argument("--name", default="snipserve-default", help="model name in the card")
    parser.add_argument(
        "--eval-json",
        type=Path,
        default=None,
        help="results of `snipserve eval --json` to store in the card's evaluation field",
    )
    parser.add_argument(
        "--parity-data",
        type=Path,
        default=None,
        help="COCO folder whose first images give real chips for the parity check",
    )
    parser.add_argument(
        "--default-mode",
        choices=["pyramid", "focus"],
        default="pyramid",
        help="what preset 'default' runs: every chip, or FocusChips coarse to fine (needs a focus head; set it only "
        "when `snipserve eval --mode focus` met the goal on every split)",
    )
    parser.add_argument(
        "--focus-threshold", type=float, default=0.05, help="the card's default focus threshold (focus head models)"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed |onnx - torch|")
    from exporters.tensorrt import add_tensorrt_arguments  # no heavy imports at module level

    add_tensorrt_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.format == "tensorrt":
        from exporters.tensorrt import run_cli

        return run_cli(args)
    from exporters.onnx import OnnxExportConfig, ParityError, export_onnx

    evaluation = json.loads(args.eval_json.read_text()) if args.eval_json else None
    cfg = OnnxExportConfig(opset=args.opset, tolerance=args.tolerance)
    try:
        report = export_onnx(
            args.weights,
            args.out,
            cfg,
            evaluation=evaluation,
            name=args.name,
            parity_data=args.parity_data,
            default_mode=args.default_mode,
            focus_threshold=args.focus_threshold,
        )
    except ParityError as exc:
        print(f"export failed parity: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
