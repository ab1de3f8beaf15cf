"""Compile the backend's CUDA sources with NVRTC, with or without a GPU.

``compile_source`` needs only the NVRTC library (the ``nvidia-cuda-nvrtc`` wheel works on a
machine with no GPU and no driver), so CI checks every kernel compiles.
"""
from __future__ import annotations

from importlib import resources

NVRTC_OPTIONS = ("-std=c++17",)
KERNEL_FILES = ("ternary.cu", "nn.cu", "optim.cu", "mhc.cu", "attention.cu")
# Extra NVRTC options per file: the optimizer kernels must not fuse multiply-adds, so that
# they round like the reference's separate float32 operations.
FILE_OPTIONS = {"optim.cu": ("--fmad=false",)}


def nvrtc_options(filename):
    return (*NVRTC_OPTIONS, *FILE_OPTIONS.get(filename, ()))


def kernel_source(filename):
    return resources.files("backends.cupy_backend").joinpath("kernels", filename).read_text()


def compile_source(source, arch="compute_90", filename="kernel.cu"):
    """Compile CUDA C++ to PTX; raise RuntimeError with the NVRTC log on failure."""
    from cupy_backends.cuda.libs import nvrtc

    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, [f"--gpu-architecture={arch}", *nvrtc_options(filename)])
        except Exception as exc:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"{filename} does not compile for {arch}: {exc}\n{log}") from None
        return nvrtc.getPTX(prog)
    finally:
        nvrtc.destroyProgram(prog)
