"""Focus against the full pyramid over a sweep of focus thresholds: AP (all, S/M/L), chips per image, a curve.

``snipserve eval --data DIR --model M --mode focus --sweep 0.02,0.05,0.1,0.2,0.3 --json OUT.json`` writes
``OUT.json``, ``OUT.md`` and ``OUT_focus_curve.png`` (chips saved against AP lost, one point per threshold).

Exact and cheap: a chip's outputs do not depend on which other chips run. So every image is run once through the
whole pyramid (the service's ``Pipeline.run_chips``), each chip's detections and focus map are kept
(:class:`ChipCache`), and each threshold replays the service's own coarse-to-fine walk
(``service.focus.FocusRun``) over them -- running, once per image, the freely placed FocusChips that are not
chips of the pyramid's tiling -- then the service's postprocess and merge. What a
threshold scores is what ``preset=focus`` serves at that threshold (``tests/models/test_focus_eval.py`` checks it
against ``Pipeline.detect``). Timing (images/s) needs a real run: ``--mode focus --focus-threshold T``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluate import METRICS, EvalConfig, coco_scores, load_dataset, load_pipeline, mode_options, read_rgb
from service.adapters import ChipDetections
from service.focus import FocusConfig, FocusRun
from service.plan import ChipPlan

# A coarse-to-fine walk to compare with the pyramid: (pyramid plan, focus config, score threshold, the image's
# ground-truth boxes xyxy px, their classes) -> the FocusRun to replay. Ground truth is for oracle experiments.
Walk = Callable[[ChipPlan, FocusConfig, float, np.ndarray, np.ndarray], FocusRun]

GOAL_RATIO = 2.5  # the goal: at least this many times fewer chips per image ...
GOAL_AP_LOST = 1.0  # ... for at most this many AP points lost, on every split


def _subset(dets: ChipDetections, rows: np.ndarray, n_chips: int) -> ChipDetections:
    """Detections of the cached chips ``rows`` (in that order), re-indexed 0..len(rows)-1."""
    where = np.full(n_chips, -1, np.int64)
    where[rows] = np.arange(rows.size)
    keep = where[dets.chip] >= 0
    d = dets.select(keep)
    return ChipDetections(where[d.chip].astype(np.int32), d.boxes, d.scores, d.classes)


class ChipCache:
    """One image's chip outputs (detections at the prepared threshold, focus maps), run on first use and kept."""

    def __init__(self, pipe: Any, prepared: Any) -> None:
        self.pipe, self.prepared = pipe, prepared
        self.rows: dict[tuple[int, int, int], int] = {}
        self.dets = ChipDetections.empty()
        self.maps: np.ndarray | None = None

    def get(self, chips: np.ndarray) -> tuple[ChipDetections, np.ndarray | None]:
        """Outputs of ``chips`` (``int32 [K, 3]``; chip = row of ``chips``), running those not seen yet."""
        keys = [(int(a), int(b), int(c)) for a, b, c in chips.tolist()]
        new = list(dict.fromkeys(k for k in keys if k not in self.rows))
        if new:
            dets, maps = self.pipe.run_chips(self.prepared, np.asarray(new, np.int32), self.prepared.threshold)
            start = len(self.rows)
            self.rows.update({k: start + i for i, k in enumerate(new)})
            shifted = ChipDetections(dets.chip + start, dets.boxes, dets.scores, dets.classes)
            self.dets = ChipDetections.concat([self.dets, shifted])
            if maps is not None:
                self.maps = maps if self.maps is None else np.concatenate([self.maps, maps])
        rows = np.asarray([self.rows[k] for k in keys], np.int64)
        return _subset(self.dets, rows, len(self.rows)), None if self.maps is None else self.maps[rows]


def replay(pipe: Any, prepared: Any, cache: ChipCache, options: Any, run: FocusRun | None = None) -> Any:
    """The focus result of ``options`` from one image's chip cache (``prepared.plan`` = the pyramid). ``run``: the
    coarse-to-fine walk to replay (a variant's, for experiments); default the service's own for ``options``."""
    full = prepared.plan
    run = run or FocusRun(full, pipe.focus_config(options), prepared.threshold)
    while (chips := run.next_chips()) is not None:
        run.add(chips, *cache.get(chips))
    fresh = type(prepared)(full, prepared.level_images, prepared.threshold, dict(prepared.timings))
    return pipe.finish_focus(fresh, run, options)


def _coco_dets(res: Any, image_id: int, cat_ids: list[int]) -> list[dict[str, Any]]:
    out = []
    for box, score, cls in zip(res.boxes.tolist(), res.scores.tolist(), res.classes.tolist(), strict=True):
        x1, y1, x2, y2 = box
        out.append(
            {"image_id": image_id, "category_id": cat_ids[cls], "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
        )
    return out


def sweep(
    data_dir: Path,
    model_path: Path | None,
    thresholds: list[float],
    cfg: EvalConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Pyramid and focus at each of ``thresholds`` on the dataset at ``data_dir``; the results dict."""
    from service.settings import default_model_path

    cfg = cfg or EvalConfig()
    coco, items = load_dataset(data_dir, cfg.max_images)
    model_path = model_path or default_model_path()  # no --model: the shipped model, as evaluate() runs
    pipe = load_pipeline(model_path, cfg.threads, cfg.max_batch)
    chip = pipe.card.input_size
    pyramid_opts = mode_options("pyramid", chip, cfg)
    focus_opts = {t: mode_options("focus", chip, cfg.model_copy(update={"focus_threshold": t})) for t in thresholds}
    tally = _Tally(["pyramid", *(str(t) for t in thresholds)], coco, len(pipe.card.default_levels))
    seconds = 0.0
    for im, (path, _, _) in _images(coco, items, f"focus sweep {thresholds}" if progress else None):
        image = read_rgb(path)
        t0 = time.perf_counter()
        prepared = pipe.prepare(image, pyramid_opts)
        cache = ChipCache(pipe, prepared)
        full = pipe.finish(prepared, cache.get(prepared.plan.chips)[0], pyramid_opts)
        seconds += time.perf_counter() - t0
        results = {"pyramid": full} | {str(t): replay(pipe, prepared, cache, focus_opts[t]) for t in thresholds}
        for k, res in results.items():
            tally.add(k, res, im["id"])
    rows = [{"threshold": None if k == "pyramid" else float(k), **r} for k, r in tally.rows().items()]
    focus_rows = [r for r in rows if r["threshold"] is not None]
    meets = [r for r in focus_rows if r["chips_ratio"] >= GOAL_RATIO and r["AP_lost_points"] <= GOAL_AP_LOST]
    best = max(meets, key=lambda r: r["chips_ratio"]) if meets else None
    return {
        "data": str(data_dir),
        "model": str(model_path),
        "focus_source": {"both": "head and detections"}.get(pipe.card.focus_spec.source, pipe.card.focus_spec.source),
        "images": len(items),
        "pyramid": rows[0],
        "focus": focus_rows,
        "goal": {"chips_ratio_at_least": GOAL_RATIO, "AP_lost_points_at_most": GOAL_AP_LOST, "met": best is not None},
        "best_threshold": None if best is None else best["threshold"],
        "pyramid_images_per_second": round(len(items) / max(seconds, 1e-9), 3),
        "settings": cfg.model_dump(),
        "method": "one pyramid pass per image; each threshold replays service.focus.FocusRun on cached chip outputs "
        "(placed FocusChips outside the pyramid's tiling run once per image)",
    }


def compare_walks(
    data_dir: Path, model_path: Path, walks: dict[str, Walk], threads: int = 2, progress: bool = True
) -> list[dict[str, Any]]:
    """Pyramid and each named coarse-to-fine walk (a :class:`FocusRun` variant, for experiments) on the dataset
    at ``data_dir``: one row each ('pyramid' first) with COCO AP (all, S/M/L), chips per image (and per level),
    the pyramid's chips over the walk's, and AP points lost. Each image runs once through the pyramid; every walk
    replays on the cached chip outputs, as :func:`sweep` does, so a row is what the service would serve with it."""
    cfg = EvalConfig()
    coco, items = load_dataset(data_dir, None)
    pipe = load_pipeline(model_path, threads, 16)
    pyramid = mode_options("pyramid", pipe.card.input_size, cfg)
    focus_opts = mode_options("focus", pipe.card.input_size, cfg)
    focus = pipe.focus_config(focus_opts)
    if focus is None:
        raise ValueError(f"{model_path}: the model card has no focus settings")
    tally = _Tally(["pyramid", *walks], coco, len(pipe.card.default_levels))
    for im, (path, boxes, classes) in _images(coco, items, f"walks {list(walks)}" if progress else None):
        prepared = pipe.prepare(read_rgb(path), pyramid)
        cache = ChipCache(pipe, prepared)
        results = {"pyramid": pipe.finish(prepared, cache.get(prepared.plan.chips)[0], pyramid)}
        for key, walk in walks.items():
            run = walk(prepared.plan, focus, prepared.threshold, boxes, classes)
            results[key] = replay(pipe, prepared, cache, focus_opts, run)
        for key, res in results.items():
            tally.add(key, res, im["id"])
    return [{"name": k, **r} for k, r in tally.rows().items()]


def walk_parser(description: str, default_model: Path) -> argparse.ArgumentParser:
    """The options every walk experiment takes (``--data``, ``--model``, ``--threads``, ``--json``); add its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", type=Path, default=default_model)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, required=True)
    return p


def report_walks(rows: list[dict[str, Any]], data: Path, model: Path, json_path: Path) -> None:
    """Print one JSON row per configuration and write them all (with the data and model) to ``json_path``."""
    for r in rows:
        print(json.dumps(r))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"data": str(data), "model": str(model), "rows": rows}, indent=1) + "\n")


def _images(coco: dict[str, Any], items: list[Any], progress: str | None) -> Any:
    """``(COCO image, item)`` pairs of a dataset, behind a tqdm bar described by ``progress`` (None: no bar)."""
    pairs = list(zip(coco["images"], items, strict=True))
    if progress is None:
        return pairs
    from tqdm import tqdm

    return tqdm(pairs, desc=progress, unit="img")


class _Tally:
    """Detections (COCO results) and chips per level of each configuration ('pyramid' among them) over a dataset,
    and from them one row per configuration: COCO AP, chips per image, ratios to the pyramid, AP points lost."""

    def __init__(self, keys: list[str], coco: dict[str, Any], n_levels: int) -> None:
        self.coco = coco
        self.cat_ids = [c["id"] for c in sorted(coco["categories"], key=lambda c: c["id"])]
        self.dets: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        self.by_level = {k: np.zeros(n_levels, np.int64) for k in keys}

    def add(self, key: str, res: Any, image_id: int) -> None:
        """One image's result (``Pipeline.finish`` / ``finish_focus``) under configuration ``key``."""
        self.dets[key] += _coco_dets(res, image_id, self.cat_ids)
        levels = len(res.plan.levels)
        self.by_level[key][:levels] += np.bincount(res.plan.chips[:, 0], minlength=levels)

    def rows(self) -> dict[str, dict[str, Any]]:
        """Per configuration (in the order given): COCO AP, chips per image (and per level), the pyramid's chips
        over its chips, AP and AP_S points lost against the pyramid."""
        scored = {k: coco_scores(self.coco, v) for k, v in self.dets.items()}
        n, base = max(len(self.coco["images"]), 1), scored["pyramid"]
        chips = {k: int(v.sum()) for k, v in self.by_level.items()}
        return {
            k: {m: round(scored[k][m], 4) for m in METRICS}
            | {
                "chips_per_image": round(chips[k] / n, 2),
                "chips_per_image_by_level": [round(float(c) / n, 2) for c in self.by_level[k]],
                "chips_ratio": round(chips["pyramid"] / max(chips[k], 1), 3),
                "AP_lost_points": round(100 * (base["AP"] - scored[k]["AP"]), 2),
                "AP_S_lost_points": round(100 * (base["AP_S"] - scored[k]["AP_S"]), 2),
            }
            for k in scored
        }


def markdown(results: dict[str, Any]) -> str:
    """Focus vs pyramid as a Markdown table, with the goal's verdict."""
    head = "| mode | threshold | AP | AP50 | AP_S | AP_M | AP_L | chips/img | fewer chips | AP lost (pts) |"
    lines = [head, "|" + "---|" * 10]
    for r in [results["pyramid"], *results["focus"]]:
        t = "—" if r["threshold"] is None else f"{r['threshold']:g}"
        name = "pyramid" if r["threshold"] is None else "focus"
        lines.append(
            f"| {name} | {t} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP_S']:.3f} | {r['AP_M']:.3f} | {r['AP_L']:.3f} | "
            f"{r['chips_per_image']:.1f} | {r['chips_ratio']:.2f}x | {r['AP_lost_points']:+.2f} |"
        )
    g = results["goal"]
    verdict = (
        f"goal (>= {g['chips_ratio_at_least']}x fewer chips at <= {g['AP_lost_points_at_most']} AP point lost): "
        + (f"met at threshold {results['best_threshold']:g}" if g["met"] else "not met at any threshold tried")
    )
    src = results["focus_source"]
    return (
        "\n".join(lines) + f"\n\n{results['images']} images of {results['data']}; focus map from the {src}. {verdict}\n"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """PNG: chips saved (x fewer than the pyramid) against AP points lost, one labelled point per threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results["focus"], key=lambda r: r["threshold"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    xs, ys = [r["chips_ratio"] for r in rows], [r["AP_lost_points"] for r in rows]
    ax.plot(xs, ys, marker="o", label="focus (AP, all sizes)")
    ax.plot(xs, [r["AP_S_lost_points"] for r in rows], marker="s", ls="--", alpha=0.7, label="focus (AP_S)")
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(f"t={r['threshold']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(GOAL_AP_LOST, color="grey", lw=0.8, ls=":")
    ax.axvline(GOAL_RATIO, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("chips saved: pyramid chips / focus chips per image")
    ax.set_ylabel("AP lost vs pyramid (points)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"Focus vs pyramid, {results['images']} images ({Path(results['data']).name})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(results: dict[str, Any], json_path: Path) -> list[Path]:
    """JSON, Markdown and PNG next to each other (``X.json``, ``X.md``, ``X_focus_curve.png``)."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2))
    md = json_path.with_suffix(".md")
    md.write_text(markdown(results))
    png = json_path.with_name(json_path.stem + "_focus_curve.png")
    plot(results, png)
    return [json_path, md, png]
