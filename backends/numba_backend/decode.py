"""Inference kernels for the numba backend: the attention step over a KV cache and the float
LM head's product, each one call instead of a chain of small ops.

- ``cached_attention``: ``reference.nn.cached_attention`` fused: RoPE on q and k (float32, the
  same arithmetic as ``rope_rotate``), the write into the float32 cache, and the causal
  attention in float64 with the cached values widened as they are read (scores, max-shifted
  exponentials, normalised probabilities, weighted values: the reference's order of
  operations, dot products summed in any order), rounded to float32. No [T, S] score matrix:
  a query row keeps one row of scores per head, so prefill memory is O(S) per thread. Large
  prefill calls split their query rows over numba's threads; a decode row runs on one.
- ``linear_rows``: ``x @ w.T`` for a few float32 rows (the LM head at decode), the vocabulary
  rows split over numba's threads, each dot product vectorized (float32, summed in any order,
  like BLAS). BLAS is held at one thread during inference (its spinning workers fight
  numba's), and the head is the one product large enough to want two.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from reference import nn as ref_nn
from reference import ops as ref_ops

from .. import threads
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


@njit(cache=True, fastmath=_REASSOC, error_model="numpy")
def _attend_row(q, kc, vc, t, end, scale, scores, acc, out):
    """out[t, hq] = softmax(scale q[t, hq] . kc[:end, hq // G]) @ vc[:end, hq // G] for every
    query head hq. Positions outermost: the cache is read front to back once for the
    scores and once for the values."""
    hd = q.shape[2]
    group = q.shape[1] // kc.shape[1]
    dv = vc.shape[2]
    n_q = q.shape[1]
    for hq in range(n_q):
        for d in range(dv):
            acc[hq, d] = 0.0
    for j in range(end):
        for hq in range(n_q):
            scores[hq, j] = _dot(q[t, hq], kc[j, hq // group], hd) * scale
    for hq in range(n_q):
        m = -np.inf
        for j in range(end):
            if scores[hq, j] > m:
                m = scores[hq, j]
        total = 0.0
        for j in range(end):
            e = np.exp(scores[hq, j] - m)
            scores[hq, j] = e
            total += e
        for j in range(end):
            scores[hq, j] /= total
    for j in range(end):
        for hq in range(n_q):
            p = scores[hq, j]
            row = vc[j, hq // group]
            for d in range(dv):
                acc[hq, d] += p * row[d]
    for hq in range(n_q):
        for d in range(dv):
            out[t, hq, d] = acc[hq, d]


@parallel_when_large(cache=True, fastmath=_REASSOC, error_model="numpy")  # version chosen by task count
def _step(q, k, v, kc, vc, start, cos, sin, scale, out, row_tasks):
    """RoPE and the cache write, then every query row t (position start + t) over cache
    positions 0 .. start + t, the rows dealt round-robin to ``row_tasks`` tasks (later rows
    read more positions)."""
    t_len, n_q, hd = q.shape
    _rope_into(k, cos, sin, kc, start)
    for t in range(t_len):
        vc[start + t] = v[t]
    q64 = np.empty(q.shape, _F64)
    _rope_into(q, cos, sin, q64, 0)
    for first in prange(row_tasks):
        scores = np.empty((n_q, start + t_len), _F64)
        acc = np.empty((n_q, vc.shape[2]), _F64)
        for t in range(first, t_len, row_tasks):
            _attend_row(q64, kc, vc, t, start + t + 1, scale, scores, acc, out)


# A call is split over threads (by query rows) from this many multiply-adds (scores and
# values) on: above a few hundred cached positions at 768 wide once workers spin (inference),
# far more otherwise. A single row (decode) runs on one thread: splitting its heads over two
# measured slower in real decode steps (nano_125m shape, int8 head, 2026-12-08: 5.1-5.6 ms a
# step with one thread on attention against 5.6-7.7 ms split, at 256 cached positions; 7.7-8.6
# against 10.5-11.8 ms at 900), though faster in isolation with the cache warm.
ATTEND_PARALLEL_MIN = {True: 1 << 18, False: 1 << 21}


def row_tasks(t_len, n_q, hd, start):
    """Row tasks for an attention step of ``t_len`` query rows of ``n_q`` heads from position
    ``start`` (its multiply-adds: scores and values over the visible positions)."""
    if 2 * t_len * n_q * hd * (start + (t_len + 1) // 2) < ATTEND_PARALLEL_MIN[threads.spinning_workers()]:
        return 1
    return max(1, min(numba.get_num_threads(), t_len))


def cached_attention(q, k, v, k_cache, v_cache, start, cos, sin):
    """``reference.nn.cached_attention`` in one kernel (see the module docstring)."""
    q, k, v, cos, sin = (_data(a) for a in (q, k, v, cos, sin))
    start = int(start)
    ref_nn.check_cached_attention_args(q, k, v, k_cache, v_cache, start, cos, sin)
    if not (q.dtype == k.dtype == v.dtype == cos.dtype == sin.dtype == k_cache.dtype == v_cache.dtype == _F32
            and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous):
        return ref_nn.cached_attention(q, k, v, k_cache, v_cache, start, cos, sin)
    t_len, n_q, hd = q.shape[1], q.shape[2], q.shape[3]
    out = np.empty((1, t_len, n_q, v.shape[3]), _F32)
    rows = row_tasks(t_len, n_q, hd, start)
    kernel = _step.parallel if rows > 1 else _step.serial
    kernel(np.ascontiguousarray(q[0]), np.ascontiguousarray(k[0]), np.ascontiguousarray(v[0]), k_cache[0], v_cache[0],
           start, np.ascontiguousarray(cos), np.ascontiguousarray(sin), 1.0 / math.sqrt(hd), out[0], rows)
    return out


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
