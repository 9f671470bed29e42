"""Staging: which path is chosen, and the GPU path through the batcher and the pipeline.

The GPU path runs against the CuPy and TensorRT stand-ins (tests/service/fake_gpu.py) with the crop and resize
kernels' own CUDA source emulated on the CPU: the fake engine reports each chip's mean and max, so any
difference in what reaches the engine (a wrong chip, a wrong row, another request's pixels) shows.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import crop_gpu
from service.adapters import ChipDetections
from service.batch import Batcher, BatcherConfig
from service.crop import Normalizer, resize_levels
from service.engines import EngineConfig, create_engine
from service.engines.fake import FAKE_CARD, FakeEngine
from service.engines.manifest import BatchProfile
from service.errors import ModelLoadError
from service.modelcard import ModelCard
from service.options import DetectOptions
from service.pipeline import Pipeline
from service.plan import ChipPlan, LevelSpec, PlanConfig, plan
from service.staging import DeviceStaging, HostStaging, select_staging
from tests.service import fake_gpu
from tests.service.test_crop_gpu import smooth_image


def fingerprint(outputs: Sequence[np.ndarray], card: ModelCard, thresholds: np.ndarray) -> ChipDetections:
    """An adapter for the fake TensorRT engine: one "detection" per chip carrying the chip's mean and max."""
    mean, top = outputs
    n = len(mean)
    boxes = np.zeros((n, 4), np.float32)
    boxes[:, 2] = top[:, 0]
    return ChipDetections(np.arange(n, dtype=np.int32), boxes, mean[:, 0].astype(np.float32), np.zeros(n, np.int32))


def trt_engine(tmp_path: Path, max_batch: int = 4) -> Any:
    profile = BatchProfile(min_batch=2, opt_batch=max_batch, max_batch=max_batch)
    return create_engine(fake_gpu.engine_files(tmp_path, profile), EngineConfig(kind="tensorrt"))


def image_and_plan(seed: int, h: int, w: int) -> tuple[np.ndarray, ChipPlan]:
    img = smooth_image(np.random.default_rng(seed), h, w)
    levels = (LevelSpec(scale=1.4), LevelSpec(scale=1.0), LevelSpec(scale=0.55))
    cfg = PlanConfig(chip_size=fake_gpu.TRT_CARD.input_size, levels=levels, sweet_spot=FAKE_CARD.sweet_spot)
    return img, plan((w, h), cfg)


def by_chip(d: ChipDetections) -> tuple[np.ndarray, np.ndarray]:
    o = np.argsort(d.chip, kind="stable")
    return d.scores[o], d.boxes[o]


# ---- choice ----------------------------------------------------------------------------------------------------


def test_cpu_engines_stage_on_the_host() -> None:
    engine = FakeEngine()
    norm = Normalizer.from_card(engine.card)
    assert isinstance(select_staging(engine, norm, "auto"), HostStaging)
    assert isinstance(select_staging(engine, norm, "cpu"), HostStaging)
    with pytest.raises(ModelLoadError, match=r"preprocess=gpu needs an engine that takes chips on the device"):
        select_staging(engine, norm, "gpu")
    assert Pipeline(engine).staging.name == "cpu"


def test_tensorrt_engines_stage_on_the_device(fake_trt: types.ModuleType, tmp_path: Path) -> None:
    engine = trt_engine(tmp_path)
    assert Pipeline(engine).staging.name == "gpu"
    assert Pipeline(engine, preprocess="gpu").staging.name == "gpu"
    assert Pipeline(engine, preprocess="cpu").staging.name == "cpu"


def test_broken_gpu_kernels_fail_the_startup_loudly(
    fake_trt: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TensorRT engine whose pre-processing kernels cannot compile (CuPy without CUDA headers) is a broken
    install: auto must not switch to the CPU silently; the error names the cause and both ways out."""
    engine = trt_engine(tmp_path)

    def broken() -> None:
        raise RuntimeError("Failed to find CUDA headers")

    monkeypatch.setattr(crop_gpu, "compile_kernels", broken)
    for preprocess in ("auto", "gpu"):
        with pytest.raises(ModelLoadError) as info:
            Pipeline(engine, preprocess=preprocess)  # type: ignore[arg-type]
        message = str(info.value)
        assert f"preprocess={preprocess}: the GPU pre-processing kernels failed" in message
        assert "RuntimeError: Failed to find CUDA headers" in message and "SNIPSERVE_PREPROCESS=cpu" in message
        assert "cuda-cudart-dev" in message
    assert Pipeline(engine, preprocess="cpu").staging.name == "cpu"  # the explicit choice still works


# ---- the GPU path ------------------------------------------------------------------------------------------------


async def test_batcher_on_the_device_feeds_the_engine_what_the_host_path_does(
    fake_trt: types.ModuleType, tmp_path: Path
) -> None:
    """Three requests share batches of 4 (chips of different requests and levels in one batch, the profile's min
    batch padding the tail); with the same level images the device path gives bit-identical engine outputs."""
    engine = trt_engine(tmp_path)
    norm = Normalizer.from_card(engine.card)
    cases = [image_and_plan(seed, h, w) for seed, (h, w) in enumerate([(150, 220), (90, 130), (260, 170)])]
    config = BatcherConfig(max_batch=4, max_delay_ms=20.0)
    results = {}
    for staging in (HostStaging(engine, norm), DeviceStaging(engine, norm)):
        batcher = Batcher(engine, fingerprint, norm, config, staging)
        await batcher.start()
        try:
            works = []
            for img, p in cases:
                levels: list[Any] = resize_levels(img, p)
                if staging.name == "gpu":  # the same level pixels, "on the device"
                    levels = [fake_gpu.FakeArray(np.ascontiguousarray(x)) for x in levels]
                works.append(await batcher.submit(p, levels, threshold=0.0))
            results[staging.name] = await asyncio.gather(*(w.future for w in works))
        finally:
            await batcher.stop()
    total = sum(p.num_chips for _, p in cases)
    assert total > 12  # several batches, mixing requests
    for (_, p), host, dev in zip(cases, results["cpu"], results["gpu"], strict=True):
        assert len(dev) == p.num_chips
        for a, b in zip(by_chip(host), by_chip(dev), strict=True):
            np.testing.assert_array_equal(a, b)


async def test_pipeline_on_the_device_matches_the_cpu_path(fake_trt: types.ModuleType, tmp_path: Path) -> None:
    """The whole pre-processing on the device (upload, resize kernels, crop kernel) through Pipeline and the
    batcher, against the CPU pipeline: within one grey level per pixel, so chip means within one level."""
    engine = trt_engine(tmp_path)
    gpu, cpu = Pipeline(engine, preprocess="gpu"), Pipeline(engine, preprocess="cpu")
    gpu.adapter = cpu.adapter = fingerprint
    img, _ = image_and_plan(7, 210, 260)
    options = DetectOptions(levels=(LevelSpec(scale=1.4), LevelSpec(scale=0.55)), score_threshold=0.0)
    prepared = gpu.prepare(img, options)
    assert all(isinstance(x, fake_gpu.FakeArray) for x in prepared.level_images)
    want = cpu.infer_chips(cpu.prepare(img, options))  # synchronous path, host staging
    got_sync = gpu.infer_chips(prepared)  # synchronous path, device staging
    batcher = Batcher(engine, fingerprint, gpu.norm, BatcherConfig(max_batch=4, max_delay_ms=5.0), gpu.staging)
    await batcher.start()
    try:
        work = await batcher.submit(prepared.plan, prepared.level_images, 0.0)
        got_async = await work.future
    finally:
        await batcher.stop()
    one_level = float(gpu.norm.scale.max()) * 1.0001
    for got in (got_sync, got_async):
        (gm, gb), (wm, wb) = by_chip(got), by_chip(want)
        assert gm.shape == wm.shape
        assert np.abs(gm - wm).max() <= one_level  # per-chip mean
        assert np.abs(gb - wb).max() <= one_level  # per-chip max
    np.testing.assert_array_equal(by_chip(got_sync)[0], by_chip(got_async)[0])
