"""The ops the cupy backend overrides, by reference op name.

Kernels live in ``kernels/*.cu`` and are loaded with ``cupy.RawModule`` on first use. Dense
float matmuls go through cuBLAS (``cupy.matmul``). Everything stays on the device: scalars
such as activation scales are passed as device pointers, never copied to the host.
"""
from __future__ import annotations

import functools
import math

import cupy as cp
import numpy as np

from reference import mhc as ref_mhc
from reference import nn as ref_nn
from reference import optim as ref_optim
from reference.autograd import Function, data_of as _data
from reference.ternary import RowSelection, resolve_keep, rows_to_full

from .compile import kernel_source, nvrtc_options

_THREADS = 256


@functools.lru_cache(maxsize=None)
def _module(filename):
    return cp.RawModule(code=kernel_source(filename), options=nvrtc_options(filename))


def _kernel(filename, name):
    return _module(filename).get_function(name)


def _blocks(n, threads=_THREADS):
    return (max(1, (int(n) + threads - 1) // threads),)


def _f32(a):
    return cp.ascontiguousarray(a, dtype=cp.float32)


def device_pointer(a):
    return a.data.ptr


def _aligned(a, dtype, alignment=16):
    """Contiguous copy of ``a`` whose device pointer is ``alignment``-byte aligned."""
    a = cp.ascontiguousarray(a, dtype=dtype)
    return a if device_pointer(a) % alignment == 0 else a.copy()


# ----------------------------------------------------------------------------- quantizers
def quantize_acts(x):
    """Per-token absmax int8 quantization (SPEC 2); returns (q int8 [..., K], s [...])."""
    shape = x.shape
    x2 = _f32(x).reshape(-1, shape[-1])
    n, k = x2.shape
    q = cp.empty((n, k), dtype=cp.int8)
    s = cp.empty((n,), dtype=cp.float32)
    if n:
        _kernel("ternary.cu", "quantize_acts_rows")((n,), (_THREADS,), (x2, q, s, cp.int32(k)))
    return q.reshape(shape), s.reshape(shape[:-1]).astype(x.dtype, copy=False)


def _weight_scales(w32, group_size):
    m, k = w32.shape
    groups = k // group_size
    mean = cp.empty((m, groups), dtype=cp.float64)
    warps_per_block = _THREADS // 32
    _kernel("ternary.cu", "group_abs_mean")(
        _blocks(m * groups, warps_per_block), (_THREADS,),
        (w32, mean, cp.int32(m), cp.int32(k), cp.int32(group_size)),
    )
    s = mean.astype(cp.float16).astype(cp.float32)
    s[mean < 1e-8] = 0
    s[~cp.isfinite(s)] = cp.nan  # NaN/Inf groups, and means fp16 cannot hold, as in the reference
    return s


def quantize_weights(w, group_size):
    """Group-wise absmean ternary quantization (SPEC 2); returns (q int8 [M, K], s [M, K/G])."""
    if w.ndim != 2 or w.shape[1] % group_size:
        raise ValueError(f"quantize_weights: expected [M, K] with K divisible by group_size {group_size}, got shape {w.shape}")
    w32 = _f32(w)
    m, k = w32.shape
    s = _weight_scales(w32, group_size)
    q = cp.empty((m, k), dtype=cp.int8)
    if m * k:
        _kernel("ternary.cu", "quantize_weights_apply")(
            _blocks(m * k), (_THREADS,), (w32, s, q, cp.int32(m), cp.int32(k), cp.int32(group_size))
        )
    return q, s.astype(w.dtype, copy=False)


def pack_ternary(q):
    q = cp.ascontiguousarray(q, dtype=cp.int8)
    if q.ndim != 2 or q.shape[1] % 4:
        raise ValueError(f"pack_ternary: expected int8 [M, K] with K divisible by 4, got shape {q.shape}")
    out = cp.empty((q.shape[0], q.shape[1] // 4), dtype=cp.uint8)
    if out.size:
        _kernel("ternary.cu", "pack_ternary")(_blocks(out.size), (_THREADS,), (q, out, cp.uint64(out.size)))
    return out


def unpack_ternary(packed):
    packed = cp.ascontiguousarray(packed, dtype=cp.uint8)
    if packed.ndim != 2:
        raise ValueError(f"unpack_ternary: expected uint8 [M, K/4], got shape {packed.shape}")
    q = cp.empty((packed.shape[0], packed.shape[1] * 4), dtype=cp.int8)
    if packed.size:
        _kernel("ternary.cu", "unpack_ternary")(_blocks(packed.size), (_THREADS,), (packed, q, cp.uint64(packed.size)))
    return q


# ------------------------------------------------------------------------- int8 GEMM/GEMV
def _grouped_gemm_fallback(xq, xs, wq, ws, group_size):
    """The same product with cuBLAS, one float64 GEMM per group (exact integer sums), for
    group sizes the dp4a kernel's 32-column tiles cannot follow."""
    acc = cp.zeros((xq.shape[0], wq.shape[0]), dtype=cp.float64)
    for g in range(wq.shape[1] // group_size):
        cols = slice(g * group_size, (g + 1) * group_size)
        acc += ws[:, g].astype(cp.float64) * (xq[:, cols].astype(cp.float64) @ wq[:, cols].astype(cp.float64).T)
    return (cp.asarray(xs, dtype=cp.float64)[:, None] * acc).astype(cp.float32)


# Fewer tokens than this leave most of a 128-token tensor-core tile idle: use dp4a instead.
MMA_MIN_TOKENS = 17


def gemm_kernel_for(n, group_size):
    """Which int8 GEMM runs for ``n`` tokens: "mma" (tensor cores, G % 64 == 0), "dp4a"
    (G % 32 == 0) or "float64" (cuBLAS, one GEMM per group, any G)."""
    if group_size % 64 == 0 and n >= MMA_MIN_TOKENS:
        return "mma"
    return "dp4a" if group_size % 32 == 0 else "float64"


def _int8_gemm(xq, xs, wq, ws, group_size):
    """y[n, m] = xs[n] * sum_g ws[m, g] * intsum over group g (exact integer sums)."""
    n, k = xq.shape
    m = wq.shape[0]
    kernel = gemm_kernel_for(n, group_size)
    if kernel == "float64":
        return _grouped_gemm_fallback(xq, xs, wq, ws, group_size)
    y = cp.empty((n, m), dtype=cp.float32)
    if n == 0 or m == 0:
        return y
    tile = 128 if kernel == "mma" else 64
    _kernel("ternary.cu", f"ternary_gemm_{kernel}")(
        ((m + tile - 1) // tile, (n + tile - 1) // tile), (256,),
        (_aligned(xq, cp.int8), _f32(xs), _aligned(wq, cp.int8), _f32(ws), y,
         cp.int32(n), cp.int32(m), cp.int32(k), cp.int32(group_size)),
    )
    return y


class TernaryLinear(Function):
    """Same contract as ``reference.ternary.ternary_linear``: int8 x ternary forward on the
    GPU, straight-through backward with cuBLAS."""

    @staticmethod
    def forward(ctx, x, w, group_size, keep=None):
        k = w.shape[1]
        if x.shape[-1] != k:
            raise ValueError(f"ternary_linear: x has shape {x.shape} but w has shape {w.shape}")
        if w.shape[1] % group_size:
            raise ValueError(f"ternary_linear: K = {w.shape[1]} is not divisible by group_size {group_size}")
        x2 = x.reshape(-1, k)
        if keep is not None and not isinstance(keep, RowSelection):
            keep = resolve_keep(keep, x2.shape[0])
        xq, xs = quantize_acts(x2)
        wq, ws = quantize_weights(w, group_size)
        y = _int8_gemm(xq, xs, wq, ws, group_size).astype(x.dtype, copy=False)
        ctx.save(xq, xs, wq, ws, x.shape, group_size, keep)
        return y.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        xq, xs, wq, ws, x_shape, group_size, keep = ctx.saved
        m, k = wq.shape
        gy2 = gy.reshape(-1, m)
        dtype = gy.dtype
        gx = gw = None
        keep = resolve_keep(keep, gy2.shape[0])
        rows = slice(None) if keep is None else cp.asarray(keep)
        gk = gy2[rows]
        if ctx.needs_input_grad[0]:
            w_deq = (wq.astype(dtype).reshape(m, -1, group_size) * ws.astype(dtype)[:, :, None]).reshape(m, k)
            gx = rows_to_full(gk @ w_deq, None if keep is None else rows, gy2.shape[0]).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            x_deq = xq[rows].astype(dtype) * xs[rows].astype(dtype)[:, None]
            gw = gk.T @ x_deq
        return gx, gw, None, None


def ternary_linear(x, w, group_size, keep=None):
    return TernaryLinear.apply(x, w, group_size, keep)


class PackedTernaryGPU:
    """Device-side packed weights: canonical packing (for GEMV) plus an int8 copy (for GEMM)."""

    def __init__(self, packed, scales, group_size):
        self.packed = _aligned(packed, cp.uint8)
        self.scales = _f32(scales)
        self.group_size = int(group_size)
        self.shape = (self.packed.shape[0], self.packed.shape[1] * 4)
        self._int8 = None

    @property
    def int8(self):
        if self._int8 is None:
            self._int8 = unpack_ternary(self.packed)
        return self._int8


def prepare_packed(packed, scales, group_size):
    m, k4 = packed.shape
    if (4 * k4) % group_size or scales.shape != (m, 4 * k4 // group_size):
        raise ValueError(
            f"prepare_packed: packed shape {packed.shape} and scales shape {scales.shape} "
            f"do not fit group_size {group_size}"
        )
    return PackedTernaryGPU(cp.asarray(packed), cp.asarray(scales), group_size)


@functools.lru_cache(maxsize=None)
def _sm_count():
    return int(cp.cuda.Device().attributes["MultiProcessorCount"])


def gemv_lanes_per_row(k):
    """Lanes that share one row in the GEMV: a power of two, one 64-trit chunk each, <= 32."""
    lanes = 1
    while lanes < min(k // 64, 32):
        lanes *= 2
    return lanes


def packed_gemv(handle, xq, xs):
    m, k = handle.shape
    if xq.shape != (k,):
        raise ValueError(f"packed_gemv: activations have shape {xq.shape}, expected ({k},)")
    if handle.group_size % 64 or m == 0 or k > 48 * 1024:
        # The kernel reads 64 trits per 16-byte load and scales each load by one group, and
        # keeps the activations in (at most 48 KB of) shared memory.
        return packed_gemm(handle, xq.reshape(1, k), cp.asarray(xs, dtype=cp.float32).reshape(1))[0]
    xs_dev = cp.asarray(xs, dtype=cp.float32).reshape(1)
    y = cp.empty((m,), dtype=cp.float32)
    lanes = gemv_lanes_per_row(k)
    warps = 8
    rows_per_block = warps * (32 // lanes)
    # A few blocks per SM, each looping over many rows, so the activations are staged in
    # shared memory a few hundred times rather than once per 8 rows.
    blocks = min(max(1, (m + rows_per_block - 1) // rows_per_block), 4 * _sm_count())
    _kernel("ternary.cu", "ternary_gemv_packed")(
        (blocks,), (32 * warps,),
        (handle.packed, handle.scales, _aligned(xq, cp.int8), xs_dev, y,
         cp.int32(m), cp.int32(k), cp.int32(handle.group_size), cp.int32(lanes)),
        shared_mem=k,  # the activations, regrouped by bit plane
    )
    return y


def packed_gemm(handle, xq, xs):
    m, k = handle.shape
    if xq.ndim != 2 or xq.shape[1] != k:
        raise ValueError(f"packed_gemm: activations have shape {xq.shape}, expected [N, {k}]")
    return _int8_gemm(xq, cp.asarray(xs, dtype=cp.float32), handle.int8, handle.scales, handle.group_size)


def packed_linear(handle, x):
    """``reference.ternary.packed_linear``: int8 activations per row, then the GEMV (one row)
    or the GEMM."""
    from reference.ternary import check_linear_acts

    x = _data(x)
    check_linear_acts(handle.shape, x)
    xq, xs = quantize_acts(x)
    if xq.shape[0] == 1:
        return packed_gemv(handle, xq[0], xs[0])[None, :]
    return packed_gemm(handle, xq, xs)


# ------------------------------------------------------------------------------ nn ops
class RMSNorm(Function):
    @staticmethod
    def forward(ctx, x, w, eps=1e-6):
        ref_nn.check_rmsnorm_args(x, w)
        c = x.shape[-1]
        x2 = _f32(x).reshape(-1, c)
        y = cp.empty_like(x2)
        rstd = cp.empty((x2.shape[0],), dtype=cp.float32)
        if x2.shape[0]:
            _kernel("nn.cu", "rmsnorm_fwd")((x2.shape[0],), (_THREADS,), (x2, _f32(w), y, rstd, cp.int32(c), cp.float32(eps)))
        ctx.save(x2, _f32(w), rstd, x.shape)
        return y.reshape(x.shape).astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, gy):
        x2, w, rstd, shape = ctx.saved
        c = x2.shape[1]
        gx = cp.empty_like(x2)
        gw_rows = cp.empty_like(x2)
        if x2.shape[0]:
            _kernel("nn.cu", "rmsnorm_bwd")(
                (x2.shape[0],), (_THREADS,), (x2, w, rstd, _f32(gy).reshape(-1, c), gx, gw_rows, cp.int32(c))
            )
        return gx.reshape(shape).astype(gy.dtype, copy=False), gw_rows.sum(axis=0).astype(gy.dtype, copy=False)


def rmsnorm(x, w, eps=1e-6):
    return RMSNorm.apply(x, w, eps=eps)


class _GLU(Function):
    mode = 0

    @classmethod
    def forward(cls, ctx, gate, up):
        if gate.shape != up.shape:
            raise ValueError(f"gated activation: gate shape {gate.shape} differs from up shape {up.shape}")
        g, u = _f32(gate), _f32(up)
        out = cp.empty_like(g)
        if g.size:
            _kernel("nn.cu", "glu_fwd")(_blocks(g.size), (_THREADS,), (g, u, out, cp.uint64(g.size), cp.int32(cls.mode)))
        ctx.save(g, u, cls.mode)
        return out.astype(gate.dtype, copy=False)

    @staticmethod
    def backward(ctx, gout):
        g, u, mode = ctx.saved
        gg, gu = cp.empty_like(g), cp.empty_like(u)
        if g.size:
            _kernel("nn.cu", "glu_bwd")(
                _blocks(g.size), (_THREADS,), (g, u, _f32(gout), gg, gu, cp.uint64(g.size), cp.int32(mode))
            )
        return gg.astype(gout.dtype, copy=False), gu.astype(gout.dtype, copy=False)


class SwiGLU(_GLU):
    mode = 0


class ReLU2GLU(_GLU):
    mode = 1


class CrossEntropy(Function):
    """Same contract as ``reference.nn.cross_entropy`` (weights, ignore_index, reductions)."""

    @staticmethod
    def forward(ctx, logits, targets, weights=None, ignore_index=-100, reduction="mean"):
        n, v = logits.shape
        if targets.shape != (n,):
            raise ValueError(f"cross_entropy: logits {logits.shape} and targets {targets.shape} do not match")
        lg = _f32(logits)
        t = cp.ascontiguousarray(targets, dtype=cp.int64)
        loss = cp.empty((n,), dtype=cp.float32)
        lse = cp.empty((n,), dtype=cp.float32)
        if n:
            _kernel("nn.cu", "cross_entropy_fwd")((n,), (_THREADS,), (lg, t, loss, lse, cp.int32(v), cp.int64(ignore_index)))
        valid = (t != ignore_index).astype(cp.float32)
        w = valid if weights is None else _f32(weights) * valid
        if reduction == "none":
            out, coef_scale = loss * (1.0 if weights is None else _f32(weights)), None
        elif reduction == "sum":
            out, coef_scale = (loss * w).sum(), None
        elif reduction == "mean":
            denom = valid.sum() if weights is None else w.sum()
            safe = cp.where(denom > 0, denom, 1.0)
            out = cp.where(denom > 0, (loss * w).sum() / safe, 0.0)
            coef_scale = safe
        else:
            raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        ctx.save(lg, t, lse, w, coef_scale, reduction, ignore_index, weights is None, loss, valid, out)
        return out.astype(logits.dtype, copy=False)

    @staticmethod
    def backward(ctx, gout):
        lg, t, lse, w, coef_scale, reduction, ignore_index, unweighted, loss, valid, out = ctx.saved
        n, v = lg.shape
        if reduction == "none":
            coef = _f32(gout) * (w if not unweighted else 1.0)
        elif reduction == "sum":
            coef = w * gout.astype(cp.float32)
        else:
            coef = w * (gout.astype(cp.float32) / coef_scale)
        coef = _f32(cp.broadcast_to(coef, (n,)))
        g = cp.empty_like(lg)
        if n:
            _kernel("nn.cu", "cross_entropy_bwd")((n,), (_THREADS,), (lg, t, lse, coef, g, cp.int32(v), cp.int64(ignore_index)))
        gw = None
        if ctx.needs_input_grad[2]:  # d out / d w_i, as the reference gives it
            go = gout.astype(cp.float32)
            if reduction == "mean":
                gw = go * valid * (loss - out.astype(cp.float32)) / coef_scale * (w.sum() > 0)
            else:
                gw = go * valid * loss
            gw = gw.astype(gout.dtype, copy=False)
        return g.astype(gout.dtype, copy=False), None, gw


def cross_entropy(logits, targets, weights=None, ignore_index=-100, reduction="mean"):
    return CrossEntropy.apply(logits, targets, weights, ignore_index=ignore_index, reduction=reduction)


# The ops below take float32 inputs; any other dtype (float64 gradient checks, for instance)
# runs on the reference, which also raises the errors for invalid arguments, so messages read
# the same on every backend.
def _all_f32(*arrays):
    return all(getattr(_data(a), "dtype", None) == cp.float32 for a in arrays)


def _row_threads(width):
    """Threads for a one-block-per-row kernel: enough warps to cover the row, at most 256."""
    return (min(_THREADS, max(32, (int(width) + 31) // 32 * 32)),)


class RoPE(Function):
    """``reference.nn.RoPE`` (NeoX half-split): the angles are formed on the device per row
    (see ``rope_rotate`` in nn.cu), so neither pass stores cos/sin tables."""

    @staticmethod
    def forward(ctx, x, positions, theta=10000.0):
        positions = cp.asarray(positions)
        lead = x.shape[:-2]
        try:
            rows_shape = np.broadcast_shapes(positions.shape, lead)  # shapes only, on the host
        except ValueError:
            rows_shape = None
        if rows_shape != lead:
            raise ValueError(f"rope: positions shape {positions.shape} does not broadcast to x.shape[:-2] = "
                             f"{lead} for x shape {x.shape}")
        pos = cp.ascontiguousarray(cp.broadcast_to(positions, lead), dtype=cp.int64).reshape(-1)
        ctx.save(pos, float(theta))
        return _rope_apply(x, pos, float(theta), 1.0)

    @staticmethod
    def backward(ctx, gy):
        pos, theta = ctx.saved
        return _rope_apply(gy, pos, theta, -1.0), None  # a rotation's transpose is its inverse


def _rope_apply(x, pos, theta, sign):
    heads, hd = x.shape[-2], x.shape[-1]
    x3 = _f32(x).reshape(-1, heads, hd)
    y = cp.empty_like(x3)
    if x3.size:
        _kernel("nn.cu", "rope_rotate")(
            (x3.shape[0],), _row_threads(heads * hd // 2),
            (x3, pos, y, cp.int32(heads), cp.int32(hd), cp.float64(theta), cp.float32(sign)),
            shared_mem=hd * 4,
        )
    return y.reshape(x.shape)


def rope(x, positions, theta=10000.0):
    """Rotary embedding, NeoX half-split (SPEC 5): x [..., T, H, hd], positions int [T] -> same shape."""
    xd, pd = _data(x), cp.asarray(_data(positions))
    valid = (
        _all_f32(xd) and xd.ndim >= 3 and pd.ndim >= 1 and pd.shape[-1] == xd.shape[-3]
        and pd.dtype.kind in "iu" and xd.shape[-1] > 0 and xd.shape[-1] % 2 == 0
    )
    if not valid:
        return ref_nn.rope(x, positions, theta=theta)
    return RoPE.apply(x, pd, theta=theta)


# Attention tiles (kernels/attention.cu): 16 x 16 (query, key) pairs, 128 threads, head
# dimensions up to 128; larger heads run on the reference.
_FA_TILE, _FA_THREADS, _FA_MAX_DIM = 16, 128, 128


class FlashAttention(Function):
    """``reference.nn.Attention`` without the [T, S] probabilities: the forward keeps the
    log-sum-exp per query row, the backward recomputes probabilities tile by tile. Memory is
    O(T) per head instead of O(T * S)."""

    @staticmethod
    def forward(ctx, q, k, v, causal=True, scale=None):
        b, t, hq, hd = q.shape
        s_len, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
        scale = float(1.0 / math.sqrt(hd) if scale is None else scale)
        q, k, v = _f32(q), _f32(k), _f32(v)
        out = cp.empty((b, t, hq, dv), dtype=cp.float32)
        lse = cp.empty((b, hq, t), dtype=cp.float32)
        dims = (cp.int32(t), cp.int32(s_len), cp.int32(hq), cp.int32(hkv), cp.int32(hd), cp.int32(dv),
                cp.float32(scale), cp.int32(bool(causal)))
        _kernel("attention.cu", "attention_fwd")(((t + _FA_TILE - 1) // _FA_TILE, b * hq), (_FA_THREADS,),
                                                 (q, k, v, out, lse, *dims))
        ctx.save(q, k, v, out, lse, dims)
        return out

    @staticmethod
    def backward(ctx, gy):
        q, k, v, out, lse, dims = ctx.saved
        b, t, hq, hd = q.shape
        s_len, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
        gy = _f32(gy)
        row_terms = cp.empty((b, hq, t), dtype=cp.float32)
        rows = b * hq * t
        _kernel("attention.cu", "attention_bwd_rowdot")(_blocks(rows, _THREADS // 32), (_THREADS,),
                                                        (gy, out, row_terms, cp.int32(rows), cp.int32(t), cp.int32(hq), cp.int32(dv)))
        gq = cp.empty_like(q)
        gk, gv = cp.empty_like(k), cp.empty_like(v)
        _kernel("attention.cu", "attention_bwd_dq")(((t + _FA_TILE - 1) // _FA_TILE, b * hq), (_FA_THREADS,),
                                                    (q, k, v, gy, lse, row_terms, gq, *dims))
        _kernel("attention.cu", "attention_bwd_dkdv")(((s_len + _FA_TILE - 1) // _FA_TILE, b * hkv), (_FA_THREADS,),
                                                      (q, k, v, gy, lse, row_terms, gk, gv, *dims))
        return gq, gk, gv


def attention(q, k, v, causal=True, scale=None):
    """GQA attention (SPEC 5): q [B, T, Hq, hd], k [B, S, Hkv, hd], v [B, S, Hkv, dv] -> [B, T, Hq, dv]."""
    qd, kd, vd = _data(q), _data(k), _data(v)
    ref_nn.check_attention_shapes(qd, kd, vd, causal)
    if not _all_f32(qd, kd, vd) or 0 in qd.shape or 0 in kd.shape or max(qd.shape[3], vd.shape[3]) > _FA_MAX_DIM:
        return ref_nn.attention(q, k, v, causal=causal, scale=scale)
    return FlashAttention.apply(q, k, v, causal=causal, scale=scale)


class Softmax(Function):
    """``reference.nn.Softmax``: one block per row over the last axis (another axis is moved
    last and back, on the device)."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        last = cp.moveaxis(x, axis, -1)
        x2 = _f32(last).reshape(-1, last.shape[-1])
        y = cp.empty_like(x2)
        if x2.size:
            _kernel("nn.cu", "softmax_fwd")((x2.shape[0],), _row_threads(x2.shape[1]), (x2, y, cp.int32(x2.shape[1])))
        ctx.save(y, last.shape, axis)
        return cp.ascontiguousarray(cp.moveaxis(y.reshape(last.shape), -1, axis))

    @staticmethod
    def backward(ctx, gy):
        y, last_shape, axis = ctx.saved
        g2 = _f32(cp.moveaxis(gy, axis, -1)).reshape(y.shape)
        gx = cp.empty_like(y)
        if y.size:
            _kernel("nn.cu", "softmax_bwd")((y.shape[0],), _row_threads(y.shape[1]), (y, g2, gx, cp.int32(y.shape[1])))
        return (cp.ascontiguousarray(cp.moveaxis(gx.reshape(last_shape), -1, axis)),)


def softmax(x, axis=-1):
    """Softmax along ``axis``: x [...] -> same shape, entries in [0, 1] summing to 1 along ``axis``."""
    xd = _data(x)
    ndim = getattr(xd, "ndim", 0)
    if not _all_f32(xd) or ndim < 1 or not isinstance(axis, int) or not -ndim <= axis < ndim:
        return ref_nn.softmax(x, axis=axis)
    return Softmax.apply(x, axis=axis)


def cross_entropy_per_token(logits, targets, ignore_index=-100):
    """Per-token losses l_i [N] (0 on ignored rows) as a plain array; not differentiable.

    The ``cross_entropy_fwd`` kernel; as in ``cross_entropy``, a target outside [0, V) gives a
    NaN loss instead of the reference's error, which would need a device-to-host copy.
    """
    lg = _data(logits)
    t = cp.asarray(_data(targets))
    if not _all_f32(lg) or lg.ndim != 2 or t.dtype.kind not in "iu" or t.shape != lg.shape[:1] or (
            lg.shape[1] == 0 and lg.shape[0]):
        return ref_nn.cross_entropy_per_token(logits, targets, ignore_index=ignore_index)
    n, v = lg.shape
    lg = _f32(lg)
    t = cp.ascontiguousarray(t, dtype=cp.int64)
    loss = cp.empty((n,), dtype=cp.float32)
    lse = cp.empty((n,), dtype=cp.float32)
    if n:
        _kernel("nn.cu", "cross_entropy_fwd")((n,), _row_threads(v), (lg, t, loss, lse, cp.int32(v), cp.int64(ignore_index)))
    return loss


# ----------------------------------------------------------------------------------- mHC
# Streams X [..., n, C] are viewed as [T, n, C]; a coefficient is shared ([n], [n, n]) or per
# token ([..., n], [..., n, n]) and reaches the kernels as a pointer plus a token stride (0 when
# shared). Kernels keep a token's streams in registers, sized for n <= 4 or n <= 8; larger n
# runs on the reference.
def _mhc_bound(n):
    return 4 if n <= 4 else 8


def _mhc_coeff(coeff, tail):
    """A coefficient as contiguous float32 and its token stride (0 when shared)."""
    c = _f32(coeff)
    size = int(math.prod(tail))
    return c, (0 if c.size == size else size)


def _mhc_coeff_grad(rows, shared, shape):
    """Per-token coefficient gradients [T, ...] -> the coefficient's shape (summed if shared)."""
    return (rows.sum(axis=0) if shared else rows).reshape(shape)


class MhcPre(Function):
    """``reference.mhc.MhcPre``: ``u = sum_s h_pre[s] X[s]`` (kernels in mhc.cu)."""

    @staticmethod
    def forward(ctx, x, h_pre):
        shared = ref_mhc.check_stream_coeff("mhc_pre", "h_pre", h_pre, x, (x.shape[-2],))
        n, c_len = x.shape[-2], x.shape[-1]
        x3 = _f32(x).reshape(-1, n, c_len)
        t_len = x3.shape[0]
        h, stride = _mhc_coeff(h_pre, (n,))
        u = cp.empty((t_len, c_len), dtype=cp.float32)
        _kernel("mhc.cu", "mhc_pre_fwd")(
            _blocks(t_len * c_len), (_THREADS,), (x3, h, u, cp.int32(t_len), cp.int32(n), cp.int32(c_len), cp.int32(stride))
        )
        ctx.save(x3, h, stride, shared, h_pre.shape, x.shape)
        return u.reshape(x.shape[:-2] + (c_len,))

    @staticmethod
    def backward(ctx, g):
        x3, h, stride, shared, h_shape, x_shape = ctx.saved
        t_len, n, c_len = x3.shape
        dx = cp.empty_like(x3)
        dh_rows = cp.empty((t_len, n), dtype=cp.float32)
        _kernel("mhc.cu", f"mhc_pre_bwd{_mhc_bound(n)}")(
            (t_len,), _row_threads(c_len),
            (x3, h, _f32(g).reshape(t_len, c_len), dx, dh_rows, cp.int32(n), cp.int32(c_len), cp.int32(stride)),
        )
        d_h = _mhc_coeff_grad(dh_rows, shared, h_shape) if ctx.needs_input_grad[1] else None
        return (dx.reshape(x_shape) if ctx.needs_input_grad[0] else None), d_h


def mhc_pre(x, h_pre):
    """``mhc_pre(X [..., n, C], h_pre [n] or [..., n]) -> u [..., C]``, ``u = sum_s h_pre[s] X[s]``."""
    xd = _data(x)
    if not _all_f32(x, h_pre) or xd.ndim < 2 or xd.size == 0 or xd.shape[-2] > 8:
        return ref_mhc.mhc_pre(x, h_pre)
    return MhcPre.apply(x, h_pre)


class MhcPost(Function):
    """``reference.mhc.MhcPost``: ``X' = H_res @ (X + h_post (outer) y)`` (kernels in mhc.cu).
    Saves X and y, not Z: the backward recomputes Z per column."""

    @staticmethod
    def forward(ctx, x, y, h_res, h_post):
        if x.ndim < 2 or y.shape != x.shape[:-2] + x.shape[-1:]:
            raise ValueError(f"mhc_post: X has shape {x.shape} and y {y.shape}, expected [..., n, C] and [..., C]")
        n, c_len = x.shape[-2], x.shape[-1]
        shared_res = ref_mhc.check_stream_coeff("mhc_post", "H_res", h_res, x, (n, n))
        shared_post = ref_mhc.check_stream_coeff("mhc_post", "h_post", h_post, x, (n,))
        x3 = _f32(x).reshape(-1, n, c_len)
        t_len = x3.shape[0]
        y2 = _f32(y).reshape(t_len, c_len)
        hr, res_stride = _mhc_coeff(h_res, (n, n))
        hp, post_stride = _mhc_coeff(h_post, (n,))
        out = cp.empty_like(x3)
        _kernel("mhc.cu", f"mhc_post_fwd{_mhc_bound(n)}")(
            _blocks(t_len * c_len), (_THREADS,),
            (x3, y2, hr, hp, out, cp.int32(t_len), cp.int32(n), cp.int32(c_len), cp.int32(res_stride), cp.int32(post_stride)),
        )
        ctx.save(x3, y2, hr, hp, res_stride, post_stride, shared_res, shared_post, h_res.shape, h_post.shape, x.shape, y.shape)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, g):
        x3, y2, hr, hp, res_stride, post_stride, shared_res, shared_post, res_shape, post_shape, x_shape, y_shape = ctx.saved
        t_len, n, c_len = x3.shape
        dx = cp.empty_like(x3)
        dy = cp.empty_like(y2)
        dres_rows = cp.empty((t_len, n, n), dtype=cp.float32)
        dpost_rows = cp.empty((t_len, n), dtype=cp.float32)
        _kernel("mhc.cu", f"mhc_post_bwd{_mhc_bound(n)}")(
            (t_len,), _row_threads(c_len),
            (x3, y2, hr, hp, _f32(g).reshape(x3.shape), dx, dy, dres_rows, dpost_rows,
             cp.int32(n), cp.int32(c_len), cp.int32(res_stride), cp.int32(post_stride)),
        )
        needs = ctx.needs_input_grad
        return (
            dx.reshape(x_shape) if needs[0] else None,
            dy.reshape(y_shape) if needs[1] else None,
            _mhc_coeff_grad(dres_rows, shared_res, res_shape) if needs[2] else None,
            _mhc_coeff_grad(dpost_rows, shared_post, post_shape) if needs[3] else None,
        )


def mhc_post(x, y, h_res, h_post):
    """``mhc_post(X [..., n, C], y [..., C], H_res [n, n] or [..., n, n], h_post [n] or [..., n])
    -> X' [..., n, C]``, ``X' = H_res @ (X + h_post (outer) y)``."""
    xd = _data(x)
    if not _all_f32(x, y, h_res, h_post) or xd.ndim < 2 or xd.size == 0 or xd.shape[-2] > 8:
        return ref_mhc.mhc_post(x, y, h_res, h_post)
    return MhcPost.apply(x, y, h_res, h_post)


# ---------------------------------------------------------------------------- optimizers
def _check_f32(name, *arrays):
    for a in arrays:
        if a.dtype != cp.float32 or not a.flags.c_contiguous:
            raise ValueError(f"{name}: the cupy kernels update contiguous float32 arrays in place, got {a.dtype}")


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    _check_f32("adamw_update", p, m, v)
    g = _f32(g)
    bc1, bc2 = 1.0 - beta1 ** step, 1.0 - beta2 ** step
    _kernel("optim.cu", "adamw_update")(
        _blocks(p.size), (_THREADS,),
        (p, g, m, v, cp.uint64(p.size), cp.float32(lr), cp.float32(beta1), cp.float32(beta2),
         cp.float32(eps), cp.float32(weight_decay), cp.float32(bc1), cp.float32(bc2)),
    )


def lion_update(p, g, m, *, lr, beta1, beta2, weight_decay):
    _check_f32("lion_update", p, m)
    _kernel("optim.cu", "lion_update")(
        _blocks(p.size), (_THREADS,),
        (p, _f32(g), m, cp.uint64(p.size), cp.float32(lr), cp.float32(beta1), cp.float32(beta2), cp.float32(weight_decay)),
    )


def muon_momentum(buf, g, *, beta, nesterov):
    _check_f32("muon_momentum", buf)
    u = cp.empty_like(buf)
    _kernel("optim.cu", "muon_momentum")(
        _blocks(buf.size), (_THREADS,),
        (buf, _f32(g), u, cp.uint64(buf.size), cp.float32(beta), cp.float32(1.0 - beta), cp.int32(bool(nesterov))),
    )
    return u


def muon8_momentum(qbuf, scales, g, *, beta, nesterov):
    n = g.size
    if qbuf.size != n or scales.size != math.ceil(n / 256):
        raise ValueError(f"muon8_momentum: {qbuf.size} int8 values and {scales.size} scales do not fit {n} elements")
    u = cp.empty(g.shape, dtype=cp.float32)
    _kernel("optim.cu", "muon8_momentum")(
        (scales.size,), (256,),
        (qbuf, scales, _f32(g), u, cp.uint64(n), cp.float32(beta), cp.float32(1.0 - beta), cp.int32(bool(nesterov))),
    )
    return u


def _scale_add(a, b, alpha, beta):
    """b = alpha * a + beta * b in place, one elementwise kernel."""
    _kernel("nn.cu", "scale_add")(
        _blocks(b.size), (_THREADS,), (a, b, b, cp.uint64(b.size), cp.float32(alpha), cp.float32(beta))
    )


def newton_schulz(u, steps=5, coefficients=None):
    """``reference.optim.newton_schulz`` for float32 matrices: the products on cuBLAS into
    buffers allocated once, the combinations in one fused kernel each, no host sync
    (``reference.optim.newton_schulz_buffered``); other inputs run the reference."""
    if (not isinstance(u, cp.ndarray) or u.dtype != cp.float32 or u.ndim != 2 or u.size == 0
            or (coefficients is not None and len(coefficients) == 0)):
        return ref_optim.newton_schulz(u, steps=steps, coefficients=coefficients)
    return ref_optim.newton_schulz_buffered(u, steps, coefficients, _scale_add)


OPS = {
    "quantize_acts": quantize_acts,
    "quantize_weights": quantize_weights,
    "pack_ternary": pack_ternary,
    "unpack_ternary": unpack_ternary,
    "ternary_linear": ternary_linear,
    "prepare_packed": prepare_packed,
    "packed_gemv": packed_gemv,
    "packed_gemm": packed_gemm,
    "packed_linear": packed_linear,
    "rmsnorm": rmsnorm,
    "swiglu": SwiGLU.apply,
    "relu2_glu": ReLU2GLU.apply,
    "cross_entropy": cross_entropy,
    "cross_entropy_per_token": cross_entropy_per_token,
    "rope": rope,
    "attention": attention,
    "softmax": softmax,
    "mhc_pre": mhc_pre,
    "mhc_post": mhc_post,
    "adamw_update": adamw_update,
    "lion_update": lion_update,
    "muon_momentum": muon_momentum,
    "muon8_momentum": muon8_momentum,
    "newton_schulz": newton_schulz,
}
