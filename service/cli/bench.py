"""``snipserve bench``: engine, in-process pipeline and HTTP throughput on the shipped model.

Prints each stage's throughput as a ratio of the engine-only limit (engine chips/s / chips per image),
and a per-stage time breakdown. A benchmark, not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.engines import EngineConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="ONNX model (default: the shipped model)")
    parser.add_argument("--images", type=int, default=8, help="synthetic test images (default 8)")
    parser.add_argument("--seed", type=int, default=777, help="synthetic image seed (not a training seed)")
    parser.add_argument("--max-long-side", type=int, default=2000, help="largest synthetic image side")
    parser.add_argument("--max-batch", type=int, default=8, help="engine batch size")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = all cores)")
    parser.add_argument("--spin", action="store_true", help="let ONNX Runtime threads spin (SNIPSERVE_ORT_SPIN)")
    parser.add_argument(
        "--no-fuse",
        dest="fuse",
        action="store_false",
        help="normalise chips in NumPy (SNIPSERVE_FUSE_PREPROCESS=false)",
    )
    parser.add_argument("--engine-seconds", type=float, default=10.0, help="time for the engine-only measurement")
    parser.add_argument("--concurrency", type=int, default=4, help="concurrent HTTP clients")
    parser.add_argument("--http-seconds", type=float, default=30.0, help="time for the HTTP measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")


def _images(args: argparse.Namespace) -> list[bytes]:
    from models.synth import SynthConfig, generate

    cfg = SynthConfig(max_long_side=args.max_long_side)
    return [s.jpeg for s in generate(cfg, seed=args.seed, count=args.images)]


def bench_engine(pipeline: Any, image: np.ndarray, seconds: float) -> float:
    """Chips/s of the engine alone on full batches of real chips (cut from ``image``, in the engine's layout)."""
    from service.crop import crop_plan
    from service.options import DetectOptions

    engine = pipeline.engine
    prepared = pipeline.prepare(image, DetectOptions())
    chips = crop_plan(prepared.level_images, prepared.plan, pipeline.norm, layout=engine.input_layout)
    batch = np.ascontiguousarray(chips[: engine.max_batch])
    engine.infer(batch)  # warm
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.infer(batch)
        n += batch.shape[0]
    return n / (time.perf_counter() - t0)


def bench_pipeline(pipeline: Any, images: list[np.ndarray]) -> tuple[float, float, dict[str, float]]:
    """(images/s, mean chips per image, mean seconds per stage) of the synchronous in-process pipeline."""
    pipeline.detect(images[0])  # warm
    stages: dict[str, list[float]] = {}
    chips = []
    t0 = time.perf_counter()
    for img in images:
        r = pipeline.detect(img)
        chips.append(r.num_chips)
        for k, v in r.timings.items():
            stages.setdefault(k, []).append(v)
    elapsed = time.perf_counter() - t0
    return len(images) / elapsed, float(np.mean(chips)), {k: statistics.mean(v) for k, v in stages.items()}


def bench_http(
    model: Path | None, images: list[bytes], concurrency: int, seconds: float, engine: EngineConfig
) -> dict[str, Any]:
    """Images/s of the real HTTP service (a `snipserve serve` process running ``engine``'s batch, threads, spin and
    fusion) under ``concurrency`` closed-loop clients for ``seconds``."""
    import httpx

    from service.cli.serve_process import ServerStartError, running_server, serve_command

    try:
        with running_server(
            serve_command(), env=_server_env(model, engine), ready_timeout_s=120, stop_timeout_s=60
        ) as server:
            try:
                return asyncio.run(_closed_loop(f"{server.url}/v1/detect", images, concurrency, seconds))
            except httpx.HTTPError as e:
                tail = server.output_tail()
                raise SystemExit(f"HTTP benchmark failed: {e!r}; server output ({server.log}):\n{tail}") from e
    except ServerStartError as e:
        raise SystemExit(f"snipserve serve did not start: {e}") from e


def _server_env(model: Path | None, engine: EngineConfig) -> dict[str, str]:
    env = {
        "SNIPSERVE_MAX_BATCH": str(engine.max_batch),
        "SNIPSERVE_INTRA_OP_THREADS": str(engine.intra_op_threads),
        "SNIPSERVE_LOG_LEVEL": "warning",
        "SNIPSERVE_ORT_SPIN": "true" if engine.spin else "false",
        "SNIPSERVE_FUSE_PREPROCESS": "true" if engine.fuse_preprocess else "false",
    }
    if model is not None:
        env["SNIPSERVE_MODEL_PATH"] = str(model)
        env["SNIPSERVE_MODELS_DIR"] = str(model.resolve().parent)
    return env


async def _closed_loop(url: str, images: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    import httpx

    async def client(i: int, stop: float, lat: list[float], timings: list[dict[str, float]]) -> None:
        async with httpx.AsyncClient(timeout=300) as http:
            k = i
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await http.post(url, content=images[k % len(images)], headers={"content-type": "image/jpeg"})
                r.raise_for_status()
                lat.append(time.perf_counter() - t)
                timings.append(r.json()["timings"])
                k += concurrency

    lat: list[float] = []
    timings: list[dict[str, float]] = []
    # warm-up: one pass over every image
    await asyncio.gather(*(client(i, time.perf_counter() + 0.001, [], []) for i in range(concurrency)))
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i, t0 + seconds, lat, timings) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    stage_ms = {k: statistics.mean(t[k] for t in timings if k in t) for k in timings[0]} if timings else {}
    return {
        "images_per_s": len(lat) / elapsed,
        "requests": len(lat),
        "latency_p50_s": float(np.percentile(lat, 50)),
        "latency_p99_s": float(np.percentile(lat, 99)),
        "stage_ms": stage_ms,
    }


def run(args: argparse.Namespace) -> int:
    from service.engines import EngineConfig
    from service.pipeline import Pipeline
    from service.settings import default_model_path

    model = args.model or default_model_path()
    jpegs = _images(args)
    from service.decode import DecodeConfig, decode_image

    decoded = [decode_image(j, DecodeConfig()) for j in jpegs]
    engine_config = EngineConfig(
        max_batch=args.max_batch, intra_op_threads=args.threads, spin=args.spin, fuse_preprocess=args.fuse
    )
    pipeline = Pipeline.load(model, engine_config)
    engine_cps = bench_engine(pipeline, decoded[0], args.engine_seconds)
    pipe_ips, chips_per_image, stages = bench_pipeline(pipeline, decoded)
    limit = engine_cps / chips_per_image
    pipeline.engine.close()
    http = bench_http(args.model, jpegs, args.concurrency, args.http_seconds, engine_config)
    result = {
        "model": str(model),
        "images": len(jpegs),
        "chips_per_image": chips_per_image,
        "engine_chips_per_s": engine_cps,
        "engine_limit_images_per_s": limit,
        "pipeline_images_per_s": pipe_ips,
        "pipeline_ratio": pipe_ips / limit,
        "http_images_per_s": http["images_per_s"],
        "http_ratio": http["images_per_s"] / limit,
        "http": http,
        "pipeline_stage_s": stages,
    }
    print(f"chips per image            {chips_per_image:10.1f}")
    print(f"engine (full batches)      {engine_cps:10.1f} chips/s  -> limit {limit:.3f} images/s")
    print(f"pipeline (in-process)      {pipe_ips:10.3f} images/s  ratio {pipe_ips / limit:.3f}")
    http_ips = http["images_per_s"]
    print(
        f"HTTP ({args.concurrency} clients)".ljust(27) + f"{http_ips:10.3f} images/s  ratio {http_ips / limit:.3f}"
        f"  p50 {http['latency_p50_s']:.2f} s  p99 {http['latency_p99_s']:.2f} s"
    )
    print("per-stage mean, in-process (ms):  " + "  ".join(f"{k} {v * 1000:.1f}" for k, v in stages.items()))
    print("per-stage mean, HTTP (ms):        " + "  ".join(f"{k} {v:.1f}" for k, v in http["stage_ms"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0
