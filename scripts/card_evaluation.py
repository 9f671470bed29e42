"""Write the measured evaluation into the shipped model's sidecar card (models/snipserve_default.yaml).

    python scripts/card_evaluation.py --real-val docs/results/real_val.json --real-test docs/results/real_test.json \
        --synth-val docs/results/synth_val.json [--card models/snipserve_default.yaml] [--measured-on TEXT]

Everything from the card's ``evaluation:`` line to its end is replaced (the comments and fields above it stay), so
a re-measurement is a card-only change and never rewrites the weights file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

KEYS = ("AP", "AP50", "AP75", "AP_S", "AP_M", "AP_L", "chips_per_image")


def summary(results: dict[str, Any], sources: bool = True) -> dict[str, Any]:
    """Per mode: the COCO numbers, chips per image, AP50 per class (and per source) of one eval JSON."""
    out: dict[str, Any] = {}
    for mode, r in results["modes"].items():
        row: dict[str, Any] = {k: r[k] for k in KEYS if k in r}
        row["per_class_AP50"] = {c: v["AP50"] for c, v in r.get("per_class", {}).items()}
        if sources and r.get("per_source"):
            row["per_source_AP50"] = {s: v["AP50"] for s, v in r["per_source"].items()}
        out[mode] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--card", type=Path, default=Path("models/snipserve_default.yaml"))
    p.add_argument("--real-val", type=Path, required=True)
    p.add_argument("--real-test", type=Path, required=True)
    p.add_argument("--synth-val", type=Path, required=True)
    p.add_argument("--measured-on", default="2-core AMD EPYC, ONNX Runtime CPU EP, 2 threads (README)")
    args = p.parse_args(argv)
    val, test, synth = (json.loads(f.read_text()) for f in (args.real_val, args.real_test, args.synth_val))
    n_val, n_test = val.get("images"), test.get("images")
    evaluation = {
        "real_val": summary(val)
        | {"data": f"real validation split, {n_val} images (snipserve data import of models/data/real_sources.yaml)"},
        "real_test": summary(test) | {"data": f"real test split, {n_test} images (never used for a choice)"},
        "synthetic_val": summary(synth, sources=False) | {"data": "snipserve synth --images 120 --seed 1000"},
        "modes": "snipserve eval --mode single|slices|pyramid|focus (docs/results/*.json)",
        "measured_on": args.measured_on,
    }
    text = args.card.read_text()
    head = text[: text.index("\nevaluation:") + 1] if "\nevaluation:" in text else text
    args.card.write_text(head + yaml.safe_dump({"evaluation": evaluation}, sort_keys=False, width=110))
    print(f"wrote the evaluation of {args.card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
