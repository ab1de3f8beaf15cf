"""Fused float32 mHC kernels (``reference.mhc``): applying the stream coefficients, forward
and backward. (``mhc_dynamic_coeffs`` stays on the reference, which computes it in float64.)

Each op keeps the reference's name, signature and semantics; arrays are viewed as
``[tokens, n, C]``. Shared coefficients (``[n]``, ``[n, n]``) and per-token ones
(``[T, n]``, ``[T, n, n]``) go through the same kernels: a coefficient array has one row
(shared) or one row per token. Other dtypes, empty inputs and invalid shapes go to the
reference unchanged (so errors read the same on every backend).

What the kernels save over the reference:

- ``mhc_pre``/``mhc_post``: one pass per token over its ``n`` streams, where the reference
  broadcasts into ``[T, n, C]`` temporaries and runs ``T`` tiny matmuls. ``mhc_post`` keeps
  ``X`` and ``y`` for the backward instead of a new ``Z = X + h_post y`` (recomputed per token
  there), and its backward forms every gradient in one pass.
- Sums over ``C`` (and over tokens, for shared coefficients) accumulate in float64.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from reference import mhc as ref
from reference.autograd import Function, data_of as _arr

from .dispatch import n_tasks

_F32 = np.dtype(np.float32)

# Below this many stream elements (T * n * C) a kernel runs as one task.
PARALLEL_MIN_ELEMENTS = 1 << 16


def _all_f32(*arrays):
    return all(getattr(_arr(a), "dtype", None) == _F32 for a in arrays)


def _tasks(tokens, elements):
    return n_tasks(tokens, elements, PARALLEL_MIN_ELEMENTS)


def _streams(x):
    """``X [..., n, C]`` as a contiguous ``[T, n, C]`` array."""
    return np.ascontiguousarray(x).reshape((-1,) + x.shape[-2:])


def _rows(coeff, tail):
    """A shared or per-token coefficient as ``[1 or T, *tail]`` (contiguous)."""
    return np.ascontiguousarray(coeff).reshape((-1,) + tail)


# Reductions over C accumulate in float64 and may be reassociated ("reassoc" only: no
# assumptions about NaN or infinities), which lets LLVM vectorise them: 4x faster than a
# fixed-order sum, and no less accurate in float64.
@njit(cache=True, fastmath={"reassoc"}, error_model="numpy")
def _dot(a, b):
    s = 0.0
    for i in range(a.shape[0]):
        s += np.float64(a[i]) * np.float64(b[i])
    return s


@njit(cache=True, fastmath=False, error_model="numpy")
def _weighted_sum(w, rows, out):
    """out[c] = sum_s w[s] rows[s, c], summed in order s = 0, 1, ... (float32, like the reference)."""
    w0 = w[0]
    r0 = rows[0]
    for c in range(out.shape[0]):
        out[c] = w0 * r0[c]
    for s in range(1, w.shape[0]):
        ws = w[s]
        rs = rows[s]
        for c in range(out.shape[0]):
            out[c] += ws * rs[c]


# --- mhc_pre -------------------------------------------------------------------------------


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _pre_forward(x, h, u, n_tasks):
    """u[t] = sum_s h[t or 0, s] x[t, s]."""
    t_len = x.shape[0]
    per_token = h.shape[0] > 1
    for task in prange(n_tasks):
        for t in range(task * t_len // n_tasks, (task + 1) * t_len // n_tasks):
            _weighted_sum(h[t if per_token else 0], x[t], u[t])


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _pre_backward(x, h, g, dx, dh, dh_parts, n_tasks, want_dx, want_dh, per_token_dh):
    """dx[t, s] = h[s] g[t]; dh[t, s] = <x[t, s], g[t]> (or its sum over tokens, per task)."""
    t_len, n, c_len = x.shape
    per_token = h.shape[0] > 1
    for task in prange(n_tasks):
        for t in range(task * t_len // n_tasks, (task + 1) * t_len // n_tasks):
            ht = t if per_token else 0
            gr = g[t]
            for s in range(n):
                if want_dx:
                    hs = h[ht, s]
                    dxr = dx[t, s]
                    for c in range(c_len):
                        dxr[c] = hs * gr[c]
                if want_dh:
                    d = _dot(x[t, s], gr)
                    if per_token_dh:
                        dh[t, s] = np.float32(d)
                    else:
                        dh_parts[task, s] += d


class MhcPre(Function):
    """``reference.mhc.MhcPre`` (float32, fused)."""

    @staticmethod
    def forward(ctx, x, h_pre):
        shared = ref.check_stream_coeff("mhc_pre", "h_pre", h_pre, x, (x.shape[-2],))
        x3 = _streams(x)
        t_len, n, c_len = x3.shape
        h = _rows(h_pre, (n,))
        u = np.empty((t_len, c_len), np.float32)
        n_tasks = _tasks(t_len, x3.size)
        _pre_forward(x3, h, u, n_tasks)
        ctx.save(x3, h, h_pre.shape, shared, x.shape, n_tasks)
        return u.reshape(x.shape[:-2] + (c_len,))

    @staticmethod
    def backward(ctx, g):
        x3, h, h_shape, shared, x_shape, n_tasks = ctx.saved
        want_dx, want_dh = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        t_len, n, c_len = x3.shape
        g2 = np.ascontiguousarray(g, dtype=np.float32).reshape(t_len, c_len)
        dx = np.empty_like(x3) if want_dx else np.empty((0, 0, 0), np.float32)
        dh = np.empty((t_len, n) if want_dh and not shared else (0, 0), np.float32)
        parts = np.zeros((n_tasks, n), np.float64)
        _pre_backward(x3, h, g2, dx, dh, parts, n_tasks, want_dx, want_dh, not shared)
        d_h = None
        if want_dh:
            d_h = (parts.sum(axis=0).astype(np.float32) if shared else dh).reshape(h_shape)
        return (dx.reshape(x_shape) if want_dx else None), d_h


def mhc_pre(x, h_pre):
    """``mhc_pre(X [..., n, C], h_pre [n] or [..., n]) -> u [..., C]``, ``u = sum_s h_pre[s] X[s]``."""
    xd = _arr(x)
    if not _all_f32(x, h_pre) or xd.ndim < 2 or xd.size == 0:
        return ref.mhc_pre(x, h_pre)
    return MhcPre.apply(x, h_pre)


# --- mhc_post ------------------------------------------------------------------------------


@njit(cache=True, fastmath=False, error_model="numpy")
def _mix_rows(x, y, hp, z):
    """z[j] = x[j] + hp[j] y (the reference's Z for one token)."""
    n, c_len = x.shape
    for j in range(n):
        hj = hp[j]
        xj = x[j]
        zj = z[j]
        for c in range(c_len):
            zj[c] = xj[c] + hj * y[c]


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _post_forward(x, y, hr, hp, out, n_tasks):
    """out[t, i] = sum_j H[i, j] (x[t, j] + hp[j] y[t])."""
    t_len, n, c_len = x.shape
    res_per_token = hr.shape[0] > 1
    post_per_token = hp.shape[0] > 1
    for task in prange(n_tasks):
        z = np.empty((n, c_len), np.float32)
        for t in range(task * t_len // n_tasks, (task + 1) * t_len // n_tasks):
            rt = t if res_per_token else 0
            pt = t if post_per_token else 0
            _mix_rows(x[t], y[t], hp[pt], z)
            for i in range(n):
                _weighted_sum(hr[rt, i], z, out[t, i])


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _post_backward(x, y, hr, hp, g, dz, dy, dres, dpost, res_parts, post_parts, n_tasks,
                   want_dy, want_dres, want_dpost, res_shared, post_shared):
    """dz[t, j] = sum_i H[i, j] g[t, i]; dy[t] = sum_j hp[j] dz[t, j];
    dres[t, i, j] = <g[t, i], z[t, j]>; dpost[t, j] = <dz[t, j], y[t]> (shared ones summed per task)."""
    t_len, n, c_len = x.shape
    res_per_token = hr.shape[0] > 1
    post_per_token = hp.shape[0] > 1
    for task in prange(n_tasks):
        z = np.empty((n, c_len), np.float32)
        for t in range(task * t_len // n_tasks, (task + 1) * t_len // n_tasks):
            rt = t if res_per_token else 0
            pt = t if post_per_token else 0
            for j in range(n):
                _weighted_sum(hr[rt, :, j], g[t], dz[t, j])
            if want_dy:
                _weighted_sum(hp[pt], dz[t], dy[t])
            if want_dres:
                _mix_rows(x[t], y[t], hp[pt], z)
                for i in range(n):
                    for j in range(n):
                        d = _dot(g[t, i], z[j])
                        if res_shared:
                            res_parts[task, i, j] += d
                        else:
                            dres[t, i, j] = np.float32(d)
            if want_dpost:
                for j in range(n):
                    d = _dot(dz[t, j], y[t])
                    if post_shared:
                        post_parts[task, j] += d
                    else:
                        dpost[t, j] = np.float32(d)


class MhcPost(Function):
    """``reference.mhc.MhcPost`` (float32, fused)."""

    @staticmethod
    def forward(ctx, x, y, h_res, h_post):
        if x.ndim < 2 or y.shape != x.shape[:-2] + x.shape[-1:]:
            raise ValueError(f"mhc_post: X has shape {x.shape} and y {y.shape}, expected [..., n, C] and [..., C]")
        n = x.shape[-2]
        shared_res = ref.check_stream_coeff("mhc_post", "H_res", h_res, x, (n, n))
        shared_post = ref.check_stream_coeff("mhc_post", "h_post", h_post, x, (n,))
        x3 = _streams(x)
        t_len, _, c_len = x3.shape
        y2 = np.ascontiguousarray(y).reshape(t_len, c_len)
        hr, hp = _rows(h_res, (n, n)), _rows(h_post, (n,))
        out = np.empty_like(x3)
        n_tasks = _tasks(t_len, x3.size)
        _post_forward(x3, y2, hr, hp, out, n_tasks)
        ctx.save(x3, y2, hr, hp, h_res.shape, h_post.shape, shared_res, shared_post, x.shape, y.shape, n_tasks)
        return out.reshape(x.shape)

    @staticmethod
    def backward(ctx, g):
        x3, y2, hr, hp, res_shape, post_shape, shared_res, shared_post, x_shape, y_shape, n_tasks = ctx.saved
        needs = ctx.needs_input_grad
        want_dy, want_dres, want_dpost = needs[1], needs[2], needs[3]
        t_len, n, c_len = x3.shape
        g3 = np.ascontiguousarray(g, dtype=np.float32).reshape(x3.shape)
        dz = np.empty_like(x3)
        dy = np.empty((t_len, c_len) if want_dy else (0, 0), np.float32)
        dres = np.empty((t_len, n, n) if want_dres and not shared_res else (0, 0, 0), np.float32)
        dpost = np.empty((t_len, n) if want_dpost and not shared_post else (0, 0), np.float32)
        res_parts = np.zeros((n_tasks, n, n), np.float64)
        post_parts = np.zeros((n_tasks, n), np.float64)
        _post_backward(x3, y2, hr, hp, g3, dz, dy, dres, dpost, res_parts, post_parts, n_tasks,
                       want_dy, want_dres, want_dpost, shared_res, shared_post)
        d_res = d_post = None
        if want_dres:
            d_res = (res_parts.sum(axis=0).astype(np.float32) if shared_res else dres).reshape(res_shape)
        if want_dpost:
            d_post = (post_parts.sum(axis=0).astype(np.float32) if shared_post else dpost).reshape(post_shape)
        return (dz.reshape(x_shape) if needs[0] else None,
                dy.reshape(y_shape) if want_dy else None, d_res, d_post)


def mhc_post(x, y, h_res, h_post):
    """``mhc_post(X [..., n, C], y [..., C], H_res [n, n] or [..., n, n], h_post [n] or [..., n])
    -> X' [..., n, C]``, ``X' = H_res @ (X + h_post (outer) y)``."""
    xd = _arr(x)
    if not _all_f32(x, y, h_res, h_post) or xd.ndim < 2 or xd.size == 0:
        return ref.mhc_post(x, y, h_res, h_post)
    return MhcPost.apply(x, y, h_res, h_post)


# mhc_dynamic_coeffs is not overridden: the reference computes it in float64 so that the
# training forward and the inference engine (prefill and decode) get identical float32
# coefficients.
OPS = {
    "mhc_pre": mhc_pre,
    "mhc_post": mhc_post,
}
