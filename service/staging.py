"""Staging: how the chips of a batch reach the engine. One interface, two places the work can happen.

- :class:`HostStaging` (the CPU path, any engine): each pyramid level is resized once with OpenCV in host
  memory (:func:`service.crop.resize_levels`), and a batch's chips are cropped into a host buffer in the
  engine's input layout, which ``engine.infer`` takes.
- :class:`DeviceStaging` (engines with a device input buffer, i.e. TensorRT): the image is uploaded once, its
  levels are resized on the GPU (:mod:`service.crop_gpu`) and stay there, and a batch's chips, from any number of
  requests, are cut and normalised straight into the engine's input buffer by one kernel launch, on the engine
  thread, right before inference. Only the original image crosses the bus; nothing is staged in host memory.

Both are used the same way by :class:`~service.batch.Batcher` and :class:`~service.pipeline.Pipeline`:
``levels`` when a request is prepared, ``fill`` on a preparation thread (host work), ``infer`` on the engine
thread. :func:`select_staging` picks one from the ``preprocess`` setting (``auto``: the device when the engine
can take chips on the device, else the host; kernels that cannot compile then fail the startup, loudly).

Status of the device path: the kernels' CUDA source runs in every CI run, compiled for the CPU by the tests'
CUDA emulation, through this code; it has not run on a GPU yet (README, GPU path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from service.crop import Normalizer, chip_buffer, crop_chips, resize_levels
from service.engines import Engine
from service.errors import ModelLoadError
from service.plan import ChipPlan

log = logging.getLogger("snipserve.staging")

Preprocess = Literal["auto", "cpu", "gpu"]


@dataclass(frozen=True)
class BatchPart:
    """One request's rows in a batch: chips ``chips`` (``int32 [n, 3]`` level, x0, y0) of ``level_images``,
    written from batch row ``row`` on."""

    level_images: list[Any]
    chips: np.ndarray
    row: int


class Staging(Protocol):
    name: str  # "cpu" or "gpu": where pre-processing runs

    def levels(self, image: np.ndarray, plan: ChipPlan) -> list[Any]:
        """The level images of ``image`` (``uint8 [H, W, 3]`` RGB) for ``plan``, where ``fill`` reads them."""
        ...

    def new_buffer(self, rows: int) -> Any:
        """A batch buffer for up to ``rows`` chips (one per batch in flight)."""
        ...

    def fill(self, parts: list[BatchPart], buffer: Any) -> Any:
        """Host-side preparation of one batch (a preparation thread): returns what ``infer`` takes."""
        ...

    def infer(self, staged: Any) -> list[np.ndarray]:
        """Run a filled batch (the engine thread): outputs in the card's order, one row per chip."""
        ...


class HostStaging:
    """Levels in host memory, chips cropped on the CPU into the engine's host input layout."""

    name = "cpu"

    def __init__(self, engine: Engine, norm: Normalizer) -> None:
        self.engine = engine
        self.norm = norm
        self.layout = engine.input_layout

    def levels(self, image: np.ndarray, plan: ChipPlan) -> list[Any]:
        return list(resize_levels(image, plan))

    def new_buffer(self, rows: int) -> np.ndarray:
        return chip_buffer(self.layout, rows, self.engine.card.input_size)

    def fill(self, parts: list[BatchPart], buffer: np.ndarray) -> np.ndarray:
        rows = 0
        for part in parts:
            crop_chips(part.level_images, part.chips, self.norm, buffer[part.row :], self.layout)
            rows = max(rows, part.row + len(part.chips))
        return buffer[:rows]

    def infer(self, staged: np.ndarray) -> list[np.ndarray]:
        return self.engine.infer(staged)


class DeviceEngine(Engine, Protocol):
    """An engine that takes chips already on the device (:class:`service.engines.tensorrt.TensorRTEngine`)."""

    @property
    def input_device(self) -> Any: ...

    def infer_staged(self, level_images: list[Any], chips: np.ndarray, norm: Normalizer) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class DeviceBatch:
    """A batch described for the crop kernel: all parts' level images, chips with level indices into them."""

    level_images: list[Any]
    chips: np.ndarray  # int32 [rows, 3]


class DeviceStaging:
    """Levels on the GPU; chips cut into the engine's device input buffer by the crop kernel."""

    name = "gpu"

    def __init__(self, engine: DeviceEngine, norm: Normalizer) -> None:
        from service import crop_gpu  # lazy: CuPy is imported only here

        self.engine = engine
        self.norm = norm
        self._crop_gpu = crop_gpu
        crop_gpu.compile_kernels()  # compile now: a broken toolchain fails at startup, not on the first request

    def levels(self, image: np.ndarray, plan: ChipPlan) -> list[Any]:
        return self._crop_gpu.levels_to_device(image, plan)

    def new_buffer(self, rows: int) -> None:
        return None  # the engine's own device input buffer is the only one

    def fill(self, parts: list[BatchPart], buffer: None) -> DeviceBatch:
        levels: list[Any] = []
        chips = []
        for part in sorted(parts, key=lambda p: p.row):
            c = np.array(part.chips, np.int32, copy=True)
            c[:, 0] += len(levels)  # level indices into the batch's concatenated level list
            levels.extend(part.level_images)
            chips.append(c)
        return DeviceBatch(levels, np.concatenate(chips) if chips else np.zeros((0, 3), np.int32))

    def infer(self, staged: DeviceBatch) -> list[np.ndarray]:
        return self.engine.infer_staged(staged.level_images, staged.chips, self.norm)


def device_capable(engine: Engine) -> bool:
    """True when ``engine`` can take chips written on the device (it has a device input buffer)."""
    return callable(getattr(engine, "infer_staged", None)) and getattr(engine, "input_device", None) is not None


def select_staging(engine: Engine, norm: Normalizer, preprocess: Preprocess = "auto") -> Staging:
    """The staging ``preprocess`` asks for: ``cpu``, ``gpu`` (fails with :class:`ModelLoadError` when the engine or
    the GPU kernels cannot do it) or ``auto`` (the GPU when the engine takes chips on the device, else the CPU).
    With ``auto`` on such an engine, kernels that fail to compile are a startup failure too, never a silent
    switch to the CPU: the error says how to fix the toolchain or to choose ``cpu`` explicitly."""
    if preprocess == "cpu":
        return HostStaging(engine, norm)
    if not device_capable(engine):
        if preprocess == "gpu":
            raise ModelLoadError(
                f"preprocess=gpu needs an engine that takes chips on the device (TensorRT); "
                f"the {engine.name} engine on {engine.providers} does not"
            )
        return HostStaging(engine, norm)
    try:
        return DeviceStaging(engine, norm)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 - any CuPy/NVRTC failure
        # Not a silent switch to the CPU, for auto either: a GPU engine whose kernels cannot compile is a broken
        # install (most often CUDA headers missing for NVRTC), and serving on would hide it behind slower numbers.
        raise ModelLoadError(
            f"preprocess={preprocess}: the GPU pre-processing kernels failed to compile or load "
            f"({type(exc).__name__}: {exc}). CuPy compiles them with NVRTC, which needs the CUDA runtime headers "
            "(cuda_runtime.h, cuda_fp16.h): the Docker gpu image ships them; on a bare host install the CUDA "
            "toolkit's cuda-cudart-dev and cuda-nvrtc packages or pip install 'cupy-cuda12x[ctk]'. "
            "Or set SNIPSERVE_PREPROCESS=cpu to pre-process on the CPU."
        ) from exc
