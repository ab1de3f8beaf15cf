"""Optimizer kernels for the numba backend: the per-tensor arithmetic of ``reference.optim``.

- ``adamw_update``, ``lion_update``, ``muon_momentum``: one fused pass over the parameter and
  its state instead of the reference's eight to twelve numpy passes (each with a temporary).
  The arithmetic is the reference's, operation by operation in float32 (NumPy 2 turns the
  Python-float hyperparameters into float32 before it multiplies), so results are bit-identical.
- ``muon8_momentum``: dequantize, update, requantize each 256-element block while it sits in
  the L1 cache (the updated float block lives in a 1 KB scratch buffer).
- ``newton_schulz``: the matmuls stay in BLAS (numpy's), arranged to do less work: both
  ``A = X X^T`` and ``A A = A A^T`` are products of a matrix with its own transpose, which numpy
  hands to ``ssyrk`` (half the flops of a general product); tall matrices use ``X^T X`` and
  ``X B`` instead of being transposed and copied; every product writes into a preallocated
  buffer and ``a X`` is added in place. All three products run on ``gemm.matmul`` (split over
  numba's threads; the syrk ones as two diagonal syrks against one off-diagonal gemm).

Other dtypes, non-contiguous state and invalid arguments go to the reference unchanged (the
reference raises the errors, so they read the same on every backend). ``galore_project`` and
``galore_project_back`` stay on the reference: each is one BLAS product already.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from reference import optim as ref

from . import gemm
from .dispatch import n_tasks
from .nn import _f32_from_bits

_F32 = np.dtype(np.float32)
BLOCK = ref.QUANT_BLOCK

# Below this many elements a kernel runs in the calling thread: waking the thread pool costs
# more than the pass itself.
PARALLEL_MIN_ELEMENTS = 1 << 18


def _tasks(n):
    return n_tasks(n, n, PARALLEL_MIN_ELEMENTS)


def _flat_f32(*arrays):
    """Flat views of ``arrays`` when every one is C-contiguous float32, else None."""
    views = []
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.dtype != _F32 or not a.flags.c_contiguous:
            return None
        views.append(a.reshape(-1))
    return views


def _same_shape(*arrays):
    return all(a.shape == arrays[0].shape for a in arrays)


# --- AdamW ---------------------------------------------------------------------------------


@njit(cache=True, fastmath=False, error_model="numpy")
def _adamw_kernel(p, g, m, v, decay, b1, c1, b2, c2, sqrt_bias2, eps, step_size):
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i] * b1
        mi = mi + c1 * gi
        vi = v[i] * b2
        vi = vi + c2 * (gi * gi)
        m[i] = mi
        v[i] = vi
        denom = np.float32(math.sqrt(vi)) / sqrt_bias2 + eps
        p[i] = p[i] * decay - step_size * (mi / denom)


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _adamw_parallel(p, g, m, v, n_tasks, decay, b1, c1, b2, c2, sqrt_bias2, eps, step_size):
    n = p.shape[0]
    for t in prange(n_tasks):
        lo, hi = t * n // n_tasks, (t + 1) * n // n_tasks
        _adamw_kernel(p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], decay, b1, c1, b2, c2, sqrt_bias2, eps, step_size)


def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    """``reference.optim.adamw_update`` (in place on ``p``, ``m``, ``v``) in one pass (float32)."""
    flat = _flat_f32(p, m, v)
    if flat is None or not isinstance(g, np.ndarray) or g.dtype != _F32 or not _same_shape(p, g, m, v) or step < 1:
        return ref.adamw_update(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                weight_decay=weight_decay, step=step)
    pf, mf, vf = flat
    gf = np.ascontiguousarray(g).reshape(-1)
    f32 = np.float32
    # Multiplying by exactly 1 changes no float, so "no decay" needs no branch.
    decay = f32(1.0 - lr * weight_decay) if weight_decay else f32(1.0)
    args = (decay, f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2),
            f32(math.sqrt(1.0 - beta2**step)), f32(eps), f32(lr / (1.0 - beta1**step)))
    n_tasks = _tasks(pf.size)
    if n_tasks == 1:
        _adamw_kernel(pf, gf, mf, vf, *args)
    else:
        _adamw_parallel(pf, gf, mf, vf, n_tasks, *args)


# --- Lion ----------------------------------------------------------------------------------


@njit(cache=True, fastmath=False, error_model="numpy")
def _lion_kernel(p, g, m, decay, lr, b1, c1, b2, c2):
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for i in range(p.shape[0]):
        gi = g[i]
        mi = m[i]
        c = b1 * mi + c1 * gi
        # numpy's sign, as selects: +-1, +0 for +-0, NaN for NaN
        s = (one if c > zero else zero) - (one if c < zero else zero)
        s = c if c != c else s
        p[i] = p[i] * decay - lr * s
        mi = mi * b2
        m[i] = mi + c2 * gi


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _lion_parallel(p, g, m, n_tasks, decay, lr, b1, c1, b2, c2):
    n = p.shape[0]
    for t in prange(n_tasks):
        lo, hi = t * n // n_tasks, (t + 1) * n // n_tasks
        _lion_kernel(p[lo:hi], g[lo:hi], m[lo:hi], decay, lr, b1, c1, b2, c2)


def lion_update(p, g, m, *, lr, beta1, beta2, weight_decay):
    """``reference.optim.lion_update`` (in place on ``p`` and ``m``) in one pass (float32)."""
    flat = _flat_f32(p, m)
    if flat is None or not isinstance(g, np.ndarray) or g.dtype != _F32 or not _same_shape(p, g, m):
        return ref.lion_update(p, g, m, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
    pf, mf = flat
    gf = np.ascontiguousarray(g).reshape(-1)
    f32 = np.float32
    decay = f32(1.0 - lr * weight_decay) if weight_decay else f32(1.0)
    args = (decay, f32(lr), f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2))
    n_tasks = _tasks(pf.size)
    if n_tasks == 1:
        _lion_kernel(pf, gf, mf, *args)
    else:
        _lion_parallel(pf, gf, mf, n_tasks, *args)


# --- Muon momentum -------------------------------------------------------------------------


@njit(cache=True, fastmath=False, error_model="numpy")
def _muon_kernel(buf, g, u, beta, one_minus_beta, nesterov):
    for i in range(buf.shape[0]):
        gi = g[i]
        b = buf[i] + one_minus_beta * (gi - buf[i])
        buf[i] = b
        if nesterov:
            u[i] = gi + beta * (b - gi)


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _muon_parallel(buf, g, u, n_tasks, beta, one_minus_beta, nesterov):
    n = buf.shape[0]
    for t in prange(n_tasks):
        lo, hi = t * n // n_tasks, (t + 1) * n // n_tasks
        _muon_kernel(buf[lo:hi], g[lo:hi], u[lo:hi], beta, one_minus_beta, nesterov)


def muon_momentum(buf, g, *, beta, nesterov):
    """``reference.optim.muon_momentum`` in one pass (float32): updates ``buf`` in place and
    returns a new Nesterov array, or ``buf`` itself."""
    flat = _flat_f32(buf)
    if flat is None or not isinstance(g, np.ndarray) or g.dtype != _F32 or g.shape != buf.shape:
        return ref.muon_momentum(buf, g, beta=beta, nesterov=nesterov)
    (bf,) = flat
    gf = np.ascontiguousarray(g).reshape(-1)
    u = np.empty_like(buf) if nesterov else buf
    uf = u.reshape(-1)
    args = (np.float32(beta), np.float32(1.0 - beta), bool(nesterov))
    n_tasks = _tasks(bf.size)
    if n_tasks == 1:
        _muon_kernel(bf, gf, uf, *args)
    else:
        _muon_parallel(bf, gf, uf, n_tasks, *args)
    return u


# --- 8-bit Muon momentum -------------------------------------------------------------------


@njit(cache=True, fastmath=False, error_model="numpy")
def _muon8_block(q, g, u, b, s_old, beta, one_minus_beta, nesterov):
    """One block (slices of at most 256 elements, ``b`` a scratch slice of the same length):
    update ``q`` in place and return the new scale."""
    for i in range(q.shape[0]):
        gi = g[i]
        bi = np.float32(q[i]) * s_old
        bi = bi + one_minus_beta * (gi - bi)
        b[i] = bi
        u[i] = gi + beta * (bi - gi) if nesterov else bi
    # absmax through the bit patterns: for |b| they order like the floats, and an integer max
    # vectorises where a float one (NaN-ordered) does not
    bits = b.view(np.int32)
    top = np.int32(0)
    for i in range(bits.shape[0]):
        v = bits[i] & np.int32(0x7FFFFFFF)
        top = v if v > top else top
    zero = np.float32(0.0)
    s_new = _f32_from_bits(top) / np.float32(127.0)
    if s_new > zero:
        half = np.float32(0.5)
        one = np.float32(1.0)
        for i in range(q.shape[0]):
            r = b[i] / s_new
            a = abs(r)
            whole = np.floor(a)
            rounded = whole + (one if a - whole >= half else zero)  # half away from zero
            rounded = min(rounded, np.float32(127.0))  # |r| <= 127 up to the scale's rounding
            q[i] = np.int8(-rounded if r < zero else rounded)
    else:  # an all-zero block
        for i in range(q.shape[0]):
            q[i] = 0
    return s_new


@njit(cache=True, fastmath=False, error_model="numpy")
def _muon8_blocks(qbuf, scales, g, u, beta, one_minus_beta, nesterov):
    n = g.shape[0]
    scratch = np.empty(BLOCK, np.float32)
    for blk in range(scales.shape[0]):
        lo = blk * BLOCK
        hi = min(lo + BLOCK, n)
        scales[blk] = _muon8_block(qbuf[lo:hi], g[lo:hi], u[lo:hi], scratch[:hi - lo], scales[blk],
                                   beta, one_minus_beta, nesterov)


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _muon8_parallel(qbuf, scales, g, u, n_tasks, beta, one_minus_beta, nesterov):
    n_blocks = scales.shape[0]
    n = g.shape[0]
    for t in prange(n_tasks):
        b_lo, b_hi = t * n_blocks // n_tasks, (t + 1) * n_blocks // n_tasks
        lo, hi = b_lo * BLOCK, min(b_hi * BLOCK, n)
        _muon8_blocks(qbuf[lo:hi], scales[b_lo:b_hi], g[lo:hi], u[lo:hi], beta, one_minus_beta, nesterov)


def muon8_momentum(qbuf, scales, g, *, beta, nesterov):
    """``reference.optim.muon8_momentum`` one 256-element block at a time (float32 ``g``): the
    same int8 values and bit-identical scales and ``u``."""
    n = g.size
    ok = (isinstance(g, np.ndarray) and g.dtype == _F32
          and isinstance(qbuf, np.ndarray) and qbuf.dtype == np.int8 and qbuf.shape == (n,) and qbuf.flags.c_contiguous
          and isinstance(scales, np.ndarray) and scales.dtype == _F32 and scales.shape == (-(-n // BLOCK),)
          and scales.flags.c_contiguous)
    if not ok:
        return ref.muon8_momentum(qbuf, scales, g, beta=beta, nesterov=nesterov)
    gf = np.ascontiguousarray(g).reshape(-1)
    u = np.empty(n, np.float32)
    args = (np.float32(beta), np.float32(1.0 - beta), bool(nesterov))
    n_tasks = min(_tasks(n), scales.size)
    if n_tasks <= 1:
        _muon8_blocks(qbuf, scales, gf, u, *args)
    else:
        _muon8_parallel(qbuf, scales, gf, u, n_tasks, *args)
    return u.reshape(g.shape)


# --- Newton-Schulz -------------------------------------------------------------------------


@njit(cache=True, fastmath=False, error_model="numpy")
def _scale_add_flat(a, b, alpha, beta):
    """``b = alpha * a + beta * b`` over flat arrays, in place, one pass."""
    for i in range(b.shape[0]):
        b[i] = alpha * a[i] + beta * b[i]


def _scale_add(a, b, alpha, beta):
    _scale_add_flat(a.reshape(-1), b.reshape(-1), np.float32(alpha), np.float32(beta))


def newton_schulz(u, steps=5, coefficients=None):
    """``reference.optim.newton_schulz`` for float32 matrices with fewer flops and no
    temporaries (``reference.optim.newton_schulz_buffered``); other inputs run the reference."""
    if not isinstance(u, np.ndarray) or u.dtype != _F32 or u.ndim != 2 or (
            coefficients is not None and len(coefficients) == 0) or u.size == 0:
        return ref.newton_schulz(u, steps=steps, coefficients=coefficients)
    return ref.newton_schulz_buffered(u, steps, coefficients, _scale_add, gemm.matmul)


OPS = {
    "adamw_update": adamw_update,
    "lion_update": lion_update,
    "muon_momentum": muon_momentum,
    "muon8_momentum": muon8_momentum,
    "newton_schulz": newton_schulz,
}
