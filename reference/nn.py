"""Neural-network ops: softmax, activations, gated FFN units, RMSNorm, RoPE, attention, cross-entropy.

Each op is a ``Function`` with its forward and backward side by side, written against
``xp = array_module(...)`` so the same code runs on numpy and cupy arrays; the dtype of the
result follows the float inputs (float32 or float64). The lower-case name below each class is
the public entry point and the name a backend overrides in ``OPS``.

Layouts (SPEC 5):

- activations and ``softmax``/``log_softmax``: any shape, elementwise / along ``axis``.
- ``rmsnorm``: x [..., D], w [D], normalised over the last axis.
- ``rope``: x [..., T, H, hd] (the model uses [B, T, H, hd]), positions int [T] or any integer
  array broadcastable to x.shape[:-2] (e.g. [B, T]); NeoX half-split pairs (i, i + hd/2).
- ``attention``: q [B, T, Hq, hd], k [B, S, Hkv, hd], v [B, S, Hkv, dv] -> [B, T, Hq, dv];
  query head h reads kv head h // (Hq // Hkv); with ``causal`` the T queries are the LAST T of
  the S positions (query i sits at absolute position S - T + i), which is what KV-cache decoding needs.
- ``cross_entropy``: logits [N, V], targets int [N], weights float [N] (optional).
"""
from __future__ import annotations

import math

import numpy as np

from .autograd import Function, Tensor, array_module
from .ops import _check_same_dtype


def _float(x):
    """A Python float, so it combines with float32 arrays without promoting them (NEP 50)."""
    return float(x)


# --- softmax family -----------------------------------------------------------------------


class Softmax(Function):
    """softmax(x, axis=-1): exp(x - max) / sum(exp(x - max)) along ``axis``; any shape."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = array_module(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
        y = e / e.sum(axis=axis, keepdims=True)
        ctx.save(y, axis)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, axis = ctx.saved
        return (y * (gy - (gy * y).sum(axis=axis, keepdims=True)),)


class LogSoftmax(Function):
    """log_softmax(x, axis=-1): x - logsumexp(x) along ``axis``, stable for logits of any size."""

    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = array_module(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save(y, axis)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, axis = ctx.saved
        xp = array_module(y)
        return (gy - xp.exp(y) * gy.sum(axis=axis, keepdims=True),)


def softmax(x, axis=-1):
    """Softmax along ``axis``: x [...] -> same shape, entries in [0, 1] summing to 1 along ``axis``."""
    return Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    """Log-softmax along ``axis``: x [...] -> same shape; stable for logits of any magnitude."""
    return LogSoftmax.apply(x, axis=axis)


# --- elementwise activations --------------------------------------------------------------


def _sigmoid(x):
    """Stable logistic function: never exponentiates a positive number."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))  # in (0, 1]
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class Sigmoid(Function):
    """sigmoid(x) = 1 / (1 + exp(-x)), elementwise, finite for any |x|."""

    @staticmethod
    def forward(ctx, x):
        s = _sigmoid(x)
        ctx.save(s)
        return s

    @staticmethod
    def backward(ctx, gy):
        (s,) = ctx.saved
        return (gy * s * (1.0 - s),)


class Softplus(Function):
    """softplus(x) = log(1 + exp(x)) computed as max(x, 0) + log1p(exp(-|x|)), elementwise."""

    @staticmethod
    def forward(ctx, x):
        xp = array_module(x)
        ctx.save(x)
        return xp.maximum(x, 0.0) + xp.log1p(xp.exp(-xp.abs(x)))

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved
        return (gy * _sigmoid(x),)


def _silu_and_slope(x):
    """silu(x) = x * sigmoid(x) and its derivative sigmoid(x) * (1 + x * (1 - sigmoid(x)))."""
    s = _sigmoid(x)
    return x * s, s * (1.0 + x * (1.0 - s))


class SiLU(Function):
    """silu(x) = x * sigmoid(x), elementwise."""

    @staticmethod
    def forward(ctx, x):
        y, _ = _silu_and_slope(x)
        ctx.save(x)
        return y

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved
        _, slope = _silu_and_slope(x)
        return (gy * slope,)


class ReLU2(Function):
    """relu2(x) = relu(x)^2, elementwise (the ReLU² FFN activation)."""

    @staticmethod
    def forward(ctx, x):
        xp = array_module(x)
        r = xp.maximum(x, 0.0)
        ctx.save(r)
        return r * r

    @staticmethod
    def backward(ctx, gy):
        (r,) = ctx.saved
        return (2.0 * r * gy,)


sigmoid = Sigmoid.apply
softplus = Softplus.apply
silu = SiLU.apply
relu2 = ReLU2.apply


# --- fused gated FFN units ------------------------------------------------------------------


def check_gate_up(op, gate, up):
    if gate.shape != up.shape:
        raise ValueError(f"{op}: gate shape {gate.shape} and up shape {up.shape} must be equal")
    _check_same_dtype(op, gate, up)


class SwiGLU(Function):
    """swiglu(gate, up) = silu(gate) * up; gate, up [..., F] of equal shape -> [..., F]."""

    @staticmethod
    def forward(ctx, gate, up):
        check_gate_up("swiglu", gate, up)
        act, _ = _silu_and_slope(gate)
        ctx.save(gate, up)
        return act * up

    @staticmethod
    def backward(ctx, gy):
        gate, up = ctx.saved
        act, slope = _silu_and_slope(gate)
        g_gate = gy * up * slope if ctx.needs_input_grad[0] else None
        g_up = gy * act if ctx.needs_input_grad[1] else None
        return g_gate, g_up


class ReLU2GLU(Function):
    """relu2_glu(gate, up) = relu(gate)^2 * up; gate, up [..., F] of equal shape -> [..., F]."""

    @staticmethod
    def forward(ctx, gate, up):
        check_gate_up("relu2_glu", gate, up)
        xp = array_module(gate)
        r = xp.maximum(gate, 0.0)
        ctx.save(r, up)
        return r * r * up

    @staticmethod
    def backward(ctx, gy):
        r, up = ctx.saved
        g_gate = 2.0 * r * up * gy if ctx.needs_input_grad[0] else None
        g_up = r * r * gy if ctx.needs_input_grad[1] else None
        return g_gate, g_up


swiglu = SwiGLU.apply
relu2_glu = ReLU2GLU.apply


# --- RMSNorm -------------------------------------------------------------------------------


def check_rmsnorm_args(x, w):
    """The argument checks every backend's rmsnorm makes: w [D] matching x [..., D], same dtype."""
    if x.ndim < 1 or w.shape != x.shape[-1:]:
        raise ValueError(f"rmsnorm: weight shape {w.shape} must be ({x.shape[-1] if x.ndim else '?'},) "
                         f"to match the last axis of x shape {x.shape}")
    _check_same_dtype("rmsnorm", x, w)


class RMSNorm(Function):
    """rmsnorm(x, w, eps=1e-6) = x / sqrt(mean(x^2, -1) + eps) * w; x [..., D], w [D] -> [..., D]."""

    @staticmethod
    def forward(ctx, x, w, eps=1e-6):
        check_rmsnorm_args(x, w)
        xp = array_module(x)
        rstd = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + _float(eps))
        x_hat = x * rstd
        ctx.save(x_hat, w, rstd)
        return x_hat * w

    @staticmethod
    def backward(ctx, gy):
        x_hat, w, rstd = ctx.saved
        gx = gw = None
        if ctx.needs_input_grad[0]:
            g_hat = gy * w
            gx = rstd * (g_hat - x_hat * (g_hat * x_hat).mean(axis=-1, keepdims=True))
        if ctx.needs_input_grad[1]:
            gw = (gy * x_hat).reshape(-1, w.shape[0]).sum(axis=0)
        return gx, gw


def rmsnorm(x, w, eps=1e-6):
    """RMSNorm over the last axis (SPEC 5): x [..., D], w [D] -> [..., D]."""
    return RMSNorm.apply(x, w, eps=eps)


# --- RoPE ----------------------------------------------------------------------------------


def rope_tables(positions, head_dim, theta=10000.0, dtype=np.float32):
    """(cos, sin) of the RoPE angles, each of shape positions.shape + (head_dim // 2,).

    Angle of pair i at position p is ``p * theta^(-2i/head_dim)``; computed in float64 and
    cast to ``dtype``. ``positions`` is an integer array (numpy or cupy) or a Python int/list.
    """
    if head_dim % 2 != 0 or head_dim <= 0:
        raise ValueError(f"rope: head_dim {head_dim} must be a positive even number (pairs (i, i + hd/2))")
    xp = array_module(positions)
    positions = xp.asarray(positions)
    if positions.dtype.kind not in "iu":
        raise ValueError(f"rope: positions must be integers, got dtype {positions.dtype}")
    half = head_dim // 2
    inv_freq = _float(theta) ** (-2.0 * xp.arange(half, dtype=xp.float64) / head_dim)
    angles = positions.astype(xp.float64)[..., None] * inv_freq
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def rope_rotate(x, cos, sin, inverse=False):
    """Rotate x [..., T, H, hd] by tables cos, sin [..., T, hd/2] (from ``rope_tables``).

    Pairs are (i, i + hd/2). ``inverse=True`` rotates by the negated angles (the backward).
    Plain arrays in and out; the engine uses this with cached tables.
    """
    xp = array_module(x)
    half = x.shape[-1] // 2
    c, s = cos[..., None, :], sin[..., None, :]  # broadcast over the head axis
    if inverse:
        s = -s
    x1, x2 = x[..., :half], x[..., half:]
    return xp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class RoPE(Function):
    """rope(x, positions, theta=10000.0): x [..., T, H, hd], positions int [T] (or [B, T]) -> x's shape."""

    @staticmethod
    def forward(ctx, x, positions, theta=10000.0):
        xp = array_module(x)
        positions = xp.asarray(positions)
        if x.ndim < 3:
            raise ValueError(f"rope: x shape {x.shape} must be [..., T, n_heads, head_dim]")
        if positions.ndim < 1 or positions.shape[-1] != x.shape[-3]:
            raise ValueError(f"rope: positions shape {positions.shape} must end in T={x.shape[-3]} "
                             f"to match x shape {x.shape} ([..., T, n_heads, head_dim])")
        cos, sin = rope_tables(positions, x.shape[-1], theta, x.dtype)
        ctx.save(cos, sin)
        return rope_rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, gy):
        cos, sin = ctx.saved
        return rope_rotate(gy, cos, sin, inverse=True), None  # a rotation's transpose is its inverse


def rope(x, positions, theta=10000.0):
    """Rotary embedding, NeoX half-split (SPEC 5): x [..., T, H, hd], positions int [T] -> same shape."""
    return RoPE.apply(x, positions, theta=theta)


# --- attention -----------------------------------------------------------------------------


def check_attention_shapes(q, k, v, causal):
    shapes = f"q shape {q.shape}, k shape {k.shape}, v shape {v.shape}"
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be 4-D [B, T, H, hd] / [B, S, H, hd]; got {shapes}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attention: k and v must agree in batch, length and kv heads; got {shapes}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q and k/v batch sizes differ; got {shapes}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q and k head_dim differ; got {shapes}")
    n_q, n_kv = q.shape[2], k.shape[2]
    if n_kv == 0 or n_q % n_kv != 0:
        raise ValueError(f"attention: query heads ({n_q}) must be a multiple of kv heads ({n_kv}); got {shapes}")
    if causal and k.shape[1] < q.shape[1]:
        raise ValueError(f"attention: causal attention needs at least as many keys as queries "
                         f"(S={k.shape[1]} < T={q.shape[1]}); got {shapes}")
    _check_same_dtype("attention", q, k, v)


class Attention(Function):
    """Grouped-query scaled dot-product attention with optional causal mask (saves probabilities).

    q [B, T, Hq, hd], k [B, S, Hkv, hd], v [B, S, Hkv, dv] -> [B, T, Hq, dv]. Internally the
    query heads are grouped as [B, Hkv, G, T, hd] with G = Hq // Hkv, so query head
    h = kv * G + g reads kv head kv = h // G.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal=True, scale=None):
        check_attention_shapes(q, k, v, causal)
        xp = array_module(q, k, v)
        b, t, n_q, hd = q.shape
        s_len, n_kv, dv = k.shape[1], k.shape[2], v.shape[3]
        group = n_q // n_kv
        scale = _float(1.0 / math.sqrt(hd) if scale is None else scale)
        qg = q.reshape(b, t, n_kv, group, hd).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, hd]
        kg = k.transpose(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, S, hd]
        vg = v.transpose(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, S, dv]
        scores = (qg @ kg.swapaxes(-1, -2)) * scale  # [B, Hkv, G, T, S]
        if causal and t > 1:  # query i sits at position S - T + i; key j is visible when j <= that (one query sees all)
            hidden = xp.arange(s_len)[None, :] > (xp.arange(t)[:, None] + (s_len - t))
            scores = xp.where(hidden, -xp.inf, scores)
        e = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = e / e.sum(axis=-1, keepdims=True)
        out = probs @ vg  # [B, Hkv, G, T, dv]
        ctx.save(qg, kg, vg, probs, scale)
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n_q, dv)

    @staticmethod
    def backward(ctx, gy):
        qg, kg, vg, probs, scale = ctx.saved
        b, n_kv, group, t, hd = qg.shape
        gyg = gy.reshape(b, t, n_kv, group, -1).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, dv]
        gq = gk = gv = None
        if ctx.needs_input_grad[2]:
            gv = (probs.swapaxes(-1, -2) @ gyg).sum(axis=2)  # [B, Hkv, S, dv]
            gv = gv.transpose(0, 2, 1, 3)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            gp = gyg @ vg.swapaxes(-1, -2)  # [B, Hkv, G, T, S]
            gs = probs * (gp - (gp * probs).sum(axis=-1, keepdims=True)) * scale
            if ctx.needs_input_grad[0]:
                gq = (gs @ kg).transpose(0, 3, 1, 2, 4).reshape(b, t, n_kv * group, hd)
            if ctx.needs_input_grad[1]:
                gk = (gs.swapaxes(-1, -2) @ qg).sum(axis=2).transpose(0, 2, 1, 3)  # [B, S, Hkv, hd]
        return gq, gk, gv


def attention(q, k, v, causal=True, scale=None):
    """GQA attention (SPEC 5): q [B, T, Hq, hd], k [B, S, Hkv, hd], v [B, S, Hkv, dv] -> [B, T, Hq, dv].

    ``scale`` defaults to 1/sqrt(hd). With ``causal`` (S >= T) query i attends to keys
    0 .. S - T + i, i.e. the queries are the last T of the S positions.
    """
    return Attention.apply(q, k, v, causal=causal, scale=scale)


def check_cached_attention_args(q, k, v, k_cache, v_cache, start, cos, sin):
    """The contract of ``cached_attention`` (every backend checks the same)."""
    def fail(problem):
        raise ValueError(f"cached_attention: {problem}; got q {q.shape}, k {k.shape}, v {v.shape}, k_cache "
                         f"{k_cache.shape}, v_cache {v_cache.shape}, cos {cos.shape}, sin {sin.shape}")

    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k_cache.ndim != 4 or v_cache.ndim != 4:
        fail("q, k, v and the caches must be 4-D")
    if q.shape[0] != 1 or k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3]:
        fail("q, k, v must be one sequence [1, T, H, hd] of equal T")
    if k_cache.shape[0] != 1 or k_cache.shape[2:] != k.shape[2:] or v_cache.shape[:3] != k_cache.shape[:3] \
            or v_cache.shape[3] != v.shape[3]:
        fail("caches must be [1, capacity, Hkv, hd] matching k and v")
    if q.shape[3] != k.shape[3] or q.shape[3] % 2 or k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        fail("q and k need one even head_dim and Hq a multiple of Hkv")
    t = q.shape[1]
    if not 0 <= start <= k_cache.shape[1] - t:
        fail(f"positions {start}..{start + t} do not fit the cache capacity {k_cache.shape[1]}")
    if cos.shape != (t, q.shape[3] // 2) or sin.shape != cos.shape:
        fail(f"cos and sin must be [T, hd/2] = {(t, q.shape[3] // 2)}")


def cached_attention(q, k, v, k_cache, v_cache, start, cos, sin):
    """One attention step of one sequence over its KV cache (inference; no gradient).

    q [1, T, Hq, hd], k [1, T, Hkv, hd], v [1, T, Hkv, dv] (float32, before RoPE) for the
    positions ``start .. start + T - 1``; ``cos``/``sin`` [T, hd/2] their RoPE tables; caches
    [1, capacity, Hkv, hd|dv], float32 (RoPE's outputs are float32, so the cache holds them
    exactly). Writes ``rope_rotate(k)`` and ``v`` into the caches at those positions and
    returns the causal attention of ``rope_rotate(q)`` over cache positions
    ``0 .. start + T - 1``, computed in float64 and rounded to float32 ``[1, T, Hq, dv]``. It
    is exactly this composition of ``rope_rotate`` and ``attention``; backends fuse it.
    """
    check_cached_attention_args(q, k, v, k_cache, v_cache, start, cos, sin)
    end = start + q.shape[1]
    k_cache[:, start:end] = rope_rotate(k, cos, sin)
    v_cache[:, start:end] = v
    q64 = rope_rotate(q, cos, sin).astype(np.float64)
    out = attention(q64, k_cache[:, :end].astype(np.float64), v_cache[:, :end].astype(np.float64), causal=True)
    return (out.data if isinstance(out, Tensor) else out).astype(np.float32)


# --- cross-entropy -------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def check_cross_entropy(logits, targets, weights, ignore_index, reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction {reduction!r} must be one of {_REDUCTIONS}")
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits shape {logits.shape} must be [N, V] (reshape [B, T, V] first)")
    if targets.dtype.kind not in "iu":
        raise ValueError(f"cross_entropy: targets must be integers, got dtype {targets.dtype}")
    n, vocab = logits.shape
    if targets.shape != (n,):
        raise ValueError(f"cross_entropy: targets shape {targets.shape} must be ({n},) "
                         f"to match logits shape {logits.shape}")
    if weights is not None and weights.shape != (n,):
        raise ValueError(f"cross_entropy: weights shape {weights.shape} must be ({n},) "
                         f"to match logits shape {logits.shape}")
    kept = targets[targets != ignore_index]
    if kept.size and (int(kept.min()) < 0 or int(kept.max()) >= vocab):
        raise ValueError(f"cross_entropy: targets must lie in [0, {vocab}) or equal ignore_index "
                         f"{ignore_index}; found values in [{int(kept.min())}, {int(kept.max())}]")


def _per_token(logits, targets, ignore_index):
    """Per-token losses [N] (0 on ignored rows), the row log-sum-exp [N, 1] and the row mask [N]."""
    xp = array_module(logits)
    n = logits.shape[0]
    valid = targets != ignore_index
    safe_targets = xp.where(valid, targets, 0)
    row_max = logits.max(axis=1, keepdims=True)
    lse = row_max + xp.log(xp.exp(logits - row_max).sum(axis=1, keepdims=True))
    picked = logits[xp.arange(n), safe_targets]
    losses = xp.where(valid, lse[:, 0] - picked, 0.0).astype(logits.dtype, copy=False)
    return losses, lse, valid, safe_targets


class CrossEntropy(Function):
    """Token cross-entropy with optional per-token weights and ignore_index; fused softmax backward.

    logits [N, V], targets int [N], weights float [N] or None. Per-token loss
    l_i = logsumexp(logits_i) - logits_i[targets_i], 0 where targets_i == ignore_index.
    Effective weights w_i (1 by default) are 0 on ignored rows.

    - ``mean``: sum(w_i l_i) / sum(w_i over non-ignored rows), a scalar; when that sum is 0
      (all rows ignored or all weights 0) the loss is 0 and every gradient is 0.
    - ``sum``:  sum(w_i l_i), a scalar.
    - ``none``: w_i l_i per token, [N] (differentiable; so ``sum`` is the sum of ``none``).

    Backward: d logits_i = c_i (softmax(logits_i) - onehot(targets_i)) with c_i the upstream
    gradient times w_i (divided by the weight sum for ``mean``); the one-hot is a scatter of one
    entry per row, never a matrix. The weights receive their gradient too (d/dw_i).
    """

    @staticmethod
    def forward(ctx, logits, targets, weights=None, ignore_index=-100, reduction="mean"):
        xp = array_module(logits)
        targets = xp.asarray(targets)
        check_cross_entropy(logits, targets, weights, ignore_index, reduction)
        if weights is not None:
            _check_same_dtype("cross_entropy", logits, weights)
        losses, lse, valid, safe_targets = _per_token(logits, targets, ignore_index)
        w, denom, out = reduce_token_losses(losses, valid, weights, reduction, logits.dtype)
        ctx.save(logits, lse, safe_targets, valid, w, losses, denom, out, reduction)
        return out

    @staticmethod
    def backward(ctx, g):
        logits, lse, safe_targets, valid, w, losses, denom, out, reduction = ctx.saved
        xp = array_module(logits)
        coef, g_w = token_loss_backward(g, valid, w, losses, denom, out, reduction, ctx.needs_input_grad[2])
        g_logits = None
        if ctx.needs_input_grad[0]:
            if coef is None:
                g_logits = xp.zeros_like(logits)
            else:
                g_logits = xp.exp(logits - lse) * coef[:, None]
                g_logits[xp.arange(logits.shape[0]), safe_targets] -= coef
        return g_logits, None, g_w


def reduce_token_losses(losses, valid, weights, reduction, dtype):
    """The weighted reduction of per-token losses shared by every cross-entropy kernel.

    Returns ``(w, denom, out)``: the effective weights (0 on ignored rows), their sum, and the
    reduced loss as ``CrossEntropy`` defines it.
    """
    xp = array_module(losses)
    w = valid.astype(dtype) if weights is None else xp.where(valid, weights, 0.0).astype(dtype)
    weighted = w * losses
    denom = w.sum()
    if reduction == "none":
        out = weighted
    elif reduction == "sum":
        out = weighted.sum()
    else:
        out = weighted.sum() / denom if float(denom) != 0.0 else xp.zeros((), dtype=dtype)
    return w, denom, out


def token_loss_backward(g, valid, w, losses, denom, out, reduction, need_weight_grad):
    """Per-row coefficients ``c_i`` of the logits gradient and the weights' gradient.

    ``coef`` is None when a ``mean`` has zero total weight (every gradient is then 0).
    """
    xp = array_module(w)
    if reduction == "mean" and float(denom) == 0.0:
        return None, (xp.zeros_like(w) if need_weight_grad else None)
    g_rows = xp.broadcast_to(g / denom if reduction == "mean" else g, w.shape)  # scalar or [N]
    coef = (g_rows * w).astype(w.dtype, copy=False)
    g_w = None
    if need_weight_grad:  # ignored rows have no weight dependence
        centred = losses - out if reduction == "mean" else losses
        g_w = xp.where(valid, g_rows * centred, 0.0).astype(w.dtype, copy=False)
    return coef, g_w


def cross_entropy(logits, targets, weights=None, ignore_index=-100, reduction="mean"):
    """Cross-entropy: logits [N, V], targets int [N], weights float [N] | None -> scalar, or [N] for "none".

    See ``CrossEntropy`` for the exact reductions. Per-token losses for token filtering come
    either from ``reduction="none"`` (on the tape) or from ``cross_entropy_per_token``.
    """
    return CrossEntropy.apply(logits, targets, weights, ignore_index=ignore_index, reduction=reduction)


def cross_entropy_per_token(logits, targets, ignore_index=-100):
    """Per-token losses l_i [N] (0 on ignored rows) as a plain array; not differentiable.

    logits [N, V] array or Tensor, targets int [N]. Same numbers as
    ``cross_entropy(..., reduction="none")`` without weights, with no tape entry.
    """
    logits = logits.data if isinstance(logits, Tensor) else logits
    xp = array_module(logits)
    targets = xp.asarray(targets.data if isinstance(targets, Tensor) else targets)
    check_cross_entropy(logits, targets, None, ignore_index, "none")
    losses, _, _, _ = _per_token(logits, targets, ignore_index)
    return losses


OPS = {
    "softmax": softmax, "log_softmax": log_softmax,
    "sigmoid": sigmoid, "softplus": softplus, "silu": silu, "relu2": relu2,
    "swiglu": swiglu, "relu2_glu": relu2_glu,
    "rmsnorm": rmsnorm,
    "rope": rope, "rope_tables": rope_tables, "rope_rotate": rope_rotate,
    "attention": attention, "cached_attention": cached_attention,
    "cross_entropy": cross_entropy, "cross_entropy_per_token": cross_entropy_per_token,
}
