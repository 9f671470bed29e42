"""Run the project's CUDA C kernels on the CPU: the exact source CuPy compiles, built with ``g++``.

``cuda_cpu.h`` (next to this file) maps CUDA's kernel dialect onto C++: one fiber (own stack, own locals) per
CUDA thread, run in a permuted order that changes at every barrier round, real barriers for ``__syncthreads``
and warp shuffles (a barrier some threads never reach is reported, not hung on), ``__shared__`` as block-shared
statics, blocks in order.
Its header comment lists what is and is not modelled. With it, the kernels' logic -- indexing, reductions,
barrier placement, tie-breaking, rounding -- is tested on every CI run, not only on GPU hosts; the GPU still
has to confirm what emulation cannot (the device compiler, weak memory ordering, speed).

Launches use CUDA's own convention (``cuLaunchKernel``'s array of pointers to each argument), and every launch
is checked against the kernel's C++ signature: a scalar of the wrong width or kind, an array where a scalar
belongs or a wrong argument count fails loudly here, where on a GPU it would silently read garbage.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

HEADER = Path(__file__).with_name("cuda_cpu.h")
CXX = shutil.which("g++")
# No FMA contraction (the kernels are compiled with --fmad=false); no fast-math; SSE2 doubles (x86-64 default).
CXX_FLAGS = ("-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-pthread", "-w")
KERNEL_DECL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')

_lock = threading.Lock()  # the emulation's CUDA state (blockDim, the running block) is global: one launch at a time
_launches = 0  # each launch runs its threads in another (seeded) order, unless SEED fixes it
SEED: int | None = None
_modules: dict[str, Module] = {}


def available() -> str | None:
    """``None`` when kernels can be emulated here, else the reason they cannot."""
    return None if CXX else "no C++ compiler (g++) to build the CUDA kernels for CPU emulation"


def kernel_names(source: str) -> list[str]:
    return KERNEL_DECL.findall(source)


def _trampolines(names: list[str]) -> str:
    out = []
    for n in names:
        out.append(
            f'extern "C" int cudasim_launch_{n}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,'
            f" unsigned bz, unsigned seed, void** params) {{\n"
            f"    return cudasim::launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}},"
            f" [params] {{ cudasim::invoke(&{n}, params); }}, seed);\n"
            f"}}\n"
            f'extern "C" int cudasim_signature_{n}(char* kinds, int* sizes, int cap) {{\n'
            f"    return cudasim::signature(&{n}, kinds, sizes, cap);\n"
            f"}}\n"
        )
    return "\n".join(out)


class Kernel:
    """One compiled kernel: ``kernel(grid, block, args)`` as CuPy's ``RawKernel.__call__``."""

    def __init__(self, lib: ctypes.CDLL, name: str) -> None:
        self.name = name
        self._launch = getattr(lib, f"cudasim_launch_{name}")
        self._launch.argtypes = [ctypes.c_uint] * 7 + [ctypes.POINTER(ctypes.c_void_p)]
        self._launch.restype = ctypes.c_int
        sig = getattr(lib, f"cudasim_signature_{name}")
        kinds, sizes = ctypes.create_string_buffer(64), (ctypes.c_int * 64)()
        n = sig(kinds, sizes, 64)
        self.signature = [(kinds.raw[i : i + 1].decode(), sizes[i]) for i in range(n)]

    def _param(self, i: int, arg: Any, keep: list[Any]) -> int:
        kind, size = self.signature[i]
        ptr = device_pointer(arg)
        if kind == "p":
            if ptr is None:
                raise TypeError(f"{self.name} argument {i}: the kernel takes a pointer, got {type(arg).__name__}")
            cell = ctypes.c_void_p(ptr)
            keep.append(cell)
            return ctypes.addressof(cell)
        if ptr is not None or not isinstance(arg, np.generic):
            raise TypeError(f"{self.name} argument {i}: the kernel takes a scalar; pass a NumPy scalar, got {arg!r}")
        want = "f" if np.issubdtype(arg.dtype, np.floating) else "i"
        if (want, arg.dtype.itemsize) != (kind, size):
            raise TypeError(
                f"{self.name} argument {i}: the kernel takes a {size}-byte {'float' if kind == 'f' else 'integer'}, "
                f"got {arg.dtype}"
            )
        cell = np.array(arg)  # owns the bytes for the call
        keep.append(cell)
        return int(cell.ctypes.data)

    def check(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> Any:
        """Validate a launch (argument count and kinds, launch configuration); returns the parameter block."""
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name} takes {len(self.signature)} arguments, got {len(args)}")
        g = (tuple(grid) + (1, 1))[:3]
        b = (tuple(block) + (1, 1))[:3]
        if not 1 <= b[0] * b[1] * b[2] <= 1024 or min(g) < 1:
            raise ValueError(f"invalid launch configuration grid={grid} block={block}")
        keep: list[Any] = []
        params = (ctypes.c_void_p * len(args))(*(self._param(i, a, keep) for i, a in enumerate(args)))
        return g, b, params, keep

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...], **_: Any) -> None:
        g, b, params, _keep = self.check(grid, block, args)
        with _lock:
            global _launches
            _launches += 1
            rc = self._launch(*g, *b, _launches if SEED is None else SEED, params)
        if rc != 0:
            raise RuntimeError(f"{self.name}: barrier deadlock in the emulated launch grid={g} block={b} (see stderr)")


class Module:
    """The compiled kernels of one CUDA source: ``module.get_function(name)``."""

    def __init__(self, source: str) -> None:
        names = kernel_names(source)
        if not names:
            raise ValueError('no extern "C" __global__ kernels in the source')
        self.path = _build(source, names)
        self._lib = ctypes.CDLL(str(self.path))
        self.kernels = {n: Kernel(self._lib, n) for n in names}

    def get_function(self, name: str) -> Kernel:
        return self.kernels[name]


def device_pointer(arg: Any) -> int | None:
    """The address behind an array argument (NumPy, or anything with ``.data.ptr`` like the CuPy stand-in)."""
    if isinstance(arg, np.ndarray):
        if not arg.flags.c_contiguous:
            raise ValueError("kernel array arguments must be C-contiguous")
        return int(arg.ctypes.data)
    data = getattr(arg, "data", None)
    ptr = getattr(data, "ptr", None)
    return int(ptr) if isinstance(ptr, int) else None


def _build(source: str, names: list[str]) -> Path:
    if CXX is None:
        raise RuntimeError(available())
    text = f'#include "{HEADER}"\n#line 1 "kernel.cu"\n{source}\n#line 1 "cudasim-trampolines"\n{_trampolines(names)}'
    key = hashlib.sha256((text + HEADER.read_text() + " ".join(CXX_FLAGS)).encode()).hexdigest()[:20]
    cache = Path(tempfile.gettempdir()) / "snipserve-cudasim"
    cache.mkdir(exist_ok=True)
    lib = cache / f"{key}.so"
    if lib.exists():
        return lib
    src = cache / f"{key}.cpp"
    src.write_text(text)
    tmp = cache / f"{key}.{threading.get_ident()}.so"
    proc = subprocess.run([CXX, *CXX_FLAGS, str(src), "-o", str(tmp)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed to build the kernels for emulation:\n{proc.stderr[-4000:]}")
    tmp.replace(lib)  # atomic: concurrent test processes never load a half-written library
    return lib


def module(source: str) -> Module:
    """The compiled module for ``source`` (built once per process and cached on disk by content)."""
    mod = _modules.get(source)
    if mod is None:
        mod = _modules[source] = Module(source)
    return mod
