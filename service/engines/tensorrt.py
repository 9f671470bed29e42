"""TensorRT engine backend: a serialized engine (``snipserve export tensorrt``) behind the :class:`Engine` protocol.

Status: written against the TensorRT 10 Python API (named I/O tensors) and CuPy; never run on a GPU yet
(README, GPU path, status table). What runs without a GPU is tested: manifest checks, batch splitting, padding.

Per call: the batch is split into pieces of at most the profile's max batch (pieces below its min are
padded with zeros and the padding's outputs dropped); each piece is copied into a pinned host buffer, then
asynchronously into a device buffer allocated once for the largest batch, the input shape is set, the engine
runs with ``execute_async_v3`` on the engine's own CUDA stream, outputs come back into pinned host buffers
and the stream is synchronised (so the next call's writes to the input buffer cannot overtake this call's
reads). Tensor addresses never change, so they are set once at load time.
:meth:`TensorRTEngine.infer_staged` is the GPU pre-processing path (:class:`service.staging.DeviceStaging`): the
crop kernel writes a batch's chips from device-resident level images straight into
:attr:`TensorRTEngine.input_device` on the runner's crop stream, TensorRT's stream waits for an event recorded
after it, and the engine runs them, with no host copy of the batch. :meth:`TensorRTEngine.close` takes the
engine's lock, so it waits for a call in progress instead of freeing buffers under it.

TensorRT and CuPy are imported only in :class:`CudaRunner` and :meth:`TensorRTEngine.infer_staged`, never at
module import.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from service.crop import ChipLayout, Normalizer
from service.engines import EngineConfig
from service.engines.manifest import BatchProfile, EngineManifest, card_from_manifest, check_compatible, read_manifest
from service.errors import ModelLoadError
from service.modelcard import ModelCard

log = logging.getLogger("snipserve.engine.tensorrt")


@dataclass(frozen=True)
class Piece:
    """One engine execution: rows ``start:stop`` of the caller's batch, run as a batch of ``run`` rows
    (``run > stop - start`` where the profile's min batch needs zero padding)."""

    start: int
    stop: int
    run: int


def split_batch(n: int, min_batch: int, max_batch: int) -> list[Piece]:
    """Split ``n`` rows into pieces the profile ``[min_batch, max_batch]`` accepts, in order, largest first.

    >>> split_batch(10, 1, 4)
    [Piece(start=0, stop=4, run=4), Piece(start=4, stop=8, run=4), Piece(start=8, stop=10, run=2)]
    """
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= max_batch, got {min_batch}, {max_batch}")
    pieces = []
    for start in range(0, n, max_batch):
        stop = min(start + max_batch, n)
        pieces.append(Piece(start, stop, max(stop - start, min_batch)))
    return pieces


class Runner(Protocol):
    """Runs one piece on the device. :class:`CudaRunner` on a GPU; a stub in CPU tests."""

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """``float32 [b, 3, C, C]`` (b within the profile) -> outputs ``[b, ...]`` in the card's order."""
        ...

    def close(self) -> None: ...


class TensorRTEngine:
    """A serialized TensorRT engine with its manifest; implements :class:`service.engines.Engine`."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, config: EngineConfig) -> None:
        if not engine_path.is_file():
            raise ModelLoadError(f"TensorRT engine file not found: {engine_path}")
        manifest = read_manifest(engine_path)
        card = card_from_manifest(engine_path, manifest)
        runner = CudaRunner(engine_path, manifest, card)
        self._init(card, runner, manifest, config.max_batch)

    @classmethod
    def from_runner(cls, card: ModelCard, runner: Runner, manifest: EngineManifest, max_batch: int) -> TensorRTEngine:
        """An engine over any :class:`Runner` (CPU tests use a stub; no TensorRT needed)."""
        self = cls.__new__(cls)
        self._init(card, runner, manifest, max_batch)
        return self

    def _init(self, card: ModelCard, runner: Runner, manifest: EngineManifest, max_batch: int) -> None:
        self.card = card
        self.manifest = manifest
        self.profile: BatchProfile = manifest.profile
        self._runner = runner
        self.providers = ["tensorrt"]
        self.precision: str = manifest.precision
        self.input_layout: ChipLayout = "float32_nchw"
        # The batcher never sends more than this; infer() still splits larger batches (direct callers).
        self.max_batch = min(max_batch, manifest.profile.max_batch)
        self._lock = threading.Lock()  # one set of device/pinned buffers: one call at a time

    @property
    def input_device(self) -> Any:
        """The device input buffer ``cupy float32 [max_batch, 3, C, C]`` (GPU pre-processing writes here)."""
        return getattr(self._runner, "input_device", None)

    def infer(self, batch: np.ndarray) -> list[np.ndarray]:
        """``batch`` ``float32 [B, 3, C, C]`` -> outputs ``[B, ...]`` in the card's order (any B >= 1)."""
        c = self.card.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, c, c):
            raise ValueError(f"batch must be [B, 3, {c}, {c}], got {batch.shape}")
        batch = np.ascontiguousarray(batch, np.float32)
        parts: list[list[np.ndarray]] = []
        with self._lock:
            runner = self._runner_or_raise()
            for p in split_batch(batch.shape[0], self.profile.min_batch, self.profile.max_batch):
                rows = batch[p.start : p.stop]
                if p.run > rows.shape[0]:  # below the profile's min batch: zero rows, outputs dropped below
                    rows = np.concatenate([rows, np.zeros((p.run - rows.shape[0], *rows.shape[1:]), np.float32)])
                outs = runner.run(rows)
                parts.append([o[: p.stop - p.start] for o in outs])
        if len(parts) == 1:
            return parts[0]
        return [np.concatenate(group) for group in zip(*parts, strict=True)]

    def infer_staged(self, level_images: list[Any], chips: np.ndarray, norm: Normalizer) -> list[np.ndarray]:
        """Cut ``chips`` (``int [n, 3]`` level, x0, y0; ``1 <= n <= max_batch``) of the device ``level_images``
        straight into :attr:`input_device` (normalised, :func:`service.crop_gpu.crop_to_device`) and run them:
        the GPU pre-processing path, with no host copy of the batch. Outputs ``[n, ...]`` in the card's order."""
        from service import crop_gpu  # lazy: CuPy

        n = int(chips.shape[0])
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"chips must number 1..{self.max_batch}, got {n}")
        dev = self.input_device
        run_device = getattr(self._runner_or_raise(), "run_device", None)
        if dev is None or run_device is None:
            raise RuntimeError("this engine's runner has no device input buffer")
        run = max(n, self.profile.min_batch)
        with self._lock:
            # The crop runs on the runner's crop stream; TensorRT's stream waits for the event recorded after it
            # (without that wait TensorRT could read the buffer before the chips are in it).
            stream = self._runner_or_raise().crop_stream  # type: ignore[attr-defined]
            with stream:
                crop_gpu.crop_to_device(level_images, chips, norm, dev)
                if run > n:  # below the profile's min batch: zero rows, their outputs dropped below
                    dev[n:run].fill(0)
                ready = stream.record()
            outs = run_device(run, ready)
        return [o[:n] for o in outs]

    def _runner_or_raise(self) -> Runner:
        runner: Runner | None = vars(self).get("_runner")
        if runner is None:
            raise RuntimeError("the TensorRT engine is closed")
        return runner

    def close(self) -> None:
        """Release the engine; waits for a call in progress (under the lock), idempotent."""
        with self._lock:
            runner = vars(self).pop("_runner", None)
            if runner is not None:
                runner.close()


def device_identity() -> tuple[str, str]:
    """``(gpu_name, "major.minor")`` of the current CUDA device, through CuPy."""
    import cupy as cp

    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return name, f"{props['major']}.{props['minor']}"


class CudaRunner:
    """Deserialised engine, one execution context, one CUDA stream, device and pinned host buffers sized for
    the profile's max batch, allocated once. Not thread-safe by itself (:class:`TensorRTEngine` locks)."""

    def __init__(self, engine_path: Path, manifest: EngineManifest, card: ModelCard) -> None:
        try:
            import cupy as cp
            import cupyx
            import tensorrt as trt
        except ImportError as exc:
            raise ModelLoadError(
                f"the TensorRT engine backend needs the gpu extra (tensorrt, cupy): {exc}; "
                "install with pip install 'snipserve[gpu]'"
            ) from exc
        try:
            gpu_name, cc = device_identity()
        except Exception as exc:  # noqa: BLE001 - CUDA raises its own types when there is no driver/device
            raise ModelLoadError(f"no usable CUDA device for the TensorRT engine: {exc}") from exc
        for w in check_compatible(manifest, tensorrt_version=trt.__version__, compute_capability=cc, gpu_name=gpu_name):
            log.warning("%s", w)

        self._cp = cp
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ModelLoadError(
                f"TensorRT could not deserialise {engine_path} (built with TensorRT {manifest.tensorrt_version} for "
                f"{manifest.gpu_name}); see the TensorRT log above"
            )
        self._check_io(trt, manifest, card)
        self.context = self.engine.create_execution_context()
        # Non-blocking: no implicit synchronisation with the legacy default stream other libraries may use. One
        # stream for TensorRT (and the copies around it), one for the crop kernel writing its input buffer.
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.crop_stream = cp.cuda.Stream(non_blocking=True)
        self._allocate(trt, cupyx, card.input_size)

    def _check_io(self, trt: Any, manifest: EngineManifest, card: ModelCard) -> None:
        """The engine's I/O tensors and batch profile are the manifest's (and the card's output names)."""
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if inputs != [manifest.input_name]:
            raise ModelLoadError(f"engine inputs {inputs} differ from the manifest's [{manifest.input_name!r}]")
        self.output_names = list(card.output_names or manifest.output_names)
        if sorted(self.output_names) != sorted(outputs):
            raise ModelLoadError(f"engine outputs {outputs} differ from the card/manifest's {self.output_names}")
        self.input_name = manifest.input_name
        lo, _opt, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
        if (lo[0], hi[0]) != (manifest.profile.min_batch, manifest.profile.max_batch):
            raise ModelLoadError(
                f"engine profile batch [{lo[0]}, {hi[0]}] differs from the manifest's {manifest.profile!r}"
            )
        self.max_batch = int(hi[0])

    def _allocate(self, trt: Any, cupyx: Any, c: int) -> None:
        """Device buffers for the largest batch (the engine computes in place on prefixes of them), pinned host
        buffers of the same shapes, and their addresses set once on the context."""
        cp = self._cp
        in_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        if in_dtype != np.float32:
            raise ModelLoadError(f"engine input dtype {in_dtype}; the service feeds float32")
        self.input_device = cp.empty((self.max_batch, 3, c, c), cp.float32)
        self.input_host = cupyx.empty_pinned((self.max_batch, 3, c, c), np.float32)
        self.out_device: list[Any] = []
        self.out_host: list[np.ndarray] = []
        for name in self.output_names:
            shape = tuple(self.engine.get_tensor_shape(name))
            if any(d < 0 for d in shape[1:]):
                raise ModelLoadError(f"output {name!r} has a data-dependent shape {shape}; not supported")
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            self.out_device.append(cp.empty((self.max_batch, *shape[1:]), dtype))
            self.out_host.append(cupyx.empty_pinned((self.max_batch, *shape[1:]), dtype))
        self.context.set_tensor_address(self.input_name, self.input_device.data.ptr)
        for name, buf in zip(self.output_names, self.out_device, strict=True):
            self.context.set_tensor_address(name, buf.data.ptr)

    def _execute(self, n: int) -> list[np.ndarray]:
        """Input rows ``:n`` are (being) written on ``self.stream``; run and copy outputs back."""
        cp = self._cp
        c = self.input_device.shape[-1]
        if not self.context.set_input_shape(self.input_name, (n, 3, c, c)):
            raise RuntimeError(f"TensorRT rejected input shape {(n, 3, c, c)}")
        if not self.context.execute_async_v3(self.stream.ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log")
        for dev, host in zip(self.out_device, self.out_host, strict=True):
            nbytes = dev[:n].nbytes
            cp.cuda.runtime.memcpyAsync(
                host.ctypes.data, dev.data.ptr, nbytes, cp.cuda.runtime.memcpyDeviceToHost, self.stream.ptr
            )
        self.stream.synchronize()
        # Copies: the pinned buffers are reused by the next call, the caller keeps its outputs.
        return [np.array(h[:n], np.float32) for h in self.out_host]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        cp = self._cp
        n = batch.shape[0]
        self.input_host[:n] = batch
        cp.cuda.runtime.memcpyAsync(
            self.input_device.data.ptr,
            self.input_host.ctypes.data,
            self.input_host[:n].nbytes,
            cp.cuda.runtime.memcpyHostToDevice,
            self.stream.ptr,
        )
        return self._execute(n)

    def run_device(self, n: int, ready: Any) -> list[np.ndarray]:
        """Run rows ``:n`` of :attr:`input_device`, written by work that ``ready`` (a CUDA event) marks the end of."""
        self.stream.wait_event(ready)  # TensorRT's reads of the input wait for the crop kernel's writes
        return self._execute(n)

    def close(self) -> None:
        # Explicit release order: context before engine before runtime (TensorRT's documented lifetime rule).
        for attr in ("context", "engine", "_runtime"):
            vars(self).pop(attr, None)
