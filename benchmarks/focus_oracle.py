"""How far can focus go with a *perfect* focus signal? An upper bound for any head or fallback on this detector.

    python benchmarks/focus_oracle.py --data data/synth_val --json runs/bench/focus_oracle_synth_val.json \
        --min-px 0 --min-px 4 --min-px 8

An oracle walk is the service's coarse-to-fine walk (``service.focus.FocusRun``, FocusChips placed by the card's
settings) with one change: the map each finer level is planned from is painted from the image's **ground truth**
instead of the head -- 1 on every cell, of the chips that ran at the coarser level, overlapped by an object small
enough for the finer level (``sqrt(area)`` at most the finer level's valid ``hi``, the head's positive label) and
at least ``min_px`` pixels at the coarser level (``--min-px``: 0 = every object; 4 or 8 = only objects a signal
computed at that level could see). So what such a row loses against the pyramid comes from FocusChips and from
the objects left out, never from a missed or spurious focus cell, and its chips are the fewest a map that marks
those objects can plan.

Each image runs once through the pyramid; every oracle replays on the cached chip outputs
(``models.focus_eval.compare_walks``), like ``snipserve eval --mode focus --sweep``. Prints and writes one row
per configuration: AP (all, S/M/L), chips per image (per level), the pyramid's chips over the row's, AP points
lost.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.focus_eval import Walk, compare_walks, report_walks, walk_parser  # noqa: E402
from service.adapters import ChipDetections  # noqa: E402
from service.focus import FocusConfig, FocusRun, detections_focus_map, level_focus_map  # noqa: E402
from service.plan import ChipPlan, Level  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "snipserve_default.onnx"


class OracleRun(FocusRun):
    """:class:`FocusRun` planning every finer level from a map of the ground truth it needs (see the module)."""

    def __init__(
        self, full: ChipPlan, cfg: FocusConfig, threshold: float, boxes: np.ndarray, classes: np.ndarray, min_px: float
    ) -> None:
        super().__init__(full, cfg.model_copy(update={"threshold": 0.5}), threshold)
        real = np.asarray(classes) >= 0
        self.boxes, self.min_px = np.asarray(boxes, np.float32)[real], min_px

    def focus_map(
        self, lv: Level, finer: Level, chips: np.ndarray, dets: ChipDetections, maps: np.ndarray | None
    ) -> np.ndarray:
        c, s = self.full.chip_size, self.cfg.stride
        covered = level_focus_map(np.ones((chips.shape[0], c // s, c // s), np.float32), chips[:, 1:3], lv, c, s)
        b = self.boxes * lv.scale  # level px
        seen = np.sqrt(np.maximum((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), 0)) >= self.min_px
        # the fallback's painter keeps the objects small enough for the finer level; score 1 = in focus
        return detections_focus_map(b[seen], np.ones(int(seen.sum()), np.float32), lv, finer, s) * covered


def _walk(min_px: float) -> Walk:
    return lambda full, cfg, threshold, boxes, classes: OracleRun(full, cfg, threshold, boxes, classes, min_px)


def run(data: Path, model: Path, min_pxs: list[float], threads: int = 2) -> list[dict[str, Any]]:
    """One row per configuration: 'pyramid' first, then the oracle at each ``min_px``."""
    walks = {f"oracle min_px={m:g}": _walk(m) for m in min_pxs}
    return compare_walks(data, model, walks, threads, progress=True)


def main(argv: list[str] | None = None) -> int:
    p = walk_parser(__doc__.splitlines()[0], MODEL)
    p.add_argument("--min-px", action="append", type=float, required=True, help="objects seen from this size up")
    args = p.parse_args(argv)
    rows = run(args.data, args.model, args.min_px, args.threads)
    report_walks(rows, args.data, args.model, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
