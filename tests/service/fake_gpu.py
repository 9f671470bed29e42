"""Stand-ins for ``cupy``, ``cupyx`` and ``tensorrt`` that run on the CPU, to execute the GPU modules' Python glue.

They implement only the API surface our code calls, as the libraries document it, backed by NumPy: "device"
arrays are NumPy arrays whose real addresses serve as device pointers (so ``memcpyAsync`` is a ``memmove``),
kernels are the project's own CUDA source compiled for the CPU by :mod:`tests.cudasim` (every launch checked
against the kernel's signature), and the TensorRT engine computes a fixed row-wise function.
What this proves: our host code runs end to end (argument order and types, shapes, buffer handling, manifest
writing) and the kernels compute what they should on those arguments. What it cannot prove: that the real
libraries and the device compiler behave as documented, and how fast it all is -- that needs a GPU.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import types
from pathlib import Path
from typing import Any

import numpy as np

from service.engines.fake import FAKE_CARD
from service.engines.manifest import BatchProfile, EngineManifest, write_manifest
from tests import cudasim

# ---- cupy ------------------------------------------------------------------------------------------------------

_BY_ADDRESS: dict[int, np.ndarray] = {}


class _Mem:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class FakeArray:
    """A "device" array: a NumPy array; ``data.ptr`` is its real address."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        if a.base is None:  # an allocation (views share their base's address)
            _BY_ADDRESS[self.ptr] = a

    @property
    def ptr(self) -> int:
        return int(self.a.__array_interface__["data"][0])

    @property
    def data(self) -> _Mem:
        return _Mem(self.ptr)

    shape = property(lambda self: self.a.shape)
    dtype = property(lambda self: self.a.dtype)
    ndim = property(lambda self: self.a.ndim)
    nbytes = property(lambda self: self.a.nbytes)
    flags = property(lambda self: self.a.flags)

    def __getitem__(self, key: Any) -> FakeArray:
        return FakeArray(self.a[key])

    def fill(self, value: Any) -> None:
        self.a.fill(value)

    def get(self) -> np.ndarray:
        return self.a.copy()

    def set(self, arr: np.ndarray) -> None:
        assert arr.shape == self.a.shape, (arr.shape, self.a.shape)
        self.a[...] = arr


def _asarray(x: Any) -> FakeArray:
    return FakeArray(np.array(x.a if isinstance(x, FakeArray) else x, copy=True, order="C"))


class RawKernel:
    """CuPy's ``RawKernel``: the same CUDA source, compiled for the CPU by :mod:`tests.cudasim` and run there."""

    def __init__(self, code: str, name: str, options: tuple[str, ...] = ()) -> None:
        assert "--fmad=false" in options  # the kernels' rounding contract (their module docstrings)
        self.name = name
        self._kernel = cudasim.module(code).get_function(name)

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], **_: Any) -> None:
        self._kernel(grid, block, args)


class RawModule:
    def __init__(self, code: str, options: tuple[str, ...] = ()) -> None:
        self.code, self.options = code, options

    def get_function(self, name: str) -> RawKernel:
        return RawKernel(self.code, name, self.options)


class _Event:
    pass


class _Stream:
    def __init__(self, non_blocking: bool = False) -> None:
        self.ptr = 1234
        self.waited: list[_Event] = []

    def synchronize(self) -> None:
        pass

    def record(self) -> _Event:
        return _Event()

    def wait_event(self, event: _Event) -> None:
        self.waited.append(event)


def _memcpy_async(dst: int, src: int, size: int, kind: int, stream: int) -> None:
    assert kind in (1, 2) and stream == 1234
    ctypes.memmove(dst, src, size)


def make_cupy() -> tuple[types.ModuleType, types.ModuleType]:
    cp = types.ModuleType("cupy")
    cp.__spec__ = importlib.machinery.ModuleSpec("cupy", None)  # find_spec() reads it from sys.modules
    cp.float32, cp.float64, cp.int64, cp.uint8 = np.float32, np.float64, np.int64, np.uint8  # type: ignore[attr-defined]
    cp.asarray = _asarray  # type: ignore[attr-defined]
    cp.asnumpy = lambda x: x.get()  # type: ignore[attr-defined]
    cp.empty = lambda shape, dtype=np.float32: FakeArray(np.empty(shape, dtype))  # type: ignore[attr-defined]
    cp.ones = lambda shape, dtype=np.float32: FakeArray(np.ones(shape, dtype))  # type: ignore[attr-defined]
    cp.RawKernel, cp.RawModule = RawKernel, RawModule  # type: ignore[attr-defined]
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDeviceProperties=lambda i: {"name": b"Fake GPU", "major": 9, "minor": 0},
        memcpyAsync=_memcpy_async,
        memcpyHostToDevice=1,
        memcpyDeviceToHost=2,
        deviceSynchronize=lambda: None,
    )
    current = _Stream()
    cp.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        runtime=runtime,
        Device=lambda i=0: types.SimpleNamespace(id=i, synchronize=lambda: None),
        Stream=_Stream,
        get_current_stream=lambda: current,
    )
    cupyx = types.ModuleType("cupyx")
    cupyx.__spec__ = importlib.machinery.ModuleSpec("cupyx", None)
    cupyx.empty_pinned = lambda shape, dtype=np.float32: np.empty(shape, dtype)  # type: ignore[attr-defined]
    return cp, cupyx


# ---- tensorrt --------------------------------------------------------------------------------------------------


class TensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


class FakeContext:
    """Executes ``out0 = per-row mean [B, 1]``, ``out1 = per-row max [B, 2]`` (repeated) at the bound addresses."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shape: tuple[int, ...] | None = None
        self.executions: list[int] = []

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
        ok = lo[0] <= shape[0] <= hi[0] and tuple(shape[1:]) == tuple(lo[1:])
        self.shape = tuple(shape) if ok else None
        return ok

    def execute_async_v3(self, stream: int) -> bool:
        assert self.shape is not None and stream == 1234
        n = self.shape[0]
        x = _BY_ADDRESS[self.addresses["images"]][:n].reshape(n, -1)
        _BY_ADDRESS[self.addresses["mean"]][:n] = x.mean(1, keepdims=True)
        _BY_ADDRESS[self.addresses["top"]][:n] = np.repeat(x.max(1, keepdims=True), 2, axis=1)
        self.executions.append(n)
        return True


class FakeEngine:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.names = ["images", "mean", "top"]
        self.num_io_tensors = 3

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name == "images" else TensorIOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        c = self.spec["chip"]
        return {"images": (-1, 3, c, c), "mean": (-1, 1), "top": (-1, 2)}[name]

    def get_tensor_dtype(self, name: str) -> str:
        return "float32"

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        c, (lo, opt, hi) = self.spec["chip"], self.spec["profile"]
        return [(lo, 3, c, c), (opt, 3, c, c), (hi, 3, c, c)]

    def create_execution_context(self) -> FakeContext:
        self.context = FakeContext(self)
        return self.context


class OnnxFakeContext(FakeContext):
    """Runs the engine's ONNX model with ONNX Runtime (CPU) on the rows at the bound input address."""

    engine: OnnxFakeEngine

    def execute_async_v3(self, stream: int) -> bool:
        assert self.shape is not None and stream == 1234
        n = self.shape[0]
        eng = self.engine
        x = _BY_ADDRESS[self.addresses[eng.input_name]][:n]
        outs = eng.session.run(eng.output_names, {eng.input_name: np.ascontiguousarray(x)})
        for name, value in zip(eng.output_names, outs, strict=True):
            _BY_ADDRESS[self.addresses[name]][:n] = value
        self.executions.append(n)
        return True


class OnnxFakeEngine(FakeEngine):
    """An engine "built" from an ONNX model: its I/O names and shapes, outputs computed by ONNX Runtime."""

    def __init__(self, spec: dict[str, Any], model: bytes) -> None:
        import onnx
        import onnxruntime as ort

        super().__init__(spec)
        graph = onnx.load_from_string(model).graph
        self.input_name = graph.input[0].name
        self.output_names = [o.name for o in graph.output]
        self.names = [self.input_name, *self.output_names]
        self.num_io_tensors = len(self.names)
        self.shapes = {
            v.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
            for v in (*graph.input, *graph.output)
        }
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name == self.input_name else TensorIOMode.OUTPUT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (-1, *self.shapes[name][1:])

    def create_execution_context(self) -> FakeContext:
        self.context = OnnxFakeContext(self)
        return self.context


class _Network:
    def __init__(self) -> None:
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self.onnx = b""

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i: int) -> Any:
        return self.inputs[i]

    def get_output(self, i: int) -> Any:
        return self.outputs[i]


class _Parser:
    def __init__(self, network: _Network, logger: Any) -> None:
        self.network = network
        self.num_errors = 0

    def parse(self, data: bytes) -> bool:
        import onnx

        model = onnx.load_from_string(data)
        self.network.inputs = [types.SimpleNamespace(name=i.name) for i in model.graph.input]
        self.network.outputs = [types.SimpleNamespace(name=o.name) for o in model.graph.output]
        self.network.onnx = bytes(data)
        return True

    def get_error(self, i: int) -> str:
        return ""


class _Profile:
    def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
        self.shape = (name, lo, opt, hi)


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data or b"fresh"

    def serialize(self) -> memoryview:
        return memoryview(self.data + b"+timings")


class _Config:
    def __init__(self) -> None:
        self.flags: list[str] = []
        self.profiles: list[_Profile] = []
        self.int8_calibrator: Any = None
        self.calibration_profile: _Profile | None = None
        self.pool: dict[Any, int] = {}

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool[pool] = size

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def set_calibration_profile(self, profile: _Profile) -> bool:
        self.calibration_profile = profile
        return True

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        return self.timing_cache


class _Builder:
    built: list[_Config] = []

    def __init__(self, logger: Any) -> None:
        pass

    def create_network(self, flags: int) -> _Network:
        assert flags == 0  # TensorRT 10: always explicit batch
        return _Network()

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> memoryview:
        calib = config.int8_calibrator
        # TensorRT drives the calibrator: the cache if it has one, else batches until None, then writes the cache.
        if calib is not None and calib.read_calibration_cache() is None:
            while calib.get_batch([network.get_input(0).name]) is not None:
                pass
            calib.write_calibration_cache(memoryview(b"calibration-table"))
        type(self).built.append(config)
        _, lo, opt, hi = config.profiles[0].shape
        spec = {"chip": lo[-1], "profile": (lo[0], opt[0], hi[0])}
        # The "engine": its spec, a newline, then the parsed ONNX model, which the runtime executes with ONNX
        # Runtime on the CPU (OnnxFakeEngine), so a built engine gives the model's real outputs.
        return memoryview(json.dumps(spec).encode() + b"\n" + network.onnx)


def make_tensorrt(version: str = "10.99.0.1") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version  # type: ignore[attr-defined]

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
            header, _, model = bytes(data).partition(b"\n")
            spec = json.loads(header)
            return OnnxFakeEngine(spec, model) if model else FakeEngine(spec)

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            pass

    trt.Logger, trt.Runtime, trt.Builder = Logger, Runtime, _Builder  # type: ignore[attr-defined]
    trt.OnnxParser, trt.TensorIOMode = _Parser, TensorIOMode  # type: ignore[attr-defined]
    trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2  # type: ignore[attr-defined]
    trt.nptype = np.dtype  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    return trt


# ---- a serialized "engine" with its manifest ---------------------------------------------------------------------

TRT_CARD = FAKE_CARD.model_copy(update={"input_name": "images", "output_names": ("mean", "top")})


def engine_files(tmp_path: Path, profile: BatchProfile, version: str = "10.99.0.1") -> Path:
    """``model.engine`` (what :func:`make_tensorrt`'s runtime deserialises) and its manifest, in ``tmp_path``."""
    engine = tmp_path / "model.engine"
    spec = {"chip": TRT_CARD.input_size, "profile": [profile.min_batch, profile.opt_batch, profile.max_batch]}
    engine.write_text(json.dumps(spec))
    write_manifest(
        engine,
        EngineManifest(
            tensorrt_version=version,
            gpu_name="Fake GPU",
            compute_capability="9.0",
            precision="fp32",
            profile=profile,
            input_name="images",
            output_names=("mean", "top"),
            onnx_file="model.onnx",
            onnx_sha256="0" * 64,
            card=TRT_CARD.model_dump(mode="json", exclude_none=True),
            workspace_mib=64,
        ),
    )
    return engine
