"""``decode_layer``: one decode step of a whole dense attention block in one numba call.

``reference.decode.decode_layer`` composed from the numba ops costs ~12 calls from Python per
block, each with its wrapper, checks and reshapes: at the ``nano_125m`` shape that Python took
as long as the kernels (docs/decode_profile.md). Here the same kernels run in one compiled
function: RMSNorm, the activation quantizer and the packed GEMV (``packed_x86``'s drivers, row
blocks split over numba's threads when the product is large enough), the fused attention step
(``decode._rope_into`` / ``decode._attend_row``), SwiGLU or ReLU²-GLU, SubLN and the residual
adds. Every value is computed by the same kernel as in the op chain, so the result is
bit-identical to it (tests/test_decode_layer.py), and within the reference's tolerances of
``reference.decode.decode_layer``.

Only the SIMD packed paths are fused: a layer whose handles run the ``plain`` path (a group
size that is not a multiple of 32) runs the chain of numba ops (``reference.decode.compose``).
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from reference import decode as ref

from . import decode, dispatch, nn, packed, packed_x86, quant
from .dispatch import cache_depends_on
from .packed_x86 import GEMM_ROWS, GEMV_ROWS, _gemm_blocks, _gemv_blocks, group_sums
from .quant import _data

cache_depends_on(__file__, decode.__file__, dispatch.__file__, nn.__file__, packed_x86.__file__, quant.__file__)

_quantize, _quantize_parallel = quant._quantize_acts_rows, quant._quantize_acts_parallel

_rmsnorm_serial, _rmsnorm_parallel = nn._rmsnorm_forward.serial, nn._rmsnorm_forward.parallel
_swiglu_serial, _swiglu_parallel = nn._swiglu_forward.serial, nn._swiglu_forward.parallel
_relu2_serial, _relu2_parallel = nn._relu2_glu_forward.serial, nn._relu2_glu_forward.parallel
_step_serial, _step_parallel = decode._step.serial, decode._step.parallel
_ELEMENTS = dispatch.PARALLEL_MIN_ELEMENTS  # nn's row kernels: parallel from this size (parallel_when_large)
_QUANT_ELEMENTS = quant.PARALLEL_MIN_ELEMENTS


@njit(cache=True)
def _tasks(rows, elements, min_elements, n_threads):
    """``dispatch.n_tasks`` inside a kernel (``numba.get_num_threads()`` there would keep the
    kernel out of the disk cache, so the count comes in as an argument)."""
    if elements < min_elements:
        return 1
    return max(1, min(rows, n_threads))


@njit(cache=True)
def _norm(x, w, eps):
    """rmsnorm of the rows of ``x [T, D]`` (the op's kernel, serial or parallel by size as the op picks)."""
    y = np.empty_like(x)
    rstd = np.empty(x.shape[0], np.float32)
    if x.size >= _ELEMENTS:
        _rmsnorm_parallel(x, w, eps, y, rstd)
    else:
        _rmsnorm_serial(x, w, eps, y, rstd)
    return y


@njit(cache=True)
def _glu(gate, up, relu2):
    """SwiGLU or ReLU2-GLU of ``[T, F]`` rows, on the flattened rows as the ops run them."""
    g, u = gate.copy().reshape(gate.size), up.copy().reshape(up.size)
    y = np.empty(gate.size, np.float32)
    if relu2:
        if y.size >= _ELEMENTS:
            _relu2_parallel(g, u, y)
        else:
            _relu2_serial(g, u, y)
    elif y.size >= _ELEMENTS:
        _swiglu_parallel(g, u, y)
    else:
        _swiglu_serial(g, u, y)
    return y.reshape(gate.shape)


@njit(cache=True, parallel=True)
def _linear(path, x, layout, scales_t, group_size, m, min_macs, n_threads):
    """packed_linear of the rows ``x [T, K]`` (``packed.packed_linear``): the activation quantizer
    (rows over threads when large), then GEMV (one row) or GEMM row blocks over numba's threads
    when the product reaches ``min_macs`` (``packed._run``'s split)."""
    n, k = x.shape
    xq = np.empty(x.shape, np.int8)
    xs = np.empty(n, np.float32)
    levels, zero = np.float32(quant.ACT_LEVELS), np.float32(quant.ZERO_THRESHOLD)
    q_tasks = _tasks(n, x.size, _QUANT_ELEMENTS, n_threads)
    if q_tasks > 1:
        _quantize_parallel(x, levels, zero, xq, xs, q_tasks)
    else:
        _quantize(x, levels, zero, xq, xs, 0, n)
    xs64 = xs.astype(np.float64)
    out = np.empty((n, m), np.float32)
    xsums = group_sums(xq, group_size)
    cpg = group_size // 32
    n_blocks = layout.shape[0] // (GEMV_ROWS if n == 1 else GEMM_ROWS)
    n_tasks = min(n_threads, n_blocks) if m * k * n >= min_macs else 1
    if n_tasks > 1:
        for task in prange(n_tasks):
            b0, b1 = task * n_blocks // n_tasks, (task + 1) * n_blocks // n_tasks
            if n == 1:
                _gemv_blocks(path, layout, scales_t, xq, xs64, xsums, cpg, m, b0, b1, out)
            else:
                _gemm_blocks(path, layout, scales_t, xq, xs64, xsums, cpg, m, b0, b1, out)
    elif n == 1:
        _gemv_blocks(path, layout, scales_t, xq, xs64, xsums, cpg, m, 0, n_blocks, out)
    else:
        _gemm_blocks(path, layout, scales_t, xq, xs64, xsums, cpg, m, 0, n_blocks, out)
    return out


@njit(cache=True)
def _layer(path, x, eps, group_size, n_threads, min_macs, attend_rows, attn_norm, qkv, qkv_s, n_q, n_kv, hd,
           k_cache, v_cache, start, cos, sin, attn_sub, wo, wo_s,
           ffn_norm, gate_up, gate_up_s, hidden, relu2, ffn_sub, w_down, w_down_s):
    t, dim = x.shape
    y = _linear(path, _norm(x, attn_norm, eps), qkv, qkv_s, group_size, (n_q + 2 * n_kv) * hd, min_macs, n_threads)
    q = y[:, :n_q * hd].copy().reshape((t, n_q, hd))
    k = y[:, n_q * hd:(n_q + n_kv) * hd].copy().reshape((t, n_kv, hd))
    v = y[:, (n_q + n_kv) * hd:].copy().reshape((t, n_kv, hd))
    # decode.cached_attention's kernel: RoPE, the cache write, the float64 attention
    o = np.empty((t, n_q, hd), np.float32)
    if attend_rows > 1:
        _step_parallel(q, k, v, k_cache, v_cache, start, cos, sin, 1.0 / math.sqrt(hd), o, attend_rows)
    else:
        _step_serial(q, k, v, k_cache, v_cache, start, cos, sin, 1.0 / math.sqrt(hd), o, attend_rows)
    o2 = o.reshape((t, n_q * hd))
    if attn_sub.shape[0]:
        o2 = _norm(o2, attn_sub, eps)
    x = x + _linear(path, o2, wo, wo_s, group_size, dim, min_macs, n_threads)
    gu = _linear(path, _norm(x, ffn_norm, eps), gate_up, gate_up_s, group_size, 2 * hidden, min_macs, n_threads)
    a = _glu(gu[:, :hidden], gu[:, hidden:], relu2)
    if ffn_sub.shape[0]:
        a = _norm(a, ffn_sub, eps)
    return x + _linear(path, a, w_down, w_down_s, group_size, dim, min_macs, n_threads)


def supports(layer):
    """Whether ``layer``'s weights are numba handles on a SIMD path (else the op chain runs)."""
    handles = (layer.qkv, layer.wo, layer.gate_up, layer.w_down)
    return all(isinstance(h, packed.PackedHandle) and h.kernel in packed_x86.PATHS for h in handles) \
        and len({h.kernel for h in handles}) == 1 and len({h.group_size for h in handles}) == 1


_NO_NORM = np.zeros(0, np.float32)


def _prepared(layer):
    """The kernel's fixed arguments, made once per layer (False: the layer runs the op chain)."""
    if layer.prepared is None:
        layer.prepared = _prepare(layer) if supports(layer) else False
    return layer.prepared


def _prepare(layer):
    def f32(a):
        return _NO_NORM if a is None else np.ascontiguousarray(_data(a), dtype=np.float32)

    products = [(h.layout, h.scales_t) for h in (layer.qkv, layer.wo, layer.gate_up, layer.w_down)]
    return (packed_x86.PATHS[layer.qkv.kernel], layer.qkv.group_size, products, f32(layer.attn_norm),
            f32(layer.attn_sub), f32(layer.ffn_norm), f32(layer.ffn_sub), layer.glu == "relu2_glu")


def decode_layer(x, layer, k_cache, v_cache, start, cos, sin):
    """``reference.decode.decode_layer`` in one call (see the module docstring)."""
    x = _data(x)
    start = int(start)
    ref.check_decode_layer_args(x, layer, k_cache, v_cache, start)
    prepared = _prepared(layer)
    if not prepared:
        from .. import get_backend

        return ref.compose(get_backend("numba").op, x, layer, k_cache, v_cache, start, cos, sin)
    if not (k_cache.dtype == v_cache.dtype == np.float32 and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise ValueError("decode_layer: the caches must be C-contiguous float32 arrays")
    path, group_size, (qkv, wo, gu, wd), attn_norm, attn_sub, ffn_norm, ffn_sub, relu2 = prepared
    return _layer(path, np.ascontiguousarray(x), np.float64(layer.eps), group_size, numba.get_num_threads(),
                  packed._min_macs(), decode.row_tasks(x.shape[0], layer.n_heads, layer.head_dim, start), attn_norm, *qkv,
                  layer.n_heads, layer.n_kv_heads, layer.head_dim, k_cache[0], v_cache[0], start,
                  np.ascontiguousarray(_data(cos), dtype=np.float32), np.ascontiguousarray(_data(sin), dtype=np.float32),
                  attn_sub, *wo, ffn_norm, *gu, layer.hidden, relu2, ffn_sub, *wd)


OPS = {"decode_layer": decode_layer}
