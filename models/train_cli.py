"""``snipserve train --config FILE``: SNIPER training (resumes from ``<out>/last.pt`` when present)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="training config YAML (models/configs/default.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="override the run folder")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps")
    parser.add_argument("--seed", type=int, default=None, help="override the seed")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    # Sleeping (not spinning) OpenMP workers: on a shared 2-core machine a spinning torch thread pool ran
    # 12x slower (3.9 s vs 0.32 s per step, /tmp bench of TinyDet batch 16) whenever another process was busy.
    # Must be set before torch (and its OpenMP runtime) is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from models.train import TrainConfig, train  # torch is imported only here

    cfg = TrainConfig.from_yaml(args.config)
    overrides = {k: v for k, v in (("out", args.out), ("steps", args.steps), ("seed", args.seed)) if v is not None}
    if overrides:
        cfg = cfg.model_copy(update=overrides)
    train(cfg, progress=not args.no_progress)
    return 0
