"""``ternary_linear`` for training on the CPU: numba quantizers feeding float32 BLAS.

Same contract as ``reference.ternary.ternary_linear`` (SPEC 2). The forward's integer inner
sums are formed *exactly* by float32 matrix products of integer-valued float32 matrices, one
per weight group:

    P_g = Xq[:, g] @ Wq[:, g]^T       (|every partial sum| <= G * 127 < 2**24: exact in float32)
    y   = s_x * sum_g s[:, g] * P_g    (one float32 multiply-add per group and output)

so the only rounding is in the few float32 multiply-adds over groups (relative error about
1e-7 against the float64 reference; the SPEC allows 1e-5). OpenBLAS sgemm runs these products
at full speed: at [4096, 1024] x [1024, 1024] a register-blocked plain-numba int8 kernel took
5.8 s against 0.14 s for the four per-group sgemms on this AVX2 CPU (no VNNI). The STE backward
is two float32 sgemms (``dX = dY @ W_q``, ``dW = (s_x dY)^T @ Xq``), on the kept rows only
when ``keep`` is given.

Exact for G * 127 < 2**24 (G <= 132104); larger groups still agree to float32 rounding.
The weight-group means are float64 sums of float32 values, exact (so equal to the reference's
pairwise sums) unless a group spans more than about 2**20 in magnitude; the float16 rounding
of the means is the reference's own numpy code.
"""
from __future__ import annotations

import math
import os

import numpy as np
from numba import njit, prange

from reference import ternary as ref
from reference.autograd import Function, data_of

from . import gemm
from . import packed as _packed
from . import quant as _quant
from .nn import _is_f32

_KERNEL = dict(cache=True, fastmath=False, error_model="numpy")
# Bytes of one group's product block P_g ([rows, M] float32). Whole-matrix products beat
# cache-sized row blocks here: every extra sgemm/numba hand-off costs a thread-pool sync.
_BLOCK_BYTES = 32 << 20


# --- quantizers (same numbers as reference.ternary, fused with what the products need) ----


def _quantize_acts(x2):
    """(xq int8 [N, K], xq as float32 [N, K], sx float32 [N]) from the backend's one activation
    quantizer (``quant.quantize_acts``, bit-identical to the reference)."""
    qx, sx = _quant.quantize_acts(x2)
    return qx, qx.astype(np.float32), sx


def _quantize_weights(w, group_size):
    """(wq float32 trits [M, K], wd = wq * s float32 [M, K], s [M, K/G]) from the backend's one
    weight quantizer (``quant.quantize_weights``, bit-identical to the reference): training's
    forward uses exactly the trits and scales that export and inference use."""
    m, k = w.shape
    q, s = _quant.quantize_weights(w, group_size)
    wq = q.astype(np.float32)
    # A NaN/Inf group has q = 0 and s = NaN, so wd = 0 * NaN = NaN there, as q * s in the reference.
    wd = (wq.reshape(m, k // group_size, group_size) * s[:, :, None]).reshape(m, k)
    return wq, wd, s


# --- the grouped product ----------------------------------------------------------------------


@njit(parallel=True, **_KERNEL)
def _fold_group(p, s_g, sx, y, first, last):
    """y = (0 if first else y) + p * s_g[None, :]; then y *= sx[:, None] when last."""
    n, m = p.shape
    for t in prange(n):
        st = sx[t]
        for r in range(m):
            acc = p[t, r] * s_g[r]
            if not first:
                acc = y[t, r] + acc
            if last:
                acc = acc * st
            y[t, r] = acc


def _grouped_forward(xq, sx, wq, s, group_size):
    """y[t, r] = sx[t] * sum_g s[r, g] * (xq[t, g] . wq[r, g]) in float32, exact inner sums."""
    n, k = xq.shape
    m = wq.shape[0]
    groups = k // group_size
    y = np.empty((n, m), np.float32)
    if groups == 0 or n == 0 or m == 0:
        y[:] = 0
        return y
    block = max(1, min(n, _BLOCK_BYTES // (4 * m)))
    p = np.empty((block, m), np.float32) if groups > 1 else None
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        yb = y[lo:hi]
        for g in range(groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            pb = yb if g == 0 else p[: hi - lo]  # the first product lands in y and is scaled in place
            np.matmul(xq[lo:hi, cols], wq[:, cols].T, out=pb)
            _fold_group(pb, np.ascontiguousarray(s[:, g]), sx[lo:hi], yb, g == 0, g == groups - 1)
    return y


# --- the forward on the packed int8 kernel ----------------------------------------------------
#
# ``packed_gemm`` forms the same exact integer group sums with AVX-512 VNNI ``vpdpbusd`` (or AVX2
# ``vpmaddubsw``) on int8 activations and 2-bit weights, and folds the groups in float64 in group
# order: the reference's own arithmetic (the sgemm path above folds in float32). At the training
# shapes (2048 tokens, K = 256..768, G = 128) it beat the per-group sgemms by about 1.3-1.8x on one
# core. Used when the SIMD kernels run here (G % 32 == 0) and the product is large enough for
# packing the weights every call to pay off. ``NANOCHAT_PACKED_FORWARD=0`` keeps the sgemm path.
PACKED_FORWARD = _packed.DEFAULT_PATH != "plain" and os.environ.get("NANOCHAT_PACKED_FORWARD", "1") != "0"
PACKED_MIN_MACS = 1 << 22


def _use_packed(n, m, k, group_size):
    return PACKED_FORWARD and group_size % 32 == 0 and n * m * k >= PACKED_MIN_MACS


@njit(parallel=True, **_KERNEL)
def _dequantize_groups(q, s, group_size, wd):
    """wd[r, j] = q[r, j] * s[r, j // G] as float32 (NaN groups stay NaN, as ``q * s``)."""
    m, k = q.shape
    for r in prange(m):
        for g in range(k // group_size):
            sg = s[r, g]
            for j in range(g * group_size, (g + 1) * group_size):
                wd[r, j] = np.float32(q[r, j]) * sg


def _packed_forward(x2, w, group_size):
    """(y [N, M], xq float32 [N, K], sx [N], wd [M, K]) with the forward on ``packed_gemm``."""
    n, k = x2.shape
    qx, xq, sx = _quantize_acts(x2)
    qw, s = _quant.quantize_weights(w, group_size)
    handle = _packed.prepare_packed(_quant.pack_ternary(qw), s, group_size)
    y = _packed.packed_gemm(handle, qx, sx)
    wd = np.empty(qw.shape, np.float32)
    _dequantize_groups(qw, s, group_size, wd)
    return y, xq, sx, wd


@njit(parallel=True, **_KERNEL)
def _scaled_rows(gy, sx, rows, out):
    """out[i] = gy[rows[i]] * sx[rows[i]] (the kept rows of dY, scaled by the token scales)."""
    n, m = out.shape
    for i in prange(n):
        t = rows[i]
        st = sx[t]
        for r in range(m):
            out[i, r] = gy[t, r] * st


# --- the op -----------------------------------------------------------------------------------


class TernaryLinear(Function):
    """``reference.ternary.TernaryLinear`` in float32: exact grouped integer forward on sgemm,
    straight-through backward on sgemm, ``keep`` resolved with the reference's own helper."""

    @staticmethod
    def forward(ctx, x, w, group_size, keep=None):
        ref.require_float("ternary_linear", "x", x)
        m, k = ref.check_grouped_weight("ternary_linear", "w", w, group_size)
        if x.ndim < 1 or x.shape[-1] != k:
            raise ValueError(f"ternary_linear: x has shape {x.shape} but w has shape {w.shape}; the last axis of x must be K = {k}")
        if x.dtype != w.dtype:
            raise ValueError(f"ternary_linear: x is {x.dtype} but w is {w.dtype}; both must have the same dtype")
        n = math.prod(x.shape[:-1])
        x2 = np.ascontiguousarray(x).reshape(n, k)
        if keep is not None and not isinstance(keep, ref.RowSelection):
            keep = ref.check_keep(data_of(keep), n)
        if _use_packed(n, m, k, group_size):
            y, xq, sx, wd = _packed_forward(x2, np.ascontiguousarray(w), group_size)
        else:
            _, xq, sx = _quantize_acts(x2)
            wq, wd, s = _quantize_weights(np.ascontiguousarray(w), group_size)
            y = _grouped_forward(xq, sx, wq, s, group_size)
        ctx.save(xq, sx, wd, keep, x.shape)
        return y.reshape(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, gy):
        xq, sx, wd, keep, x_shape = ctx.saved
        m = wd.shape[0]
        n = xq.shape[0]
        gy2 = np.ascontiguousarray(gy, dtype=np.float32).reshape(n, m)
        rows = ref.resolve_keep(keep, n)
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = ref.rows_to_full(gemm.matmul(gy2 if rows is None else gy2[rows], wd), rows, n).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            index = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
            scaled = np.empty((index.size, m), np.float32)
            if scaled.size:
                _scaled_rows(gy2, sx, index, scaled)
            x_rows = xq if rows is None else xq[index]
            gw = gemm.matmul(scaled.T, x_rows)
        return gx, gw


def ternary_linear(x, w, group_size, keep=None):
    """``ternary_linear(x [..., K], w [M, K], group_size, keep=None) -> y [..., M]``.

    Differentiable in ``x`` and ``w`` (Tensors or arrays, same float dtype); ``keep`` is an
    optional 1-D integer array of distinct row indices into ``x.reshape(-1, K)`` or a
    ``RowSelection`` filled in before backward. float32 runs here; other dtypes run the
    reference (same contract).
    """
    if not _is_f32(x, w):
        return ref.ternary_linear(x, w, group_size, keep=keep)
    return TernaryLinear.apply(x, w, group_size=group_size, keep=keep)


class DenseLinear(ref.DenseLinear):
    """``reference.ternary.DenseLinear`` (the LM head) with its three products on the threaded
    ``gemm.matmul`` (BLAS itself runs one thread)."""

    product = staticmethod(gemm.matmul)


def dense_linear(x, w, keep=None):
    """``reference.ternary.dense_linear``; float32 runs the threaded products."""
    if not _is_f32(x, w):
        return ref.dense_linear(x, w, keep=keep)
    return DenseLinear.apply(x, w, keep=keep)


OPS = {"ternary_linear": ternary_linear, "dense_linear": dense_linear}
