"""Fused float32 kernels for the training path's elementwise and row-wise ops.

Each op keeps the reference's name, signature and semantics (``reference.nn``); only the
float32 hot loops run here. Other dtypes (float64 gradient checks, for instance) go to the
reference unchanged, and so does validation, so errors read the same on every backend.

What makes these kernels fast on this CPU:

- one pass over memory where the reference makes five to ten (each numpy expression
  allocates and streams a temporary);
- ``exp_nonpos``: an exp for arguments <= 0 written in plain arithmetic, so LLVM vectorises
  it (libm's ``expf`` is a scalar call, 2.5x slower than numpy's SIMD exp); every exp these
  ops need has a non-positive argument (``x - max``, ``-|x|``);
- ``error_model="numpy"``: a float division by zero gives inf/NaN instead of a branch that
  raises, which keeps divisions inside vectorised loops;
- row reductions over 8 independent accumulators: without fastmath LLVM keeps the order of a
  single accumulator and cannot vectorise it; 8 lanes give it independent chains (and the
  float64 lanes make the sums more accurate than the float32 reference).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from reference import nn as ref_nn
from reference.autograd import Function, Tensor, data_of as _arr
from reference.ops import _check_same_dtype

from . import gemm
from .dispatch import PARALLEL_MIN_ELEMENTS, cache_depends_on, n_tasks, parallel_when_large
from .gemm import sgemm

cache_depends_on(__file__, gemm.__file__)  # the attention kernels compile gemm.sgemm in

_F32 = np.dtype(np.float32)

# --- scalar helpers ----------------------------------------------------------------------


@intrinsic
def _f32_from_bits(typingctx, bits):
    """Reinterpret an int32 bit pattern as a float32 (a bitcast, no conversion)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(cache=True, fastmath=False, error_model="numpy")
def exp_nonpos(x):
    """exp(x) for float32 x <= 0 (also fine up to x = 80), within 1.5 ulp; NaN -> NaN, -inf -> 0.

    Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2, a degree-7 polynomial for exp(r)
    (the Cephes expf coefficients), and 2^n built from exponent bits as two factors so that
    results in the subnormal range and exact zeros (x < -104) come out right.
    """
    x = max(x, np.float32(-110.0))
    n = np.int32(math.floor(x * np.float32(1.4426950408889634) + np.float32(0.5)))
    nf = np.float32(n)
    r = x - nf * np.float32(0.693359375)
    r = r - nf * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    n = min(max(n, np.int32(-160)), np.int32(254))  # NaN converts to INT_MIN: keep the bits sane
    n1 = n >> 1
    n2 = n - n1
    return p * _f32_from_bits(np.int32((n1 + 127) << 23)) * _f32_from_bits(np.int32((n2 + 127) << 23))


@njit(cache=True, fastmath=False, error_model="numpy")
def _sigmoid(x):
    """The reference's stable logistic: never exponentiates a positive number."""
    e = exp_nonpos(-abs(x))
    one = np.float32(1.0)
    return one / (one + e) if x >= 0 else e / (one + e)


@njit(cache=True, fastmath=False, error_model="numpy")
def _row_sumsq(r):
    """sum(r * r) in float64 over 8 lanes."""
    n = r.shape[0]
    n8 = n - n % 8
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    for j in range(0, n8, 8):
        v0 = np.float64(r[j]); v1 = np.float64(r[j + 1]); v2 = np.float64(r[j + 2]); v3 = np.float64(r[j + 3])
        v4 = np.float64(r[j + 4]); v5 = np.float64(r[j + 5]); v6 = np.float64(r[j + 6]); v7 = np.float64(r[j + 7])
        a0 += v0 * v0; a1 += v1 * v1; a2 += v2 * v2; a3 += v3 * v3
        a4 += v4 * v4; a5 += v5 * v5; a6 += v6 * v6; a7 += v7 * v7
    for j in range(n8, n):
        v = np.float64(r[j])
        a0 += v * v
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(cache=True, fastmath=False, error_model="numpy")
def _row_dot(a, b):
    """sum(a * b) in float64 over 8 lanes."""
    n = a.shape[0]
    n8 = n - n % 8
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    for j in range(0, n8, 8):
        a0 += np.float64(a[j]) * b[j]; a1 += np.float64(a[j + 1]) * b[j + 1]
        a2 += np.float64(a[j + 2]) * b[j + 2]; a3 += np.float64(a[j + 3]) * b[j + 3]
        a4 += np.float64(a[j + 4]) * b[j + 4]; a5 += np.float64(a[j + 5]) * b[j + 5]
        a6 += np.float64(a[j + 6]) * b[j + 6]; a7 += np.float64(a[j + 7]) * b[j + 7]
    for j in range(n8, n):
        a0 += np.float64(a[j]) * b[j]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(cache=True, fastmath=False, error_model="numpy")
def _row_sum(r):
    """sum(r) in float64 over 8 lanes."""
    n = r.shape[0]
    n8 = n - n % 8
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    for j in range(0, n8, 8):
        a0 += r[j]; a1 += r[j + 1]; a2 += r[j + 2]; a3 += r[j + 3]
        a4 += r[j + 4]; a5 += r[j + 5]; a6 += r[j + 6]; a7 += r[j + 7]
    for j in range(n8, n):
        a0 += r[j]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(cache=True, fastmath=False, error_model="numpy")
def _row_max(r):
    """max(r) over 8 lanes (r non-empty). A NaN may be skipped here; callers exponentiate
    ``r - max`` afterwards, which carries any NaN of the row into their result, as in numpy."""
    n = r.shape[0]
    n8 = n - n % 8
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = r[0]
    for j in range(0, n8, 8):
        m0 = r[j] if r[j] > m0 else m0
        m1 = r[j + 1] if r[j + 1] > m1 else m1
        m2 = r[j + 2] if r[j + 2] > m2 else m2
        m3 = r[j + 3] if r[j + 3] > m3 else m3
        m4 = r[j + 4] if r[j + 4] > m4 else m4
        m5 = r[j + 5] if r[j + 5] > m5 else m5
        m6 = r[j + 6] if r[j + 6] > m6 else m6
        m7 = r[j + 7] if r[j + 7] > m7 else m7
    for j in range(n8, n):
        m0 = r[j] if r[j] > m0 else m0
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


def _is_f32(*arrays):
    """True when every float argument (array or Tensor) is float32: the kernels' dtype."""
    for a in arrays:
        d = a.data if isinstance(a, Tensor) else a
        if getattr(d, "dtype", _F32) != _F32:
            return False
    return True


# --- RMSNorm -------------------------------------------------------------------------------


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _rmsnorm_forward(x, w, eps, y, rstd):
    n, d = x.shape
    for i in prange(n):
        r = np.float32(1.0) / np.float32(math.sqrt(_row_sumsq(x[i]) / d + eps))
        rstd[i] = r
        for j in range(d):
            y[i, j] = (x[i, j] * r) * w[j]


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _rmsnorm_backward(x, w, rstd, gy, gx, gw_parts, chunks, want_gx, want_gw):
    """gx = rstd (g_hat - x_hat mean(g_hat x_hat)), g_hat = gy w; gw partial sums per chunk."""
    n, d = x.shape
    for c in prange(chunks):
        lo = c * n // chunks
        hi = (c + 1) * n // chunks
        xh = np.empty(d, np.float32)
        gh = np.empty(d, np.float32)
        for i in range(lo, hi):
            r = rstd[i]
            for j in range(d):
                xh[j] = x[i, j] * r
            if want_gw:
                for j in range(d):
                    gw_parts[c, j] += np.float64(gy[i, j]) * xh[j]
            if want_gx:
                for j in range(d):
                    gh[j] = gy[i, j] * w[j]
                dot = _row_dot(gh, xh)
                mean = np.float32(dot / d)
                for j in range(d):
                    gx[i, j] = r * (gh[j] - xh[j] * mean)


def _chunks(n_rows):
    """Row chunks for a parallel column reduction: enough to balance 2-8 threads, each with
    a private float64 partial sum."""
    return max(1, min(n_rows, 16))


def _rmsnorm_rows(x, w, eps):
    """Checked float32 RMSNorm of ``x``'s rows: (x2 [N, D], w, y [N, D], rstd [N])."""
    ref_nn.check_rmsnorm_args(x, w)
    d = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(math.prod(x.shape[:-1]), d)
    w = np.ascontiguousarray(w)
    y = np.empty_like(x2)
    rstd = np.empty(x2.shape[0], np.float32)
    _rmsnorm_forward(x2, w, np.float64(eps), y, rstd)
    return x2, w, y, rstd


class RMSNorm(Function):
    """``reference.nn.RMSNorm`` in one pass each way (float32)."""

    @staticmethod
    def forward(ctx, x, w, eps=1e-6):
        x2, w, y, rstd = _rmsnorm_rows(x, w, eps)
        ctx.save(x2, w, rstd, x.shape)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, gy):
        x2, w, rstd, shape = ctx.saved
        want_gx, want_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gy2 = np.ascontiguousarray(gy, dtype=np.float32).reshape(x2.shape)
        gx = np.empty_like(x2) if want_gx else np.empty((0, 0), np.float32)
        chunks = _chunks(x2.shape[0])
        parts = np.zeros((chunks, x2.shape[1] if want_gw else 0), np.float64)
        if x2.shape[0]:
            _rmsnorm_backward(x2, w, rstd, gy2, gx, parts, chunks, want_gx, want_gw)
        return (gx.reshape(shape) if want_gx else None,
                parts.sum(axis=0).astype(np.float32) if want_gw else None)


def rmsnorm(x, w, eps=1e-6):
    """RMSNorm over the last axis (SPEC 5): x [..., D], w [D] -> [..., D]; same as the reference."""
    if type(x) is np.ndarray and type(w) is np.ndarray and x.dtype == w.dtype == np.float32 and x.ndim >= 1 \
            and x.shape[-1]:
        # Plain arrays (the engine; nothing to differentiate): the forward without the autograd
        # node, a few microseconds less on each of ~50 calls a decode step.
        return Tensor(_rmsnorm_rows(x, w, eps)[2].reshape(x.shape))
    if not _is_f32(x, w) or _arr(x).ndim < 1 or _arr(x).shape[-1] == 0:
        return ref_nn.rmsnorm(x, w, eps=eps)
    return RMSNorm.apply(x, w, eps=eps)


# --- gated FFN units -----------------------------------------------------------------------


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _swiglu_forward(gate, up, y):
    n = gate.shape[0]
    for i in prange(n):
        g = gate[i]
        y[i] = (g * _sigmoid(g)) * up[i]


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _swiglu_backward(gate, up, gy, g_gate, g_up, want_gate, want_up):
    n = gate.shape[0]
    one = np.float32(1.0)
    for i in prange(n):
        g = gate[i]
        s = _sigmoid(g)
        if want_gate:
            g_gate[i] = (gy[i] * up[i]) * (s * (one + g * (one - s)))
        if want_up:
            g_up[i] = gy[i] * (g * s)


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _relu2_glu_forward(gate, up, y):
    n = gate.shape[0]
    for i in prange(n):
        g = gate[i]
        r = np.float32(0.0) if g < 0 else g  # NaN stays NaN, as with numpy's maximum
        y[i] = r * r * up[i]


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _relu2_glu_backward(gate, up, gy, g_gate, g_up, want_gate, want_up):
    n = gate.shape[0]
    for i in prange(n):
        g = gate[i]
        r = np.float32(0.0) if g < 0 else g
        if want_gate:
            g_gate[i] = np.float32(2.0) * r * up[i] * gy[i]
        if want_up:
            g_up[i] = r * r * gy[i]


def _flat(a):
    return np.ascontiguousarray(a, dtype=np.float32).reshape(-1)


class _GLU(Function):
    """A gated unit ``act(gate) * up`` with both gradients from one fused pass."""

    name = ""
    forward_kernel = None
    backward_kernel = None

    @classmethod
    def forward(cls, ctx, gate, up):
        ref_nn.check_gate_up(cls.name, gate, up)
        g, u = _flat(gate), _flat(up)
        y = np.empty_like(g)
        cls.forward_kernel(g, u, y)
        ctx.save(g, u, gate.shape)
        return y.reshape(gate.shape)

    @classmethod
    def backward(cls, ctx, gy):
        g, u, shape = ctx.saved
        want_gate, want_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_gate = np.empty_like(g) if want_gate else np.empty(0, np.float32)
        g_up = np.empty_like(u) if want_up else np.empty(0, np.float32)
        cls.backward_kernel(g, u, _flat(gy), g_gate, g_up, want_gate, want_up)
        return (g_gate.reshape(shape) if want_gate else None,
                g_up.reshape(shape) if want_up else None)


class SwiGLU(_GLU):
    """``reference.nn.SwiGLU``: silu(gate) * up, fused (float32)."""

    name = "swiglu"
    forward_kernel = _swiglu_forward
    backward_kernel = _swiglu_backward


class ReLU2GLU(_GLU):
    """``reference.nn.ReLU2GLU``: relu(gate)^2 * up, fused (float32)."""

    name = "relu2_glu"
    forward_kernel = _relu2_glu_forward
    backward_kernel = _relu2_glu_backward


def swiglu(gate, up):
    """swiglu(gate, up) = silu(gate) * up; gate, up [..., F] of equal shape -> [..., F]."""
    if not _is_f32(gate, up):
        return ref_nn.swiglu(gate, up)
    return SwiGLU.apply(gate, up)


def relu2_glu(gate, up):
    """relu2_glu(gate, up) = relu(gate)^2 * up; gate, up [..., F] of equal shape -> [..., F]."""
    if not _is_f32(gate, up):
        return ref_nn.relu2_glu(gate, up)
    return ReLU2GLU.apply(gate, up)


# --- RoPE ----------------------------------------------------------------------------------


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _rope_rotate(x, cos, sin, sign, y):
    """y[r, h] = rotate(x[r, h]) by row r's angles; ``sign = -1`` rotates backwards."""
    rows, heads, hd = x.shape
    half = hd // 2
    for r in prange(rows):
        for h in range(heads):
            for i in range(half):
                c = cos[r, i]
                s = sign * sin[r, i]
                x1 = x[r, h, i]
                x2 = x[r, h, half + i]
                y[r, h, i] = x1 * c - x2 * s
                y[r, h, half + i] = x2 * c + x1 * s


class RoPE(Function):
    """``reference.nn.RoPE``: NeoX half-split rotation, tables from ``rope_tables`` (float32)."""

    @staticmethod
    def forward(ctx, x, positions, theta=10000.0):
        positions = np.asarray(positions)
        if x.ndim < 3:
            raise ValueError(f"rope: x shape {x.shape} must be [..., T, n_heads, head_dim]")
        if positions.ndim < 1 or positions.shape[-1] != x.shape[-3]:
            raise ValueError(f"rope: positions shape {positions.shape} must end in T={x.shape[-3]} "
                             f"to match x shape {x.shape} ([..., T, n_heads, head_dim])")
        cos, sin = ref_nn.rope_tables(positions, x.shape[-1], theta, x.dtype)
        half = x.shape[-1] // 2
        try:
            rows_shape = np.broadcast_shapes(cos.shape[:-1], x.shape[:-2])
        except ValueError:
            rows_shape = None
        if rows_shape != x.shape[:-2]:
            raise ValueError(f"rope: positions shape {positions.shape} does not broadcast to x.shape[:-2] = "
                             f"{x.shape[:-2]} for x shape {x.shape}")
        cos = np.ascontiguousarray(np.broadcast_to(cos, rows_shape + (half,))).reshape(-1, half)
        sin = np.ascontiguousarray(np.broadcast_to(sin, rows_shape + (half,))).reshape(-1, half)
        ctx.save(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, gy):
        cos, sin = ctx.saved
        return _rotate(gy, cos, sin, -1.0), None  # a rotation's transpose is its inverse


def _rotate(x, cos, sin, sign):
    x3 = np.ascontiguousarray(x, dtype=np.float32).reshape(cos.shape[0], x.shape[-2], x.shape[-1])
    y = np.empty_like(x3)
    if x3.size:
        _rope_rotate(x3, cos, sin, np.float32(sign), y)
    return y.reshape(x.shape)


def rope(x, positions, theta=10000.0):
    """Rotary embedding, NeoX half-split (SPEC 5): x [..., T, H, hd], positions int [T] -> same shape."""
    if not _is_f32(x):
        return ref_nn.rope(x, positions, theta=theta)
    return RoPE.apply(x, positions, theta=theta)


def rope_rotate(x, cos, sin, inverse=False):
    """``reference.nn.rope_rotate`` (plain arrays; the engine's cached tables) with the same
    kernel as ``rope``."""
    x, cos, sin = _arr(x), _arr(cos), _arr(sin)
    if not (_is_f32(x, cos, sin) and x.ndim >= 3 and cos.shape == sin.shape and cos.shape[-1:] == (x.shape[-1] // 2,)
            and x.shape[-1] % 2 == 0 and cos.shape[:-1] == x.shape[-len(cos.shape) - 1:-2]):
        return ref_nn.rope_rotate(x, cos, sin, inverse=inverse)
    half = x.shape[-1] // 2
    rows = x.shape[:-2]
    cos = np.ascontiguousarray(np.broadcast_to(cos, rows + (half,))).reshape(-1, half)
    sin = np.ascontiguousarray(np.broadcast_to(sin, rows + (half,))).reshape(-1, half)
    return _rotate(x, cos, sin, -1.0 if inverse else 1.0)


# --- softmax -------------------------------------------------------------------------------


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _softmax_rows(x, y):
    n, v = x.shape
    for i in prange(n):
        m = _row_max(x[i])
        for j in range(v):
            y[i, j] = exp_nonpos(x[i, j] - m)
        inv = np.float32(1.0 / _row_sum(y[i]))
        for j in range(v):
            y[i, j] = y[i, j] * inv


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _softmax_backward_rows(y, gy, gx):
    n, v = y.shape
    for i in prange(n):
        row = gx[i]
        for j in range(v):
            row[j] = gy[i, j] * y[i, j]
        dot = np.float32(_row_sum(row))
        for j in range(v):
            row[j] = y[i, j] * (gy[i, j] - dot)


class Softmax(Function):
    """``reference.nn.Softmax`` along the last axis in one pass each way (float32)."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
        y = np.empty_like(x2)
        if x2.size:
            _softmax_rows(x2, y)
        ctx.save(y, x.shape)
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, gy):
        y, shape = ctx.saved
        gx = np.empty_like(y)
        if y.size:
            _softmax_backward_rows(y, np.ascontiguousarray(gy, dtype=np.float32).reshape(y.shape), gx)
        return (gx.reshape(shape),)


def softmax(x, axis=-1):
    """Softmax along ``axis``: x [...] -> same shape, entries in [0, 1] summing to 1 along ``axis``."""
    d = _arr(x)
    last = axis in (-1, getattr(d, "ndim", 0) - 1)
    if not _is_f32(x) or getattr(d, "ndim", 0) < 1 or not last or d.shape[-1] == 0:
        return ref_nn.softmax(x, axis=axis)
    return Softmax.apply(x)


# --- attention -----------------------------------------------------------------------------


@njit(cache=True, fastmath=False, error_model="numpy", inline="always")
def _softmax_row(row, visible, scale):
    """In place: row[:visible] -> softmax(scale * row[:visible]), the rest of the row -> 0;
    returns the row's max (of the scaled scores) and float32 1/sum, what recomputes it."""
    for j in range(visible):
        row[j] = row[j] * scale
    m = _row_max(row[:visible])
    for j in range(visible):
        row[j] = exp_nonpos(row[j] - m)
    inv = np.float32(1.0 / _row_sum(row[:visible]))
    for j in range(visible):
        row[j] = row[j] * inv
    for j in range(visible, row.shape[0]):
        row[j] = 0
    return m, inv


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _attention_probs(scores, t_len, s_len, scale, causal):
    """In place: scores [P, R, S] -> softmax(scale * scores) per row, causal rows masked.

    Row r of a plane is query r % T (the G query heads of a kv head are stacked), which sits
    at absolute position S - T + r % T and sees keys 0 .. S - T + r % T.
    """
    planes, rows, keys = scores.shape
    for pr in prange(planes * rows):
        p = pr // rows
        r = pr % rows
        _softmax_row(scores[p, r], min(keys, s_len - t_len + r % t_len + 1) if causal else keys, scale)


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _attention_score_grad(probs, gp, scale):
    """In place: gp -> probs * (gp - rowsum(gp * probs)) * scale (the softmax backward)."""
    planes, rows, keys = probs.shape
    for pr in prange(planes * rows):
        p = pr // rows
        r = pr % rows
        dot = np.float32(_row_dot(gp[p, r], probs[p, r]))
        for j in range(keys):
            gp[p, r, j] = probs[p, r, j] * (gp[p, r, j] - dot) * scale


# Query blocks of this many rows (of one head's T) in the blocked attention below: 48-64 ran
# fastest at both training shapes (measured: benchmarks/attention_block.py, docs/backends.md).
ATTENTION_BLOCK_ROWS = 64
# Blocked attention (when gemm can call BLAS from numba); False keeps the whole-plane path.
ATTENTION_BLOCKED = True

_NT, _TR = 111, 112  # CBLAS no-transpose / transpose


@njit(cache=True, fastmath=False, error_model="numpy")
def _ptr(a, offset):
    """Byte address of element ``offset`` of a C-contiguous float32 array."""
    return np.uint64(a.ctypes.data + 4 * offset)


@njit(cache=True, fastmath=False, error_model="numpy")
def _block_span(t_len, s_len, r1, causal):
    """Columns of a query block ending at row r1 (of T): its last row's visible keys, rounded
    up to a multiple of 8 (or S), so ``_row_dot`` over the block's row puts every key in the
    same float64 lane as over the full row of the whole-plane path: identical row dots."""
    vis = min(s_len, s_len - t_len + r1) if causal else s_len
    return min(s_len, (vis + 7) // 8 * 8)


@njit(cache=True, inline="always")
def _block_geometry(it, per_head, block, t_len, s_len, causal):
    """Query block ``it`` of a plane (head ``it // per_head`` of the group): its rows, first
    stacked row, first row within the head, and the keys its products span."""
    r0 = it % per_head * block
    rows = min(block, t_len - r0)
    return rows, it // per_head * t_len + r0, r0, _block_span(t_len, s_len, r0 + rows, causal)


@njit(cache=True, fastmath=False, error_model="numpy")
def _block_scores(fn, qs, ks, p, q0, rows, w, buf):
    """buf[:rows, :w] = Q[p, q0:q0+rows] K[p, :w]^T (one single-thread sgemm)."""
    hd = qs.shape[2]
    sgemm(fn, _NT, _TR, rows, w, hd, np.float32(1.0), _ptr(qs, (p * qs.shape[1] + q0) * hd), hd,
          _ptr(ks, p * ks.shape[1] * hd), hd, np.float32(0.0), _ptr(buf, 0), w)


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _attention_blocks_forward(qs, ks, vs, out, row_max, row_inv, fn, t_len, scale, causal, block, chunks):
    """out = softmax(scale Q K^T) V per query block, as ``_attention_probs`` + two sgemms do
    over the whole [G*T, S] plane, keeping only each row's max and float32 1/sum.

    Work items are (plane, head of the group, query block), split into ``chunks`` contiguous
    runs, one per thread, each with one [block, S] scratch. A causal block's products stop at
    its last row's visible keys."""
    planes, gt, hd = qs.shape
    s_len, dv = ks.shape[1], vs.shape[2]
    per_head = (t_len + block - 1) // block
    items = planes * (gt // t_len) * per_head
    for c in prange(chunks):
        buf = np.empty(block * s_len, np.float32)
        for it in range(items * c // chunks, items * (c + 1) // chunks):
            p = it // (items // planes)
            rows, q0, r0, w = _block_geometry(it % (items // planes), per_head, block, t_len, s_len, causal)
            _block_scores(fn, qs, ks, p, q0, rows, w, buf)
            for i in range(rows):
                vis = min(s_len, s_len - t_len + r0 + i + 1) if causal else s_len
                row_max[p, q0 + i], row_inv[p, q0 + i] = _softmax_row(buf[i * w:(i + 1) * w], vis, scale)
            sgemm(fn, _NT, _NT, rows, dv, w, np.float32(1.0), _ptr(buf, 0), w, _ptr(vs, p * s_len * dv), dv,
                  np.float32(0.0), _ptr(out, (p * gt + q0) * dv), dv)


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _attention_blocks_backward(qs, ks, vs, gys, row_max, row_inv, gq, gk, gv, fn, t_len, scale, causal, block,
                               chunks, need_q, need_k, need_v):
    """The backward of ``_attention_blocks_forward``, one plane (batch, kv head) per task so
    that dK and dV (zeroed by the caller) accumulate without races: per query block, P is
    recomputed bit for bit from the saved row max and 1/sum, then dV += P^T dO,
    dS = P (dO V^T - rowsum(P dO V^T)) scale (``_attention_score_grad``), dQ = dS K and
    dK += dS^T Q."""
    planes, gt, hd = qs.shape
    s_len, dv = ks.shape[1], vs.shape[2]
    per_head = (t_len + block - 1) // block
    one, zero = np.float32(1.0), np.float32(0.0)
    for c in prange(chunks):
        probs = np.empty(block * s_len, np.float32)
        grads = np.empty(block * s_len, np.float32)
        for p in range(planes * c // chunks, planes * (c + 1) // chunks):
            for it in range(gt // t_len * per_head):
                rows, q0, r0, w = _block_geometry(it, per_head, block, t_len, s_len, causal)
                _block_scores(fn, qs, ks, p, q0, rows, w, probs)
                for i in range(rows):
                    row = probs[i * w:(i + 1) * w]
                    vis = min(s_len, s_len - t_len + r0 + i + 1) if causal else s_len
                    m, inv = row_max[p, q0 + i], row_inv[p, q0 + i]
                    for j in range(vis):
                        row[j] = exp_nonpos(row[j] * scale - m) * inv
                    for j in range(vis, w):
                        row[j] = 0
                if need_v:
                    sgemm(fn, _TR, _NT, w, dv, rows, one, _ptr(probs, 0), w, _ptr(gys, (p * gt + q0) * dv), dv,
                          one, _ptr(gv, p * s_len * dv), dv)
                if need_q or need_k:
                    sgemm(fn, _NT, _TR, rows, w, dv, one, _ptr(gys, (p * gt + q0) * dv), dv, _ptr(vs, p * s_len * dv),
                          dv, zero, _ptr(grads, 0), w)
                    for i in range(rows):
                        pr = probs[i * w:(i + 1) * w]
                        gr = grads[i * w:(i + 1) * w]
                        dot = np.float32(_row_dot(gr, pr))
                        for j in range(w):
                            gr[j] = pr[j] * (gr[j] - dot) * scale
                    if need_q:
                        sgemm(fn, _NT, _NT, rows, hd, w, one, _ptr(grads, 0), w, _ptr(ks, p * s_len * hd), hd,
                              zero, _ptr(gq, (p * gt + q0) * hd), hd)
                    if need_k:
                        sgemm(fn, _TR, _NT, w, hd, rows, one, _ptr(grads, 0), w, _ptr(qs, (p * gt + q0) * hd), hd,
                              one, _ptr(gk, p * s_len * hd), hd)


class Attention(Function):
    """``reference.nn.Attention`` (GQA, causal offset S - T) with contiguous per-head BLAS
    products and fused numba softmax kernels (float32).

    The G query heads that read one kv head are stacked into one [G*T, hd] matrix. Two ways:

    - blocked (``ATTENTION_BLOCKED`` and ``gemm.AVAILABLE``): query blocks of
      ``ATTENTION_BLOCK_ROWS`` rows, each Q K^T, softmax and P V in a per-thread [block, S]
      scratch, with single-thread sgemms called from the numba kernel; only the rows' max and
      1/sum are kept, and the backward recomputes P. The [G*T, S] probabilities (96 MiB per
      layer at the nano_125m shape, batch 2) are never stored, and causal blocks skip the keys
      none of their rows sees;
    - whole planes: P [B*Hkv, G*T, S] from one sgemm per plane, kept for the backward, where
      dK and dV sum over the group inside the sgemm.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal=True, scale=None):
        ref_nn.check_attention_shapes(q, k, v, causal)
        b, t, n_q, hd = q.shape
        s_len, n_kv, dv = k.shape[1], k.shape[2], v.shape[3]
        group = n_q // n_kv
        scale = float(1.0 / math.sqrt(hd) if scale is None else scale)
        # [B, T, Hkv*G, hd] -> [B, Hkv, G*T, hd]: query head h = kv * G + g.
        qs = np.ascontiguousarray(q.reshape(b, t, n_kv, group, hd).transpose(0, 2, 3, 1, 4)).reshape(b * n_kv, group * t, hd)
        ks = np.ascontiguousarray(k.transpose(0, 2, 1, 3)).reshape(b * n_kv, s_len, hd)
        vs = np.ascontiguousarray(v.transpose(0, 2, 1, 3)).reshape(b * n_kv, s_len, dv)
        blocked = ATTENTION_BLOCKED and gemm.AVAILABLE and min(qs.size, vs.size) > 0
        if blocked:
            block = min(ATTENTION_BLOCK_ROWS, t)
            out = np.empty((b * n_kv, group * t, dv), np.float32)
            stats = np.empty((2, b * n_kv, group * t), np.float32)  # row max, row 1/sum
            items = b * n_kv * group * -(-t // block)
            _attention_blocks_forward(qs, ks, vs, out, stats[0], stats[1], gemm.SGEMM, t, np.float32(scale),
                                      bool(causal), block, n_tasks(items, qs.size, PARALLEL_MIN_ELEMENTS))
            ctx.save(qs, ks, vs, stats, scale, q.shape, v.shape, bool(causal), block)
        else:
            probs = gemm.matmul(qs, ks.transpose(0, 2, 1))  # [B*Hkv, G*T, S]
            if probs.size:
                _attention_probs(probs, t, s_len, np.float32(scale), bool(causal))
            out = gemm.matmul(probs, vs)  # [B*Hkv, G*T, dv]
            ctx.save(qs, ks, vs, probs, scale, q.shape, v.shape, None, None)
        return np.ascontiguousarray(out.reshape(b, n_kv, group, t, dv).transpose(0, 3, 1, 2, 4)).reshape(b, t, n_q, dv)

    @staticmethod
    def backward(ctx, gy):
        qs, ks, vs, saved, scale, q_shape, v_shape, causal, block = ctx.saved
        b, t, n_q, hd = q_shape
        s_len, n_kv, dv = v_shape[1], v_shape[2], v_shape[3]
        group = n_q // n_kv
        gys = np.ascontiguousarray(
            gy.astype(np.float32, copy=False).reshape(b, t, n_kv, group, dv).transpose(0, 2, 3, 1, 4)
        ).reshape(b * n_kv, group * t, dv)
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        if block is not None:
            gq = np.empty(qs.shape, np.float32) if need_q else None
            gk = np.zeros(ks.shape, np.float32) if need_k else None
            gv = np.zeros(vs.shape, np.float32) if need_v else None
            dummy = np.empty((1, 1, 1), np.float32)
            _attention_blocks_backward(qs, ks, vs, gys, saved[0], saved[1], dummy if gq is None else gq,
                                       dummy if gk is None else gk, dummy if gv is None else gv, gemm.SGEMM, t,
                                       np.float32(scale), causal, block,
                                       n_tasks(qs.shape[0], qs.size, PARALLEL_MIN_ELEMENTS), need_q, need_k, need_v)
        else:
            probs = saved
            gq = gk = gv = None
            if need_v:
                gv = gemm.matmul(probs.transpose(0, 2, 1), gys)  # [B*Hkv, S, dv], summed over the group
            if need_q or need_k:
                gs = gemm.matmul(gys, vs.transpose(0, 2, 1))  # [B*Hkv, G*T, S]
                if gs.size:
                    _attention_score_grad(probs, gs, np.float32(scale))
                if need_q:
                    gq = gemm.matmul(gs, ks)
                if need_k:
                    gk = gemm.matmul(gs.transpose(0, 2, 1), qs)
        if gq is not None:
            gq = np.ascontiguousarray(gq.reshape(b, n_kv, group, t, hd).transpose(0, 3, 1, 2, 4)).reshape(b, t, n_q, hd)
        if gk is not None:
            gk = np.ascontiguousarray(gk.reshape(b, n_kv, s_len, hd).transpose(0, 2, 1, 3))
        if gv is not None:
            gv = np.ascontiguousarray(gv.reshape(b, n_kv, s_len, dv).transpose(0, 2, 1, 3))
        return gq, gk, gv


def attention(q, k, v, causal=True, scale=None):
    """GQA attention (SPEC 5): q [B, T, Hq, hd], k [B, S, Hkv, hd], v [B, S, Hkv, dv] -> [B, T, Hq, dv]."""
    if not _is_f32(q, k, v):
        return ref_nn.attention(q, k, v, causal=causal, scale=scale)
    return Attention.apply(q, k, v, causal=causal, scale=scale)


# --- cross-entropy -------------------------------------------------------------------------


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _ce_rows(logits, targets, valid, lse, losses):
    """Per row: lse = max + log(sum exp(x - max)); loss = lse - x[target] (0 where ignored)."""
    n, v = logits.shape
    for i in prange(n):
        row = logits[i]
        m = _row_max(row)
        buf = np.empty(v, np.float32)
        for j in range(v):
            buf[j] = exp_nonpos(row[j] - m)
        l = np.float32(np.float64(m) + math.log(_row_sum(buf)))
        lse[i] = l
        losses[i] = l - row[targets[i]] if valid[i] else np.float32(0.0)


@parallel_when_large(cache=True, fastmath=False, error_model="numpy")
def _ce_backward_rows(logits, targets, lse, coef, g):
    """g = coef_i (softmax(logits_i) - onehot(target_i)), one pass."""
    n, v = logits.shape
    for i in prange(n):
        c = coef[i]
        l = lse[i]
        for j in range(v):
            g[i, j] = exp_nonpos(logits[i, j] - l) * c
        g[i, targets[i]] -= c


def _per_token(logits, targets, ignore_index):
    """Per-token losses [N] (0 on ignored rows), lse [N], the row mask [N] and safe targets."""
    n, vocab = logits.shape
    if vocab == 0 and n:
        raise ValueError(f"cross_entropy: logits shape {logits.shape} has an empty vocabulary axis")
    valid = targets != ignore_index
    safe_targets = np.where(valid, targets, 0).astype(np.int64)
    lse = np.empty(n, np.float32)
    losses = np.empty(n, np.float32)
    if n:
        _ce_rows(np.ascontiguousarray(logits), safe_targets, valid, lse, losses)
    return losses, lse, valid, safe_targets


class CrossEntropy(Function):
    """``reference.nn.CrossEntropy`` (weights, ignore_index, all three reductions) with a
    fused log-sum-exp forward and a one-pass softmax-minus-onehot backward (float32)."""

    @staticmethod
    def forward(ctx, logits, targets, weights=None, ignore_index=-100, reduction="mean"):
        targets = np.asarray(targets)
        ref_nn.check_cross_entropy(logits, targets, weights, ignore_index, reduction)
        if weights is not None:
            _check_same_dtype("cross_entropy", logits, weights)
        logits = np.ascontiguousarray(logits)
        losses, lse, valid, safe_targets = _per_token(logits, targets, ignore_index)
        w, denom, out = ref_nn.reduce_token_losses(losses, valid, weights, reduction, logits.dtype)
        ctx.save(logits, lse, safe_targets, valid, w, losses, denom, out, reduction)
        return np.asarray(out)

    @staticmethod
    def backward(ctx, g):
        logits, lse, safe_targets, valid, w, losses, denom, out, reduction = ctx.saved
        coef, g_w = ref_nn.token_loss_backward(g, valid, w, losses, denom, out, reduction, ctx.needs_input_grad[2])
        g_logits = None
        if ctx.needs_input_grad[0]:
            if coef is None:
                g_logits = np.zeros_like(logits)
            else:
                g_logits = np.empty(logits.shape, np.float32)
                if logits.size:
                    _ce_backward_rows(logits, safe_targets, lse, np.ascontiguousarray(coef, dtype=np.float32), g_logits)
        return g_logits, None, g_w


def cross_entropy(logits, targets, weights=None, ignore_index=-100, reduction="mean"):
    """Cross-entropy: logits [N, V], targets int [N], weights float [N] | None -> scalar, or [N] for "none"."""
    if not _is_f32(logits):
        return ref_nn.cross_entropy(logits, targets, weights, ignore_index=ignore_index, reduction=reduction)
    return CrossEntropy.apply(logits, targets, weights, ignore_index=ignore_index, reduction=reduction)


def cross_entropy_per_token(logits, targets, ignore_index=-100):
    """Per-token losses l_i [N] (0 on ignored rows) as a plain array; not differentiable."""
    logits = _arr(logits)
    if not _is_f32(logits):
        return ref_nn.cross_entropy_per_token(logits, targets, ignore_index=ignore_index)
    targets = np.asarray(_arr(targets))
    ref_nn.check_cross_entropy(logits, targets, None, ignore_index, "none")
    losses, _, _, _ = _per_token(logits, targets, ignore_index)
    return losses


OPS = {
    "rmsnorm": rmsnorm,
    "swiglu": swiglu,
    "relu2_glu": relu2_glu,
    "rope": rope,
    "rope_rotate": rope_rotate,
    "softmax": softmax,
    "attention": attention,
    "cross_entropy": cross_entropy,
    "cross_entropy_per_token": cross_entropy_per_token,
}
