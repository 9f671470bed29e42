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
import threading
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.engines.fake import FAKE_CARD
from service.engines.manifest import BatchProfile, EngineManifest, write_manifest
from tests import cudasim

# ---- cupy ------------------------------------------------------------------------------------------------------
#
# A device with CUDA's stream semantics. Every device-side operation (kernel launch, copy, fill, TensorRT's
# execute) is *enqueued* on a stream and runs only when something waits for it: ``Stream.synchronize``, a
# ``get()``, ``Device().synchronize()``. Before an operation runs, everything it depends on runs: earlier work on
# its own stream, the work recorded by any event the stream was told to wait for, and -- CUDA's legacy default
# stream -- work on the null stream and the blocking streams around it. Nothing else is ordered: two streams
# without an event between them run in whatever order their waits demand, so an operation that reads a buffer
# another stream writes, without ``wait_event``, reads it *before* the write (freshly allocated memory is
# poisoned: NaN floats, 0xA5 bytes). Host memory handed to an async copy is read when the copy runs, as with
# pinned buffers; ``asarray``/``set`` from pageable memory snapshot it at the call, as CUDA stages it.

_BY_ADDRESS: dict[int, np.ndarray] = {}
_DEVICE: _Device | None = None


class _Op:
    __slots__ = ("deps", "done", "fn", "seq")

    def __init__(self, seq: int, fn: Callable[[], None], deps: list[_Op]) -> None:
        self.seq, self.fn, self.deps, self.done = seq, fn, deps, False


class _Event:
    """``cupy.cuda.Event``: marks the work enqueued on a stream up to its ``record``."""

    def __init__(self, *_: Any, **__: Any) -> None:
        self.op: _Op | None = None

    def record(self, stream: _Stream | None = None) -> None:
        self.op = (stream or _device().current()).last

    def synchronize(self) -> None:
        _device().run(self.op)

    @property
    def done(self) -> bool:
        return self.op is None or self.op.done


class _Stream:
    """``cupy.cuda.Stream``: its own pointer, a queue of work, ``with stream:`` makes it the thread's current one."""

    def __init__(self, null: bool = False, non_blocking: bool = False, ptr: int | None = None) -> None:
        dev = _device()
        self.null, self.non_blocking = null, non_blocking
        self.ptr = 0 if null else (ptr if ptr is not None else dev.new_ptr())
        self.last: _Op | None = None
        self._waits: list[_Op] = []
        self._outer: list[_Stream] = []
        dev.streams[self.ptr] = self

    def enqueue(self, fn: Callable[[], None]) -> None:
        dev = _device()
        with dev.lock:
            deps = [op for op in (self.last, *self._waits) if op is not None]
            self._waits = []
            if self.null:  # the legacy default stream waits for every blocking stream...
                deps += [s.last for s in dev.streams.values() if s is not self and not s.non_blocking and s.last]
            elif not self.non_blocking and dev.null.last is not None:  # ...and they wait for it
                deps.append(dev.null.last)
            dev.seq += 1
            self.last = _Op(dev.seq, fn, deps)
            dev.history.append(self.ptr)

    def record(self, event: _Event | None = None) -> _Event:
        event = event or _Event()
        event.record(self)
        return event

    def wait_event(self, event: _Event) -> None:
        if event.op is not None:
            self._waits.append(event.op)

    def synchronize(self) -> None:
        _device().run(self.last)

    @property
    def done(self) -> bool:
        return self.last is None or self.last.done

    def __enter__(self) -> _Stream:
        dev = _device()
        self._outer.append(dev.current())
        dev.local.stream = self
        return self

    def __exit__(self, *exc: object) -> None:
        _device().local.stream = self._outer.pop()


class _Device:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.local = threading.local()
        self.streams: dict[int, _Stream] = {}
        self.seq = 0
        self.history: list[int] = []  # the stream handle of every enqueued operation, in issue order
        self._next_ptr = 0x7F00_0000
        self.null: _Stream

    def new_ptr(self) -> int:
        self._next_ptr += 0x10
        return self._next_ptr

    def current(self) -> _Stream:
        return getattr(self.local, "stream", None) or self.null

    def stream(self, ptr: int) -> _Stream:
        if ptr not in self.streams:
            raise AssertionError(f"unknown CUDA stream handle {ptr:#x}")
        return self.streams[ptr]

    def run(self, target: _Op | None) -> None:
        """Run ``target`` and everything it depends on, in issue order (a valid topological order)."""
        with self.lock:
            todo, stack, seen = [], [target] if target is not None else [], set()
            while stack:
                op = stack.pop()
                if op.done or id(op) in seen:
                    continue
                seen.add(id(op))
                todo.append(op)
                stack.extend(op.deps)
            for op in sorted(todo, key=lambda o: o.seq):
                op.fn()
                op.done = True

    def synchronize(self) -> None:
        for stream in list(self.streams.values()):
            stream.synchronize()


def _device() -> _Device:
    assert _DEVICE is not None, "make_cupy() first"
    return _DEVICE


def _poison(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        a.fill(np.nan)
    else:
        a.view(np.uint8).fill(0xA5)
    return a


class _Mem:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class FakeArray:
    """A "device" array: a NumPy array; ``data.ptr`` is its real address. Writing it through the stand-in's API
    is stream-ordered work (see above); constructing one directly from an array means "already on the device"."""

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
        a = self.a
        _device().current().enqueue(lambda: a.fill(value))

    def get(self, stream: _Stream | None = None) -> np.ndarray:
        """CuPy copies on the (current) stream and waits for it: only work ordered before the copy is seen."""
        stream = stream or _device().current()
        out = np.empty_like(self.a)
        a = self.a
        stream.enqueue(lambda: np.copyto(out, a))
        stream.synchronize()
        return out

    def set(self, arr: np.ndarray, stream: _Stream | None = None) -> None:
        """CuPy's checks (same dtype, same shape), then a stream-ordered copy of ``arr`` as it is now."""
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.dtype != self.a.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.a.dtype} array")
        if arr.shape != self.a.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.a.shape}, new shape: {arr.shape}")
        snapshot, a = np.array(arr, copy=True), self.a
        (stream or _device().current()).enqueue(lambda: np.copyto(a, snapshot))


def _empty(shape: Any, dtype: Any = np.float32) -> FakeArray:
    return FakeArray(_poison(np.empty(shape, dtype)))


def _asarray(x: Any, dtype: Any = None) -> FakeArray:
    """A new device array, filled by a stream-ordered copy (a snapshot of host data; device data as it is when
    the copy runs)."""
    if isinstance(x, FakeArray):
        src = x.a
        out = _empty(src.shape, dtype or src.dtype)
        _device().current().enqueue(lambda: np.copyto(out.a, src, casting="unsafe"))
        return out
    host = np.array(x, dtype=dtype, copy=True, order="C")
    out = _empty(host.shape, host.dtype)
    _device().current().enqueue(lambda: np.copyto(out.a, host))
    return out


def _ones(shape: Any, dtype: Any = np.float32) -> FakeArray:
    out = _empty(shape, dtype)
    out.fill(1)
    return out


class RawKernel:
    """CuPy's ``RawKernel``: the same CUDA source, compiled for the CPU by :mod:`tests.cudasim`; a launch is enqueued
    on the current stream and runs (reading its buffers) when that stream's work is waited for."""

    def __init__(self, code: str, name: str, options: tuple[str, ...] = ()) -> None:
        assert "--fmad=false" in options  # the kernels' rounding contract (their module docstrings)
        self.name = name
        self._kernel = cudasim.module(code).get_function(name)

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], **_: Any) -> None:
        self._kernel.check(grid, block, args)  # wrong arguments fail at the launch, as a real launch does
        kernel = self._kernel
        _device().current().enqueue(lambda: kernel(grid, block, args))


class RawModule:
    def __init__(self, code: str, options: tuple[str, ...] = ()) -> None:
        self.code, self.options = code, options

    def get_function(self, name: str) -> RawKernel:
        return RawKernel(self.code, name, self.options)


def _memcpy_async(dst: int, src: int, size: int, kind: int, stream: int) -> None:
    assert kind in (1, 2), kind
    _device().stream(stream).enqueue(lambda: ctypes.memmove(dst, src, size))


def make_cupy() -> tuple[types.ModuleType, types.ModuleType]:
    """Fresh ``cupy`` and ``cupyx`` stand-ins over a fresh device (no work pending, only the null stream)."""
    global _DEVICE
    _DEVICE = _Device()
    _DEVICE.null = _Stream(null=True)
    cp = types.ModuleType("cupy")
    cp.__spec__ = importlib.machinery.ModuleSpec("cupy", None)  # find_spec() reads it from sys.modules
    cp.float32, cp.float64, cp.int64, cp.int32, cp.uint8 = np.float32, np.float64, np.int64, np.int32, np.uint8  # type: ignore[attr-defined]
    cp.uint64, cp.float16 = np.uint64, np.float16  # type: ignore[attr-defined]
    cp.asarray = _asarray  # type: ignore[attr-defined]
    cp.asnumpy = lambda x, stream=None: x.get(stream)  # type: ignore[attr-defined]
    cp.empty = _empty  # type: ignore[attr-defined]
    cp.ones = _ones  # type: ignore[attr-defined]
    cp.RawKernel, cp.RawModule = RawKernel, RawModule  # type: ignore[attr-defined]
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        getDeviceProperties=lambda i: {"name": b"Fake GPU", "major": 9, "minor": 0},
        memcpyAsync=_memcpy_async,
        memcpyHostToDevice=1,
        memcpyDeviceToHost=2,
        deviceSynchronize=lambda: _device().synchronize(),
        runtimeGetVersion=lambda: 12060,
        driverGetVersion=lambda: 12080,
    )
    stream_cls = type("Stream", (_Stream,), {"null": _DEVICE.null})
    cp.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        runtime=runtime,
        Device=lambda i=0: types.SimpleNamespace(id=i, synchronize=lambda: _device().synchronize()),
        Stream=stream_cls,
        Event=_Event,
        get_current_stream=lambda: _device().current(),
    )
    cupyx = types.ModuleType("cupyx")
    cupyx.__spec__ = importlib.machinery.ModuleSpec("cupyx", None)
    cupyx.empty_pinned = lambda shape, dtype=np.float32: np.empty(shape, dtype)  # type: ignore[attr-defined]
    return cp, cupyx


def synchronize() -> None:
    """Run every pending operation (what a test does before it inspects device memory directly)."""
    _device().synchronize()


def stream_history() -> list[int]:
    """The stream handle (0: the legacy default stream) of every operation enqueued since ``make_cupy()``."""
    return list(_device().history)


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
        """Enqueues the computation on ``stream`` (a real stream handle; it reads its input when it runs)."""
        assert self.shape is not None, "set_input_shape first"
        assert stream != 0, "execute_async_v3 on the legacy default stream (TensorRT warns: extra synchronisation)"
        n = self.shape[0]
        _device().stream(stream).enqueue(lambda: self._compute(n))
        self.executions.append(n)
        return True

    def _compute(self, n: int) -> None:
        x = _BY_ADDRESS[self.addresses["images"]][:n].reshape(n, -1)
        _BY_ADDRESS[self.addresses["mean"]][:n] = x.mean(1, keepdims=True)
        _BY_ADDRESS[self.addresses["top"]][:n] = np.repeat(x.max(1, keepdims=True), 2, axis=1)


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

    def _compute(self, n: int) -> None:
        eng = self.engine
        x = _BY_ADDRESS[self.addresses[eng.input_name]][:n]
        outs = eng.session.run(eng.output_names, {eng.input_name: np.ascontiguousarray(x)})
        for name, value in zip(eng.output_names, outs, strict=True):
            _BY_ADDRESS[self.addresses[name]][:n] = value


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
        # Q/DQ pairs run as written (quantize, dequantize, float ops), as TensorRT's explicit quantization computes
        # them: fused into ONNX Runtime's int8 kernels, x86 CPUs without VNNI (AVX2's u8s8 path) can saturate the
        # products, an error of the CPU kernel that TensorRT does not have
        # (float models keep ONNX Runtime's optimizations: their parity checks compare with an optimized session)
        if any(n.op_type == "QuantizeLinear" for n in graph.node):
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
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
    """``IBuilderConfig``: TF32 is on by default, as in TensorRT; the implicit-quantization API warns as TensorRT
    10.1+ does (a DeprecationWarning, an error under the tests' warning filter)."""

    def __init__(self) -> None:
        self.flags: set[str] = {"TF32"}
        self.profiles: list[_Profile] = []
        self._int8_calibrator: Any = None
        self.calibration_profile: _Profile | None = None
        self.pool: dict[Any, int] = {}

    @property
    def int8_calibrator(self) -> Any:
        warnings.warn("IBuilderConfig.int8_calibrator is deprecated since TensorRT 10.1", DeprecationWarning, 2)
        return self._int8_calibrator

    @int8_calibrator.setter
    def int8_calibrator(self, calibrator: Any) -> None:
        warnings.warn("IBuilderConfig.int8_calibrator is deprecated since TensorRT 10.1", DeprecationWarning, 2)
        self._int8_calibrator = calibrator

    def set_memory_pool_limit(self, pool: Any, size: int) -> None:
        self.pool[pool] = size

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)

    def get_flag(self, flag: str) -> bool:
        return flag in self.flags

    def set_calibration_profile(self, profile: _Profile) -> bool:
        warnings.warn("IBuilderConfig.set_calibration_profile is deprecated since TensorRT 10.1", DeprecationWarning, 2)
        self.calibration_profile = profile
        return True

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(bytes(data))

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        return self.timing_cache


STRONGLY_TYPED = 1  # NetworkDefinitionCreationFlag.STRONGLY_TYPED (bit 1)


class _Builder:
    built: list[_Config] = []

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def create_network(self, flags: int) -> _Network:
        # TensorRT 10: always explicit batch (the EXPLICIT_BATCH flag is deprecated); STRONGLY_TYPED may be set.
        assert flags in (0, 1 << STRONGLY_TYPED), f"unexpected network flags {flags:#b}"
        network = _Network()
        network.strongly_typed = bool(flags)
        return network

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> memoryview | None:
        precision = config.flags & {"FP16", "INT8", "BF16", "FP8"}
        if getattr(network, "strongly_typed", False) and precision:
            self.logger.errors.append(f"precision flags {sorted(precision)} are not allowed on strongly typed networks")
            return None  # TensorRT logs the error and returns None
        calib = config._int8_calibrator
        # TensorRT drives a calibrator: batch size first, then the cache if it has one, else batches until None.
        if calib is not None:
            batch = calib.get_batch_size()
            assert isinstance(batch, int) and batch >= 1, batch
            if calib.read_calibration_cache() is None:
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
            self.errors: list[str] = []

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes) -> FakeEngine:
            header, _, model = bytes(data).partition(b"\n")
            spec = json.loads(header)
            return OnnxFakeEngine(spec, model) if model else FakeEngine(spec)

    class IInt8EntropyCalibrator2:
        def __init__(self) -> None:
            warnings.warn("IInt8EntropyCalibrator2 is deprecated since TensorRT 10.1", DeprecationWarning, 2)

    trt.Logger, trt.Runtime, trt.Builder = Logger, Runtime, _Builder  # type: ignore[attr-defined]
    trt.OnnxParser, trt.TensorIOMode = _Parser, TensorIOMode  # type: ignore[attr-defined]
    trt.IInt8EntropyCalibrator2 = IInt8EntropyCalibrator2  # type: ignore[attr-defined]
    trt.nptype = np.dtype  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8", TF32="TF32")  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=STRONGLY_TYPED)  # type: ignore[attr-defined]
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
