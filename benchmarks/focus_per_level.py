"""Focus with a threshold per level step, against the full pyramid (an experiment; the service has one threshold).

    python benchmarks/focus_per_level.py --data data/synth_val --json runs/bench/focus_per_level.json \
        --combo 0=0.05,1=0.05 --combo 0=0.05,1=0.2 --combo 0=0.03,1=0.3

A combo ``K=T,...`` plans the FocusChips of level ``K`` (0 = finest) from the next coarser level's focus map at
threshold ``T``; steps it does not name use the card's threshold. Like ``snipserve eval --mode focus --sweep``
(``models/focus_eval.py``), each image runs once through the whole pyramid and every combo replays the service's own
coarse-to-fine walk on the cached chip outputs (placed chips outside the tiling run once per image), so the rows are
what the service would serve. Prints and writes one row per configuration: AP, AP_S, chips per image (per level),
the ratio of the pyramid's chips and the AP points lost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.focus_eval import Walk, compare_walks, report_walks, walk_parser  # noqa: E402
from service.focus import FocusConfig, FocusRun  # noqa: E402
from service.plan import ChipPlan  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "snipserve_default.onnx"


class PerLevelRun(FocusRun):
    """:class:`FocusRun` whose step into finer level ``k`` thresholds the map at ``thresholds[k]`` when given."""

    def __init__(self, full: ChipPlan, cfg: FocusConfig, threshold: float, thresholds: dict[int, float]) -> None:
        super().__init__(full, cfg, threshold)
        self.base, self.thresholds = cfg, thresholds

    def add(self, chips: np.ndarray, dets: Any, maps: np.ndarray | None) -> None:
        finer = self._level - 1
        self.cfg = self.base.model_copy(update={"threshold": self.thresholds.get(finer, self.base.threshold)})
        super().add(chips, dets, maps)


def parse_combo(text: str) -> dict[int, float]:
    """``"0=0.05,1=0.2"`` -> ``{0: 0.05, 1: 0.2}``."""
    return {int(k): float(v) for k, v in (part.split("=", 1) for part in text.split(","))}


def _walk(combo: dict[int, float]) -> Walk:
    return lambda full, cfg, threshold, _boxes, _classes: PerLevelRun(full, cfg, threshold, combo)


def run(data: Path, model: Path, combos: list[dict[int, float]], threads: int = 2) -> list[dict[str, Any]]:
    """One row per configuration: 'pyramid' first, then each combo."""
    walks = {json.dumps(c): _walk(c) for c in combos}
    rows = compare_walks(data, model, walks, threads, progress=False)
    names = [r.pop("name") for r in rows]
    return [{"thresholds": None if n == "pyramid" else json.loads(n), **r} for n, r in zip(names, rows, strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = walk_parser(__doc__.splitlines()[0], MODEL)
    p.add_argument("--combo", action="append", required=True, type=parse_combo, help="K=T,... (level 0 = finest)")
    args = p.parse_args(argv)
    rows = run(args.data, args.model, args.combo, args.threads)
    report_walks(rows, args.data, args.model, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
