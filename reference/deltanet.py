"""Gated DeltaNet: the token-by-token recurrence (truth) and the chunkwise-parallel form.

Layouts (SPEC section 5): ``q, k`` [B, T, H, dk], ``v`` [B, T, H, dv], ``beta`` and ``g``
[B, T, H], per-head state ``S`` [B, H, dk, dv]. ``beta`` is already a sigmoid, ``g = log alpha``
(<= 0) is the log decay, and ``q, k`` are L2-normalised by the caller (``l2_normalize``).

    S_t = alpha_t (S_{t-1} - beta_t k_t (k_t^T S_{t-1})) + beta_t k_t v_t^T,   o_t = S_t^T q_t

Chunkwise form (chunk of C tokens, state S entering it, gamma = within-chunk cumsum of g,
Gamma = exp(gamma), D[t, i] = exp(gamma_t - gamma_i) for i <= t): the state after token t is
``Gamma_t S + sum_{i<=t} D[t, i] k_i u_i^T`` with pseudo-values ``U`` solving the unit lower
triangular system ``(I + A) U = diag(beta) V - diag(beta Gamma) K S``, where
``A[t, i] = beta_t D[t, i] (k_t . k_i)`` for i < t. With ``T = (I + A)^{-1}`` (the UT transform),
``W = T diag(beta Gamma) K`` and ``U~ = T diag(beta) V`` (the WY representation) do not depend on
``S``, so every chunk computes them at once; only

    U = U~ - W S,   O = diag(Gamma) Q S + (Q K^T * D) U,   S' = Gamma_C S + K^T diag(D[C, :]) U

runs chunk after chunk. The backward of the chunkwise form is an explicit chunked backward:
the same chunk-by-chunk pass in reverse for the state gradient, then the intra-chunk pieces
(UT transform, decays) for all chunks at once. It saves only the chunk-boundary states and
recomputes the intra-chunk quantities. The last chunk is padded with k = v = q = beta = g = 0
tokens, which leave the state unchanged.
"""
from __future__ import annotations

import numpy as np

from .autograd import Function, array_module, data_of as _data
from .nn import _sigmoid, sigmoid


def _swap(a):
    return a.swapaxes(-1, -2)


# --- elementwise pieces: L2 normalisation and the gates -----------------------------------


class L2Normalize(Function):
    """``y = x / sqrt(sum(x^2, axis=-1) + eps)`` over the last axis."""

    @staticmethod
    def forward(ctx, x, eps=1e-6):
        xp = array_module(x)
        rstd = 1.0 / xp.sqrt((x * x).sum(axis=-1, keepdims=True) + x.dtype.type(eps))
        y = x * rstd
        ctx.save(y, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        y, rstd = ctx.saved
        return (rstd * (gy - y * (gy * y).sum(axis=-1, keepdims=True)),)


def l2_normalize(x, eps=1e-6):
    """L2-normalise ``x`` [..., d] over its last axis (differentiable): ``x / sqrt(|x|^2 + eps)``."""
    return L2Normalize.apply(x, eps=eps)


def _softplus(z):
    xp = array_module(z)
    return xp.logaddexp(z.dtype.type(0), z)


class DeltaNetGates(Function):
    """``g = -exp(A_log) * softplus(a_proj + dt_bias)`` (log of the decay alpha)."""

    @staticmethod
    def forward(ctx, a_proj, dt_bias, A_log):
        xp = array_module(a_proj)
        z = a_proj + dt_bias
        rate = xp.exp(A_log)
        g = -rate * _softplus(z)
        ctx.save(z, rate, g)
        return g

    @staticmethod
    def backward(ctx, gg):
        z, rate, g = ctx.saved
        g_z = -gg * rate * _sigmoid(z)
        # gradients at the broadcast shape; the tape sums them down to [H]
        return g_z, g_z, gg * g


def deltanet_gates(a_proj, dt_bias, A_log):
    """Log decay ``g = -exp(A_log) * softplus(a_proj + dt_bias)``, differentiable in all three.

    ``a_proj`` [B, T, H]; ``dt_bias`` and ``A_log`` [H] (broadcast). Returns g [B, T, H] <= 0.
    """
    return DeltaNetGates.apply(a_proj, dt_bias, A_log)


def deltanet_beta(b_proj):
    """Write strength ``beta = sigmoid(b_proj)`` [B, T, H], differentiable (``nn.sigmoid``)."""
    return sigmoid(b_proj)


# --- input checks ---------------------------------------------------------------------------


def _check_inputs(op, q, k, v, beta, g, initial_state):
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"{op}: q and k must both be [B, T, H, dk], got shapes {q.shape} and {k.shape}")
    b, t, h, _ = q.shape
    if v.ndim != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"{op}: v must be [B, T, H, dv] = [{b}, {t}, {h}, dv], got shape {v.shape}")
    for name, a in (("beta", beta), ("g", g)):
        if a.shape != (b, t, h):
            raise ValueError(f"{op}: {name} must be [B, T, H] = {(b, t, h)}, got shape {a.shape}")
    state_shape = (b, h, q.shape[3], v.shape[3])
    if initial_state is not None and initial_state.shape != state_shape:
        raise ValueError(f"{op}: initial_state must be [B, H, dk, dv] = {state_shape}, got shape {initial_state.shape}")
    arrays = (q, k, v, beta, g) + (() if initial_state is None else (initial_state,))
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1 or next(iter(dtypes)).kind != "f":
        raise ValueError(f"{op}: inputs must share one float dtype, got {sorted(str(d) for d in dtypes)}")
    return state_shape


# --- the recurrence (truth) -----------------------------------------------------------------


def _step(q_t, k_t, v_t, b_t, a_t, S):
    """One token for all (batch, head): returns (o_t, S_t). Shapes [B,H,dk], [B,H,dv], [B,H]."""
    u = (_swap(S) @ k_t[..., None])[..., 0]  # k^T S  [B,H,dv]
    delta = b_t[..., None] * (v_t - a_t[..., None] * u)  # beta (v - alpha k^T S)
    S_new = a_t[..., None, None] * S + k_t[..., :, None] * delta[..., None, :]
    o = (_swap(S_new) @ q_t[..., None])[..., 0]
    return o, S_new


class GatedDeltaRecurrent(Function):
    """Token-by-token Gated DeltaNet with a reverse-time backward (stores every state)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state=None):
        xp = array_module(q)
        state_shape = _check_inputs("gated_delta_recurrent", q, k, v, beta, g, initial_state)
        S = xp.zeros(state_shape, dtype=q.dtype) if initial_state is None else initial_state
        alpha = xp.exp(g)
        o = xp.empty(v.shape, dtype=q.dtype)
        states = [S]
        for t in range(q.shape[1]):
            o[:, t], S = _step(q[:, t], k[:, t], v[:, t], beta[:, t], alpha[:, t], S)
            states.append(S)
        ctx.save(q, k, v, beta, alpha, states)
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, beta, alpha, states = ctx.saved
        xp = array_module(do)
        dq, dk, dv = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
        dbeta, dg = xp.empty_like(beta), xp.empty_like(beta)
        dS = dS.copy()
        for t in reversed(range(q.shape[1])):
            S_prev, S_t = states[t], states[t + 1]
            q_t, k_t, v_t = q[:, t], k[:, t], v[:, t]
            b, a = beta[:, t][..., None], alpha[:, t][..., None]
            # o_t = S_t^T q_t
            dq[:, t] = (S_t @ do[:, t][..., None])[..., 0]
            dS += q_t[..., :, None] * do[:, t][..., None, :]
            # S_t = a (S_prev - b k u^T) + b k v^T with u = S_prev^T k
            u = (_swap(S_prev) @ k_t[..., None])[..., 0]
            Mk = (_swap(dS) @ k_t[..., None])[..., 0]  # dS^T k   [dv]
            dv[:, t] = b * Mk
            S_mid = S_prev - (b * k_t)[..., :, None] * u[..., None, :]
            dg[:, t] = alpha[:, t] * (dS * S_mid).sum(axis=(-2, -1))
            dbeta[:, t] = (Mk * (v_t - a * u)).sum(axis=-1)
            M_vau = (dS @ (b * (v_t - a * u))[..., None])[..., 0]  # dS (b v - a b u)
            dk[:, t] = M_vau - a * b * (S_prev @ Mk[..., None])[..., 0]
            dS = a[..., None] * (dS - (b * k_t)[..., :, None] * Mk[..., None, :])
        return dq, dk, dv, dbeta, dg, dS


def gated_delta_recurrent(q, k, v, beta, g, initial_state=None):
    """Gated DeltaNet, one token at a time (the ground truth), differentiable in every input.

    ``q, k`` [B, T, H, dk], ``v`` [B, T, H, dv], ``beta, g`` [B, T, H] (g = log alpha),
    ``initial_state`` [B, H, dk, dv] or None (zeros). Returns ``(o [B, T, H, dv],
    final_state [B, H, dk, dv])``.
    """
    return GatedDeltaRecurrent.apply(q, k, v, beta, g, initial_state)


def gated_delta_step(q_t, k_t, v_t, beta_t, g_t, S):
    """One decoding step (not differentiable): ``q_t, k_t`` [B, H, dk], ``v_t`` [B, H, dv],
    ``beta_t, g_t`` [B, H], ``S`` [B, H, dk, dv]. Returns ``(o_t [B, H, dv], S_new)``."""
    q_t, k_t, v_t, beta_t, g_t, S = (_data(a) for a in (q_t, k_t, v_t, beta_t, g_t, S))
    if q_t.ndim != 3 or k_t.shape != q_t.shape or v_t.shape[:2] != q_t.shape[:2] or v_t.ndim != 3:
        raise ValueError(f"gated_delta_step: q_t, k_t must be [B, H, dk] and v_t [B, H, dv], got shapes "
                         f"{q_t.shape}, {k_t.shape}, {v_t.shape}")
    if beta_t.shape != q_t.shape[:2] or g_t.shape != q_t.shape[:2]:
        raise ValueError(f"gated_delta_step: beta_t and g_t must be [B, H] = {q_t.shape[:2]}, got shapes "
                         f"{beta_t.shape} and {g_t.shape}")
    if S.shape != q_t.shape[:2] + (q_t.shape[2], v_t.shape[2]):
        raise ValueError(f"gated_delta_step: state must be [B, H, dk, dv] = "
                         f"{q_t.shape[:2] + (q_t.shape[2], v_t.shape[2])}, got shape {S.shape}")
    xp = array_module(q_t)
    return _step(q_t, k_t, v_t, beta_t, xp.exp(g_t), S)


# --- the chunkwise-parallel form ------------------------------------------------------------


def _to_chunks(x, chunk):
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padding T up to N * C."""
    xp = array_module(x)
    b, t, h = x.shape[:3]
    n = -(-t // chunk)
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n * chunk - t)
    x = xp.pad(x, pad)
    x = x.reshape((b, n, chunk, h) + x.shape[3:])
    return xp.moveaxis(x, 3, 1)


def _from_chunks(x, t):
    """[B, H, N, C, ...] -> [B, T, H, ...] (drops the padding)."""
    xp = array_module(x)
    b, h, n, c = x.shape[:4]
    x = xp.moveaxis(x, 1, 3).reshape((b, n * c, h) + x.shape[4:])
    return xp.ascontiguousarray(x[:, :t])


def _unit_lower_inverse(A):
    """(I + A)^{-1} for strictly lower triangular A [..., C, C] by forward substitution."""
    xp = array_module(A)
    c = A.shape[-1]
    inv = xp.zeros_like(A)
    idx = xp.arange(c)
    inv[..., idx, idx] = 1
    for i in range(1, c):
        # row i of (I + A) X = I: X[i, :i] = -A[i, :i] X[:i, :i]
        inv[..., i, :i] = -(A[..., i, None, :i] @ inv[..., :i, :i])[..., 0, :]
    return inv


def _intra_chunk(q, k, v, beta, g):
    """Everything that does not depend on the state entering a chunk ([B, H, N, C, ...] inputs)."""
    xp = array_module(q)
    c = q.shape[-2]
    gam = xp.cumsum(g, axis=-1)
    lower = xp.tril(xp.ones((c, c), dtype=bool))
    strict = xp.tril(xp.ones((c, c), dtype=bool), k=-1)
    diff = gam[..., :, None] - gam[..., None, :]
    decay = xp.where(lower, xp.exp(xp.where(lower, diff, 0)), 0).astype(q.dtype)  # D[t, i]
    kk = k @ _swap(k)
    A = xp.where(strict, beta[..., :, None] * kk * decay, 0).astype(q.dtype)
    T = _unit_lower_inverse(A)
    Gam = xp.exp(gam)
    kb = (beta * Gam)[..., None] * k
    vb = beta[..., None] * v
    qk = q @ _swap(k)
    return {
        "gam": gam, "Gam": Gam, "decay": decay, "strict": strict, "kk": kk, "T": T, "kb": kb, "vb": vb,
        "W": T @ kb, "Uv": T @ vb, "qk": qk, "P": qk * decay,
        "e": xp.exp(gam[..., -1:] - gam),  # D[C, i]: decay from token i to the chunk's end
    }


class GatedDeltaChunkwise(Function):
    """Chunkwise-parallel Gated DeltaNet (WY / UT transform) with an explicit chunked backward."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state=None, chunk_size=64):
        xp = array_module(q)
        state_shape = _check_inputs("gated_delta_chunkwise", q, k, v, beta, g, initial_state)
        if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"gated_delta_chunkwise: chunk_size must be a positive integer, got {chunk_size!r}")
        t = q.shape[1]
        qc, kc, vc, bc, gc = (_to_chunks(a, chunk_size) for a in (q, k, v, beta, g))
        m = _intra_chunk(qc, kc, vc, bc, gc)
        S = xp.zeros(state_shape, dtype=q.dtype) if initial_state is None else initial_state
        o = xp.empty(vc.shape, dtype=q.dtype)
        states = [S]
        for n in range(qc.shape[2]):
            U = m["Uv"][:, :, n] - m["W"][:, :, n] @ S
            o[:, :, n] = m["Gam"][:, :, n, :, None] * (qc[:, :, n] @ S) + m["P"][:, :, n] @ U
            S = m["Gam"][:, :, n, -1, None, None] * S + _swap(kc[:, :, n]) @ (m["e"][:, :, n, :, None] * U)
            states.append(S)
        ctx.save((qc, kc, vc, bc, gc), states[:-1], t)
        return _from_chunks(o, t), S

    @staticmethod
    def backward(ctx, do, dS):
        (qc, kc, vc, bc, gc), states, t = ctx.saved
        xp = array_module(do)
        m = _intra_chunk(qc, kc, vc, bc, gc)
        doc = _to_chunks(do, qc.shape[-2])
        Gam, e, W, Uv, P = m["Gam"], m["e"], m["W"], m["Uv"], m["P"]
        dq, dk = xp.zeros_like(qc), xp.zeros_like(kc)
        dW, dUv, dP = xp.empty_like(W), xp.empty_like(Uv), xp.empty_like(P)
        dGam, de = xp.empty_like(Gam), xp.empty_like(e)
        dGamC = xp.empty_like(Gam[..., 0])
        dS = dS.copy()
        # Reverse pass over chunks: the state gradient flows from each chunk into the previous one.
        for n in reversed(range(qc.shape[2])):
            S_in, q_n, k_n, do_n = states[n], qc[:, :, n], kc[:, :, n], doc[:, :, n]
            U = Uv[:, :, n] - W[:, :, n] @ S_in
            # S_out = Gam_C S_in + K^T diag(e) U
            dGamC[:, :, n] = (dS * S_in).sum(axis=(-2, -1))
            kdS = k_n @ dS
            dk[:, :, n] = e[:, :, n, :, None] * (U @ _swap(dS))
            dU = e[:, :, n, :, None] * kdS
            de[:, :, n] = (kdS * U).sum(axis=-1)
            dS_in = Gam[:, :, n, -1, None, None] * dS
            # O = diag(Gam) Q S_in + P U
            dS_in += _swap(q_n) @ (Gam[:, :, n, :, None] * do_n)
            dq[:, :, n] = Gam[:, :, n, :, None] * (do_n @ _swap(S_in))
            dGam[:, :, n] = ((q_n @ S_in) * do_n).sum(axis=-1)
            dP[:, :, n] = do_n @ _swap(U)
            dU += _swap(P[:, :, n]) @ doc[:, :, n]
            # U = Uv - W S_in
            dUv[:, :, n] = dU
            dW[:, :, n] = -(dU @ _swap(S_in))
            dS = dS_in - _swap(W[:, :, n]) @ dU
        # Intra-chunk pieces, every chunk at once.
        decay, kk, T, kb, vb, qk, strict = m["decay"], m["kk"], m["T"], m["kb"], m["vb"], m["qk"], m["strict"]
        dqk = dP * decay  # P = (Q K^T) * D
        dq += dqk @ kc
        dk += _swap(dqk) @ qc
        ddecay = dP * qk
        # W = T kb, Uv = T vb with kb = diag(beta Gam) K, vb = diag(beta) V
        dT = dW @ _swap(kb) + dUv @ _swap(vb)
        dkb, dvb = _swap(T) @ dW, _swap(T) @ dUv
        dk += (bc * Gam)[..., None] * dkb
        kb_scale = (dkb * kc).sum(axis=-1)
        dbeta = Gam * kb_scale + (dvb * vc).sum(axis=-1)
        dGam += bc * kb_scale
        dv = bc[..., None] * dvb
        # T = (I + A)^{-1}  =>  dA = -T^T dT T^T, on A's strictly lower support
        dA = xp.where(strict, -(_swap(T) @ dT @ _swap(T)), 0)
        # A = diag(beta) (KK^T * D) on the strict lower triangle
        dbeta += (dA * kk * decay).sum(axis=-1)
        dX = bc[..., :, None] * dA
        dkk = dX * decay
        ddecay += dX * kk
        dk += (dkk + _swap(dkk)) @ kc
        # D[t, i] = exp(gam_t - gam_i), Gam = exp(gam), e_i = exp(gam_C - gam_i)
        z = ddecay * decay
        dgam = z.sum(axis=-1) - z.sum(axis=-2) + dGam * Gam - de * e
        dgam[..., -1] += dGamC * Gam[..., -1] + (de * e).sum(axis=-1)
        dg = xp.flip(xp.cumsum(xp.flip(dgam, axis=-1), axis=-1), axis=-1)  # gam = cumsum(g)
        return (_from_chunks(dq, t), _from_chunks(dk, t), _from_chunks(dv, t),
                _from_chunks(dbeta, t), _from_chunks(dg, t), dS)


def gated_delta_chunkwise(q, k, v, beta, g, chunk_size=64, initial_state=None):
    """Gated DeltaNet in chunks of ``chunk_size`` tokens (the training path), differentiable.

    Same layouts and results as ``gated_delta_recurrent``: ``q, k`` [B, T, H, dk], ``v``
    [B, T, H, dv], ``beta, g`` [B, T, H], ``initial_state`` [B, H, dk, dv] or None. Returns
    ``(o [B, T, H, dv], final_state [B, H, dk, dv])``. Any T >= 0 works (the last chunk is padded).
    """
    return GatedDeltaChunkwise.apply(q, k, v, beta, g, initial_state, chunk_size=chunk_size)


OPS = {
    "l2_normalize": l2_normalize,
    "deltanet_gates": deltanet_gates,
    "deltanet_beta": deltanet_beta,
    "gated_delta_recurrent": gated_delta_recurrent,
    "gated_delta_chunkwise": gated_delta_chunkwise,
    "gated_delta_step": gated_delta_step,
}
