"""mHC residual streams (SPEC section 3): static and dynamic (mHC-lite) coefficients.

With ``n_streams = n > 1`` the residual state of every token is ``X [n, C]``. Around each
sub-layer ``F`` (attention or FFN, including its pre-norm):

    u  = sum_s h_pre[s] * X[s]                 mhc_pre
    y  = F(u)
    X' = H_res @ (X + h_post (outer) y)        mhc_post  (residual first, then mix)

The model expands the embedding into every stream at the entry (``mhc_expand``) and takes
the mean over streams before the final norm (``mhc_collapse``).

Ops (each a ``Function`` with forward and backward side by side, each an ``OPS`` entry that a
backend may override; every array argument may be a ``Tensor``):

``mhc_static_coeffs(res_logits, pre_logits, pre_bias, post_logits, post_bias)``
    ``-> (H_res [n, n], h_pre [n], h_post [n])``. ``res_logits`` is ``[1]`` for n = 2 (the
    ``alpha_logit``) and ``[24]`` for n = 4; the four others are ``[n]``.
``mhc_dynamic_coeffs(X, dyn_weight, dyn_gate, res_logits, pre_logits, pre_bias, post_logits,
post_bias, eps=1e-6)``
    mHC-lite: per token, ``logits = base + dyn_gate * (dyn_weight @ rmsnorm(flatten(X)))`` where
    ``base = concat(res_logits, pre_logits + pre_bias, post_logits + post_bias)`` (the static
    logits) and the RMSNorm has no weight (``dyn_weight`` absorbs it). ``X [..., n, C]``,
    ``dyn_weight [R + 2n, n*C]`` (rows: R residual logits, then n pre, then n post),
    ``dyn_gate [1]``. Returns ``(H_res [..., n, n], h_pre [..., n], h_post [..., n])``.
    At ``dyn_gate = 0`` it equals ``mhc_static_coeffs`` for every token.
``mhc_pre(X [..., n, C], h_pre [n] or [..., n]) -> u [..., C]``
``mhc_post(X [..., n, C], y [..., C], H_res [n, n] or [..., n, n], h_post [n] or [..., n])``
    ``-> X' [..., n, C]``.
``mhc_expand(x [..., C], n) -> [..., n, C]`` (copies), ``mhc_collapse(X [..., n, C]) -> [..., C]``
    (mean over streams).
``composite_gain(list of H_res) -> float`` (diagnostic, no gradient): for the product
    ``H_L ... H_2 H_1``, the larger of the largest absolute row sum and the largest absolute
    column sum; per-token ``[..., n, n]`` inputs give the maximum over tokens. Computed in
    float64 so that it measures the coefficients, not the product's rounding.

Leading dimensions ``...`` are any token batch shape (``[T]`` or ``[B, T]``); per-token
coefficients carry the same leading dimensions as ``X``, shared (static) ones have none.

Coefficients: ``h_pre = sigmoid(pre)``, ``h_post = n * sigmoid(post)``; for n = 2
``H_res = a I + (1 - a) Swap`` with ``a = sigmoid(alpha_logit)``; for n = 4
``H_res = sum_k softmax(res_logits)_k P_k`` over ``itertools.permutations(range(4))`` in
lexicographic order (``k = 0`` is the identity), ``P_k[i, perm_k[i]] = 1``. Both are convex
combinations of permutation matrices, hence exactly doubly stochastic (no Sinkhorn).

Parameters of one sub-layer (``mhc_init_params``; all train with AdamW, SPEC section 4):

    name          n = 2          n = 4         mode
    alpha_logit   [1]            -             static, dynamic
    res_logits    -              [24]          static, dynamic
    pre_logits    [2]            [4]           static, dynamic
    pre_bias      [2]            [4]           static, dynamic
    post_logits   [2]            [4]           static, dynamic
    post_bias     [2]            [4]           static, dynamic
    dyn_weight    [5, 2C]        [32, 4C]      dynamic
    dyn_gate      [1]            [1]           dynamic

The static names and order are those of an ``.mhc`` record (``nanochat.io.mhc``).

Initialisation breaks stream symmetry. ``mhc_expand`` copies the embedding into every stream,
so if every sub-layer also read and wrote all streams alike, the streams would stay identical
forever and ``H_res`` would get exactly zero gradient (it mixes equal rows). Sub-layer ``l``
(counted ``blk0.attn, blk0.ffn, blk1.attn, ...``) has a target stream ``l mod n``:

- ``h_pre`` is nearly one-hot on the target (``sigmoid(+3) = 0.95``, others ``sigmoid(-3)``),
  as Hyper-Connections reads one stream per layer;
- ``h_post`` writes 1 + (n-1)/2 to the target and 1/2 to the others. This is what makes the
  streams differ; ``sum_s h_post[s] = n`` keeps the mean over streams (what ``mhc_collapse``
  returns, and what a doubly stochastic ``H_res`` preserves) exactly a plain residual update;
- ``H_res`` is near the identity (weight 0.98 on the identity permutation);
- dynamic mode: ``dyn_weight ~ N(0, 1/(n C))`` (unit-scale projections of the unit-RMS input),
  ``dyn_gate = 0.01``. ``dyn_weight`` must not start at zero or ``dyn_gate`` gets no gradient.

The logit part (``pre_logits``, ``post_logits``) starts at zero and the pattern sits in the
biases; in static mode only their sum matters.

One gradient is zero by construction, whatever the init: the model's last sub-layer mixes its
streams with ``H_res`` right before ``mhc_collapse``, and the mean over streams is the same for
every doubly stochastic ``H_res`` (its columns sum to 1). So that sub-layer's residual logits
(and, in dynamic mode, the first R rows of its ``dyn_weight``) never change the output. Every
other mHC parameter gets a gradient from the first step (tested).

``n_streams = 1`` is a plain pre-norm residual ``x + F(norm(x))``: the model bypasses mHC and
``mhc_init_params(1, ...)`` returns no parameters. ``mhc_pre``/``mhc_post``/``mhc_expand``/
``mhc_collapse`` accept n = 1 and, with ``h_pre = h_post = [1]`` and ``H_res = [[1]]``, give
exactly ``X + y``; the coefficient ops need n = 2 or 4.
"""
from __future__ import annotations

import itertools

import numpy as np

from .autograd import Function, Tensor, array_module

SUPPORTED_STREAMS = (2, 4)
RES_NAME = {2: "alpha_logit", 4: "res_logits"}
RES_SIZE = {2: 1, 4: 24}
STATIC_PARAM_NAMES = {
    n: (RES_NAME[n], "pre_logits", "pre_bias", "post_logits", "post_bias") for n in SUPPORTED_STREAMS
}
DYNAMIC_PARAM_NAMES = {n: STATIC_PARAM_NAMES[n] + ("dyn_weight", "dyn_gate") for n in SUPPORTED_STREAMS}

PERMUTATIONS_4 = tuple(itertools.permutations(range(4)))


def _permutation_basis(n):
    """Float64 ``[K, n*n]``: row k is the flattened permutation matrix mixed by weight k."""
    perms = ((0, 1), (1, 0)) if n == 2 else PERMUTATIONS_4
    basis = np.zeros((len(perms), n, n))
    for k, perm in enumerate(perms):
        basis[k, np.arange(n), perm] = 1.0
    return basis.reshape(len(perms), n * n)


_BASIS = {n: _permutation_basis(n) for n in SUPPORTED_STREAMS}


def n_logits(n):
    """Number of per-sub-layer logits: R residual + n pre + n post (5 for n = 2, 32 for n = 4)."""
    return RES_SIZE[n] + 2 * n


def _sigmoid(xp, z):
    e = xp.exp(-xp.abs(z))  # never overflows
    return xp.where(z >= 0, 1 / (1 + e), e / (1 + e))


# --- shared coefficient math ---------------------------------------------------------------
def _check_coeff_shapes(op, res, pre, post):
    n = pre.shape[-1] if pre.ndim else 0
    if n not in SUPPORTED_STREAMS:
        raise ValueError(f"{op}: pre_logits has shape {pre.shape}; its last axis must be n_streams = 2 or 4")
    if post.shape != pre.shape:
        raise ValueError(f"{op}: post_logits shape {post.shape} differs from pre_logits shape {pre.shape}")
    if res.shape != pre.shape[:-1] + (RES_SIZE[n],):
        raise ValueError(
            f"{op}: residual logits have shape {res.shape}, expected {pre.shape[:-1] + (RES_SIZE[n],)} for n = {n}"
        )
    return n


def _coeffs_forward(res, pre, post, n):
    """Logits -> (H_res, h_pre, h_post, saved). ``res [..., R]``, ``pre``/``post`` ``[..., n]``."""
    xp = array_module(res, pre, post)
    if n == 2:  # weights (a, 1 - a) of (I, Swap)
        a = _sigmoid(xp, res)
        w = xp.concatenate([a, 1 - a], axis=-1)
    else:  # softmax over the 24 permutations
        e = xp.exp(res - res.max(axis=-1, keepdims=True))
        w = e / e.sum(axis=-1, keepdims=True)
    basis = xp.asarray(_BASIS[n], dtype=w.dtype)
    h_res = (w @ basis).reshape(w.shape[:-1] + (n, n))
    s_pre, s_post = _sigmoid(xp, pre), _sigmoid(xp, post)
    return h_res, s_pre, n * s_post, (w, s_pre, s_post)


def _coeffs_backward(saved, g_res, g_pre, g_post, n):
    """Gradients of (H_res, h_pre, h_post) -> gradients of (res, pre, post) logits."""
    w, s_pre, s_post = saved
    xp = array_module(w)
    basis = xp.asarray(_BASIS[n], dtype=w.dtype)
    g_w = g_res.reshape(g_res.shape[:-2] + (n * n,)) @ basis.T
    if n == 2:
        a = w[..., :1]
        d_res = (g_w[..., :1] - g_w[..., 1:]) * (a * (1 - a))
    else:
        d_res = w * (g_w - (w * g_w).sum(axis=-1, keepdims=True))
    d_pre = g_pre * s_pre * (1 - s_pre)
    d_post = g_post * (n * s_post * (1 - s_post))
    return d_res, d_pre, d_post


class MhcStaticCoeffs(Function):
    """``mhc_static_coeffs(res_logits [R], pre_logits [n], pre_bias [n], post_logits [n], post_bias [n])
    -> (H_res [n, n], h_pre [n], h_post [n])``; R = 1 (alpha_logit) for n = 2, 24 for n = 4."""

    @staticmethod
    def forward(ctx, res_logits, pre_logits, pre_bias, post_logits, post_bias):
        pre, post = pre_logits + pre_bias, post_logits + post_bias
        n = _check_coeff_shapes("mhc_static_coeffs", res_logits, pre, post)
        h_res, h_pre, h_post, saved = _coeffs_forward(res_logits, pre, post, n)
        ctx.save(n, saved)
        return h_res, h_pre, h_post

    @staticmethod
    def backward(ctx, g_res, g_pre, g_post):
        n, saved = ctx.saved
        d_res, d_pre, d_post = _coeffs_backward(saved, g_res, g_pre, g_post, n)
        return d_res, d_pre, d_pre, d_post, d_post


class MhcDynamicCoeffs(Function):
    """``mhc_dynamic_coeffs(X [..., n, C], dyn_weight [R + 2n, n*C], dyn_gate [1], res_logits [R],
    pre_logits [n], pre_bias [n], post_logits [n], post_bias [n], eps=1e-6)
    -> (H_res [..., n, n], h_pre [..., n], h_post [..., n])``: per-token (mHC-lite) logits
    ``static + dyn_gate * (dyn_weight @ rmsnorm(flatten(X)))``."""

    @staticmethod
    def forward(ctx, x, dyn_weight, dyn_gate, res_logits, pre_logits, pre_bias, post_logits, post_bias, eps=1e-6):
        # Computed in float64 whatever the input dtype, then rounded once: the per-token
        # projection is a matmul whose BLAS summation order depends on the number of tokens,
        # and a last-bit difference in a coefficient can flip an int8 activation rounding
        # downstream. In float64 the training forward, a prefill and a one-token decode all
        # round to the same float32 coefficients.
        dtypes = tuple(a.dtype for a in (x, dyn_weight, dyn_gate, res_logits, pre_logits, pre_bias,
                                         post_logits, post_bias))
        x, dyn_weight, dyn_gate, res_logits, pre_logits, pre_bias, post_logits, post_bias = (
            a.astype(np.float64, copy=False)
            for a in (x, dyn_weight, dyn_gate, res_logits, pre_logits, pre_bias, post_logits, post_bias))
        base_pre, base_post = pre_logits + pre_bias, post_logits + post_bias
        n = _check_coeff_shapes("mhc_dynamic_coeffs", res_logits, base_pre, base_post)
        if base_pre.ndim != 1:
            raise ValueError(
                f"mhc_dynamic_coeffs: the static logits must be 1-D, got pre_logits shape {base_pre.shape}"
            )
        if x.ndim < 2 or x.shape[-2] != n:
            raise ValueError(f"mhc_dynamic_coeffs: X has shape {x.shape}, expected [..., {n}, C]")
        n_in, n_out = n * x.shape[-1], n_logits(n)
        if dyn_weight.shape != (n_out, n_in):
            raise ValueError(f"mhc_dynamic_coeffs: dyn_weight has shape {dyn_weight.shape}, expected {(n_out, n_in)}")
        if dyn_gate.size != 1:
            raise ValueError(f"mhc_dynamic_coeffs: dyn_gate must hold one value, got shape {dyn_gate.shape}")
        xp = array_module(x, dyn_weight)
        lead = x.shape[:-2]
        flat = x.reshape(-1, n_in)
        rstd = 1 / xp.sqrt((flat * flat).mean(axis=-1, keepdims=True) + eps)
        normed = flat * rstd
        proj = normed @ dyn_weight.T
        base = xp.concatenate([res_logits, base_pre, base_post])
        logits = base + dyn_gate.reshape(()) * proj
        r = RES_SIZE[n]
        res, pre, post = logits[:, :r], logits[:, r:r + n], logits[:, r + n:]
        h_res, h_pre, h_post, saved = _coeffs_forward(res, pre, post, n)
        ctx.save(n, saved, x.shape, normed, rstd, proj, dyn_weight, dyn_gate, dtypes)
        out = dtypes[0]
        return (h_res.reshape(lead + (n, n)).astype(out), h_pre.reshape(lead + (n,)).astype(out),
                h_post.reshape(lead + (n,)).astype(out))

    @staticmethod
    def backward(ctx, g_res, g_pre, g_post):
        n, saved, x_shape, normed, rstd, proj, dyn_weight, dyn_gate, dtypes = ctx.saved
        xp = array_module(normed)
        g_res, g_pre, g_post = (g.astype(np.float64, copy=False) for g in (g_res, g_pre, g_post))
        d_res, d_pre, d_post = _coeffs_backward(
            saved, g_res.reshape(-1, n, n), g_pre.reshape(-1, n), g_post.reshape(-1, n), n
        )
        d_logits = xp.concatenate([d_res, d_pre, d_post], axis=-1)  # [T, R + 2n]
        d_base = d_logits.sum(axis=0)
        r = RES_SIZE[n]
        d_base_res, d_base_pre, d_base_post = d_base[:r], d_base[r:r + n], d_base[r + n:]
        needs = ctx.needs_input_grad
        gate = dyn_gate.reshape(())
        d_proj = gate * d_logits
        d_gate = (d_logits * proj).sum().reshape(dyn_gate.shape) if needs[2] else None
        d_weight = d_proj.T @ normed if needs[1] else None
        d_x = None
        if needs[0]:
            d_normed = d_proj @ dyn_weight
            d_flat = rstd * (d_normed - normed * (d_normed * normed).mean(axis=-1, keepdims=True))
            d_x = d_flat.reshape(x_shape)
        grads = (d_x, d_weight, d_gate, d_base_res, d_base_pre, d_base_pre, d_base_post, d_base_post)
        return tuple(None if g is None else g.astype(dt, copy=False) for g, dt in zip(grads, dtypes))


# --- applying the coefficients ---------------------------------------------------------------
def check_stream_coeff(op, name, coeff, x, tail):
    shared, per_token = tail, x.shape[:-2] + tail
    if coeff.shape not in (shared, per_token):
        raise ValueError(
            f"{op}: {name} has shape {coeff.shape}, expected {shared} or {per_token} for X of shape {x.shape}"
        )
    return coeff.shape == shared and shared != per_token


def _sum_to_shared(g, n_tail):
    """Sum a per-token gradient ``[..., *tail]`` over its token axes."""
    return g.reshape((-1,) + g.shape[g.ndim - n_tail:]).sum(axis=0)


class MhcPre(Function):
    """``mhc_pre(X [..., n, C], h_pre [n] or [..., n]) -> u [..., C]``, ``u = sum_s h_pre[s] X[s]``."""

    @staticmethod
    def forward(ctx, x, h_pre):
        if x.ndim < 2:
            raise ValueError(f"mhc_pre: X has shape {x.shape}, expected [..., n, C]")
        shared = check_stream_coeff("mhc_pre", "h_pre", h_pre, x, (x.shape[-2],))
        ctx.save(x, h_pre, shared)
        return (h_pre[..., :, None] * x).sum(axis=-2)

    @staticmethod
    def backward(ctx, g):
        x, h_pre, shared = ctx.saved
        d_x = h_pre[..., :, None] * g[..., None, :] if ctx.needs_input_grad[0] else None
        d_h = None
        if ctx.needs_input_grad[1]:
            d_h = (x @ g[..., :, None])[..., 0]
            d_h = _sum_to_shared(d_h, 1) if shared else d_h
        return d_x, d_h


class MhcPost(Function):
    """``mhc_post(X [..., n, C], y [..., C], H_res [n, n] or [..., n, n], h_post [n] or [..., n])
    -> X' [..., n, C]``, ``X' = H_res @ (X + h_post (outer) y)``: write the output, then mix."""

    @staticmethod
    def forward(ctx, x, y, h_res, h_post):
        if x.ndim < 2 or y.shape != x.shape[:-2] + x.shape[-1:]:
            raise ValueError(f"mhc_post: X has shape {x.shape} and y {y.shape}, expected [..., n, C] and [..., C]")
        n = x.shape[-2]
        shared_res = check_stream_coeff("mhc_post", "H_res", h_res, x, (n, n))
        shared_post = check_stream_coeff("mhc_post", "h_post", h_post, x, (n,))
        z = x + h_post[..., :, None] * y[..., None, :]
        ctx.save(z, y, h_res, h_post, shared_res, shared_post)
        return h_res @ z

    @staticmethod
    def backward(ctx, g):
        z, y, h_res, h_post, shared_res, shared_post = ctx.saved
        xp = array_module(g)
        needs = ctx.needs_input_grad
        d_z = xp.swapaxes(h_res, -1, -2) @ g
        d_y = (h_post[..., :, None] * d_z).sum(axis=-2) if needs[1] else None
        d_res = d_post = None
        if needs[2]:
            d_res = g @ xp.swapaxes(z, -1, -2)
            d_res = _sum_to_shared(d_res, 2) if shared_res else d_res
        if needs[3]:
            d_post = (d_z @ y[..., :, None])[..., 0]
            d_post = _sum_to_shared(d_post, 1) if shared_post else d_post
        return d_z, d_y, d_res, d_post


class MhcExpand(Function):
    """``mhc_expand(x [..., C], n) -> [..., n, C]``: a copy of ``x`` in every stream."""

    @staticmethod
    def forward(ctx, x, n):
        if int(n) < 1:
            raise ValueError(f"mhc_expand: n_streams must be >= 1, got {n}")
        xp = array_module(x)
        return xp.repeat(x[..., None, :], int(n), axis=-2)

    @staticmethod
    def backward(ctx, g):
        return g.sum(axis=-2), None


class MhcCollapse(Function):
    """``mhc_collapse(X [..., n, C]) -> [..., C]``: the mean over streams."""

    @staticmethod
    def forward(ctx, x):
        if x.ndim < 2:
            raise ValueError(f"mhc_collapse: X has shape {x.shape}, expected [..., n, C]")
        ctx.save(x.shape)
        return x.mean(axis=-2)

    @staticmethod
    def backward(ctx, g):
        (shape,) = ctx.saved
        xp = array_module(g)
        return (xp.broadcast_to((g / shape[-2])[..., None, :], shape).copy(),)


mhc_static_coeffs = MhcStaticCoeffs.apply
mhc_pre = MhcPre.apply
mhc_post = MhcPost.apply
mhc_collapse = MhcCollapse.apply


def mhc_dynamic_coeffs(x, dyn_weight, dyn_gate, res_logits, pre_logits, pre_bias, post_logits, post_bias, eps=1e-6):
    return MhcDynamicCoeffs.apply(
        x, dyn_weight, dyn_gate, res_logits, pre_logits, pre_bias, post_logits, post_bias, eps=eps
    )


def mhc_expand(x, n):
    return MhcExpand.apply(x, int(n))


mhc_dynamic_coeffs.__doc__ = MhcDynamicCoeffs.__doc__
mhc_expand.__doc__ = MhcExpand.__doc__


def composite_gain(h_res_list):
    """Gain of ``H_L ... H_1`` (list order is application order): max(abs row sum, abs column sum)."""
    if len(h_res_list) == 0:
        raise ValueError("composite_gain: the list of H_res matrices is empty")
    mats = [h.data if isinstance(h, Tensor) else h for h in h_res_list]
    xp = array_module(*mats)
    product = xp.asarray(mats[0], dtype=xp.float64)
    for h in mats[1:]:
        product = xp.asarray(h, dtype=xp.float64) @ product
    a = xp.abs(product)
    return float(max(a.sum(axis=-1).max(), a.sum(axis=-2).max()))


# --- initialisation ----------------------------------------------------------------------
PRE_TARGET_LOGIT = 3.0  # h_pre = sigmoid(+-3) = 0.953 / 0.047
POST_TARGET_SHARE = 0.5  # h_post: 1 + (n-1)/2 on the target stream, 1/2 elsewhere
RES_IDENTITY_WEIGHT = 0.98
DYN_GATE_INIT = 0.01


def mhc_init_params(n, layer_index, mode, C, rng, dtype=np.float32):
    """Parameters of sub-layer ``layer_index`` (``blk0.attn = 0, blk0.ffn = 1, ...``) as named arrays.

    ``mode`` is ``"static"`` or ``"dynamic"``; ``C`` the model width (used by ``dyn_weight``);
    ``rng`` a ``numpy.random.Generator`` (only dynamic mode draws from it). Returns ``{}`` for
    n = 1 (plain residual). See the module docstring for names, shapes and the reasoning.
    """
    if mode not in ("static", "dynamic"):
        raise ValueError(f"mhc_init_params: mode must be 'static' or 'dynamic', got {mode!r}")
    if n == 1:
        return {}
    if n not in SUPPORTED_STREAMS:
        raise ValueError(f"mhc_init_params: n_streams must be 1, 2 or 4, got {n}")
    if layer_index < 0:
        raise ValueError(f"mhc_init_params: layer_index must be >= 0, got {layer_index}")
    target = layer_index % n
    onehot = np.arange(n) == target
    n_others = _BASIS[n].shape[0] - 1  # permutations competing with the identity
    identity_logit = np.log(RES_IDENTITY_WEIGHT * n_others / (1 - RES_IDENTITY_WEIGHT))
    res = np.zeros(RES_SIZE[n])
    res[0] = identity_logit  # permutation 0 is the identity
    post_share = np.where(onehot, 1 + (n - 1) * POST_TARGET_SHARE, 1 - POST_TARGET_SHARE) / n
    params = {
        RES_NAME[n]: res,
        "pre_logits": np.zeros(n),
        "pre_bias": np.where(onehot, PRE_TARGET_LOGIT, -PRE_TARGET_LOGIT),
        "post_logits": np.zeros(n),
        "post_bias": np.log(post_share / (1 - post_share)),
    }
    if mode == "dynamic":
        if C < 1:
            raise ValueError(f"mhc_init_params: C must be >= 1 for dynamic mode, got {C}")
        params["dyn_weight"] = rng.standard_normal((n_logits(n), n * C)) / np.sqrt(n * C)
        params["dyn_gate"] = np.full(1, DYN_GATE_INIT)
    return {k: np.asarray(v, dtype=dtype) for k, v in params.items()}


OPS = {
    "mhc_static_coeffs": mhc_static_coeffs,
    "mhc_dynamic_coeffs": mhc_dynamic_coeffs,
    "mhc_pre": mhc_pre,
    "mhc_post": mhc_post,
    "mhc_expand": mhc_expand,
    "mhc_collapse": mhc_collapse,
    "composite_gain": composite_gain,
}
