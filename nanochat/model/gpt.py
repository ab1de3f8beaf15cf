"""The ternary decoder-only transformer (SPEC section 5): one forward for training, evaluation,
prefill and decode.

    model = Model(cfg, backend, seed=0)                  # parameters from the table, initialised
    out = model.forward(idx)                             # training: autograd Tensors, float32
    out.logits, out.hidden, out.moe                      # losses live in nanochat.train.losses

    model = Model.from_weights(cfg, backend, floats)     # inference: plain arrays
    caches = [model.new_cache(capacity) for _ in range(B)]
    out = model.forward(idx, cache=caches, linear=PackedLinear(...))   # prefill / batched decode

Parameters come from ``nanochat.model.params.parameter_table`` (one declaration of names,
shapes, groups and initialisers). Blocks (``AttentionMixer``, ``DeltaNetMixer``, ``DenseFFN``,
``MoEFFN``, ``MHCUnit``) hold a name prefix and compute their part; what differs between
training and inference is passed in, not written twice:

- the linear strategy (``nanochat.model.linear``): STE ``ternary_linear`` with Collider's row
  selection, or packed GEMM/GEMV with stacked projections, or dequantized float;
- the execution policy (``Run``): training runs backend ops on autograd Tensors in float32;
  inference (a ``cache`` is given) runs them on plain arrays and computes in float64 the parts
  whose float32 result would depend on how many tokens a call holds (the attention core, the
  DeltaNet recurrence and its gates, the small float projections feeding routing and gates),
  rounding to float32 at their outputs; so one-token decode, many-token prefill and the
  training forward agree to float32 rounding (docs/numerics.md, docs/engine.md);
- whole blocks: in inference a plain dense attention block of one sequence runs as one
  backend op (``decode_layer``, the chain of ops below fused) where the backend has it;
- the per-layer state: a ``SequenceCache`` per sequence whose per-block states the blocks
  create (``new_state``). Sequences in one call may sit at different positions (batched
  decode): linear layers run over all rows at once, attention and DeltaNet per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from reference.autograd import Tensor, data_of, grad_enabled
from reference.decode import DecodeLayer
from nanochat.model.cache import MIN_CAPACITY, KVCache, DeltaState, SequenceCache
from nanochat.model.linear import TrainingLinear
from nanochat.model.params import parameter_table

F32 = np.float32
F64 = np.float64


@dataclass
class Output:
    logits: object                     # [B, T, V]
    hidden: object                     # [B, T, C]: the collapsed residual before the final norm
    moe: list = field(default_factory=list)    # per MoE block (router logits [N, E], expert indices [N, k])
    h_res: list = field(default_factory=list)  # per mHC unit its residual mixing matrix (metrics)


class _ArrayOps:
    """Backend ops on plain arrays: each result is unwrapped from its Tensor (inference)."""

    def __init__(self, be):
        self._be = be

    def __getattr__(self, name):
        op = self._be.op(name)

        def call(*args, **kwargs):
            out = op(*args, **kwargs)
            return tuple(data_of(o) for o in out) if isinstance(out, tuple) else data_of(out)

        setattr(self, name, call)
        return call


class Run:
    """The execution policy of one forward: op namespace, linear strategy, precision islands,
    positions and caches. ``caches is None``: training-style (Tensors, float32, whole batch);
    else inference-style (arrays, float64 islands, per-sequence state)."""

    def __init__(self, model, idx, caches, linear, keep, head=None):
        self.model, self.caches, self.head = model, caches, head
        be, c = model.be, model.cfg
        self.inference = caches is not None
        self.F = model.array_ops if self.inference else be
        self.linear = linear if linear is not None else TrainingLinear(be, model.params, c.group_size, keep)
        self.keep = keep
        self.moe, self.h_res = [], []
        # whole blocks as one op where the backend fuses them and the weights are packed
        self.fused_decode = self.inference and "decode_layer" in be.overridden and hasattr(self.linear, "decode_layer")
        b, t = idx.shape
        if self.inference:
            self.starts = [cache.position for cache in caches]
            # RoPE tables per sequence, shared by every attention layer of this forward.
            self.rope_tables = [self.F.rope_tables(be.xp.arange(s, s + t), c.head_dim, c.rope_theta, F32)
                                for s in self.starts]
        else:
            self.positions = be.xp.arange(t)

    # precision islands (identity in training)
    def up(self, x):
        return x.astype(F64) if self.inference else x

    def down(self, x):
        return x.astype(F32) if self.inference else x

    def proj(self, x, name):
        """A small float projection ``x @ W.T`` (router, DeltaNet gates); float64 in inference."""
        if not self.inference:
            return x @ self.model.params[name].T
        lead = x.shape[:-1]
        y = x.reshape(-1, x.shape[-1]).astype(F64) @ self.model.param64(name).T
        return y.reshape(lead + (y.shape[-1],))

    def param(self, name):
        """A float parameter at the island precision (float64 copies in inference)."""
        return self.model.param64(name) if self.inference else self.model.params[name]


# ------------------------------------------------------------------------------------- blocks
class AttentionMixer:
    def __init__(self, model, prefix):
        self.m, self.p = model, prefix

    def new_state(self, capacity):
        c = self.m.cfg
        return KVCache(self.m.be.xp, capacity, c.n_kv_heads, c.head_dim)

    def __call__(self, run, x, states):
        c, F, p = self.m.cfg, run.F, self.p
        b, t, _ = x.shape
        hd = c.head_dim
        q, k, v = run.linear(x, p + "wq", p + "wk", p + "wv")
        q = q.reshape(b, t, c.n_heads, hd)
        k = k.reshape(b, t, c.n_kv_heads, hd)
        v = v.reshape(b, t, c.n_kv_heads, hd)
        if states is None:
            q = F.rope(q, run.positions, theta=c.rope_theta)
            k = F.rope(k, run.positions, theta=c.rope_theta)
            o = F.attention(q, k, v, causal=True)
        else:
            # RoPE, the cache write and the float64 attention core in one op per sequence.
            outs = [F.cached_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], kv.k, kv.v, run.starts[i], *run.rope_tables[i])
                    for i, kv in enumerate(states)]
            o = outs[0] if b == 1 else self.m.be.xp.concatenate(outs)
        o = o.reshape(b, t, c.n_heads * hd)
        if c.sub_norm:
            o = F.rmsnorm(o, self.m.params[p + "sub_norm"], eps=c.norm_eps)
        return run.linear(o, p + "wo")[0]


class DeltaNetMixer:
    """Gated DeltaNet: chunkwise over the whole batch in training, per-sequence state in inference."""

    def __init__(self, model, prefix):
        self.m, self.p = model, prefix

    def new_state(self, capacity, record=True):
        c = self.m.cfg
        return DeltaState(self.m.be.xp, c.dn_heads, c.dn_key_dim, c.dn_value_dim, capacity,
                          c.deltanet_chunk_size, record)

    def __call__(self, run, x, states):
        c, F, p = self.m.cfg, run.F, self.p
        b, t, _ = x.shape
        h, dk, dv = c.dn_heads, c.dn_key_dim, c.dn_value_dim
        q, k, v = run.linear(x, p + "wq", p + "wk", p + "wv")
        q = F.l2_normalize(run.up(q).reshape(b, t, h, dk))
        k = F.l2_normalize(run.up(k).reshape(b, t, h, dk))
        v = run.up(v).reshape(b, t, h, dv)
        g = F.deltanet_gates(run.proj(x, p + "wa"), run.param(p + "dt_bias"), run.param(p + "A_log"))
        beta = F.deltanet_beta(run.proj(x, p + "wbeta"))
        if states is None:
            o, _ = F.gated_delta_chunkwise(q, k, v, beta, g, chunk_size=c.deltanet_chunk_size)
        else:
            outs = [state.run(self.m.be, run.starts[i], q[i:i + 1], k[i:i + 1], v[i:i + 1], beta[i:i + 1], g[i:i + 1])
                    for i, state in enumerate(states)]
            o = run.down(outs[0] if b == 1 else self.m.be.xp.concatenate(outs))
        o = F.rmsnorm(o, self.m.params[p + "out_norm"], eps=c.norm_eps)
        gate = run.linear(x, p + "wgate")[0].reshape(b, t, h, dv)
        o = o * F.silu(gate)
        return run.linear(o.reshape(b, t, h * dv), p + "wo")[0]


class DenseFFN:
    def __init__(self, model, prefix):
        self.m, self.p = model, prefix

    def __call__(self, run, x, linear=None):
        c, F, p = self.m.cfg, run.F, self.p
        linear = linear or run.linear
        gate, up = linear(x, p + "w_gate", p + "w_up")
        hidden = F.swiglu(gate, up) if c.ffn_type == "swiglu" else F.relu2_glu(gate, up)
        if c.sub_norm:
            hidden = F.rmsnorm(hidden, self.m.params[p + "sub_norm"], eps=c.norm_eps)
        return linear(hidden, p + "w_down")[0]


class MoEFFN:
    """Top-k MoE FFN (softmax over the selected router logits, optional shared expert). The
    router logits and choices go to ``run.moe`` for the trainer's balancing loss and load."""

    def __init__(self, model, prefix):
        self.m, self.p = model, prefix
        c = model.cfg
        self.experts = [DenseFFN(model, f"{prefix}experts.{e}.") for e in range(c.n_experts)]
        self.shared = DenseFFN(model, prefix + "shared.") if c.moe_shared_expert else None

    def __call__(self, run, x):
        c, F = self.m.cfg, run.F
        b, t, d = x.shape
        x2 = x.reshape(b * t, d)
        router_logits = run.down(run.proj(x2, self.p + "router"))
        weights, indices = F.topk_route(router_logits, c.moe_top_k)
        run.moe.append((router_logits, indices))
        routes = F.moe_routes(indices, c.n_experts)
        outs = []
        for expert, (token_ids, _) in zip(self.experts, routes):
            if run.inference and len(token_ids) == 0:
                outs.append(self.m.be.xp.zeros((0, d), F32))
                continue
            outs.append(expert(run, F.getitem(x2, token_ids), run.linear.subset(token_ids, b * t)))
        y = F.moe_combine(weights, outs, routes)
        if self.shared is not None:
            y = y + self.shared(run, x2)
        return y.reshape(b, t, d)


class MHCUnit:
    """One mHC unit around a sub-layer F: u = h_pre . X, y = F(u), X' = H_res (X + h_post (x) y).

    Static coefficients depend on the weights only: without gradients they are computed once
    per weight version (``Model.weights_changed``) and reused."""

    def __init__(self, model, prefix):
        self.m, self.p = model, prefix

    def _logits(self):
        from reference.mhc import RES_NAME

        names = (RES_NAME[self.m.cfg.n_streams], "pre_logits", "pre_bias", "post_logits", "post_bias")
        return tuple(self.m.params[self.p + k] for k in names)

    def coefficients(self, run, streams):
        c, F = self.m.cfg, run.F
        if c.mhc_mode == "dynamic":
            return F.mhc_dynamic_coeffs(streams, self.m.params[self.p + "dyn_weight"],
                                        self.m.params[self.p + "dyn_gate"], *self._logits(), eps=c.norm_eps)
        if grad_enabled() and not run.inference:
            return F.mhc_static_coeffs(*self._logits())
        key = (self.p, run.inference)
        hit = self.m._static_mhc.get(key)
        if hit is None or hit[0] != self.m.version:
            hit = self.m._static_mhc[key] = (self.m.version, F.mhc_static_coeffs(*self._logits()))
        return hit[1]

    def __call__(self, run, streams, fn):
        h_res, h_pre, h_post = self.coefficients(run, streams)
        run.h_res.append(data_of(h_res))
        u = run.F.mhc_pre(streams, h_pre)
        return run.F.mhc_post(streams, fn(u), h_res, h_post)


class Block:
    """Pre-norm mixer + pre-norm FFN, each with a plain residual or an mHC unit."""

    def __init__(self, model, index, mixer_kind, ffn_kind):
        p = f"layers.{index}."
        self.m, self.p, self.index = model, p, index
        self.mixer = AttentionMixer(model, p + "attn.") if mixer_kind == "attention" else DeltaNetMixer(model, p + "delta.")
        self.ffn = MoEFFN(model, p + "moe.") if ffn_kind == "moe" else DenseFFN(model, p + "ffn.")
        self.mhc = (MHCUnit(model, p + "mhc_attn."), MHCUnit(model, p + "mhc_ffn.")) if model.cfg.n_streams > 1 else None
        # a plain dense attention block can decode a token in one op (``decode_layer``)
        self.fusable = self.mhc is None and mixer_kind == "attention" and ffn_kind == "dense"

    def _decode_layer(self, linear):
        """The ``DecodeLayer`` of this block for ``linear``'s packed weights, or None."""
        c, P, a, f = self.m.cfg, self.m.params, self.mixer.p, self.ffn.p
        qkv, wo = linear.stacked(a + "wq", a + "wk", a + "wv"), linear.stacked(a + "wo")
        gate_up, w_down = linear.stacked(f + "w_gate", f + "w_up"), linear.stacked(f + "w_down")
        if any(h is None for h in (qkv, wo, gate_up, w_down)):
            return None
        return DecodeLayer(c.norm_eps, P[self.p + "attn_norm"], qkv, c.n_heads, c.n_kv_heads, c.head_dim,
                           P[a + "sub_norm"] if c.sub_norm else None, wo, P[self.p + "ffn_norm"], gate_up, c.ffn_hidden,
                           "swiglu" if c.ffn_type == "swiglu" else "relu2_glu", P[f + "sub_norm"] if c.sub_norm else None,
                           w_down)

    def new_state(self, capacity):
        return self.mixer.new_state(capacity)

    def __call__(self, run, x, streams, states, b, t):
        c, F, P = self.m.cfg, run.F, self.m.params
        if run.fused_decode and self.fusable and b == 1:
            layer = run.linear.decode_layer(self.p, self._decode_layer)
            if layer is not None:
                kv = states[0]
                return F.decode_layer(x.reshape(t, c.dim), layer, kv.k, kv.v, run.starts[0],
                                      *run.rope_tables[0]).reshape(1, t, c.dim), streams

        def mix(u):
            return self.mixer(run, F.rmsnorm(u, P[self.p + "attn_norm"], eps=c.norm_eps), states)

        def ffn(u):
            return self.ffn(run, F.rmsnorm(u, P[self.p + "ffn_norm"], eps=c.norm_eps))

        for i, fn in enumerate((mix, ffn)):
            if self.mhc is None:
                x = x + fn(x)
            else:
                streams = self.mhc[i](run, streams, lambda u: fn(u.reshape(b, t, c.dim)).reshape(b * t, c.dim))
        return x, streams


# -------------------------------------------------------------------------------------- model
class Model:
    """Parameters (one ordered dict ``name -> Tensor`` from the parameter table) and the forward."""

    def __init__(self, cfg, backend, seed=0, weights=None):
        self.cfg = cfg
        self.be = backend
        self.dtype = backend.dtype
        self.array_ops = _ArrayOps(backend)
        self.table = parameter_table(cfg)
        self.params: dict[str, object] = {}
        self.version = 0
        self._static_mhc: dict = {}
        self._p64: dict = {}
        xp = backend.xp
        if weights is None:
            rng = np.random.default_rng(seed)
            for spec in self.table:
                value = xp.asarray(np.asarray(spec.init(rng), dtype=self.dtype))
                self.params[spec.name] = Tensor(value, requires_grad=True, name=spec.name)
        else:
            for spec in self.table:
                if spec.name in weights:
                    self.params[spec.name] = xp.asarray(np.asarray(weights[spec.name], dtype=self.dtype))
        self.blocks = [Block(self, i, mixer, ffn) for i, (mixer, ffn) in enumerate(cfg.block_kinds())]

    @classmethod
    def from_weights(cls, cfg, backend, weights):
        """A model on plain arrays for inference: ``weights`` maps names to float arrays (the
        ternary weights run through a ``PackedLinear`` instead and may be absent)."""
        return cls(cfg, backend, weights=weights)

    # ------------------------------------------------------------------ parameters
    def num_parameters(self):
        return int(sum(spec.size for spec in self.table))

    def param_groups(self):
        """Optimizer group (SPEC 4) of every parameter, from the table: ``{name: "muon"|"adamw"}``."""
        return {spec.name: spec.group for spec in self.table}

    def weights_changed(self):
        """Call after the weights change (optimizer step, load): cached coefficients are redone."""
        self.version += 1
        self._p64.clear()

    def param64(self, name):
        """A float64 copy of a (small) float parameter, made once per weight version."""
        a = self._p64.get(name)
        if a is None:
            a = self._p64[name] = data_of(self.params[name]).astype(F64)
        return a

    # --------------------------------------------------------------------- state
    def new_cache(self, capacity=MIN_CAPACITY, record=True):
        """An empty ``SequenceCache`` for one sequence (capacity grows on demand)."""
        capacity = max(int(capacity), 1)
        states = []
        for block in self.blocks:
            if isinstance(block.mixer, DeltaNetMixer):
                states.append(block.mixer.new_state(capacity, record))
            else:
                states.append(block.mixer.new_state(capacity))
        return SequenceCache(states)

    # --------------------------------------------------------------------- forward
    def forward(self, idx, cache=None, *, linear=None, keep=None, last_only=False, head=None):
        """``idx`` int [B, T] -> ``Output`` (logits [B, T, V], hidden state, MoE routing).

        ``cache``: None for the training forward (positions 0 .. T-1, autograd), or a list of
        B ``SequenceCache`` (one per row; each row continues its own sequence from its own
        position, and the caches advance by T). ``linear``: the BitLinear strategy (default
        the training ``ternary_linear`` with ``keep``, Collider's row selection). ``last_only``:
        logits of each row's last position only (``[B, 1, V]``; what sampling needs). ``head``:
        inference only, a callable for the LM head on ``[N, C]`` rows (e.g. ``Int8Head``).
        """
        c, be = self.cfg, self.be
        xp = be.xp
        idx = xp.asarray(idx)
        b, t = idx.shape
        if cache is not None and len(cache) != b:
            raise ValueError(f"forward: {b} rows need {b} caches, got {len(cache)}.")
        if cache is not None:
            for seq in cache:
                seq.reserve(seq.position + t)
        run = Run(self, idx, cache, linear, keep, head)
        F = run.F
        x = F.gather(self.params["tok_embeddings"], idx)
        n = c.n_streams
        streams = F.mhc_expand(x.reshape(b * t, c.dim), n) if n > 1 else None
        for i, block in enumerate(self.blocks):
            states = None if cache is None else [seq.layers[i] for seq in cache]
            x, streams = block(run, x, streams, states, b, t)
        if n > 1:
            x = F.mhc_collapse(streams).reshape(b, t, c.dim)
        h = x[:, -1:] if last_only else x
        t_out = h.shape[1]
        logits = self.head(F.rmsnorm(h, self.params["norm"], eps=c.norm_eps).reshape(b * t_out, c.dim), keep, run)
        if cache is not None:
            for seq in cache:
                seq.position += t
            if hasattr(run.linear, "forget"):
                run.linear.forget()
        return Output(logits.reshape(b, t_out, c.vocab_size), x, run.moe, run.h_res)

    def head(self, h2, keep=None, run=None):
        """LM head on rows ``h2 [N, C]`` -> logits [N, V]. Under Collider its backward runs on
        the kept rows only (the filtered tokens' loss weights are zero, so skipping is exact)."""
        w = self.params["tok_embeddings" if self.cfg.tie_embeddings else "lm_head"]
        if run is not None and run.inference:
            return run.head(h2) if run.head is not None else run.F.linear_rows(h2, w)
        return self.be.dense_linear(h2, w, keep=keep)

    def mtp_hidden(self, h, i, keep=None, linear=None):
        """MTP head ``i`` on the hidden state: z = h + proj_i(rmsnorm_i(h)), then the final norm.

        With a ``linear`` strategy (inference: the engine's packed one) it runs on plain arrays."""
        c, P = self.cfg, self.params
        F = self.be if linear is None else self.array_ops
        lin = linear or TrainingLinear(self.be, P, c.group_size, keep)
        z = h + lin(F.rmsnorm(h, P[f"mtp.{i}.norm"], eps=c.norm_eps), f"mtp.{i}.proj")[0]
        return F.rmsnorm(z, P["norm"], eps=c.norm_eps)

    def draft_logits(self, h, n_heads, linear, head=None):
        """Inference: the first ``n_heads`` MTP heads on one hidden row ``h [C]`` -> logits
        ``[n_heads, V]``; row i guesses the token i + 2 positions after ``h``'s (speculative drafts)."""
        z = self.be.xp.concatenate([self.mtp_hidden(h[None, :], i, linear=linear) for i in range(n_heads)])
        if head is not None:
            return head(z)
        return self.be.linear_rows(z, self.params["tok_embeddings" if self.cfg.tie_embeddings else "lm_head"])

    def logits(self, idx):
        """Full-sequence logits [B, T, V] of the training forward (no loss)."""
        return self.forward(idx).logits
