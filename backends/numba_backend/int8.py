"""``int8_linear`` for the numba backend: int8 x int8 rows, exact int32 sums (the int8 LM head).

Same contract and bit-identical results as ``reference.ternary.int8_linear``: the integer dot
product is exact whatever the order, then ``(isum * ws[m]) * xs[n]`` in float64, rounded to
float32. Rows of the weight are split over numba threads when the product is large; the inner
loop multiplies int16-widened codes (|q| <= 127, so a product fits int16 and the sum of two
fits int32: what ``vpmaddwd`` computes) and accumulates in int32.
"""
from __future__ import annotations

import numpy as np
from numba import prange

from reference import ternary as ref

from .dispatch import parallel_when_large
from .quant import _data


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _int8_rows(wq, ws, xq, xs, out):
    m, k = wq.shape
    n = xq.shape[0]
    for r in prange(m):
        w = wq[r]
        for t in range(n):
            x = xq[t]
            acc = np.int32(0)
            for j in range(k):
                acc += np.int32(np.int16(x[j]) * np.int16(w[j]))
            out[t, r] = np.float32((np.float64(acc) * np.float64(ws[r])) * np.float64(xs[t]))


def int8_linear(xq, xs, wq, ws):
    """``int8_linear(xq int8 [N, K], xs [N], wq int8 [M, K], ws [M]) -> float32 [N, M]``."""
    xq, xs, wq, ws = (_data(a) for a in (xq, xs, wq, ws))
    ref.check_int8_linear(xq, xs, wq, ws)
    out = np.empty((xq.shape[0], wq.shape[0]), np.float32)
    if out.size:
        _int8_rows(np.ascontiguousarray(wq), np.ascontiguousarray(ws), np.ascontiguousarray(xq),
                   np.ascontiguousarray(xs), out)
    return out


OPS = {"int8_linear": int8_linear}
