"""The CuPy / TensorRT stand-ins are as strict as the libraries where our code could go wrong (fake_gpu.py):
stream ordering, fresh memory, ``set()``'s checks; and the GPU modules use them as CUDA requires."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import crop_gpu, soft_nms_gpu
from service.crop import Normalizer
from service.engines import EngineConfig, create_engine
from service.engines.manifest import BatchProfile
from service.plan import LevelSpec, PlanConfig, plan
from tests.service import fake_gpu
from tests.service.test_crop_gpu import smooth_image
from tests.service.test_soft_nms_gpu import random_case


def test_streams_are_ordered_only_by_events(fake_cupy: types.ModuleType) -> None:
    cp = fake_cupy
    a, b = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    assert a.ptr != b.ptr and 0 not in (a.ptr, b.ptr)
    x = cp.empty(4, cp.float32)
    with a:
        x.set(np.arange(4, dtype=np.float32))
    # b never waited for a: it reads the fresh (poisoned) memory, as a real race would
    assert np.isnan(x.get(stream=b)).all()
    y = cp.empty(4, cp.float32)
    with a:
        y.set(np.arange(4, dtype=np.float32))
    b.wait_event(a.record())
    np.testing.assert_array_equal(y.get(stream=b), np.arange(4))


def test_legacy_default_stream_orders_blocking_streams_only(fake_cupy: types.ModuleType) -> None:
    cp = fake_cupy
    blocking, nonblocking = cp.cuda.Stream(), cp.cuda.Stream(non_blocking=True)
    x, y = cp.empty(2, cp.float32), cp.empty(2, cp.float32)
    with blocking:
        x.fill(1)
    with nonblocking:
        y.fill(2)
    assert (x.get() == 1).all()  # the null stream waits for the blocking stream
    assert np.isnan(y.get()).all()  # ... not for the non-blocking one


def test_set_checks_dtype_and_shape_like_cupy(fake_cupy: types.ModuleType) -> None:
    x = fake_cupy.empty((2, 3), fake_cupy.float32)
    with pytest.raises(TypeError, match="float64 array cannot be set to float32 array"):
        x.set(np.zeros((2, 3), np.float64))
    with pytest.raises(ValueError, match="Shape mismatch"):
        x.set(np.zeros((3, 2), np.float32))


def test_gpu_stages_never_use_the_legacy_default_stream(fake_trt: Any, tmp_path: Path) -> None:
    """Levels, crop, TensorRT and soft-NMS each run on a non-default stream of their own (the default stream
    would serialise them with each other and with TensorRT's waits)."""
    engine = create_engine(
        fake_gpu.engine_files(tmp_path, BatchProfile(min_batch=1, opt_batch=2, max_batch=4)),
        EngineConfig(kind="tensorrt"),
    )
    img = smooth_image(np.random.default_rng(2), 150, 210)
    cfg = PlanConfig(chip_size=fake_gpu.TRT_CARD.input_size, levels=(LevelSpec(scale=1.2), LevelSpec(scale=0.5)))
    p = plan((img.shape[1], img.shape[0]), cfg)
    start = len(fake_gpu.stream_history())
    levels = crop_gpu.levels_to_device(img, p)
    after_levels = len(fake_gpu.stream_history())
    engine.infer_staged(levels, p.chips[:3], Normalizer.from_card(fake_gpu.TRT_CARD))  # type: ignore[attr-defined]
    after_infer = len(fake_gpu.stream_history())
    boxes, scores, groups = random_case(np.random.default_rng(3), 40, classes=2)
    soft_nms_gpu.soft_nms_groups_gpu(boxes, scores, groups)
    history = fake_gpu.stream_history()
    stages = {
        "levels": set(history[start:after_levels]),
        "crop+tensorrt": set(history[after_levels:after_infer]),
        "soft_nms": set(history[after_infer:]),
    }
    assert all(stages.values()) and 0 not in set(history[start:]), stages
    runner = engine._runner  # type: ignore[attr-defined]
    assert stages["crop+tensorrt"] == {runner.crop_stream.ptr, runner.stream.ptr}
    assert len(stages["levels"] | stages["crop+tensorrt"] | stages["soft_nms"]) == 4  # one stream per stage
    engine.close()
