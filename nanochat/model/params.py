"""The parameter table: every parameter of the model, declared once.

``parameter_table(cfg)`` lists, in the model's order, one ``ParamSpec`` per parameter: its name
(the checkpoint and ``nanochat-ternary`` GGUF name), shape, kind (``ternary`` BitLinear shadow
weight, ``norm`` RMSNorm weight, ``float`` anything else), component (one of ``COMPONENTS``),
optimizer group (``muon`` / ``adamw``, SPEC 4), initializer and llama.cpp ``bitnet`` name.
Everything that needs the layout derives it from here: ``Model`` builds its parameters from
it, ``count_parameters`` sums it per component, the trainer splits optimizer groups by it,
GGUF writing/reading and the engine's expected-tensor check read shapes and names from it.

    for spec in parameter_table(cfg):
        spec.name, spec.shape, spec.kind, spec.component, spec.group, spec.bitnet
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from reference import mhc as mhc_ref

# One grouping of components (SPEC 5 conventions: no biases, two pre-norms per block and a
# final norm, SubLN norms over the attention output and each FFN/expert hidden width, one
# DeltaNet output norm of size d_v shared by its heads, dynamic mHC's RMSNorm has no weight).
COMPONENTS = (
    "embedding",          # token embedding [vocab, dim] (the tied LM head is this matrix)
    "lm_head",            # untied LM head [vocab, dim]; 0 when tied
    "attn_q", "attn_k", "attn_v", "attn_o",
    "deltanet_qkv",       # q, k [dim -> H d_k], v [dim -> H d_v]
    "deltanet_gate",      # output gate [dim -> H d_v]
    "deltanet_out",       # output projection [H d_v -> dim]
    "deltanet_decay",     # W_beta, W_a [dim -> H], A_log [H], dt_bias [H]
    "ffn",                # dense gate, up [dim -> F], down [F -> dim]
    "moe_experts",        # n_experts SwiGLU blocks of hidden moe_hidden
    "moe_router",         # float router [dim -> n_experts]
    "moe_shared_expert",  # optional always-on SwiGLU block
    "norms",              # every RMSNorm weight (pre-norms, SubLN, DeltaNet output norm, final)
    "mhc",                # mHC coefficients (static 9 / 40 per sub-layer, dynamic adds W and gate)
    "mtp",                # per MTP head one [dim, dim] BitLinear and one RMSNorm
)

KINDS = ("ternary", "norm", "float")
GROUPS = ("muon", "adamw")

# llama.cpp ``bitnet`` names of the per-block parameters it has (SubLN, SwiGLU, attention only).
_BITNET_LAYER_NAMES = {
    "attn_norm": "attn_norm", "attn.wq": "attn_q", "attn.wk": "attn_k", "attn.wv": "attn_v",
    "attn.wo": "attn_output", "attn.sub_norm": "attn_sub_norm", "ffn_norm": "ffn_norm",
    "ffn.w_gate": "ffn_gate", "ffn.w_up": "ffn_up", "ffn.w_down": "ffn_down", "ffn.sub_norm": "ffn_sub_norm",
}
_BITNET_GLOBAL_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm"}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    kind: str                      # "ternary" | "norm" | "float"
    component: str                 # one of COMPONENTS
    group: str                     # "muon" | "adamw"
    init: Callable                 # rng -> float64 array of ``shape`` (called in table order)

    @property
    def ternary(self) -> bool:
        return self.kind == "ternary"

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def bitnet(self) -> str | None:
        """The tensor's name in llama.cpp's ``bitnet`` layout (None: that layout has no such tensor)."""
        if self.name in _BITNET_GLOBAL_NAMES:
            return _BITNET_GLOBAL_NAMES[self.name] + ".weight"
        parts = self.name.split(".", 2)
        if parts[0] == "layers" and parts[2] in _BITNET_LAYER_NAMES:
            return f"blk.{parts[1]}.{_BITNET_LAYER_NAMES[parts[2]]}.weight"
        return None


def _model_cfg(cfg):
    return getattr(cfg, "model", cfg)


def parameter_table(cfg) -> list[ParamSpec]:
    """Every parameter of the model for ``cfg`` (a ``Config`` or ``ModelConfig``), in order."""
    c = _model_cfg(cfg)
    d, hd = c.dim, c.head_dim
    out_gain = 1.0 / math.sqrt(2 * c.n_layers)
    table: list[ParamSpec] = []

    def add(name, shape, kind, component, init, group="adamw"):
        table.append(ParamSpec(name, tuple(int(s) for s in shape), kind, component, group, init))

    def normal(shape, std):
        return lambda rng: rng.standard_normal(shape) * std

    def ones(shape):
        return lambda rng: np.ones(shape)

    def norm(name, size):
        add(name, (size,), "norm", "norms", ones(size))

    def bitlinear(name, out_dim, in_dim, component, gain=1.0):
        shape = (out_dim, in_dim)
        add(name, shape, "ternary", component,
            lambda rng: rng.standard_normal(shape) * (gain / math.sqrt(in_dim)), group="muon")

    def ffn(p, hidden, component):
        bitlinear(p + "w_gate", hidden, d, component)
        bitlinear(p + "w_up", hidden, d, component)
        if c.sub_norm:
            norm(p + "sub_norm", hidden)
        bitlinear(p + "w_down", d, hidden, component, out_gain)

    add("tok_embeddings", (c.vocab_size, d), "float", "embedding", normal((c.vocab_size, d), c.init_std))
    if not c.tie_embeddings:
        add("lm_head", (c.vocab_size, d), "float", "lm_head", normal((c.vocab_size, d), c.init_std))
    for i, (mixer, ffn_kind) in enumerate(c.block_kinds()):
        p = f"layers.{i}."
        norm(p + "attn_norm", d)
        if mixer == "attention":
            bitlinear(p + "attn.wq", c.n_heads * hd, d, "attn_q")
            bitlinear(p + "attn.wk", c.n_kv_heads * hd, d, "attn_k")
            bitlinear(p + "attn.wv", c.n_kv_heads * hd, d, "attn_v")
            if c.sub_norm:
                norm(p + "attn.sub_norm", c.n_heads * hd)
            bitlinear(p + "attn.wo", d, c.n_heads * hd, "attn_o", out_gain)
        else:
            h, dk, dv = c.dn_heads, c.dn_key_dim, c.dn_value_dim
            q = p + "delta."
            bitlinear(q + "wq", h * dk, d, "deltanet_qkv")
            bitlinear(q + "wk", h * dk, d, "deltanet_qkv")
            bitlinear(q + "wv", h * dv, d, "deltanet_qkv")
            bitlinear(q + "wgate", h * dv, d, "deltanet_gate")
            # Small float projections for the per-head gates (too narrow for ternary groups).
            add(q + "wa", (h, d), "float", "deltanet_decay", normal((h, d), 0.02), group="muon")
            add(q + "wbeta", (h, d), "float", "deltanet_decay", normal((h, d), 0.02), group="muon")
            # Decay rates spread over heads (Mamba-style init): A in [1, 16], dt in [1e-3, 1e-1].
            add(q + "A_log", (h,), "float", "deltanet_decay", lambda rng, h=h: np.log(np.linspace(1.0, 16.0, h)))
            add(q + "dt_bias", (h,), "float", "deltanet_decay", lambda rng, h=h: _inverse_softplus_dt(h))
            norm(q + "out_norm", dv)
            bitlinear(q + "wo", d, h * dv, "deltanet_out", out_gain)
        norm(p + "ffn_norm", d)
        if ffn_kind == "moe":
            # The router is a hidden matrix too, but SPEC 4 puts routers on AdamW.
            add(p + "moe.router", (c.n_experts, d), "float", "moe_router", normal((c.n_experts, d), 0.02))
            for e in range(c.n_experts):
                ffn(f"{p}moe.experts.{e}.", c.expert_hidden, "moe_experts")
            if c.moe_shared_expert:
                ffn(p + "moe.shared.", c.expert_hidden, "moe_shared_expert")
        else:
            ffn(p + "ffn.", c.ffn_hidden, "ffn")
        if c.n_streams > 1:
            for j, sub in enumerate(("mhc_attn.", "mhc_ffn.")):
                unit = _MhcUnitInit(c, 2 * i + j)
                for name, shape in mhc_shapes(c).items():
                    add(p + sub + name, shape, "float", "mhc", lambda rng, unit=unit, name=name: unit(rng)[name])
    norm("norm", d)
    for i in range(c.mtp_n_tokens):
        add(f"mtp.{i}.norm", (d,), "norm", "mtp", ones(d))
        bitlinear(f"mtp.{i}.proj", d, d, "mtp", 0.5)
    return table


def _inverse_softplus_dt(h):
    dt = np.exp(np.linspace(np.log(1e-3), np.log(1e-1), h))
    return dt + np.log(-np.expm1(-dt))


class _MhcUnitInit:
    """The initial values of one mHC unit, drawn once (at its first parameter) and shared."""

    def __init__(self, c, layer_index):
        self.c, self.layer_index, self.values = c, layer_index, None

    def __call__(self, rng):
        if self.values is None:
            c = self.c
            self.values = mhc_ref.mhc_init_params(c.n_streams, self.layer_index, c.mhc_mode, c.dim, rng, np.float64)
        return self.values


def mhc_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Name -> shape of one mHC unit's parameters (static or dynamic, n streams)."""
    c = _model_cfg(cfg)
    n = c.n_streams
    names = mhc_ref.STATIC_PARAM_NAMES[n] if c.mhc_mode == "static" else mhc_ref.DYNAMIC_PARAM_NAMES[n]
    shapes = {}
    for name in names:
        if name == mhc_ref.RES_NAME[n]:
            shapes[name] = (mhc_ref.RES_SIZE[n],)
        elif name == "dyn_weight":
            shapes[name] = (mhc_ref.n_logits(n), n * c.dim)
        elif name == "dyn_gate":
            shapes[name] = (1,)
        else:
            shapes[name] = (n,)
    return shapes


def parameter_specs(cfg) -> dict[str, ParamSpec]:
    """``parameter_table`` keyed by name."""
    return {spec.name: spec for spec in parameter_table(cfg)}


def ternary_names(cfg) -> list[str]:
    """Names of the BitLinear weights, in order."""
    return [spec.name for spec in parameter_table(cfg) if spec.ternary]


def count_parameters(cfg) -> dict[str, int]:
    """Parameters per component (``COMPONENTS``, every one present) plus ``total``."""
    count = dict.fromkeys(COMPONENTS, 0)
    for spec in parameter_table(cfg):
        count[spec.component] += spec.size
    count["total"] = sum(count.values())
    return count


def inference_tensors(cfg, mtp=False):
    """``(floats, ternary)``: name -> shape of every tensor inference needs; ternary shapes are
    the ``[M, K]`` shadow shapes. The MTP heads are left out unless ``mtp`` (they only serve
    speculative decoding)."""
    floats, ternary = {}, {}
    for spec in parameter_table(cfg):
        if spec.component == "mtp" and not mtp:
            continue
        (ternary if spec.ternary else floats)[spec.name] = spec.shape
    return floats, ternary
