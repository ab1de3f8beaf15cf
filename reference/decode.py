"""One decode step of a whole dense attention block (inference; no gradient).

``decode_layer`` is exactly this composition of reference ops, for T tokens of one sequence
(one in a decode step; a prompt chunk or a speculative verify holds several):

    h = rmsnorm(x, attn_norm);  q, k, v = packed_linear(qkv, h)
    o = cached_attention(q, k, v, k_cache, v_cache, start, cos, sin)   [then rmsnorm(o, attn_sub)]
    x = x + packed_linear(wo, o)
    h = rmsnorm(x, ffn_norm);   gate, up = packed_linear(gate_up, h)
    a = swiglu(gate, up) or relu2_glu(gate, up)                          [then rmsnorm(a, ffn_sub)]
    x = x + packed_linear(w_down, a)

A decode step of a 12-layer model is ~150 such op calls, and at the ``nano_125m`` shape the
Python around them cost as much as the kernels (docs/decode_profile.md); a backend fuses the
block into one call. ``DecodeLayer`` holds what the step reads besides ``x`` and the cache:
the prepared packed weights of the backend that runs it (stacked q|k|v and gate|up, as
``PackedLinear`` stacks them), the norm weights and the shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .autograd import data_of
from . import nn
from .ternary import packed_linear

GLUS = ("swiglu", "relu2_glu")


@dataclass(eq=False)
class DecodeLayer:
    """A dense attention block's weights for ``decode_layer``. ``qkv`` rows are q (n_heads *
    head_dim), k and v (n_kv_heads * head_dim each); ``gate_up`` rows are gate then up
    (``hidden`` each); ``attn_sub``/``ffn_sub`` are the SubLN weights or None. ``prepared`` is
    the running backend's own form of the arguments, made on first use."""

    eps: float
    attn_norm: object
    qkv: object
    n_heads: int
    n_kv_heads: int
    head_dim: int
    attn_sub: object
    wo: object
    ffn_norm: object
    gate_up: object
    hidden: int
    glu: str
    ffn_sub: object
    w_down: object
    prepared: object = None

    def __post_init__(self):
        if self.glu not in GLUS:
            raise ValueError(f"DecodeLayer: glu {self.glu!r} must be one of {GLUS}")
        dim = self.attn_norm.shape[0]
        q_rows, kv_rows = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        for name, handle, shape in (("qkv", self.qkv, (q_rows + 2 * kv_rows, dim)), ("wo", self.wo, (dim, q_rows)),
                                    ("gate_up", self.gate_up, (2 * self.hidden, dim)),
                                    ("w_down", self.w_down, (dim, self.hidden))):
            if tuple(handle.shape) != shape:
                raise ValueError(f"DecodeLayer: {name} has shape {tuple(handle.shape)}, expected {shape}")


def check_decode_layer_args(x, layer, k_cache, v_cache, start):
    """The argument checks of every backend's ``decode_layer``."""
    if not isinstance(layer, DecodeLayer):
        raise ValueError(f"decode_layer: expected a DecodeLayer, got {type(layer).__name__}")
    dim = layer.attn_norm.shape[0]
    if x.dtype != np.float32 or x.ndim != 2 or x.shape[0] < 1 or x.shape[1] != dim:
        raise ValueError(f"decode_layer: x must be float32 [T, {dim}] (T >= 1 tokens of one sequence), got {x.dtype} {x.shape}")
    kv = (1, k_cache.shape[1], layer.n_kv_heads, layer.head_dim)
    if k_cache.shape != kv or v_cache.shape != kv:
        raise ValueError(f"decode_layer: caches must be [1, capacity, {layer.n_kv_heads}, {layer.head_dim}], "
                         f"got {k_cache.shape} and {v_cache.shape}")
    if start < 0 or start + x.shape[0] > k_cache.shape[1]:
        raise ValueError(f"decode_layer: positions {start}..{start + x.shape[0] - 1} are outside the cache "
                         f"(capacity {k_cache.shape[1]})")


def decode_layer(x, layer, k_cache, v_cache, start, cos, sin):
    """``x float32 [T, C]`` (the residual stream of T tokens of one sequence at positions
    ``start ..``) -> the block's output ``[T, C]``; writes their keys and values into the caches
    (see the module docstring). ``cos``/``sin`` ``[T, head_dim / 2]``: their RoPE tables."""
    return compose(_REFERENCE.__getitem__, x, layer, k_cache, v_cache, start, cos, sin)


def compose(op, x, layer, k_cache, v_cache, start, cos, sin):
    """``decode_layer`` as the chain of ops ``op(name)`` (the reference's, or a backend's: what
    a backend runs for a layer its fused kernel does not take, and what its tests compare with)."""
    x = data_of(x)
    start = int(start)
    check_decode_layer_args(x, layer, k_cache, v_cache, start)
    t, eps, hq, hkv, hd = x.shape[0], layer.eps, layer.n_heads, layer.n_kv_heads, layer.head_dim
    rmsnorm, linear = op("rmsnorm"), op("packed_linear")
    qkv = linear(layer.qkv, data_of(rmsnorm(x, layer.attn_norm, eps=eps)))
    q, k, v = qkv[:, :hq * hd], qkv[:, hq * hd:(hq + hkv) * hd], qkv[:, (hq + hkv) * hd:]
    o = data_of(op("cached_attention")(q.reshape(1, t, hq, hd), k.reshape(1, t, hkv, hd), v.reshape(1, t, hkv, hd),
                                       k_cache, v_cache, start, cos, sin)).reshape(t, hq * hd)
    if layer.attn_sub is not None:
        o = data_of(rmsnorm(o, layer.attn_sub, eps=eps))
    x = x + linear(layer.wo, o)
    gu = linear(layer.gate_up, data_of(rmsnorm(x, layer.ffn_norm, eps=eps)))
    a = data_of(op(layer.glu)(gu[:, :layer.hidden], gu[:, layer.hidden:]))
    if layer.ffn_sub is not None:
        a = data_of(rmsnorm(a, layer.ffn_sub, eps=eps))
    return x + linear(layer.w_down, a)


_REFERENCE = {"rmsnorm": nn.rmsnorm, "packed_linear": packed_linear, "cached_attention": nn.cached_attention,
              "swiglu": nn.swiglu, "relu2_glu": nn.relu2_glu}


OPS = {"decode_layer": decode_layer}
