"""CuPy GPU backend (Triangle vertex 3): CUDA kernels and cuBLAS, reference for the rest."""
from __future__ import annotations


def probe():
    """None when cupy imports and sees a working CUDA device, else why not."""
    try:
        import cupy
    except Exception as exc:
        return f"cupy does not import: {exc}"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
        cupy.zeros(1).sum()  # touches the driver and a kernel launch
    except Exception as exc:
        return f"no usable CUDA device: {type(exc).__name__}: {exc}".splitlines()[0]
    return None


def make_backend():
    import cupy

    from .. import Backend
    from .ops import OPS

    backend = Backend("cupy", cupy, OPS, "float32", "CuPy CUDA kernels")
    backend.synchronize = lambda: cupy.cuda.Device().synchronize()  # timings must wait for the GPU
    return backend
