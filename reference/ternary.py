"""Ternary numerics (SPEC section 2): quantizers, ternary_linear with its STE backward,
2-bit packing, and the packed GEMV/GEMM used at inference.

Shapes: a shadow weight ``w`` is float ``[M, K]`` (M = out, K = in), ``G = group_size``
divides K, activations are ``x [..., K]``.

Decisions the SPEC leaves open, fixed here for every backend:

- ``round_half_away`` rounds half away from zero *exactly* (like C ``round``). The literal
  float expression ``floor(|v| + 0.5)`` misrounds the largest double below 0.5 (the sum rounds
  up to 1.0); the exact version compares the fractional part instead.
- Weight scale: the group mean of ``|w|`` is accumulated in float64, the ``1e-8`` test is
  applied to that mean, then it is rounded to the nearest float16 value. A mean that rounds to
  0 in float16 (below about 2.98e-8, which covers every mean below 1e-8) also gives an
  all-zero group with ``s = 0``. Quantizing ``q * s`` again returns ``q`` exactly, and ``s``
  exactly when the group has no zero trits (otherwise the new mean is ``s * nonzeros / G``).
- Quantizers divide (``w / s``, ``x / s_x``) in the input's dtype; a backend that multiplies
  by a reciprocal can land on the other side of a rounding tie.
- Non-finite input never raises: a group or token containing NaN/Inf gets ``q = 0`` and a
  NaN scale, so the output turns non-finite and the trainer's non-finite check sees it.
- The integer inner sums are exact: they are formed by float64 matrix products of int8
  values, exact for any summation order because every partial sum is far below 2**53.
"""
from __future__ import annotations

import operator

import numpy as np

from .autograd import Function, array_module, data_of as _data
from .ops import _check_same_dtype

# Activation magnitude and weight mean below which a token/group quantizes to all zero.
ZERO_THRESHOLD = 1e-8
ACT_LEVELS = 127
# Means at or above this round to +inf in float16 (65504 is the largest float16, its ulp is 32).
FP16_OVERFLOW = 65520.0

# Lookup from a 2-bit code to its trit: 00 -> 0, 01 -> +1, 10 (invalid) -> 0, 11 -> -1.
_DECODE = np.array([0, 1, 0, -1], dtype=np.int8)
_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


def require_float(op, name, a):
    if not hasattr(a, "dtype") or a.dtype.kind != "f":
        raise ValueError(f"{op}: {name} must be a floating-point array, got dtype {getattr(a, 'dtype', type(a).__name__)}")


def _require_int8(op, name, a):
    if not hasattr(a, "dtype") or a.dtype != np.int8:
        raise ValueError(f"{op}: {name} must be an int8 array, got dtype {getattr(a, 'dtype', type(a).__name__)}")


def check_group_size(op, k, group_size):
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"{op}: group_size must be a positive integer, got {group_size!r}")
    if k % group_size != 0:
        raise ValueError(f"{op}: K = {k} is not divisible by group_size = {group_size}")


def check_grouped_weight(op, name, w, group_size, kind="float"):
    """The checks of a grouped weight matrix every backend makes: ``kind`` ``float`` (shadow
    weights) or ``int8`` (trits), 2-D ``[M, K]``, K a multiple of ``group_size``; returns (M, K)."""
    (require_float if kind == "float" else _require_int8)(op, name, w)
    if w.ndim != 2:
        raise ValueError(f"{op}: {name} must be 2-D [M, K], got shape {w.shape}")
    m, k = w.shape
    check_group_size(op, k, group_size)
    return m, k


# --- rounding -------------------------------------------------------------------------


def round_half_away(x):
    """Round to the nearest integer, ties away from zero: ``round_half_away(x) -> array``.

    Same dtype and shape as ``x`` (integer input is returned as float64). Exact for every
    float: ``|v| - floor(|v|)`` is computed without rounding error, so ties are found exactly.
    """
    x = _data(x)
    xp = array_module(x)
    x = xp.asarray(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    a = xp.abs(x)
    whole = xp.floor(a)
    rounded = whole + (a - whole >= 0.5).astype(x.dtype)
    return xp.copysign(rounded, x)


# --- quantizers -----------------------------------------------------------------------


def quantize_weights(w, group_size):
    """Absmean ternary quantization per row and group:
    ``quantize_weights(w [M, K] float, group_size) -> (q int8 [M, K], s [M, K // G])``.

    ``s`` has ``w``'s dtype and every value is exactly float16-representable; groups whose
    mean |w| is below 1e-8 (or rounds to 0 in float16) are all zero with ``s = 0``.
    """
    w = _data(w)
    m, k = check_grouped_weight("quantize_weights", "w", w, group_size)
    xp = array_module(w)
    groups = w.reshape(m, k // group_size, group_size)
    mean = xp.abs(groups).sum(axis=-1, dtype=np.float64) / group_size
    bad = ~(mean < FP16_OVERFLOW)  # NaN/Inf in the group, or a mean float16 cannot hold
    s = xp.where(bad, 0.0, mean).astype(np.float16).astype(w.dtype)
    zero = ~bad & ((mean < ZERO_THRESHOLD) | (s == 0))
    s = xp.where(zero, xp.zeros((), w.dtype), s)
    live = ~(zero | bad)
    # Dead groups divide 0 by 1 so that NaN/Inf never reach the rounding.
    numer = xp.where(live[..., None], groups, xp.zeros((), w.dtype))
    denom = xp.where(live, s, xp.ones((), w.dtype))[..., None]
    q = xp.clip(round_half_away(numer / denom), -1, 1).astype(np.int8)
    s = xp.where(bad, xp.full((), np.nan, w.dtype), s)
    return q.reshape(m, k), s


def quantize_acts(x):
    """Absmax int8 quantization per token (last axis):
    ``quantize_acts(x [..., K] float) -> (q int8 [..., K], s [...] in x's dtype)``.

    ``s = max|x| / 127`` and ``q = clip(round_half_away(x / s), -127, 127)``; a token with
    ``max|x| < 1e-8`` gets ``q = 0, s = 0``.
    """
    x = _data(x)
    require_float("quantize_acts", "x", x)
    if x.ndim < 1:
        raise ValueError(f"quantize_acts: x must have at least one axis [..., K], got shape {x.shape}")
    xp = array_module(x)
    if x.shape[-1] == 0:
        return xp.zeros(x.shape, np.int8), xp.zeros(x.shape[:-1], x.dtype)
    a = xp.abs(x).max(axis=-1)
    s = a / x.dtype.type(ACT_LEVELS)
    zero = a < ZERO_THRESHOLD
    bad = ~xp.isfinite(a)
    live = ~(zero | bad)
    numer = xp.where(live[..., None], x, xp.zeros((), x.dtype))
    denom = xp.where(live, s, xp.ones((), x.dtype))[..., None]
    q = xp.clip(round_half_away(numer / denom), -ACT_LEVELS, ACT_LEVELS).astype(np.int8)
    s = xp.where(zero, xp.zeros((), x.dtype), s)
    s = xp.where(bad, xp.full((), np.nan, x.dtype), s)
    return q, s


def dequantize_weights(q, s, group_size):
    """``dequantize_weights(q int8 [M, K], s float [M, K // G], group_size) -> q * s``,
    float ``[M, K]`` in ``s``'s dtype (exact: one trit times one scale)."""
    q, s = _data(q), _data(s)
    require_float("dequantize_weights", "s", s)
    m, k = check_grouped_weight("dequantize_weights", "q", q, group_size, kind="int8")
    if s.shape != (m, k // group_size):
        raise ValueError(
            f"dequantize_weights: scales have shape {s.shape}, expected {(m, k // group_size)} for q {q.shape} and group_size {group_size}"
        )
    groups = q.reshape(m, k // group_size, group_size).astype(s.dtype)
    return (groups * s[..., None]).reshape(m, k)


# --- the exact grouped product ----------------------------------------------------------


def _grouped_dot(qx, qw, s, group_size):
    """``acc[t, r] = sum_g s[r, g] * sum_{k in g} qx[t, k] * qw[r, k]`` in float64.

    The inner sums are exact integers (int8 products summed in float64); the sum over
    groups runs in group order. Backends reproduce this to rounding, not bit for bit.
    """
    xp = array_module(qx, qw)
    s64 = s.astype(np.float64)
    acc = xp.zeros((qx.shape[0], qw.shape[0]), np.float64)
    for g in range(qw.shape[1] // group_size):
        cols = slice(g * group_size, (g + 1) * group_size)
        inner = qx[:, cols].astype(np.float64) @ qw[:, cols].astype(np.float64).T
        acc += s64[:, g] * inner
    return acc


# --- ternary_linear ---------------------------------------------------------------------


def check_keep(keep, rows):
    xp = array_module(keep)
    keep = xp.asarray(keep)
    if keep.ndim != 1 or keep.dtype.kind not in "iu":
        raise ValueError(f"ternary_linear: keep must be a 1-D integer array of row indices, got dtype {keep.dtype} shape {keep.shape}")
    if keep.size and (int(keep.min()) < 0 or int(keep.max()) >= rows):
        raise ValueError(f"ternary_linear: keep holds row indices outside [0, {rows}) for x with {rows} rows")
    if xp.unique(keep).size != keep.size:
        raise ValueError("ternary_linear: keep holds repeated row indices")
    return keep


class RowSelection:
    """Rows chosen after the forward pass, read by the backward (Collider token filtering).

    The model passes one ``RowSelection`` as ``keep`` to every ternary_linear of a step, runs
    the forward, picks the kept tokens from the per-token losses, calls ``set(rows)``, then
    runs backward. ``rows is None`` means every row takes part.
    """

    def __init__(self, rows=None):
        self.rows = rows

    def set(self, rows):
        self.rows = rows


def resolve_keep(keep, n_rows):
    """The checked row-index array that ``keep`` stands for, or None for all rows.

    Every backend calls this in its ternary_linear backward so that arrays and
    ``RowSelection`` objects mean the same thing everywhere.
    """
    if isinstance(keep, RowSelection):
        keep = keep.rows
    if keep is None:
        return None
    return check_keep(_data(keep), n_rows)


def rows_to_full(rows_grad, keep, n_rows):
    """The full ``[n_rows, ...]`` gradient of a backward that ran on the kept rows only: the
    kept rows' values, zero elsewhere (``keep`` None: ``rows_grad`` itself)."""
    if keep is None:
        return rows_grad
    full = array_module(rows_grad).zeros((n_rows,) + rows_grad.shape[1:], rows_grad.dtype)
    full[keep] = rows_grad
    return full


class TernaryLinear(Function):
    """``y = x @ W^T`` on quantized operands (forward) with the straight-through backward.

    forward:  ``y[t, r] = s_x[t] * sum_g s[r, g] * sum_{k in g} q_x[t, k] * q_w[r, k]``
              (float64, cast to x's dtype)
    backward: ``dX = dY @ W_q``, ``dW = dY^T @ X_q`` with ``W_q = q_w * s``, ``X_q = q_x * s_x``
              (float64, cast to the input dtypes). With ``keep``, only those rows of
              ``x.reshape(-1, K)`` take part: dW sums over kept rows, dX is zero elsewhere.
    """

    @staticmethod
    def forward(ctx, x, w, group_size, keep=None):
        require_float("ternary_linear", "x", x)
        m, k = check_grouped_weight("ternary_linear", "w", w, group_size)
        if x.ndim < 1 or x.shape[-1] != k:
            raise ValueError(f"ternary_linear: x has shape {x.shape} but w has shape {w.shape}; the last axis of x must be K = {k}")
        if x.dtype != w.dtype:
            raise ValueError(f"ternary_linear: x is {x.dtype} but w is {w.dtype}; both must have the same dtype")
        x2 = x.reshape(-1, k)
        if keep is not None and not isinstance(keep, RowSelection):
            keep = check_keep(_data(keep), x2.shape[0])
        qx, sx = quantize_acts(x2)
        qw, sw = quantize_weights(w, group_size)
        y = sx.astype(np.float64)[:, None] * _grouped_dot(qx, qw, sw, group_size)
        ctx.save(qx, sx, qw, sw, keep, x.shape, group_size)
        return y.astype(x.dtype).reshape(*x.shape[:-1], m)

    @staticmethod
    def backward(ctx, gy):
        qx, sx, qw, sw, keep, x_shape, group_size = ctx.saved
        m = qw.shape[0]
        gy2 = gy.reshape(-1, m).astype(np.float64)
        keep = resolve_keep(keep, gy2.shape[0])
        if keep is not None:
            gy2, qx, sx = gy2[keep], qx[keep], sx[keep]
        gx = gw = None
        if ctx.needs_input_grad[0]:
            w_q = dequantize_weights(qw, sw.astype(np.float64), group_size)
            gx = rows_to_full(gy2 @ w_q, keep, int(np.prod(x_shape[:-1], dtype=np.int64)))
            gx = gx.astype(sw.dtype).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            x_q = qx.astype(np.float64) * sx.astype(np.float64)[:, None]
            gw = (gy2.T @ x_q).astype(sw.dtype)
        return gx, gw


def ternary_linear(x, w, group_size, keep=None):
    """``ternary_linear(x [..., K], w [M, K], group_size, keep=None) -> y [..., M]``.

    Differentiable in ``x`` and ``w`` (Tensors or arrays, same float dtype). ``keep`` is an
    optional 1-D integer array of distinct row indices into ``x.reshape(-1, K)``, or a
    ``RowSelection`` filled in before backward; only those rows take part in the backward
    (see ``TernaryLinear``).
    """
    return TernaryLinear.apply(x, w, group_size=group_size, keep=keep)


class DenseLinear(Function):
    """``y = x @ W^T`` in the inputs' dtype, with ``ternary_linear``'s ``keep`` contract: the
    backward uses only the kept rows (rows outside get zero dX and add nothing to dW).

    The model's LM head uses it under Collider: the loss weights of the filtered tokens are
    zero, so their rows of the upstream gradient are exactly zero and skipping them changes no
    gradient, while both backward products shrink to the kept rows.

    ``product(a, b)`` is ``a @ b``; a backend subclass may swap in its own (the numba backend's
    threaded ``gemm.matmul``) and keeps everything else.
    """

    product = staticmethod(operator.matmul)

    @classmethod
    def forward(cls, ctx, x, w, keep=None):
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
            raise ValueError(f"dense_linear: expected x [N, K] and w [M, K], got shapes {x.shape} and {w.shape}")
        _check_same_dtype("dense_linear", x, w)
        if keep is not None and not isinstance(keep, RowSelection):
            keep = check_keep(_data(keep), x.shape[0])
        ctx.save(x, w, keep)
        return cls.product(x, w.T)

    @classmethod
    def backward(cls, ctx, g):
        x, w, keep = ctx.saved
        rows = resolve_keep(keep, x.shape[0])
        g_kept, x_kept = (g, x) if rows is None else (g[rows], x[rows])
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = rows_to_full(cls.product(g_kept, w), rows, x.shape[0])
        if ctx.needs_input_grad[1]:
            gw = cls.product(g_kept.T, x_kept)
        return gx, gw


def dense_linear(x, w, keep=None):
    """``dense_linear(x [N, K], w [M, K], keep=None) -> y [N, M]`` (float, differentiable in
    both); ``keep`` as in ``ternary_linear``."""
    return DenseLinear.apply(x, w, keep=keep)


# --- 2-bit packing ----------------------------------------------------------------------


def pack_ternary(q):
    """``pack_ternary(q int8 [M, K]) -> uint8 [M, K // 4]``: 0 -> 00, +1 -> 01, -1 -> 11,
    column ``4j + i`` in bits ``2i..2i+1`` of byte ``j``. K must be a multiple of 4."""
    q = _data(q)
    _require_int8("pack_ternary", "q", q)
    if q.ndim != 2 or q.shape[1] % 4 != 0:
        raise ValueError(f"pack_ternary: q must be 2-D [M, K] with K a multiple of 4, got shape {q.shape}")
    xp = array_module(q)
    if q.size and (int(q.min()) < -1 or int(q.max()) > 1):
        raise ValueError(f"pack_ternary: q of shape {q.shape} holds values outside {{-1, 0, 1}}")
    # Two's complement makes the code the low two bits: 0 -> 00, 1 -> 01, -1 (0xFF) -> 11.
    codes = (q.view(np.uint8) & np.uint8(3)).reshape(q.shape[0], -1, 4)
    packed = xp.zeros(codes.shape[:2], np.uint8)
    for i in range(4):
        packed |= codes[..., i] << (2 * i)
    return packed


def unpack_ternary(p):
    """``unpack_ternary(p uint8 [M, K4]) -> int8 [M, 4 * K4]``; the invalid code 10 decodes to 0."""
    p = _data(p)
    if not hasattr(p, "dtype") or p.dtype != np.uint8 or p.ndim != 2:
        raise ValueError(
            f"unpack_ternary: packed weights must be a 2-D uint8 array [M, K/4], got dtype {getattr(p, 'dtype', None)} shape {getattr(p, 'shape', None)}"
        )
    xp = array_module(p)
    codes = (p[..., None] >> xp.asarray(_SHIFTS)) & np.uint8(3)
    return xp.asarray(_DECODE)[codes].reshape(p.shape[0], 4 * p.shape[1])


# --- packed inference -------------------------------------------------------------------


class PackedTernary:
    """The reference's packed-weight handle (built by ``prepare_packed``).

    Fields: ``q`` int8 ``[M, K]`` (unpacked trits), ``scales`` float32 ``[M, K // G]``,
    ``group_size`` (G), ``shape`` ``(M, K)``. Backends return their own handle types.
    """

    __slots__ = ("q", "scales", "group_size", "shape")

    def __init__(self, q, scales, group_size):
        self.q = q
        self.scales = scales
        self.group_size = int(group_size)
        self.shape = tuple(q.shape)

    def __repr__(self):
        return f"PackedTernary(shape={self.shape}, group_size={self.group_size})"


def prepare_packed(packed, scales, group_size):
    """``prepare_packed(packed uint8 [M, K/4], scales float [M, K/G], group_size) -> PackedTernary``.

    Called once at load time; the reference handle keeps the unpacked int8 trits and the
    scales as float32."""
    packed, scales = _data(packed), _data(scales)
    q = unpack_ternary(packed)
    m, k = q.shape
    check_group_size("prepare_packed", k, group_size)
    require_float("prepare_packed", "scales", scales)
    if scales.shape != (m, k // group_size):
        raise ValueError(
            f"prepare_packed: scales have shape {scales.shape}, expected {(m, k // group_size)} for packed weights {packed.shape} (K = {k}) and group_size {group_size}"
        )
    return PackedTernary(q, scales.astype(np.float32), group_size)


def _check_handle(op, handle):
    if not isinstance(handle, PackedTernary):
        raise ValueError(f"{op}: expected a PackedTernary from reference prepare_packed, got {type(handle).__name__}")


def check_gemv_acts(weight_shape, xq):
    """The activation checks of every backend's packed_gemv: int8 ``[K]`` for weights ``[M, K]``."""
    _require_int8("packed_gemv", "xq", xq)
    if xq.shape != (weight_shape[1],):
        raise ValueError(f"packed_gemv: activations have shape {xq.shape}, expected ({weight_shape[1]},) for weights {weight_shape}")


def check_gemm_acts(weight_shape, xq, xs):
    """The argument checks of every backend's packed_gemm: int8 ``xq [N, K]``, float ``xs [N]``."""
    _require_int8("packed_gemm", "xq", xq)
    if xq.ndim != 2 or xq.shape[1] != weight_shape[1]:
        raise ValueError(f"packed_gemm: activations have shape {xq.shape}, expected [N, {weight_shape[1]}] for weights {weight_shape}")
    if not hasattr(xs, "shape") or xs.shape != (xq.shape[0],) or xs.dtype.kind != "f":
        raise ValueError(
            f"packed_gemm: xs must be a float array of shape ({xq.shape[0]},), got {getattr(xs, 'dtype', type(xs).__name__)} {getattr(xs, 'shape', '')}"
        )


def packed_gemv(handle, xq, xs):
    """``packed_gemv(handle, xq int8 [K], xs scalar) -> float32 [M]``:
    ``y[r] = xs * sum_g scales[r, g] * sum_{k in g} xq[k] * q[r, k]``."""
    _check_handle("packed_gemv", handle)
    xq = _data(xq)
    check_gemv_acts(handle.shape, xq)
    xp = array_module(xq, handle.q)
    xs64 = xp.asarray(_data(xs), dtype=np.float64)
    if xs64.ndim != 0:
        raise ValueError(f"packed_gemv: xs must be a scalar, got shape {xs64.shape}")
    acc = _grouped_dot(xq[None, :], handle.q, handle.scales, handle.group_size)
    return (xs64 * acc[0]).astype(np.float32)


def packed_gemm(handle, xq, xs):
    """``packed_gemm(handle, xq int8 [N, K], xs float [N]) -> float32 [N, M]``:
    ``y[n, r] = xs[n] * sum_g scales[r, g] * sum_{k in g} xq[n, k] * q[r, k]``."""
    _check_handle("packed_gemm", handle)
    xq, xs = _data(xq), _data(xs)
    check_gemm_acts(handle.shape, xq, xs)
    acc = _grouped_dot(xq, handle.q, handle.scales, handle.group_size)
    return (xs.astype(np.float64)[:, None] * acc).astype(np.float32)


def check_linear_acts(weight_shape, x):
    """The argument checks of every backend's packed_linear: float ``x [N, K]``."""
    require_float("packed_linear", "x", x)
    if x.ndim != 2 or x.shape[1] != weight_shape[1]:
        raise ValueError(f"packed_linear: x has shape {x.shape}, expected [N, {weight_shape[1]}] for weights {weight_shape}")


def packed_linear(handle, x):
    """``packed_linear(handle, x float [N, K]) -> float32 [N, M]``: a BitLinear layer at
    inference, ``packed_gemm(handle, *quantize_acts(x))`` (absmax int8 per row, then the packed
    product). Backends fuse the two."""
    _check_handle("packed_linear", handle)
    x = _data(x)
    check_linear_acts(handle.shape, x)
    xq, xs = quantize_acts(x)
    return packed_gemm(handle, xq, xs)


def check_int8_linear(xq, xs, wq, ws):
    """The argument checks of every backend's ``int8_linear``."""
    for name, a in (("xq", xq), ("wq", wq)):
        _require_int8("int8_linear", name, a)
        if a.ndim != 2:
            raise ValueError(f"int8_linear: {name} must be 2-D, got shape {a.shape}")
    if xq.shape[1] != wq.shape[1]:
        raise ValueError(f"int8_linear: xq {xq.shape} and wq {wq.shape} differ in K")
    if xs.shape != (xq.shape[0],) or ws.shape != (wq.shape[0],):
        raise ValueError(f"int8_linear: scales must be xs [{xq.shape[0]}] and ws [{wq.shape[0]}], "
                         f"got {xs.shape} and {ws.shape}")


def int8_linear(xq, xs, wq, ws):
    """``int8_linear(xq int8 [N, K], xs [N], wq int8 [M, K], ws [M]) -> float32 [N, M]``.

    Both operands are absmax int8 rows (``quantize_acts``): the exact int32 dot product of each
    pair of rows, times ``ws[m]`` then ``xs[n]`` in float64, rounded to float32. The engine's
    optional int8 LM head (a quarter of the float32 head's bytes per token).
    """
    xq, xs, wq, ws = (_data(a) for a in (xq, xs, wq, ws))
    check_int8_linear(xq, xs, wq, ws)
    xp = array_module(xq, wq)
    isum = xq.astype(np.int64) @ wq.astype(np.int64).T
    y = (isum.astype(np.float64) * ws.astype(np.float64)[None, :]) * xs.astype(np.float64)[:, None]
    return y.astype(np.float32) if xp is np else xp.asarray(y, dtype=np.float32)


OPS = {
    "round_half_away": round_half_away,
    "quantize_weights": quantize_weights,
    "quantize_acts": quantize_acts,
    "dequantize_weights": dequantize_weights,
    "ternary_linear": ternary_linear,
    "dense_linear": dense_linear,
    "pack_ternary": pack_ternary,
    "unpack_ternary": unpack_ternary,
    "prepare_packed": prepare_packed,
    "packed_gemv": packed_gemv,
    "packed_gemm": packed_gemm,
    "packed_linear": packed_linear,
    "int8_linear": int8_linear,
}
