"""Optimizers (SPEC section 4): AdamW, Lion, Muon, 8-bit Muon, GaLore 2, clipping, schedule.

Two layers:

1. **Kernels** (in ``OPS``, overridable by a backend, written against ``xp``): the per-tensor
   arithmetic of one step, updating state arrays in place.

   - ``adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step)``
   - ``lion_update(p, g, m, *, lr, beta1, beta2, weight_decay)``
   - ``muon_momentum(buf, g, *, beta, nesterov) -> u``
   - ``muon8_momentum(qbuf, scales, g, *, beta, nesterov) -> u``
   - ``newton_schulz(u, steps=5, coefficients=None) -> X``
   - ``galore_projector(g, rank, side, *, oversample=8, power_iters=2, seed=0) -> P``
   - ``galore_project(g, P, side) -> low``; ``galore_project_back(low, P, side) -> full``
   - ``global_grad_norm(grads) -> float``; ``clip_by_global_norm(grads, max_norm) -> float``

2. **Optimizer classes** over parameters (objects with ``.data`` and ``.grad`` arrays, such as
   autograd ``Tensor``s). They call the kernels through a ``kernels`` namespace (default: the
   reference; pass a backend to run its accelerated kernels without changing the class).

State and checkpoints. Every optimizer keeps one dict of arrays per parameter, created at
the parameter's first step. ``state_dict()`` flattens them to ``"<param index>.<name>"``:

- all: ``i.step`` (0-d int64, steps taken by parameter ``i``)
- AdamW: ``i.m``, ``i.v``; Lion: ``i.m``
- Muon: ``i.buf`` (float) or, 8-bit and >= 4096 elements, ``i.qbuf`` (int8 ``[n]``) and
  ``i.scales`` (float32 ``[ceil(n / 256)]``)
- GaLore on an eligible matrix: ``i.P`` plus the inner optimizer's names at the projected
  shape; elsewhere the inner optimizer's names at full shape.

The arrays returned are host (NumPy) copies, ready for ``safetensors.numpy.save``;
``load_state_dict`` restores them bit-exactly (same dtypes, same values), so N steps in one go
and N/2 + save + load + N/2 give identical parameters.
"""
from __future__ import annotations

import math
import types

import numpy as np

from .autograd import array_module
from .schedule import wsd_lr
from .ternary import round_half_away

QUANT_BLOCK = 256  # 8-bit Muon: elements per absmax block
EIGHTBIT_MIN_SIZE = 4096  # 8-bit Muon: smaller tensors keep a float32 buffer
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz (Keller Jordan's Muon)
NS_EPS = 1e-7

# Polar Express, degree 5 (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932, Algorithm 1):
# the published per-step (a, b, c), each divided by (1.01, 1.01**3, 1.01**5) as the paper
# does for all but the last, which repeats for any further steps. The paper also divides the
# input by 1.01 * ||G||_F to absorb bfloat16 rounding of the norm; we keep SPEC's
# ||u||_F + 1e-7 for every coefficient set since the norm is computed in float32/64 here.
_POLAR_EXPRESS_PUBLISHED = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_COEFFICIENTS = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_PUBLISHED[:-1]
) + (_POLAR_EXPRESS_PUBLISHED[-1],)

ADJUST_LR_MODES = ("original", "match_rms_adamw")
GALORE_INNER = ("muon", "adamw")


# ----------------------------------------------------------------------------- helpers

def _check_same_shape(op, **arrays):
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{op}: arrays must have the same shape, got {shapes}")


def _num_blocks(n):
    return -(-n // QUANT_BLOCK)


def _blockwise_absmax(x, xp):
    """Max |x| over each block of 256 consecutive elements of flat ``x`` (last block may be partial)."""
    n = x.shape[0]
    padded = xp.zeros(_num_blocks(n) * QUANT_BLOCK, dtype=x.dtype)
    padded[:n] = xp.abs(x)  # zero padding never raises a block's max
    return padded.reshape(-1, QUANT_BLOCK).max(axis=1)


def muon_adjust(shape, mode="original"):
    """Muon's learning-rate factor for a ``[rows, cols]`` matrix (``torch.optim.Muon`` semantics)."""
    rows, cols = shape
    if mode == "original":
        return math.sqrt(max(1.0, rows / cols))
    if mode == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR_MODES}, got {mode!r}")


def galore_side(shape):
    """Which side GaLore projects: ``"left"`` (P ``[rows, r]``) when rows <= cols, else ``"right"``."""
    rows, cols = shape
    return "left" if rows <= cols else "right"


def galore_low_shape(shape, rank):
    """Shape of the projected gradient of a ``[rows, cols]`` matrix."""
    rows, cols = shape
    return (rank, cols) if galore_side(shape) == "left" else (rows, rank)


# ----------------------------------------------------------------------------- kernels

def adamw_update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step in place on ``p``, ``m``, ``v`` (all the same shape; ``g`` is read only).

    ``step`` is the 1-based count of this update (for the bias corrections). Decoupled weight
    decay, as ``torch.optim.AdamW``::

        p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)
    """
    _check_same_shape("adamw_update", p=p, g=g, m=m, v=v)
    if step < 1:
        raise ValueError(f"adamw_update: step is 1-based, got {step}")
    xp = array_module(p)
    if weight_decay:
        p *= 1.0 - lr * weight_decay
    m *= beta1
    m += (1.0 - beta1) * g
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    denom = xp.sqrt(v) / math.sqrt(bias2) + eps
    p -= (lr / bias1) * (m / denom)


def lion_update(p, g, m, *, lr, beta1, beta2, weight_decay):
    """One Lion step in place on ``p`` and ``m`` (Chen et al. 2023)::

        p *= 1 - lr * wd;  p -= lr * sign(b1 m + (1 - b1) g);  m = b2 m + (1 - b2) g
    """
    _check_same_shape("lion_update", p=p, g=g, m=m)
    xp = array_module(p)
    if weight_decay:
        p *= 1.0 - lr * weight_decay
    p -= lr * xp.sign(beta1 * m + (1.0 - beta1) * g)
    m *= beta2
    m += (1.0 - beta2) * g


def muon_momentum(buf, g, *, beta, nesterov):
    """Muon momentum in place on ``buf``; returns the update ``u`` to orthogonalise.

    ``buf = lerp(buf, g, 1 - beta)``; ``u = lerp(g, buf, beta)`` (Nesterov, a new array) or
    ``buf`` itself, with ``lerp(a, b, t) = a + t (b - a)``.
    """
    _check_same_shape("muon_momentum", buf=buf, g=g)
    buf += (1.0 - beta) * (g - buf)
    if nesterov:
        return g + beta * (buf - g)
    return buf


def muon8_momentum(qbuf, scales, g, *, beta, nesterov):
    """8-bit Muon momentum: dequantize, update, requantize in place; returns ``u`` (float, g's shape).

    ``qbuf`` int8 ``[n]`` (n = g.size, g flattened in C order) and ``scales`` float32
    ``[ceil(n / 256)]`` hold the buffer as ``q * scale`` per block of 256 elements (the last
    block may be partial). After the float update (as ``muon_momentum``, in
    ``result_type(g, float32)``) each block is requantized with ``scale = float32(absmax / 127)``
    and ``q = clip(round_half_away(buf / scale), -127, 127)`` (SPEC section 2's rounding, from
    ``ternary``); an all-zero block gets ``scale = 0, q = 0``. ``u`` is computed from the
    unquantized updated buffer. Callers keep non-finite gradients out (the trainer skips
    such steps): a NaN would make its block's scale NaN.
    """
    n = g.size
    if qbuf.dtype != np.int8 or qbuf.shape != (n,):
        raise ValueError(f"muon8_momentum: qbuf must be int8 of shape ({n},), got {qbuf.dtype} {qbuf.shape}")
    if scales.dtype != np.float32 or scales.shape != (_num_blocks(n),):
        raise ValueError(
            f"muon8_momentum: scales must be float32 of shape ({_num_blocks(n)},) for {n} elements, "
            f"got {scales.dtype} {scales.shape}"
        )
    xp = array_module(g)
    work = np.result_type(g.dtype, np.float32)
    gf = g.reshape(-1).astype(work, copy=False)

    buf = qbuf.astype(work) * xp.repeat(scales.astype(work), QUANT_BLOCK)[:n]
    buf += (1.0 - beta) * (gf - buf)
    u = gf + beta * (buf - gf) if nesterov else buf

    new_scales = (_blockwise_absmax(buf, xp) / 127).astype(np.float32)
    per_element = xp.repeat(new_scales, QUANT_BLOCK)[:n].astype(work)
    nonzero = per_element > 0
    ratio = xp.where(nonzero, buf / xp.where(nonzero, per_element, 1), 0)
    qbuf[...] = xp.clip(round_half_away(ratio), -127, 127).astype(np.int8)
    scales[...] = new_scales
    return u.reshape(g.shape)


def newton_schulz(u, steps=5, coefficients=None):
    """Approximate polar factor of a matrix by quintic Newton-Schulz (SPEC section 4).

    ``X = u / (||u||_F + 1e-7)``; transpose if rows > cols; ``steps`` times
    ``A = X X^T; X = a X + (b A + c A A) X``; transpose back. ``(a, b, c)`` is
    ``NS_COEFFICIENTS`` at every step, or ``coefficients[i]`` at step ``i`` (the last entry
    repeats when ``steps`` exceeds the list, e.g. ``POLAR_EXPRESS_COEFFICIENTS``). Computes in
    ``u``'s dtype; returns a new array of ``u``'s shape.
    """
    if u.ndim != 2:
        raise ValueError(f"newton_schulz: expects a 2-D matrix, got shape {tuple(u.shape)}")
    if u.dtype.kind != "f":
        raise ValueError(f"newton_schulz: expects a float matrix, got {u.dtype}")
    if coefficients is not None and len(coefficients) == 0:
        raise ValueError("newton_schulz: coefficients must list at least one (a, b, c)")
    xp = array_module(u)
    x = u / (xp.linalg.norm(u) + NS_EPS)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for i in range(steps):
        a, b, c = NS_COEFFICIENTS if coefficients is None else coefficients[min(i, len(coefficients) - 1)]
        gram = x @ x.T
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return xp.ascontiguousarray(x.T if transposed else x)


def newton_schulz_buffered(u, steps, coefficients, scale_add, matmul=None):
    """``newton_schulz`` for a float32 matrix as the numba and cupy backends run it: the
    products go into buffers allocated once (``xp.matmul(..., out=)``) and each step's two
    combinations into ``scale_add(a, b, alpha, beta)``, which sets ``b = alpha a + beta b`` in
    place and may overwrite ``a`` (the step no longer needs it).

    Wide ``X [m, n]`` (m <= n): ``A = X X^T``, ``B = b A + c A A^T``, ``X <- a X + B X``; tall
    ones use ``A = X^T X`` and ``X <- a X + X B``, the same iteration on ``X^T`` without
    transposing. ``a X`` is added after the product, not folded into ``B`` as ``a I``: folding
    costs float32 accuracy on matrices with decaying spectra (measured: twice the reference's
    error). ``A A^T`` rather than ``A A`` (A is symmetric) lets BLAS use syrk. ``matmul(a, b,
    out=)`` runs the products (default ``xp.matmul``; the numba backend passes its threaded
    one, which keeps numpy's syrk for a product of a matrix with its own transpose).
    """
    xp = array_module(u)
    matmul = xp.matmul if matmul is None else matmul
    x = xp.empty(u.shape, dtype=np.float32)
    xp.divide(u, xp.linalg.norm(u) + np.float32(NS_EPS), out=x)  # the norm stays on the device
    wide = x.shape[0] <= x.shape[1]
    k = min(x.shape)
    y = xp.empty_like(x)
    gram = xp.empty((k, k), dtype=np.float32)
    mix = xp.empty_like(gram)
    for i in range(steps):
        a, b, c = NS_COEFFICIENTS if coefficients is None else coefficients[min(i, len(coefficients) - 1)]
        if wide:
            matmul(x, x.T, out=gram)
        else:
            matmul(x.T, x, out=gram)
        matmul(gram, gram.T, out=mix)
        scale_add(gram, mix, b, c)  # B = b A + c A A
        if wide:
            matmul(mix, x, out=y)
        else:
            matmul(x, mix, out=y)
        scale_add(x, y, a, 1.0)  # X' = a X + B X
        x, y = y, x
    return x


def galore_projector(g, rank, side, *, oversample=8, power_iters=2, seed=0):
    """GaLore projector: the top-``rank`` singular subspace of ``g`` by randomized SVD.

    ``side="left"``: ``P`` ``[rows, rank]`` spans the leading left singular vectors;
    ``"right"``: ``P`` ``[cols, rank]`` the leading right ones. Halko-Martinsson-Tropp range
    finder with ``rank + oversample`` Gaussian probes (drawn on the host from
    ``np.random.default_rng(seed)``, so any backend reproduces them) and ``power_iters``
    re-orthonormalised power iterations. Columns of ``P`` are orthonormal; dtype follows ``g``.
    """
    if g.ndim != 2:
        raise ValueError(f"galore_projector: expects a 2-D gradient, got shape {tuple(g.shape)}")
    if side not in ("left", "right"):
        raise ValueError(f"galore_projector: side must be 'left' or 'right', got {side!r}")
    mat = g if side == "left" else g.T
    dim, other = mat.shape
    if not 1 <= rank <= min(dim, other):
        raise ValueError(f"galore_projector: rank must lie in [1, {min(dim, other)}] for shape {tuple(g.shape)}, got {rank}")
    xp = array_module(g)
    probes = min(rank + oversample, dim, other)
    omega = np.random.default_rng(seed).standard_normal((other, probes))
    q, _ = xp.linalg.qr(mat @ xp.asarray(omega, dtype=g.dtype))
    for _ in range(power_iters):
        z, _ = xp.linalg.qr(mat.T @ q)
        q, _ = xp.linalg.qr(mat @ z)
    small_u, _, _ = xp.linalg.svd(q.T @ mat, full_matrices=False)
    return xp.ascontiguousarray(q @ small_u[:, :rank])


def galore_project(g, P, side):
    """Project a ``[rows, cols]`` gradient: ``P^T g`` (left, P ``[rows, r]``) or ``g P`` (right, P ``[cols, r]``)."""
    if side == "left":
        return P.T @ g
    if side == "right":
        return g @ P
    raise ValueError(f"galore_project: side must be 'left' or 'right', got {side!r}")


def galore_project_back(low, P, side):
    """Back to full size: ``P low`` (left) or ``low P^T`` (right)."""
    if side == "left":
        return P @ low
    if side == "right":
        return low @ P.T
    raise ValueError(f"galore_project_back: side must be 'left' or 'right', got {side!r}")


def global_grad_norm(grads):
    """L2 norm over all arrays in ``grads`` (``None`` entries skipped), accumulated in float64.

    The per-array sums stay on the arrays' device; only the total is read back (one device
    sync per call rather than one per parameter)."""
    sums = [array_module(g).sum(g * g, dtype=np.float64) for g in grads if g is not None]
    if not sums:
        return 0.0
    xp = array_module(sums[0])
    return math.sqrt(float(xp.stack(sums).sum()))


def clip_by_global_norm(grads, max_norm):
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``; returns the norm before.

    As ``torch.nn.utils.clip_grad_norm_``: the factor is ``max_norm / (norm + 1e-6)``, applied
    only when below 1. A non-finite norm leaves the gradients untouched (the caller skips the step).
    """
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm}")
    norm = global_grad_norm(grads)
    factor = max_norm / (norm + 1e-6)
    if math.isfinite(norm) and factor < 1.0:
        for g in grads:
            if g is not None:
                g *= factor
    return norm


OPS = {
    "adamw_update": adamw_update,
    "lion_update": lion_update,
    "muon_momentum": muon_momentum,
    "muon8_momentum": muon8_momentum,
    "newton_schulz": newton_schulz,
    "galore_projector": galore_projector,
    "galore_project": galore_project,
    "galore_project_back": galore_project_back,
    "global_grad_norm": global_grad_norm,
    "clip_by_global_norm": clip_by_global_norm,
}

REFERENCE_KERNELS = types.SimpleNamespace(**OPS)


# ----------------------------------------------------------------------------- optimizers

def _to_host(a):
    return a.get() if hasattr(a, "get") else np.array(a, copy=True)


class Optimizer:
    """Shared machinery: per-parameter state dicts, ``step``, ``zero_grad``, state (de)serialisation.

    Subclasses define ``_state_spec(shape, dtype) -> {name: (shape, dtype)}`` (the arrays one
    parameter needs besides ``step``) and ``_step_param(index, p, g, state)``.
    """

    def __init__(self, params, lr, kernels=None):
        self.params = list(params)
        for i, p in enumerate(self.params):
            if not (hasattr(p, "data") and hasattr(p, "grad")):
                raise ValueError(f"parameter {i} has no .data/.grad (got {type(p).__name__})")
            if p.data.dtype.kind != "f":
                raise ValueError(f"parameter {i} must be a float array, got {p.data.dtype}")
        self.lr = lr
        self.kernels = REFERENCE_KERNELS if kernels is None else kernels
        self.state = [{} for _ in self.params]

    def kernel(self, name):
        """The kernel ``name`` from ``self.kernels``, or the reference one when it lacks it."""
        return getattr(self.kernels, name, None) or OPS[name]

    # -- stepping
    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        """Update every parameter that has a gradient (parameters with ``grad is None`` are skipped)."""
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if g.shape != p.data.shape:
                raise ValueError(f"parameter {i}: gradient shape {tuple(g.shape)} != parameter shape {tuple(p.data.shape)}")
            state = self.state[i]
            if not state:
                state.update(self._zeros(i))
            state["step"][...] = state["step"] + 1
            self._step_param(i, p.data, g, state)

    def _zeros(self, index):
        p = self.params[index].data
        xp = array_module(p)
        state = {"step": np.zeros((), dtype=np.int64)}
        for name, (shape, dtype) in self._param_spec(index).items():
            state[name] = xp.zeros(shape, dtype=dtype)
        return state

    def _param_spec(self, index):
        p = self.params[index].data
        return self._state_spec(tuple(p.shape), p.dtype)

    # -- state
    def state_nbytes(self):
        """Bytes held by all state arrays, measured from the arrays themselves."""
        return sum(int(a.nbytes) for state in self.state for a in state.values())

    def state_dict(self):
        """Flat ``{"<index>.<name>": host array}`` of every parameter's state (copies)."""
        return {f"{i}.{name}": _to_host(a) for i, state in enumerate(self.state) for name, a in state.items()}

    def load_state_dict(self, flat):
        """Restore state saved by ``state_dict`` bit-exactly.

        Rejects (ValueError, naming the key) unknown keys, a parameter with missing or extra
        arrays, a wrong shape or dtype, and non-finite values. Parameters absent from ``flat``
        start fresh. Nothing is changed unless every array passes.
        """
        grouped = {}
        for key, value in flat.items():
            index, _, name = key.partition(".")
            if not index.isdigit() or int(index) >= len(self.params) or not name:
                raise ValueError(f"optimizer state key {key!r} does not name one of {len(self.params)} parameters")
            grouped.setdefault(int(index), {})[name] = value
        restored = [{} for _ in self.params]
        for index, arrays in grouped.items():
            spec = {"step": ((), np.dtype(np.int64)), **self._param_spec(index)}
            if set(arrays) != set(spec):
                raise ValueError(
                    f"optimizer state of parameter {index} has arrays {sorted(arrays)}, expected {sorted(spec)}"
                )
            xp = array_module(self.params[index].data)
            for name, (shape, dtype) in spec.items():
                a = arrays[name]
                if tuple(a.shape) != tuple(shape) or np.dtype(a.dtype) != np.dtype(dtype):
                    raise ValueError(
                        f"optimizer state {index}.{name}: expected {np.dtype(dtype)} {tuple(shape)}, "
                        f"got {np.dtype(a.dtype)} {tuple(a.shape)}"
                    )
                if np.dtype(dtype).kind == "f" and not bool(array_module(a).isfinite(a).all()):
                    raise ValueError(f"optimizer state {index}.{name} contains NaN or Inf values")
                if name == "step":
                    restored[index][name] = np.array(a, dtype=np.int64, copy=True)
                else:
                    restored[index][name] = xp.array(a, dtype=dtype, copy=True)
        self.state = restored


class AdamW(Optimizer):
    """AdamW with decoupled weight decay (SPEC: betas (0.9, 0.95), eps 1e-8)."""

    def __init__(self, params, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, kernels=None):
        super().__init__(params, lr, kernels)
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay

    def _state_spec(self, shape, dtype):
        return {"m": (shape, dtype), "v": (shape, dtype)}

    def _step_param(self, index, p, g, state):
        self.kernel("adamw_update")(
            p, g, state["m"], state["v"], lr=self.lr, beta1=self.betas[0], beta2=self.betas[1],
            eps=self.eps, weight_decay=self.weight_decay, step=int(state["step"]),
        )

    def _direction(self, g, state, full_shape):
        """The step ``d`` with ``p_new = p (1 - lr wd) + lr d``, from ``g`` at any shape (GaLore)."""
        xp = array_module(g)
        d = xp.zeros_like(g)  # the kernel's unit-lr, no-decay update of a zero parameter is d
        self.kernel("adamw_update")(
            d, g, state["m"], state["v"], lr=1.0, beta1=self.betas[0], beta2=self.betas[1],
            eps=self.eps, weight_decay=0.0, step=int(state["step"]),
        )
        return d


class Lion(Optimizer):
    """Lion (sign of interpolated momentum), betas (0.9, 0.99)."""

    def __init__(self, params, lr, betas=(0.9, 0.99), weight_decay=0.0, kernels=None):
        super().__init__(params, lr, kernels)
        self.betas = tuple(betas)
        self.weight_decay = weight_decay

    def _state_spec(self, shape, dtype):
        return {"m": (shape, dtype)}

    def _step_param(self, index, p, g, state):
        self.kernel("lion_update")(
            p, g, state["m"], lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay
        )


class Muon(Optimizer):
    """Muon for 2-D weights (``torch.optim.Muon`` semantics, SPEC section 4).

    Per step: momentum (float, or int8 blockwise when ``eightbit`` and the tensor has >= 4096
    elements), orthogonalisation ``X = newton_schulz(u)``, then ``w *= 1 - lr wd;
    w -= lr * adjust * X``. ``polar_express`` swaps the fixed quintic for the Polar Express
    per-step coefficients.
    """

    def __init__(self, params, lr, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                 adjust_lr="original", polar_express=False, eightbit=False, kernels=None):
        super().__init__(params, lr, kernels)
        for i, p in enumerate(self.params):
            if p.data.ndim != 2:
                raise ValueError(f"Muon updates 2-D matrices only; parameter {i} has shape {tuple(p.data.shape)}")
        muon_adjust((1, 1), adjust_lr)  # validates the mode
        self.momentum = momentum
        self.nesterov = nesterov
        self.ns_steps = ns_steps
        self.weight_decay = weight_decay
        self.adjust_lr = adjust_lr
        self.eightbit = eightbit
        self.coefficients = POLAR_EXPRESS_COEFFICIENTS if polar_express else None

    def _state_spec(self, shape, dtype):
        n = math.prod(shape)
        if self.eightbit and n >= EIGHTBIT_MIN_SIZE:
            return {"qbuf": ((n,), np.dtype(np.int8)), "scales": ((_num_blocks(n),), np.dtype(np.float32))}
        return {"buf": (shape, dtype)}

    def _orthogonalized(self, g, state):
        """Momentum update of ``state`` from ``g`` (any 2-D shape), then Newton-Schulz."""
        if "qbuf" in state:
            u = self.kernel("muon8_momentum")(
                state["qbuf"], state["scales"], g, beta=self.momentum, nesterov=self.nesterov
            )
            u = u.astype(g.dtype, copy=False)
        else:
            u = self.kernel("muon_momentum")(state["buf"], g, beta=self.momentum, nesterov=self.nesterov)
        return self.kernel("newton_schulz")(u, steps=self.ns_steps, coefficients=self.coefficients)

    def _direction(self, g, state, full_shape):
        """The step ``d`` with ``p_new = p (1 - lr wd) + lr d`` (GaLore): ``-adjust(full_shape) X``."""
        return (-muon_adjust(full_shape, self.adjust_lr)) * self._orthogonalized(g, state)

    def _step_param(self, index, p, g, state):
        x = self._orthogonalized(g, state)
        if self.weight_decay:
            p *= 1.0 - self.lr * self.weight_decay
        p -= (self.lr * muon_adjust(p.shape, self.adjust_lr)) * x


class GaLore(Optimizer):
    """GaLore 2: Muon or AdamW whose state lives in a low-rank projection of each large gradient.

    For a matrix with ``min(rows, cols) >= min_dim``, the projector ``P`` (``[rows, r]`` when
    rows <= cols, else ``[cols, r]``; ``r = min(rank, rows, cols)``) is a randomized SVD of the
    gradient, computed at the matrix's first step and then every ``update_freq`` steps with
    probes seeded by ``(seed, index, step)`` (so resuming needs no RNG state). The inner
    optimizer runs on the projected gradient; its direction is projected back and multiplied by
    ``scale`` (default 0.25, the GaLore paper's alpha). Weight decay stays decoupled on the full
    weight, and Muon's ``adjust`` uses the full matrix shape, so with ``r = min(rows, cols)``
    and no refresh in between GaLore(Muon) equals Muon at ``scale = 1``.

    On a refresh the inner state is kept as it is (as in the original GaLore): moments
    expressed in the old basis continue in the new one; with a slowly turning subspace the
    mismatch decays with the momentum. Other parameters use the inner optimizer at full size.
    ``inner_options`` go to the inner optimizer (``momentum``, ``eightbit``, ``betas``, ...).
    """

    def __init__(self, params, lr, inner="muon", rank=128, update_freq=200, scale=0.25, min_dim=256,
                 oversample=8, power_iters=2, seed=0, weight_decay=0.0, kernels=None, projector_dtype=None,
                 **inner_options):
        super().__init__(params, lr, kernels)
        if inner not in GALORE_INNER:
            raise ValueError(f"GaLore inner optimizer must be one of {GALORE_INNER}, got {inner!r}")
        if rank < 1 or update_freq < 1 or min_dim < 1:
            raise ValueError(
                f"GaLore needs rank, update_freq and min_dim >= 1, got {rank}, {update_freq}, {min_dim}"
            )
        inner_cls = Muon if inner == "muon" else AdamW
        # The inner instance validates the parameters and supplies the update rule; its own
        # per-parameter state stays unused (the state lives here, at the projected shape).
        self.inner = inner_cls(self.params, lr, weight_decay=weight_decay, kernels=kernels, **inner_options)
        self.inner_name = inner
        self.rank = rank
        self.update_freq = update_freq
        self.scale = scale
        self.min_dim = min_dim
        self.oversample = oversample
        self.power_iters = power_iters
        self.seed = seed
        self.weight_decay = weight_decay
        # Storing P in float16 halves the projector's share of the state; it is an orthonormal
        # basis refreshed every update_freq steps, so fp16's 11-bit mantissa is ample.
        self.projector_dtype = None if projector_dtype is None else np.dtype(projector_dtype)

    def projects(self, shape):
        """Whether a parameter of this shape is projected."""
        return len(shape) == 2 and min(shape) >= self.min_dim

    def _rank_for(self, shape):
        return min(self.rank, *shape)

    def _state_spec(self, shape, dtype):
        if not self.projects(shape):
            return self.inner._state_spec(shape, dtype)
        r = self._rank_for(shape)
        side_dim = shape[0] if galore_side(shape) == "left" else shape[1]
        p_dtype = dtype if self.projector_dtype is None else self.projector_dtype
        return {"P": ((side_dim, r), p_dtype), **self.inner._state_spec(galore_low_shape(shape, r), dtype)}

    def _step_param(self, index, p, g, state):
        self.inner.lr = self.lr
        if "P" not in state:
            self.inner._step_param(index, p, g, state)
            return
        shape = tuple(p.shape)
        side = galore_side(shape)
        t = int(state["step"]) - 1  # 0-based step of this parameter
        if t % self.update_freq == 0:
            state["P"][...] = self.kernel("galore_projector")(
                g, self._rank_for(shape), side, oversample=self.oversample,
                power_iters=self.power_iters, seed=(self.seed, index, t),
            )
        P = state["P"] if state["P"].dtype == g.dtype else state["P"].astype(g.dtype)
        low = self.kernel("galore_project")(g, P, side)
        d = self.inner._direction(low, state, shape)
        full = self.kernel("galore_project_back")(d, P, side)
        if self.weight_decay:
            p *= 1.0 - self.lr * self.weight_decay
        p += (self.lr * self.scale) * full


__all__ = [
    "OPS", "REFERENCE_KERNELS", "POLAR_EXPRESS_COEFFICIENTS", "NS_COEFFICIENTS", "QUANT_BLOCK",
    "EIGHTBIT_MIN_SIZE", "adamw_update", "lion_update", "muon_momentum", "muon8_momentum",
    "newton_schulz", "newton_schulz_buffered", "galore_projector", "galore_project", "galore_project_back", "global_grad_norm",
    "clip_by_global_norm", "muon_adjust", "galore_side", "galore_low_shape", "Optimizer", "AdamW",
    "Lion", "Muon", "GaLore", "wsd_lr",
]
