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

from . import decode, nn, packed, packed_x86, quant
from .dispatch import cache_depends_on
from .packed_x86 import GEMV_ROWS, _gemv_blocks, group_sums
from .quant import _data

cache_depends_on(__file__, decode.__file__, nn.__file__, packed_x86.__file__, quant.__file__)

_rmsnorm = nn._rmsnorm_forward.serial
_swiglu = nn._swiglu_forward.serial
_relu2_glu = nn._relu2_glu_forward.serial
_quantize = quant._quantize_acts_rows
_rope_into = decode._rope_into
_attend_row = decode._attend_row


@njit(cache=True)
def _norm(x, w, eps):
    """rmsnorm of one row ``x [1, D]`` (the op's kernel)."""
    y = np.empty_like(x)
    _rmsnorm(x, w, eps, y, np.empty(1, np.float32))
    return y


@njit(cache=True, parallel=True)
def _linear(path, x, layout, scales_t, group_size, m, n_tasks):
    """packed_linear of one row ``x [1, K]``: quantize, then the GEMV's row blocks over
    ``n_tasks`` threads (``packed._run``'s split)."""
    xq = np.empty(x.shape, np.int8)
    xs = np.empty(1, np.float32)
    _quantize(x, np.float32(quant.ACT_LEVELS), np.float32(quant.ZERO_THRESHOLD), xq, xs, 0, 1)
    xs64 = xs.astype(np.float64)
    out = np.empty((1, m), np.float32)
    xsums = group_sums(xq, group_size)
    cpg = group_size // 32
    n_blocks = layout.shape[0] // GEMV_ROWS
    if n_tasks > 1:
        n_tasks = min(n_tasks, n_blocks)
        for task in prange(n_tasks):
            _gemv_blocks(path, layout, scales_t, xq, xs64, xsums, cpg, m,
                         task * n_blocks // n_tasks, (task + 1) * n_blocks // n_tasks, out)
    else:
        _gemv_blocks(path, layout, scales_t, xq, xs64, xsums, cpg, m, 0, n_blocks, out)
    return out


@njit(cache=True)
def _layer(path, x, eps, group_size, attn_norm, qkv, qkv_s, qkv_tasks, n_q, n_kv, hd,
           k_cache, v_cache, start, cos, sin, attn_sub, wo, wo_s, wo_tasks,
           ffn_norm, gate_up, gate_up_s, gate_up_tasks, hidden, glu, ffn_sub, w_down, w_down_s, w_down_tasks):
    dim = x.shape[1]
    y = _linear(path, _norm(x, attn_norm, eps), qkv, qkv_s, group_size, (n_q + 2 * n_kv) * hd, qkv_tasks)
    # the attention step of decode._step for one row: RoPE, cache write, float64 attention
    q = y[0, :n_q * hd].copy().reshape((1, n_q, hd))
    k = y[0, n_q * hd:(n_q + n_kv) * hd].copy().reshape((1, n_kv, hd))
    _rope_into(k, cos, sin, k_cache, start)
    v_cache[start] = y[0, (n_q + n_kv) * hd:].reshape((n_kv, hd))
    q64 = np.empty(q.shape, np.float64)
    _rope_into(q, cos, sin, q64, 0)
    o = np.empty((1, n_q, hd), np.float32)
    _attend_row(q64, k_cache, v_cache, 0, start + 1, 1.0 / math.sqrt(hd),
                np.empty((n_q, start + 1), np.float64), np.empty((n_q, hd), np.float64), o)
    o2 = o.reshape((1, n_q * hd))
    if attn_sub.shape[0]:
        o2 = _norm(o2, attn_sub, eps)
    x = x + _linear(path, o2, wo, wo_s, group_size, dim, wo_tasks)
    gu = _linear(path, _norm(x, ffn_norm, eps), gate_up, gate_up_s, group_size, 2 * hidden, gate_up_tasks)
    a = np.empty((1, hidden), np.float32)
    gate, up = gu[0, :hidden].copy(), gu[0, hidden:].copy()
    if glu == 0:
        _swiglu(gate, up, a[0])
    else:
        _relu2_glu(gate, up, a[0])
    if ffn_sub.shape[0]:
        a = _norm(a, ffn_sub, eps)
    return x + _linear(path, a, w_down, w_down_s, group_size, dim, w_down_tasks)


def supports(layer):
    """Whether ``layer``'s weights are numba handles on a SIMD path (else the op chain runs)."""
    handles = (layer.qkv, layer.wo, layer.gate_up, layer.w_down)
    return all(isinstance(h, packed.PackedHandle) and h.kernel in packed_x86.PATHS for h in handles) \
        and len({h.kernel for h in handles}) == 1 and len({h.group_size for h in handles}) == 1


_NO_NORM = np.zeros(0, np.float32)


def _prepared(layer):
    """The kernel's fixed arguments, made once per layer: (path, group size, products)."""
    if layer.prepared is None:
        f32 = lambda a: np.ascontiguousarray(_data(a), dtype=np.float32)  # noqa: E731
        products = [(h.layout, h.scales_t, h.shape[0] * h.shape[1]) for h in (layer.qkv, layer.wo, layer.gate_up, layer.w_down)]
        layer.prepared = (packed_x86.PATHS[layer.qkv.kernel], layer.qkv.group_size, products,
                          f32(layer.attn_norm), _NO_NORM if layer.attn_sub is None else f32(layer.attn_sub),
                          f32(layer.ffn_norm), _NO_NORM if layer.ffn_sub is None else f32(layer.ffn_sub),
                          ref.GLUS.index(layer.glu))
    return layer.prepared


def decode_layer(x, layer, k_cache, v_cache, start, cos, sin):
    """``reference.decode.decode_layer`` in one call (see the module docstring)."""
    x = _data(x)
    start = int(start)
    ref.check_decode_layer_args(x, layer, k_cache, v_cache, start)
    if not supports(layer):
        from .. import get_backend

        return ref.compose(get_backend("numba").op, x, layer, k_cache, v_cache, start, cos, sin)
    path, group_size, products, attn_norm, attn_sub, ffn_norm, ffn_sub, glu = _prepared(layer)
    if not (k_cache.dtype == v_cache.dtype == np.float32 and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        raise ValueError("decode_layer: the caches must be C-contiguous float32 arrays")
    threads = numba.get_num_threads()
    min_macs = packed._min_macs()
    (qkv, qkv_s, n1), (wo, wo_s, n2), (gu, gu_s, n3), (wd, wd_s, n4) = products
    tasks = [threads if n >= min_macs else 1 for n in (n1, n2, n3, n4)]
    return _layer(path, np.ascontiguousarray(x), np.float64(layer.eps), group_size, attn_norm, qkv, qkv_s, tasks[0],
                  layer.n_heads, layer.n_kv_heads, layer.head_dim, k_cache[0], v_cache[0], start,
                  np.ascontiguousarray(_data(cos), dtype=np.float32), np.ascontiguousarray(_data(sin), dtype=np.float32),
                  attn_sub, wo, wo_s, tasks[1], ffn_norm, gu, gu_s, tasks[2], layer.hidden, glu, ffn_sub, wd, wd_s, tasks[3])


OPS = {"decode_layer": decode_layer}
