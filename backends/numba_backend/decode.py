"""Inference kernels for the numba backend: the attention step over a KV cache and the float
LM head's product, each one call instead of a chain of small ops.

- ``cached_attention``: ``reference.nn.cached_attention`` fused: RoPE on q and k (float32, the
  same arithmetic as ``rope_rotate``), the cache write, and the causal attention in float64
  (scores, max-shifted exponentials, normalised probabilities, weighted values; the reference's
  order of operations; dot products summed in any order), rounded to float32. No [T, S] score matrix: each query row keeps one
  row of scores, so prefill memory is O(S) per thread. Query heads run in parallel when the
  call is large (prefill), serially for a decode step.
- ``linear_rows``: ``x @ w.T`` for a few float32 rows (the LM head at decode), the vocabulary
  rows split over numba's threads, each dot product vectorized (float32, summed in any order,
  like BLAS). BLAS is held at one thread during inference (its spinning
  workers fight numba's), and the head is the one product large enough to want two.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from reference import nn as ref_nn
from reference import ops as ref_ops

from .dispatch import parallel_when_large
from .quant import _data

_F32, _F64 = np.float32, np.float64


# Dot products may be summed in any order (so LLVM vectorizes them); nothing else is relaxed:
# no approximate functions, infinities and NaNs keep their meaning.
_REASSOC = {"reassoc", "contract"}


@njit(cache=True, fastmath=_REASSOC, error_model="numpy", inline="always")
def _dot(a, b, n):
    s = a.dtype.type(0.0)
    for j in range(n):
        s += a[j] * b[j]
    return s


@njit(cache=True, fastmath=False, error_model="numpy")
def _rope_into(x, cos, sin, out, start):
    """out[start + t, h] = rope_rotate(x[t, h]) in float32, stored as out's dtype."""
    t_len, heads, hd = x.shape
    half = hd // 2
    for t in range(t_len):
        for h in range(heads):
            for i in range(half):
                c, s = cos[t, i], sin[t, i]
                x1, x2 = x[t, h, i], x[t, h, i + half]
                out[start + t, h, i] = x1 * c - x2 * s
                out[start + t, h, i + half] = x2 * c + x1 * s


@parallel_when_large(cache=True, fastmath=_REASSOC, error_model="numpy")
def _attend(q, kc, vc, start, scale, out):
    """out[t, hq] = softmax(scale q[t, hq] . kc[:start+t+1, hq // G]) @ vc[:start+t+1, hq // G]."""
    t_len, n_q, hd = q.shape
    n_kv, dv = kc.shape[1], vc.shape[2]
    group = n_q // n_kv
    for hq in prange(n_q):
        h = hq // group
        scores = np.empty(start + t_len, _F64)
        acc = np.empty(dv, _F64)
        for t in range(t_len):
            end = start + t + 1
            qt = q[t, hq]
            m = -np.inf
            for j in range(end):
                s = _dot(qt, kc[j, h], hd) * scale
                scores[j] = s
                if s > m:
                    m = s
            total = 0.0
            for j in range(end):
                e = np.exp(scores[j] - m)
                scores[j] = e
                total += e
            acc[:] = 0.0
            for j in range(end):
                p = scores[j] / total
                row = vc[j, h]
                for d in range(dv):
                    acc[d] += p * row[d]
            for d in range(dv):
                out[t, hq, d] = acc[d]


def cached_attention(q, k, v, k_cache, v_cache, start, cos, sin):
    """``reference.nn.cached_attention`` in two kernels (see the module docstring)."""
    q, k, v, cos, sin = (_data(a) for a in (q, k, v, cos, sin))
    start = int(start)
    ref_nn.check_cached_attention_args(q, k, v, k_cache, v_cache, start, cos, sin)
    if not (q.dtype == k.dtype == v.dtype == cos.dtype == sin.dtype == _F32
            and k_cache.dtype == v_cache.dtype == _F64 and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        return ref_nn.cached_attention(q, k, v, k_cache, v_cache, start, cos, sin)
    t_len, hd = q.shape[1], q.shape[3]
    cos, sin = np.ascontiguousarray(cos), np.ascontiguousarray(sin)
    _rope_into(np.ascontiguousarray(k[0]), cos, sin, k_cache[0], start)
    v_cache[0, start:start + t_len] = v[0]
    q64 = np.empty(q.shape[1:], _F64)
    _rope_into(np.ascontiguousarray(q[0]), cos, sin, q64, 0)
    out64 = np.empty((t_len, q.shape[2], v.shape[3]), _F64)
    _attend(q64, k_cache[0], v_cache[0], start, 1.0 / np.sqrt(np.float64(hd)), out64)
    return out64.astype(_F32)[None]


@parallel_when_large(cache=True, fastmath=_REASSOC, error_model="numpy")
def _rows_times(w, x, out):
    """out[n, r] = w[r] . x[n] (float32) for every vocabulary row r."""
    m, k = w.shape
    for r in prange(m):
        wr = w[r]
        for t in range(x.shape[0]):
            out[t, r] = _dot(wr, x[t], k)


# Above this many rows BLAS's blocked product is faster than one pass per row.
LINEAR_ROWS_MAX_N = 8


def linear_rows(x, w):
    """``reference.ops.linear_rows``: ``x [N, K] @ w[M, K].T -> [N, M]``."""
    x, w = _data(x), _data(w)
    ref_ops.check_linear_rows(x, w)
    if x.shape[0] > LINEAR_ROWS_MAX_N or x.dtype != _F32 or w.dtype != _F32 or not w.flags.c_contiguous:
        return ref_ops.linear_rows(x, w)
    out = np.empty((x.shape[0], w.shape[0]), _F32)
    if out.size and x.shape[1]:
        _rows_times(w, np.ascontiguousarray(x), out)
    elif out.size:
        out[:] = 0.0
    return out


OPS = {"cached_attention": cached_attention, "linear_rows": linear_rows}
