"""Architecture comparison: chips/s of ONNX detectors on this CPU, next to their AP from `snipserve eval --json`.

    python benchmarks/arch_compare.py --model A.onnx --eval A_val.json --model B.onnx --eval B_val.json \
        [--threads 2] [--batch 16] [--seconds 20] [--json OUT.json]

Each model runs the same random chips (ONNX Runtime CPU EP, ``--threads`` intra-op threads, batches of
``--batch``) for ``--seconds`` after a warm-up; the models alternate in short rounds so a busy machine slows each
alike. Prints chips/s, the ratio to the first model, and AP / AP50 / per-class AP50 (pyramid) when an eval JSON
is given: the trade the issue asks to choose by -- AP on the real validation split against chips/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def chips_per_second(paths: list[Path], threads: int, batch: int, seconds: float, rounds: int = 5) -> list[float]:
    """Chips/s of each model, measured in ``rounds`` alternating rounds of ``seconds / rounds`` each."""
    sessions = [session(p, threads) for p in paths]
    size = sessions[0].get_inputs()[0].shape[-1]
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    name = [s.get_inputs()[0].name for s in sessions]
    for s, n in zip(sessions, name, strict=True):  # warm-up
        s.run(None, {n: x})
    done, spent = [0] * len(paths), [0.0] * len(paths)
    for _ in range(rounds):
        for k, (s, n) in enumerate(zip(sessions, name, strict=True)):
            stop = time.perf_counter() + seconds / rounds
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                s.run(None, {n: x})
                spent[k] += time.perf_counter() - t0
                done[k] += batch
    return [d / t for d, t in zip(done, spent, strict=True)]


def _ap(eval_json: Path | None) -> dict[str, Any]:
    if eval_json is None:
        return {}
    p = json.loads(eval_json.read_text())["modes"]["pyramid"]
    return {"AP": p["AP"], "AP50": p["AP50"], "per_class_AP50": {c: v["AP50"] for c, v in p["per_class"].items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", required=True)
    ap.add_argument("--eval", type=Path, action="append", default=[], help="eval JSON per model (same order)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0, help="per model")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    evals = args.eval + [None] * (len(args.model) - len(args.eval))
    rates = chips_per_second(args.model, args.threads, args.batch, args.seconds)
    rows = []
    for path, rate, ev in zip(args.model, rates, evals, strict=True):
        row = {"model": str(path), "chips_per_s": round(rate, 1), "speed_vs_first": round(rate / rates[0], 3)}
        rows.append(row | _ap(ev))
        print(json.dumps(rows[-1]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = {"threads": args.threads, "batch": args.batch, "seconds_per_model": args.seconds, "models": rows}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
