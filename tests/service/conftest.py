"""Fixtures for the GPU modules: one CuPy for the parity tests, real or emulated.

``cupy_backend`` runs a test twice: ``emulated`` (everywhere: the CuPy stand-in of :mod:`tests.service.fake_gpu`,
whose kernels are the project's CUDA source compiled for the CPU by :mod:`tests.cudasim`) and ``cuda`` (marked
``gpu``: the real CuPy on a real device, skipped with the reason where there is none).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterator
from functools import cache

import pytest

from service import crop_gpu, soft_nms_gpu
from tests import cudasim
from tests.service import fake_gpu


@cache
def cuda_unavailable() -> str | None:
    """``None`` when the real CuPy sees a CUDA device, else why not."""
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (the gpu extra)"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as exc:  # noqa: BLE001 - any driver/runtime failure means "no GPU here"
        return f"no usable CUDA device: {type(exc).__name__}: {exc}"
    return None


def _clear_caches() -> None:
    for cached in (soft_nms_gpu._kernel, soft_nms_gpu.gpu_available, crop_gpu._module):
        cached.cache_clear()


@pytest.fixture
def fake_cupy(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """The CuPy stand-in in ``sys.modules`` (kernels emulated on the CPU)."""
    reason = cudasim.available()
    if reason is not None:
        pytest.skip(reason)
    cp, cupyx = fake_gpu.make_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cp)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    _clear_caches()
    yield cp
    _clear_caches()


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def cupy_backend(request: pytest.FixtureRequest) -> Iterator[types.ModuleType]:
    """CuPy for a parity test: the emulation on every machine, the real one on GPU hosts."""
    if request.param == "emulated":
        yield request.getfixturevalue("fake_cupy")
        return
    reason = cuda_unavailable()
    if reason is not None:
        pytest.skip(reason)
    import cupy

    _clear_caches()
    yield cupy
    _clear_caches()


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch, fake_cupy: types.ModuleType) -> types.ModuleType:
    """The TensorRT stand-in in ``sys.modules`` (with the CuPy one)."""
    trt = fake_gpu.make_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt
