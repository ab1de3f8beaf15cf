"""Ternary quantizers and 2-bit packing for the numba backend, bit for bit like ``reference.ternary``.

To match the reference exactly the kernels mirror NumPy's arithmetic, not just the formulas:

- The weight-group sum of ``|w|`` follows NumPy's pairwise summation (8 accumulators, blocks of
  128, halving above that) in float64. For float32 input NumPy casts through a buffer of
  ``np.getbufsize()`` elements and adds the pairwise sums of consecutive buffers, so groups
  longer than that are summed the same way here.
- The mean is rounded straight from float64 to the nearest float16 value (ties to even), as
  ``astype(np.float16)`` does.
- Divisions (``w / s``, ``x / s_x``) and the ``1e-8`` activation test happen in the input dtype.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from reference.autograd import data_of as _data
from reference.ternary import check_grouped_weight, require_float

from .dispatch import n_tasks

ZERO_THRESHOLD = 1e-8
ACT_LEVELS = 127
_FP16_OVERFLOW = 65520.0  # smallest float64 that rounds to inf in float16
_DECODE = np.array([0, 1, 0, -1], dtype=np.int8)  # 10 is invalid and decodes to 0


# Below this many elements a kernel runs in the calling thread: waking the thread pool costs
# tens of microseconds. Measured 2026-12-08 (2-core EPYC, two threads, idle), serial vs split:
# activations 512 x 256 0.135 vs 0.083 ms, 2048 x 768 1.57 vs 0.85 ms; weights 768 x 256
# 0.30 vs 0.23 ms. (The thread policy runs one thread when the machine is busy.)
PARALLEL_MIN_ELEMENTS = 1 << 17


def _tasks(rows, elements):
    return n_tasks(rows, elements, PARALLEL_MIN_ELEMENTS)


# --- weights ------------------------------------------------------------------------------


@njit(cache=True)
def _pairwise_abs_sum(a, lo, n):
    """NumPy's pairwise sum of ``|a[lo:lo+n]|`` in float64 (same order, same roundings)."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += np.float64(abs(a[lo + i]))
        return res
    if n <= 128:
        r0, r1, r2, r3 = abs(a[lo]) * 1.0, abs(a[lo + 1]) * 1.0, abs(a[lo + 2]) * 1.0, abs(a[lo + 3]) * 1.0
        r4, r5, r6, r7 = abs(a[lo + 4]) * 1.0, abs(a[lo + 5]) * 1.0, abs(a[lo + 6]) * 1.0, abs(a[lo + 7]) * 1.0
        i = 8
        stop = n - n % 8
        while i < stop:
            b = lo + i
            r0 += abs(a[b])
            r1 += abs(a[b + 1])
            r2 += abs(a[b + 2])
            r3 += abs(a[b + 3])
            r4 += abs(a[b + 4])
            r5 += abs(a[b + 5])
            r6 += abs(a[b + 6])
            r7 += abs(a[b + 7])
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += np.float64(abs(a[lo + i]))
            i += 1
        return res
    half = n // 2
    half -= half % 8
    return _pairwise_abs_sum(a, lo, half) + _pairwise_abs_sum(a, lo + half, n - half)


@njit(cache=True)
def _round_to_fp16(v):
    """The float16 value nearest to ``v >= 0`` (ties to even), as a float64; NaN stays NaN."""
    if v != v:
        return v
    if v >= _FP16_OVERFLOW:
        return np.inf
    if v == 0.0:
        return 0.0
    _, e = math.frexp(v)  # v = f * 2**e, f in [0.5, 1)
    quantum = math.ldexp(1.0, max(e - 11, -24))  # 11 significant bits; subnormal step 2**-24
    steps = v / quantum  # exact: scaling by a power of two
    whole = math.floor(steps)
    frac = steps - whole
    if frac > 0.5 or (frac == 0.5 and whole % 2 == 1):
        whole += 1.0
    return whole * quantum


@njit(cache=True)
def _quantize_weights_rows(w, group_size, chunk, q, s, r0, r1):
    n_groups = w.shape[1] // group_size
    for r in range(r0, r1):
        row = w[r]
        for g in range(n_groups):
            start = g * group_size
            total = 0.0
            for c in range(0, group_size, chunk):
                total += _pairwise_abs_sum(row, start + c, min(chunk, group_size - c))
            mean = total / group_size
            s[r, g] = _round_to_fp16(mean)  # exact in float32 and float64
            live = False
            if mean < ZERO_THRESHOLD or s[r, g] == 0:
                s[r, g] = 0.0
            elif not np.isfinite(s[r, g]):
                s[r, g] = np.nan
            else:
                live = True
            if live:
                sv = s[r, g]
                for i in range(group_size):
                    v = row[start + i] / sv  # in w's dtype, like the reference
                    q[r, start + i] = 1 if v >= 0.5 else (-1 if v <= -0.5 else 0)
            else:
                for i in range(group_size):
                    q[r, start + i] = 0


@njit(cache=True, parallel=True)
def _quantize_weights_parallel(w, group_size, chunk, q, s, n_tasks):
    m = w.shape[0]
    for task in prange(n_tasks):
        _quantize_weights_rows(w, group_size, chunk, q, s, task * m // n_tasks, (task + 1) * m // n_tasks)


def quantize_weights(w, group_size):
    """Absmean ternary quantization per row and group:
    ``quantize_weights(w [M, K] float, group_size) -> (q int8 [M, K], s [M, K // G])``,
    ``s`` in ``w``'s dtype and float16-representable (see ``reference.ternary.quantize_weights``)."""
    w = _data(w)
    m, k = check_grouped_weight("quantize_weights", "w", w, group_size)
    w = np.ascontiguousarray(w)
    # NumPy sums float64 groups in one pass and casts other dtypes through its buffer.
    chunk = group_size if w.dtype == np.float64 else max(1, min(group_size, np.getbufsize()))
    q = np.empty((m, k), np.int8)
    s = np.empty((m, k // group_size), w.dtype)
    args = (w, int(group_size), int(chunk), q, s)
    n_tasks = _tasks(m, w.size)
    if n_tasks > 1:
        _quantize_weights_parallel(*args, n_tasks)
    else:
        _quantize_weights_rows(*args, 0, m)
    return q, s


# --- activations --------------------------------------------------------------------------


@njit(cache=True)
def _quantize_acts_rows(x, levels, threshold, q, s, r0, r1):
    k = x.shape[1]
    for t in range(r0, r1):
        row = x[t]
        a = abs(row[0])
        finite = np.isfinite(row[0])
        for i in range(1, k):
            v = abs(row[i])
            finite = finite and np.isfinite(v)
            if v > a:
                a = v
        st = a / levels
        if not finite or a < threshold:
            s[t] = np.nan if not finite else 0.0
            for i in range(k):
                q[t, i] = 0
            continue
        s[t] = st
        for i in range(k):
            v = row[i] / st
            av = abs(v)
            whole = np.floor(av)
            r = whole + (1.0 if av - whole >= 0.5 else 0.0)
            r = min(r, 127.0)
            q[t, i] = np.int8(-r if v < 0 else r)


@njit(cache=True, parallel=True)
def _quantize_acts_parallel(x, levels, threshold, q, s, n_tasks):
    n = x.shape[0]
    for task in prange(n_tasks):
        _quantize_acts_rows(x, levels, threshold, q, s, task * n // n_tasks, (task + 1) * n // n_tasks)


def quantize_acts(x):
    """Absmax int8 quantization per token (last axis):
    ``quantize_acts(x [..., K] float) -> (q int8 [..., K], s [...] in x's dtype)``
    (see ``reference.ternary.quantize_acts``)."""
    x = _data(x)
    require_float("quantize_acts", "x", x)
    if x.ndim < 1:
        raise ValueError(f"quantize_acts: x must have at least one axis [..., K], got shape {x.shape}")
    if x.shape[-1] == 0 or x.size == 0:
        return np.zeros(x.shape, np.int8), np.zeros(x.shape[:-1], x.dtype)
    q, s = quantize_rows(np.ascontiguousarray(x).reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def quantize_rows(x2):
    """``quantize_acts`` on a checked, C-contiguous float matrix ``[N, K]`` with K > 0 (the
    packed products call it after their own argument check; N may be 0)."""
    q = np.empty(x2.shape, np.int8)
    s = np.empty(x2.shape[0], x2.dtype)
    dt = x2.dtype.type
    args = (x2, dt(ACT_LEVELS), dt(ZERO_THRESHOLD), q, s)
    n_tasks = _tasks(x2.shape[0], x2.size)
    if n_tasks > 1:
        _quantize_acts_parallel(*args, n_tasks)
    else:
        _quantize_acts_rows(*args, 0, x2.shape[0])
    return q, s


# --- 2-bit packing ------------------------------------------------------------------------


@njit(cache=True)
def _pack_rows(q, packed, r0, r1):
    """Returns the number of values outside {-1, 0, 1} (nothing is valid then)."""
    k4 = packed.shape[1]
    bad = 0
    for r in range(r0, r1):
        for j in range(k4):
            byte = 0
            for i in range(4):
                v = q[r, 4 * j + i]
                if v < -1 or v > 1:
                    bad += 1
                byte |= (v & 3) << (2 * i)
            packed[r, j] = byte
    return bad


@njit(cache=True, parallel=True)
def _pack_parallel(q, packed, n_tasks):
    m = q.shape[0]
    bad = 0
    for task in prange(n_tasks):
        bad += _pack_rows(q, packed, task * m // n_tasks, (task + 1) * m // n_tasks)
    return bad


def pack_ternary(q):
    """``pack_ternary(q int8 [M, K]) -> uint8 [M, K // 4]``: 0 -> 00, +1 -> 01, -1 -> 11,
    column ``4j + i`` in bits ``2i..2i+1`` of byte ``j``. K must be a multiple of 4."""
    q = _data(q)
    if not hasattr(q, "dtype") or q.dtype != np.int8:
        raise ValueError(f"pack_ternary: q must be an int8 array, got dtype {getattr(q, 'dtype', type(q).__name__)}")
    if q.ndim != 2 or q.shape[1] % 4 != 0:
        raise ValueError(f"pack_ternary: q must be 2-D [M, K] with K a multiple of 4, got shape {q.shape}")
    packed = np.empty((q.shape[0], q.shape[1] // 4), np.uint8)
    q = np.ascontiguousarray(q)
    n_tasks = _tasks(q.shape[0], q.size)
    bad = _pack_parallel(q, packed, n_tasks) if n_tasks > 1 else _pack_rows(q, packed, 0, q.shape[0])
    if bad:
        raise ValueError(f"pack_ternary: q of shape {q.shape} holds values outside {{-1, 0, 1}}")
    return packed


@njit(cache=True)
def _unpack_rows(p, decode, q, r0, r1):
    k4 = p.shape[1]
    for r in range(r0, r1):
        for j in range(k4):
            byte = p[r, j]
            for i in range(4):
                q[r, 4 * j + i] = decode[(byte >> (2 * i)) & 3]


@njit(cache=True, parallel=True)
def _unpack_parallel(p, decode, q, n_tasks):
    m = p.shape[0]
    for task in prange(n_tasks):
        _unpack_rows(p, decode, q, task * m // n_tasks, (task + 1) * m // n_tasks)


def unpack_ternary(p):
    """``unpack_ternary(p uint8 [M, K4]) -> int8 [M, 4 * K4]``; the invalid code 10 decodes to 0."""
    p = _data(p)
    if not hasattr(p, "dtype") or p.dtype != np.uint8 or p.ndim != 2:
        raise ValueError(
            f"unpack_ternary: packed weights must be a 2-D uint8 array [M, K/4], got dtype {getattr(p, 'dtype', None)} shape {getattr(p, 'shape', None)}"
        )
    q = np.empty((p.shape[0], 4 * p.shape[1]), np.int8)
    p = np.ascontiguousarray(p)
    n_tasks = _tasks(p.shape[0], q.size)
    if n_tasks > 1:
        _unpack_parallel(p, _DECODE, q, n_tasks)
    else:
        _unpack_rows(p, _DECODE, q, 0, p.shape[0])
    return q


OPS = {
    "quantize_weights": quantize_weights,
    "quantize_acts": quantize_acts,
    "pack_ternary": pack_ternary,
    "unpack_ternary": unpack_ternary,
}
