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

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.evaluate import EvalConfig, coco_scores, mode_options, read_rgb  # noqa: E402
from models.focus_eval import ChipCache, _coco_dets, _dataset, replay  # noqa: E402
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


def run(data: Path, model: Path, combos: list[dict[int, float]], threads: int = 2) -> list[dict[str, Any]]:
    """One row per configuration: 'pyramid' first, then each combo."""
    from service.engines import EngineConfig
    from service.pipeline import Pipeline

    cfg = EvalConfig()
    coco, items = _dataset(data, None)
    pipe = Pipeline.load(model, EngineConfig(intra_op_threads=threads, max_batch=16))
    pyramid = mode_options("pyramid", pipe.card.input_size, cfg)
    focus_opts = mode_options("focus", pipe.card.input_size, cfg)
    focus = pipe.focus_config(focus_opts)
    assert focus is not None
    cat_ids = [c["id"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
    keys = ["pyramid"] + [json.dumps(c) for c in combos]
    dets: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    by_level = {k: np.zeros(len(pipe.card.default_levels), np.int64) for k in keys}
    for im, (path, _, _) in zip(coco["images"], items, strict=True):
        prepared = pipe.prepare(read_rgb(path), pyramid)
        cache = ChipCache(pipe, prepared)
        results = {"pyramid": pipe.finish(prepared, cache.get(prepared.plan.chips)[0], pyramid)}
        for key, combo in zip(keys[1:], combos, strict=True):
            walk = PerLevelRun(prepared.plan, focus, prepared.threshold, combo)
            results[key] = replay(pipe, prepared, cache, focus_opts, walk)
        for key, res in results.items():
            dets[key] += _coco_dets(res, im["id"], cat_ids)
            by_level[key][: len(res.plan.levels)] += np.bincount(res.plan.chips[:, 0], minlength=len(res.plan.levels))
    scores = {k: coco_scores(coco, v) for k, v in dets.items()}
    n, base = len(items), scores["pyramid"]
    pyramid_chips = by_level["pyramid"].sum()
    return [
        {
            "thresholds": None if k == "pyramid" else json.loads(k),
            "AP": round(scores[k]["AP"], 4),
            "AP_S": round(scores[k]["AP_S"], 4),
            "chips_per_image": round(by_level[k].sum() / n, 2),
            "chips_per_image_by_level": (by_level[k] / n).round(2).tolist(),
            "chips_ratio": round(pyramid_chips / max(by_level[k].sum(), 1), 3),
            "AP_lost_points": round(100 * (base["AP"] - scores[k]["AP"]), 2),
        }
        for k in keys
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--combo", action="append", required=True, type=parse_combo, help="K=T,... (level 0 = finest)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    rows = run(args.data, args.model, args.combo, args.threads)
    for r in rows:
        print(json.dumps(r))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"data": str(args.data), "model": str(args.model), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
