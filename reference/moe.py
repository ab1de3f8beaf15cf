"""Mixture-of-experts routing: top-k selection, the load-balancing loss, dispatch and combine.

The MoE FFN (SPEC section 5) runs as

    weights, indices = topk_route(router_logits, k)          # [T, k] each
    aux = load_balance_loss(router_logits, indices, E)       # scalar, added with its weight
    routes = moe_routes(indices, E)                          # per expert: (token_ids, slot_ids)
    outs = [expert_e(ops.getitem(x, token_ids)) for (token_ids, _) in routes]
    y = moe_combine(weights, outs, routes)                   # [T, D]

``ops.getitem`` gathers each expert's rows (its backward scatter-adds into ``x``), so only
the combine needs an op of its own: a weighted scatter-add of every expert's output rows back
to their tokens. Indices are plain integer arrays, never Tensors.
"""
from __future__ import annotations

import numpy as np

from .autograd import Function, array_module, data_of as _data


def _check_logits(op, logits):
    if logits.ndim != 2:
        raise ValueError(f"{op}: router logits must be 2-D [tokens, experts], got shape {logits.shape}")
    if logits.dtype.kind != "f":
        raise ValueError(f"{op}: router logits must be floating point, got dtype {logits.dtype}")


def _check_indices(op, indices, n_tokens, n_experts):
    if indices.ndim != 2 or indices.dtype.kind not in "iu":
        raise ValueError(f"{op}: indices must be a 2-D integer array [tokens, k], got shape {indices.shape} "
                         f"and dtype {indices.dtype}")
    if n_tokens is not None and indices.shape[0] != n_tokens:
        raise ValueError(f"{op}: indices cover {indices.shape[0]} tokens but the logits have {n_tokens}")
    if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n_experts):
        raise ValueError(f"{op}: indices must lie in [0, {n_experts}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")


def _softmax_last(z):
    xp = array_module(z)
    e = xp.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- top-k routing ------------------------------------------------------------------------


def topk_indices(logits, k):
    """Top-``k`` expert indices per token, ordered by logit, ties to the lower index.

    ``logits`` float [T, E] (array or Tensor); returns int64 [T, k]. Not differentiable.
    """
    logits = _data(logits)
    _check_logits("topk_route", logits)
    n_experts = logits.shape[1]
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n_experts:
        raise ValueError(f"topk_route: k must be an integer in [1, {n_experts}] for {n_experts} experts, got {k!r}")
    xp = array_module(logits)
    # A stable sort of the negated logits keeps equal logits in index order (cupy sorts stably).
    options = {"kind": "stable"} if xp is np else {}
    order = xp.argsort(-logits, axis=-1, **options)
    return order[:, :k].astype(xp.int64)


class TopKSoftmax(Function):
    """Softmax over the selected logits: ``w[t, j] = softmax_j(logits[t, indices[t, :]])``."""

    @staticmethod
    def forward(ctx, logits, indices):
        xp = array_module(logits)
        rows = xp.arange(logits.shape[0])[:, None]
        w = _softmax_last(logits[rows, indices])
        ctx.save(logits.shape, rows, indices, w)
        return w

    @staticmethod
    def backward(ctx, gw):
        shape, rows, indices, w = ctx.saved
        xp = array_module(gw)
        g_selected = w * (gw - (gw * w).sum(axis=-1, keepdims=True))
        g_logits = xp.zeros(shape, dtype=w.dtype)
        g_logits[rows, indices] = g_selected  # the k indices of a row are distinct
        return g_logits, None


def topk_route(logits, k):
    """Pick ``k`` experts per token and weight them by a softmax over the selected logits.

    ``logits`` float [T, E] (Tensor or array). Returns ``(weights, indices)``: ``weights``
    [T, k] (a Tensor, differentiable w.r.t. ``logits`` at the selected positions; rows sum
    to 1) and ``indices`` int64 [T, k] (a plain array, ordered by descending logit, ties
    broken toward the lower expert index).
    """
    indices = topk_indices(logits, k)
    return TopKSoftmax.apply(logits, indices), indices


# --- load balancing -----------------------------------------------------------------------


def expert_load(indices, n_experts):
    """Token-slots routed to each expert: int64 [n_experts] from ``indices`` int [T, k]."""
    indices = _data(indices)
    _check_indices("expert_load", indices, None, n_experts)
    xp = array_module(indices)
    return xp.bincount(indices.reshape(-1), minlength=n_experts).astype(xp.int64)


class LoadBalanceLoss(Function):
    """Switch-style auxiliary loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of token-slots routed to expert ``e`` (a constant), ``P_e`` the
    mean over tokens of the full softmax over all experts (differentiable). With k slots per
    token ``sum_e f_e = 1``, so perfectly balanced routing with uniform probabilities gives 1.
    ``counts`` (optional, [E]) replaces this batch's slot counts when computing ``f``: data
    parallelism passes the counts summed over all ranks, so the mean over ranks of the loss and
    of its gradient equals the loss of the whole global batch.
    """

    @staticmethod
    def forward(ctx, logits, indices, n_experts=None, counts=None):
        xp = array_module(logits)
        if counts is None:
            counts = xp.bincount(indices.reshape(-1), minlength=n_experts).astype(logits.dtype)
            f = counts / max(indices.size, 1)
        else:
            counts = xp.asarray(counts).astype(logits.dtype)
            f = counts / max(float(counts.sum()), 1.0)
        p = _softmax_last(logits)
        scale = logits.dtype.type(n_experts)
        ctx.save(p, scale * f)
        return xp.asarray(scale * (f * p.mean(axis=0)).sum())

    @staticmethod
    def backward(ctx, g):
        p, c = ctx.saved  # dL/dP_e = c_e
        n_tokens = p.shape[0]
        g_logits = p * (c - (p * c).sum(axis=-1, keepdims=True)) * (g / n_tokens)
        return g_logits, None


def load_balance_loss(logits, indices, n_experts, counts=None):
    """Switch-style load-balancing loss (a scalar Tensor), differentiable w.r.t. ``logits``.

    ``logits`` float [T, E] with ``E == n_experts``; ``indices`` int [T, k] from ``topk_route``;
    ``counts``: token-slots per expert to take ``f`` from instead of ``indices`` (see
    ``LoadBalanceLoss``).
    """
    data = _data(logits)
    _check_logits("load_balance_loss", data)
    if data.shape[1] != n_experts:
        raise ValueError(f"load_balance_loss: logits have {data.shape[1]} experts but n_experts is {n_experts}")
    indices = _data(indices)
    _check_indices("load_balance_loss", indices, data.shape[0], n_experts)
    if counts is not None and tuple(np.shape(counts)) != (n_experts,):
        raise ValueError(f"load_balance_loss: counts must have shape ({n_experts},), got {tuple(np.shape(counts))}")
    return LoadBalanceLoss.apply(logits, indices, n_experts=int(n_experts), counts=counts)


# --- dispatch and combine -----------------------------------------------------------------


def moe_routes(indices, n_experts):
    """Per expert, which (token, slot) pairs it serves.

    ``indices`` int [T, k]. Returns a list of ``n_experts`` pairs ``(token_ids, slot_ids)``,
    int64 arrays of equal length (possibly 0), tokens in increasing order. Feed
    ``ops.getitem(x, token_ids)`` to expert ``e`` and pass the list to ``moe_combine``.
    """
    indices = _data(indices)
    _check_indices("moe_routes", indices, None, n_experts)
    xp = array_module(indices)
    k = indices.shape[1]
    flat = indices.reshape(-1)
    options = {"kind": "stable"} if xp is np else {}
    order = xp.argsort(flat, **options)  # slots grouped by expert, token order kept inside a group
    bounds = np.concatenate([[0], np.cumsum(_host(xp.bincount(flat, minlength=n_experts)))])
    routes = []
    for e in range(n_experts):
        slots = order[int(bounds[e]):int(bounds[e + 1])].astype(xp.int64)
        routes.append((slots // k, slots % k))
    return routes


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


class MoECombine(Function):
    """``y[t] = sum over (e, i) with token_ids_e[i] = t of weights[t, slot_ids_e[i]] * out_e[i]``."""

    @staticmethod
    def forward(ctx, weights, *expert_outputs, routes=()):
        xp = array_module(weights, *expert_outputs)
        dim = expert_outputs[0].shape[1]
        y = xp.zeros((weights.shape[0], dim), dtype=expert_outputs[0].dtype)
        for out, (tokens, slots) in zip(expert_outputs, routes):
            # tokens are distinct within one expert (a token picks an expert at most once)
            y[tokens] += weights[tokens, slots][:, None] * out
        ctx.save(weights, expert_outputs, routes)
        return y

    @staticmethod
    def backward(ctx, gy):
        weights, expert_outputs, routes = ctx.saved
        xp = array_module(gy)
        g_weights = xp.zeros_like(weights) if ctx.needs_input_grad[0] else None
        g_outs = []
        for n, (out, (tokens, slots)) in enumerate(zip(expert_outputs, routes)):
            g_rows = gy[tokens]
            if g_weights is not None:
                g_weights[tokens, slots] = (g_rows * out).sum(axis=1)
            g_outs.append(weights[tokens, slots][:, None] * g_rows if ctx.needs_input_grad[n + 1] else None)
        return (g_weights, *g_outs)


def moe_combine(weights, expert_outputs, routes):
    """Weighted scatter-add of every expert's output rows back to their tokens.

    ``weights`` float [T, k] (from ``topk_route``); ``expert_outputs`` a list of ``E`` float
    arrays/Tensors ``[n_e, D]`` (row ``i`` is the output for ``routes[e][0][i]``; ``n_e`` may
    be 0); ``routes`` from ``moe_routes``. Returns ``[T, D]``, differentiable w.r.t. the
    weights and every expert output.
    """
    expert_outputs = list(expert_outputs)
    if len(expert_outputs) != len(routes) or not expert_outputs:
        raise ValueError(f"moe_combine: got {len(expert_outputs)} expert outputs for {len(routes)} routes")
    w = _data(weights)
    if w.ndim != 2:
        raise ValueError(f"moe_combine: weights must be 2-D [tokens, k], got shape {w.shape}")
    dims = {_data(o).shape[1:] for o in expert_outputs}
    if len(dims) != 1 or len(next(iter(dims))) != 1:
        raise ValueError(f"moe_combine: expert outputs must all be [rows, D] with one D, got shapes "
                         f"{[_data(o).shape for o in expert_outputs]}")
    for e, (o, (tokens, _)) in enumerate(zip(expert_outputs, routes)):
        if _data(o).shape[0] != len(tokens):
            raise ValueError(f"moe_combine: expert {e} returned {_data(o).shape[0]} rows for {len(tokens)} routed tokens")
    return MoECombine.apply(weights, *expert_outputs, routes=tuple(routes))


OPS = {
    "topk_route": topk_route,
    "load_balance_loss": load_balance_loss,
    "expert_load": expert_load,
    "moe_routes": moe_routes,
    "moe_combine": moe_combine,
}
