"""Portable packed ternary GEMV/GEMM: plain ``@njit`` loops that LLVM auto-vectorizes.

Each row of the kernel layout (see ``packed_x86``) is decoded once into int8 trits, then dotted
with every token group by group in exact int32. Works for any group size. Inner loops index
slices from 0: a loop over ``a[start + k]`` keeps negative-index wraparound and does not vectorize.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _decode_row(row, w):
    """``w[128*u + 32*i + j] = ((row[32*u + j] >> 2*i) & 3) - 1`` (trits in column order)."""
    for u in range(row.shape[0] // 32):
        src = row[32 * u : 32 * u + 32]
        dst = w[128 * u : 128 * u + 128]
        for j in range(32):
            b = src[j]
            dst[j] = np.int8((b & 3) - 1)
            dst[32 + j] = np.int8(((b >> 2) & 3) - 1)
            dst[64 + j] = np.int8(((b >> 4) & 3) - 1)
            dst[96 + j] = np.int8((b >> 6) - 1)


@njit(cache=True, inline="always")
def _dot(w, x):
    acc = np.int32(0)
    for k in range(w.shape[0]):
        acc = np.int32(acc + np.int32(w[k]) * np.int32(x[k]))
    return acc


@njit(cache=True)
def _rows(layout, scales_t, xq, xs, group_size, r0, r1, out):
    """``out[t, r] = xs[t] * sum_g scales[r, g] * sum_{k in g} w[r, k] * xq[t, k]`` for rows
    ``r0 .. r1`` (float64, summed in group order like the reference)."""
    n_groups = scales_t.shape[0]
    w = np.empty(layout.shape[1] * 4, np.int8)
    for r in range(r0, r1):
        _decode_row(layout[r], w)
        for t in range(xq.shape[0]):
            x = xq[t]
            acc = 0.0
            for g in range(n_groups):
                lo = g * group_size
                isum = _dot(w[lo : lo + group_size], x[lo : lo + group_size])
                acc += np.float64(scales_t[g, r]) * np.float64(isum)
            out[t, r] = np.float32(np.float64(xs[t]) * acc)


# Entry points: (layout, scales_t float32 [K // G, M_pad], xq int8 [N, K], xs float64 [N],
# group_size, m[, n_tasks]) -> float32 [N, m].


@njit(cache=True)
def gemm(layout, scales_t, xq, xs, group_size, m):
    out = np.empty((xq.shape[0], m), np.float32)
    _rows(layout, scales_t, xq, xs, group_size, 0, m, out)
    return out


@njit(cache=True, parallel=True)
def gemm_parallel(layout, scales_t, xq, xs, group_size, m, n_tasks):
    out = np.empty((xq.shape[0], m), np.float32)
    n_tasks = max(1, min(n_tasks, m))
    for task in prange(n_tasks):
        _rows(layout, scales_t, xq, xs, group_size, task * m // n_tasks, (task + 1) * m // n_tasks, out)
    return out
