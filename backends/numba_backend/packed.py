"""Packed ternary inference for the numba backend: ``prepare_packed``, ``packed_gemv``, ``packed_gemm``.

Same signatures and results as ``reference.ternary`` (SPEC section 2): exact int32 group sums,
then ``y = xs * sum_g scales[r, g] * isum[g]`` in float64 in group order, cast to float32.

``prepare_packed`` turns the canonical ``uint8 [M, K/4]`` encoding, once, into the kernel layout
described in ``packed_x86`` (offset codes, 128 columns per 32 bytes; M padded to a multiple of 8
and K to a multiple of 128 with zero weights, which the kernels never read past K). The kernel
path (``cpu_features``) is fixed per handle; the SIMD paths need ``G % 32 == 0`` and a handle
with any other group size uses the plain path.
"""
from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from reference import ternary as ref

from .. import threads
from . import cpu_features, packed_plain, packed_x86
from .quant import _data, quantize_rows

DEFAULT_PATH = cpu_features.default_path()


class PackedHandle:
    """The numba backend's packed weights (build with ``prepare_packed``).

    Fields: ``layout`` uint8 ``[M_pad, K_pad / 4]`` (kernel layout), ``scales_t`` float32
    ``[K // G, M_pad]`` (transposed so a row block's scales are contiguous; zero in padding
    rows), ``group_size``, ``shape`` ``(M, K)``, ``kernel`` (the path it runs on).
    """

    __slots__ = ("layout", "scales_t", "group_size", "shape", "kernel")

    def __init__(self, layout, scales_t, group_size, shape, kernel):
        self.layout = layout
        self.scales_t = scales_t
        self.group_size = int(group_size)
        self.shape = tuple(shape)
        self.kernel = kernel

    @property
    def scales(self):
        """float32 ``[M, K // G]``."""
        return self.scales_t[:, : self.shape[0]].T

    def __repr__(self):
        return f"PackedHandle(shape={self.shape}, group_size={self.group_size}, kernel={self.kernel!r})"


@njit(cache=True, parallel=True)
def _layout_from_packed(packed, layout):
    """Canonical 2-bit trits (``00`` 0, ``01`` +1, ``11`` -1, ``10`` invalid -> 0) to offset codes
    in the kernel layout; ``layout`` arrives filled with code 1 (weight 0) for the padding."""
    m, k4 = packed.shape
    k = 4 * k4
    for r in prange(m):
        for col in range(k):
            bits = (packed[r, col >> 2] >> (2 * (col & 3))) & 3
            code = 2 if bits == 1 else (0 if bits == 3 else 1)
            unit, within = col >> 7, col & 127
            dst = 32 * unit + (within & 31)
            layout[r, dst] = (layout[r, dst] & ~(3 << (2 * (within >> 5)))) | (code << (2 * (within >> 5)))


def kernel_layout(packed):
    """Canonical ``packed uint8 [M, K/4]`` -> the kernel layout ``uint8 [M_pad, K_pad / 4]``."""
    m, k = packed.shape[0], 4 * packed.shape[1]
    m_pad = -(-max(m, 1) // packed_x86.ROW_PAD) * packed_x86.ROW_PAD
    k_pad = -(-max(k, 1) // 128) * 128
    layout = np.full((m_pad, k_pad // 4), 0b01010101, np.uint8)  # code 1 everywhere = weight 0
    _layout_from_packed(np.ascontiguousarray(packed), layout)
    return layout


def prepare_packed(packed, scales, group_size, kernel=None):
    """``prepare_packed(packed uint8 [M, K/4], scales float [M, K/G], group_size, kernel=None)
    -> PackedHandle``. ``kernel`` forces a path (``vnni``, ``avx2``, ``plain``,
    ``vnni_emulated``); by default the fastest this CPU runs (or ``NANOCHAT_NUMBA_KERNEL``)."""
    packed, scales = _data(packed), _data(scales)
    if not hasattr(packed, "dtype") or packed.dtype != np.uint8 or packed.ndim != 2:
        raise ValueError(
            f"prepare_packed: packed weights must be a 2-D uint8 array [M, K/4], got dtype {getattr(packed, 'dtype', None)} shape {getattr(packed, 'shape', None)}"
        )
    m, k = packed.shape[0], 4 * packed.shape[1]
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"prepare_packed: group_size must be a positive integer, got {group_size!r}")
    if k % group_size != 0:
        raise ValueError(f"prepare_packed: K = {k} is not divisible by group_size = {group_size}")
    if not hasattr(scales, "dtype") or scales.dtype.kind != "f":
        raise ValueError(f"prepare_packed: scales must be a floating-point array, got {getattr(scales, 'dtype', type(scales).__name__)}")
    if scales.shape != (m, k // group_size):
        raise ValueError(
            f"prepare_packed: scales have shape {scales.shape}, expected {(m, k // group_size)} for packed weights {packed.shape} (K = {k}) and group_size {group_size}"
        )
    kernel = DEFAULT_PATH if kernel is None else kernel
    reason = cpu_features.unavailable_reason(kernel)
    if reason is not None:
        raise ValueError(f"prepare_packed: kernel {kernel!r} cannot run here: {reason}")
    if group_size % 32 != 0:
        kernel = "plain"
    layout = kernel_layout(packed)
    scales_t = np.zeros((k // group_size, layout.shape[0]), np.float32)
    scales_t[:, :m] = scales.T
    return PackedHandle(layout, scales_t, group_size, (m, k), kernel)


# Below this many multiply-adds a product runs in the calling thread: waking sleeping workers
# costs tens of microseconds, more than the product itself. Workers that spin between regions
# (inference, ``threads.inference_spin``) start at once: from about 0.5M multiply-adds two
# threads then win (768 x 768: 16 vs 20 us, 2304 x 768: 29 vs 46 us; 256 x 768 neither).
PARALLEL_MIN_MACS = 1 << 23
SPINNING_MIN_MACS = 1 << 19


def _min_macs():
    return SPINNING_MIN_MACS if threads.spinning_workers() else PARALLEL_MIN_MACS


def _run(handle, xq2, xs64):
    """``float32 [N, M]`` for int8 activations ``xq2 [N, K]`` and float64 scales ``xs64 [N]``."""
    (m, k), n = handle.shape, xq2.shape[0]
    if n == 0 or m == 0:
        return np.zeros((n, m), np.float32)
    args = (handle.layout, handle.scales_t, xq2, xs64, handle.group_size, m)
    n_threads = numba.get_num_threads() if m * k * n >= _min_macs() else 1
    if handle.kernel == "plain":
        if n_threads > 1:
            return packed_plain.gemm_parallel(*args, n_threads)
        return packed_plain.gemm(*args)
    path = packed_x86.PATHS[handle.kernel]
    if n == 1:
        return packed_x86.gemv_parallel(path, *args, n_threads) if n_threads > 1 else packed_x86.gemv(path, *args)
    return packed_x86.gemm_parallel(path, *args, n_threads) if n_threads > 1 else packed_x86.gemm(path, *args)


def _check_handle(op, handle):
    if not isinstance(handle, PackedHandle):
        raise ValueError(f"{op}: expected a PackedHandle from the numba backend's prepare_packed, got {type(handle).__name__}")


def packed_gemv(handle, xq, xs):
    """``packed_gemv(handle, xq int8 [K], xs scalar) -> float32 [M]``:
    ``y[r] = xs * sum_g scales[r, g] * sum_{k in g} xq[k] * q[r, k]``."""
    _check_handle("packed_gemv", handle)
    xq = _data(xq)
    ref.check_gemv_acts(handle.shape, xq)
    xs64 = np.asarray(_data(xs), dtype=np.float64)
    if xs64.ndim != 0:
        raise ValueError(f"packed_gemv: xs must be a scalar, got shape {xs64.shape}")
    return _run(handle, np.ascontiguousarray(xq).reshape(1, -1), xs64.reshape(1))[0]


def packed_gemm(handle, xq, xs):
    """``packed_gemm(handle, xq int8 [N, K], xs float [N]) -> float32 [N, M]``:
    ``y[n, r] = xs[n] * sum_g scales[r, g] * sum_{k in g} xq[n, k] * q[r, k]``."""
    _check_handle("packed_gemm", handle)
    xq, xs = _data(xq), _data(xs)
    ref.check_gemm_acts(handle.shape, xq, xs)
    return _run(handle, np.ascontiguousarray(xq), np.ascontiguousarray(xs, dtype=np.float64))


def packed_linear(handle, x):
    """``reference.ternary.packed_linear``: ``x float [N, K]`` quantized to int8 per row, then the
    packed product; one call, so a decode step's linear layer pays one argument check."""
    _check_handle("packed_linear", handle)
    x = _data(x)
    ref.check_linear_acts(handle.shape, x)
    xq, xs = quantize_rows(np.ascontiguousarray(x))
    return _run(handle, xq, xs.astype(np.float64))


OPS = {
    "prepare_packed": prepare_packed,
    "packed_linear": packed_linear,
    "packed_gemv": packed_gemv,
    "packed_gemm": packed_gemm,
}
