"""Run the cupy backend on the CPU: its CUDA kernels compiled for the host against
``cuda_emulator.h``, its array code on numpy.

``emulated_cupy_backend()`` returns a ``Backend`` built from ``backends/cupy_backend/ops.py``
exactly as shipped, with ``cupy`` replaced by a thin numpy stand-in whose ``RawModule``
compiles kernel sources with the host C++ compiler. The Triangle checks then exercise every
kernel's indexing, tails, reductions and warp collectives without a GPU. What it cannot
show: timing, memory-model races that a sequential schedule hides, and fused
multiply-add rounding (the host does not fuse).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

HEADER = Path(__file__).with_name("cuda_emulator.h")
CACHE = Path(tempfile.gettempdir()) / "nanochat-cuda-emulator"
_KERNEL = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)\s*\{')
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s*)?([\w ]+?)\s*(\w+)\s*\[\s*\]\s*;")


def compiler():
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def unavailable_reason():
    return None if compiler() else "no host C++ compiler (g++) to build the CUDA emulator"


def skip_without_compiler():
    """The pytest mark for tests that need the emulator: skipped, with the reason, when no
    host C++ compiler is found."""
    import pytest

    reason = unavailable_reason()
    return pytest.mark.skipif(reason is not None, reason=str(reason))


def _host_source(source):
    """Kernel source rewritten for the host: dynamic shared memory becomes a pointer into the
    emulator's buffer, and each kernel gets an ``emu_launch_<name>`` entry point."""
    source = _DYNAMIC_SHARED.sub(
        lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>(emu::dynamic_shared.data());", source)
    launchers = []
    for name, params in _KERNEL.findall(source):
        args = [p.strip() for p in params.split(",") if p.strip()]
        names = [re.findall(r"\w+", a)[-1] for a in args]
        launchers.append(
            f'extern "C" int emu_launch_{name}(unsigned emu_gx, unsigned emu_gy, unsigned emu_gz, unsigned emu_bx,'
            f' unsigned emu_by, unsigned emu_bz, size_t emu_shared{"".join(", " + a for a in args)}) {{\n'
            f"    return emu::launch(dim3(emu_gx, emu_gy, emu_gz), dim3(emu_bx, emu_by, emu_bz), emu_shared,\n"
            f"                       [&] {{ {name}({', '.join(names)}); }});\n"
            "}\n")
    launchers.append('extern "C" const char* emu_error() { return emu::error; }\n')
    launchers.append('extern "C" void emu_set_schedule(int order) { emu::schedule = order; }\n')
    return source + "\n" + "".join(launchers)


@functools.lru_cache(maxsize=None)
def _build(source):
    text = _host_source(source)
    header = HEADER.read_text()
    key = hashlib.sha256((compiler() + header + text).encode()).hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    lib = CACHE / f"kernels-{key}.so"
    if not lib.exists():
        src = CACHE / f"kernels-{key}.cpp"
        src.write_text(text)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler(), "-std=c++17", "-O1", "-shared", "-fPIC", "-ffp-contract=off",
               "-include", str(HEADER), str(src), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the CUDA emulator could not compile the kernels:\n{done.stderr[-4000:]}")
        os.replace(tmp, lib)
    return ctypes.CDLL(str(lib))


# How the emulator interleaves a block's threads (see cuda_emulator.h): "forward" and
# "reverse" advance all warps in step, "warpwise" runs one warp ahead as far as it can go.
SCHEDULES = ("forward", "reverse", "warpwise")
schedule = "forward"


_SCALARS = {
    np.dtype(np.int32): ctypes.c_int32, np.dtype(np.uint32): ctypes.c_uint32,
    np.dtype(np.int64): ctypes.c_int64, np.dtype(np.uint64): ctypes.c_uint64,
    np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
}


def _c_arg(a):
    if isinstance(a, np.ndarray):
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, np.generic) and a.dtype in _SCALARS:
        return _SCALARS[a.dtype](a.item())
    raise TypeError(f"kernel argument {a!r}: pass arrays or numpy scalars of a fixed width, as cupy requires")


def _dims(d):
    d = tuple(int(v) for v in (d if isinstance(d, tuple) else (d,)))
    return d + (1,) * (3 - len(d))


class RawModule:
    def __init__(self, code, options=(), **_):
        self._lib = _build(code)

    def get_function(self, name):
        return _Kernel(self._lib, name)


class _Kernel:
    def __init__(self, lib, name):
        self.name = name
        self._lib = lib
        self._fn = getattr(lib, f"emu_launch_{name}")
        self._fn.restype = ctypes.c_int
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self._lib.emu_set_schedule(ctypes.c_int(SCHEDULES.index(schedule)))
        if self._fn(*_dims(grid), *_dims(block), ctypes.c_size_t(int(shared_mem)), *map(_c_arg, args)):
            message = ctypes.cast(self._lib.emu_error, ctypes.CFUNCTYPE(ctypes.c_char_p))()
            raise RuntimeError(f"kernel {self.name}: {message.decode()}")


def fake_cupy():
    """A module that answers like cupy for what the backend's ops use, backed by numpy."""
    mod = types.ModuleType("cupy")
    mod.__getattr__ = lambda name: getattr(np, name)
    mod.RawModule = RawModule
    mod.asnumpy = np.asarray
    mod.get_array_module = lambda *arrays: np
    device = types.SimpleNamespace(synchronize=lambda: None, attributes={"MultiProcessorCount": 2})
    mod.cuda = types.SimpleNamespace(Device=lambda *a: device,
                                     runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    pool = types.SimpleNamespace(total_bytes=lambda: 0, used_bytes=lambda: 0, free_all_blocks=lambda: None)
    mod.get_default_memory_pool = lambda: pool
    return mod


@functools.lru_cache(maxsize=None)
def emulated_ops():
    """The cupy backend's ops module loaded against the numpy stand-in."""
    import backends.cupy_backend as package

    path = Path(package.__file__).with_name("ops.py")
    name = "backends.cupy_backend._ops_on_cpu"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = fake_cupy()
    try:
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved
    module.device_pointer = lambda a: a.ctypes.data
    return module


def emulated_cupy_backend():
    from backends import Backend

    return Backend("cupy-emulated", np, emulated_ops().OPS, "float32", "the cupy backend's kernels on the CPU")
