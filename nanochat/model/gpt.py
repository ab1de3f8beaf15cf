"""The ternary decoder-only transformer (SPEC section 5), built only from backend ops.

Parameters live in one ordered dict ``name -> Tensor`` (the names are the checkpoint and
GGUF tensor names). ``forward`` builds the autograd graph through ``backend.<op>`` calls, so
the same model runs on the numpy reference, numba and cupy backends.

Layer layout (``layers.{i}.``):
- ``attn_norm`` / ``ffn_norm``: RMSNorm weights of the two pre-norms
- attention layers: ``attn.wq wk wv wo`` BitLinear shadow weights (+ ``attn.sub_norm``)
- DeltaNet layers: ``delta.wq wk wv wo wa wbeta wgate`` (BitLinear), ``delta.A_log``,
  ``delta.dt_bias``, ``delta.out_norm``
- FFN: ``ffn.w_gate w_up w_down`` (+ ``ffn.sub_norm``) or MoE ``moe.router``,
  ``moe.experts.{e}.w_gate ...``, ``moe.shared.w_gate ...``
- mHC (n_streams > 1): ``mhc_attn.*`` and ``mhc_ffn.*``
MTP heads: ``mtp.{i}.norm``, ``mtp.{i}.proj``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from reference.autograd import Tensor, array_module
from reference import mhc as mhc_ref
from reference.ternary import RowSelection

# Parameter groups (SPEC 4): BitLinear shadow weights and other hidden matrices -> Muon;
# everything else (embedding/head, norms, mHC, routers, gates, biases, scalars) -> AdamW.
MUON_SUFFIXES = (".wq", ".wk", ".wv", ".wo", ".w_gate", ".w_up", ".w_down", ".wa", ".wbeta", ".wgate", ".proj")
# The MoE router is a hidden matrix too, but SPEC 4 puts routers on AdamW.


@dataclass
class ForwardResult:
    loss: Tensor                      # what backward runs on (includes MTP and MoE aux terms)
    ce: float                         # main next-token loss averaged over all scored tokens
    mtp: float = 0.0                  # weighted MTP loss (before mtp_weight), 0 without MTP
    aux: float = 0.0                  # MoE load-balancing loss
    token_losses: np.ndarray | None = None
    expert_load: list = field(default_factory=list)
    kept_fraction: float = 1.0


def is_muon_param(name, shape):
    return len(shape) == 2 and name.endswith(MUON_SUFFIXES)


class Model:
    """Holds the parameters and runs the forward pass on a backend."""

    def __init__(self, cfg, backend, seed=0):
        self.cfg = cfg
        self.be = backend
        self.dtype = backend.dtype
        self.params: dict[str, Tensor] = {}
        self.layer_kinds = layer_kinds(cfg)
        rng = np.random.default_rng(seed)
        self._init_params(rng)

    # ------------------------------------------------------------------ parameters
    def _add(self, name, array):
        xp = self.be.xp
        self.params[name] = Tensor(xp.asarray(np.asarray(array, dtype=self.dtype)), requires_grad=True, name=name)

    def _linear(self, name, out_dim, in_dim, rng, gain=1.0):
        self._add(name, rng.standard_normal((out_dim, in_dim)) * (gain / math.sqrt(in_dim)))

    def _init_params(self, rng):
        c = self.cfg
        d, hd = c.dim, c.head_dim
        out_gain = 1.0 / math.sqrt(2 * c.n_layers)
        self._add("tok_embeddings", rng.standard_normal((c.vocab_size, d)) * c.init_std)
        if not c.tie_embeddings:
            self._add("lm_head", rng.standard_normal((c.vocab_size, d)) * c.init_std)
        for i, kind in enumerate(self.layer_kinds):
            p = f"layers.{i}."
            self._add(p + "attn_norm", np.ones(d))
            if kind == "attention":
                self._linear(p + "attn.wq", c.n_heads * hd, d, rng)
                self._linear(p + "attn.wk", c.n_kv_heads * hd, d, rng)
                self._linear(p + "attn.wv", c.n_kv_heads * hd, d, rng)
                if c.sub_norm:
                    self._add(p + "attn.sub_norm", np.ones(c.n_heads * hd))
                self._linear(p + "attn.wo", d, c.n_heads * hd, rng, out_gain)
            else:
                self._init_deltanet(p + "delta.", rng, out_gain)
            self._add(p + "ffn_norm", np.ones(d))
            if self._is_moe_layer(i):
                self._init_moe(p + "moe.", rng, out_gain)
            else:
                self._init_ffn(p + "ffn.", c.ffn_hidden, rng, out_gain)
            if c.n_streams > 1:
                for j, sub in enumerate(("mhc_attn.", "mhc_ffn.")):
                    params = mhc_ref.mhc_init_params(c.n_streams, 2 * i + j, c.mhc_mode, d, rng, self.dtype)
                    for k, v in params.items():
                        self._add(p + sub + k, v)
        self._add("norm", np.ones(d))
        for i in range(c.mtp_n_tokens):
            self._add(f"mtp.{i}.norm", np.ones(d))
            self._linear(f"mtp.{i}.proj", d, d, rng, 0.5)

    def _init_ffn(self, p, hidden, rng, out_gain):
        d = self.cfg.dim
        self._linear(p + "w_gate", hidden, d, rng)
        self._linear(p + "w_up", hidden, d, rng)
        if self.cfg.sub_norm:
            self._add(p + "sub_norm", np.ones(hidden))
        self._linear(p + "w_down", d, hidden, rng, out_gain)

    def _init_moe(self, p, rng, out_gain):
        c = self.cfg
        self._add(p + "router", rng.standard_normal((c.n_experts, c.dim)) * 0.02)
        for e in range(c.n_experts):
            self._init_ffn(f"{p}experts.{e}.", c.expert_hidden, rng, out_gain)
        if c.moe_shared_expert:
            self._init_ffn(p + "shared.", c.expert_hidden, rng, out_gain)

    def _init_deltanet(self, p, rng, out_gain):
        c = self.cfg
        d, (h, dk, dv) = c.dim, deltanet_dims(c)
        self._linear(p + "wq", h * dk, d, rng)
        self._linear(p + "wk", h * dk, d, rng)
        self._linear(p + "wv", h * dv, d, rng)
        self._linear(p + "wgate", h * dv, d, rng)
        # Small float projections for the per-head gates (too narrow for ternary groups).
        self._add(p + "wa", rng.standard_normal((h, d)) * 0.02)
        self._add(p + "wbeta", rng.standard_normal((h, d)) * 0.02)
        # Decay rates spread over heads (Mamba-style init): A in [1, 16], dt in [1e-3, 1e-1].
        self._add(p + "A_log", np.log(np.linspace(1.0, 16.0, h)))
        dt = np.exp(np.linspace(np.log(1e-3), np.log(1e-1), h))
        self._add(p + "dt_bias", dt + np.log(-np.expm1(-dt)))  # inverse softplus
        self._add(p + "out_norm", np.ones(dv))
        self._linear(p + "wo", d, h * dv, rng, out_gain)

    def _is_moe_layer(self, i):
        return i in self.cfg.moe_layer_ids

    def num_parameters(self):
        return int(sum(t.size for t in self.params.values()))

    def parameter_breakdown(self):
        """Parameter counts per component (embedding, attention, deltanet, ffn, moe, norms, mhc, mtp)."""
        groups: dict[str, int] = {}
        for name, t in self.params.items():
            if name.startswith("mtp."):
                key = "mtp"
            elif ".mhc_" in name:
                key = "mhc"
            elif name.endswith("norm") or ".sub_norm" in name or name.endswith("out_norm"):
                key = "norms"
            elif ".attn." in name:
                key = "attention"
            elif ".delta." in name:
                key = "deltanet"
            elif ".moe." in name:
                key = "moe"
            elif ".ffn." in name:
                key = "ffn"
            else:
                key = "embedding"
            groups[key] = groups.get(key, 0) + int(t.size)
        return groups

    # --------------------------------------------------------------------- forward
    def forward(self, tokens, collider_sparsity=0.0, need_token_losses=False, with_mtp=True):
        """``tokens`` int [B, T+1] windows -> ForwardResult (loss over all T positions).

        ``with_mtp=False`` skips the MTP heads (validation reports the main loss only).
        """
        be, c, xp = self.be, self.cfg, self.be.xp
        tokens = xp.asarray(tokens)
        idx, targets = tokens[:, :-1], tokens[:, 1:]
        b, t = idx.shape
        selection = RowSelection() if collider_sparsity > 0 else None
        self.last_h_res = []
        h, expert_load, aux = self.trunk(idx, selection)
        hn = be.rmsnorm(h, self.params["norm"], eps=c.norm_eps)
        flat_targets = targets.reshape(-1)
        logits = self._logits(hn.reshape(b * t, c.dim), selection)
        token_losses = weights = None
        kept = 1.0
        if selection is not None or need_token_losses:
            token_losses = be.cross_entropy_per_token(logits.data, flat_targets)
        if selection is not None:
            weights, rows = collider_keep(token_losses.reshape(b, t), collider_sparsity, xp)
            selection.set(rows)
            kept = rows.size / (b * t)
        if weights is None:
            ce_loss = be.cross_entropy(logits, flat_targets)
            ce_value = float(be.to_numpy(ce_loss.data))
        else:
            # Filtered tokens get zero weight; normalise by all tokens so kept tokens keep their scale.
            ce_loss = be.cross_entropy(logits, flat_targets, weights, reduction="sum") * (1.0 / (b * t))
            ce_value = float(be.to_numpy(token_losses).mean())  # the reported loss averages all tokens
        loss = ce_loss
        mtp_value = 0.0
        if c.mtp_n_tokens and with_mtp:
            mtp_loss = self._mtp_loss(h, tokens, weights, selection)
            mtp_value = float(mtp_loss.data)
            loss = loss + mtp_loss * c.mtp_weight
        if aux is not None:
            loss = loss + aux * c.moe_aux_loss_weight
        return ForwardResult(
            loss=loss, ce=ce_value, mtp=mtp_value, aux=0.0 if aux is None else float(aux.data),
            token_losses=be.to_numpy(token_losses) if need_token_losses else None,
            expert_load=expert_load, kept_fraction=kept,
        )

    def _logits(self, h2, selection=None):
        """LM head. Under Collider its backward runs on the kept rows only: the filtered tokens'
        loss weights are zero, so their gradient rows are zero and skipping them is exact."""
        head = self.params["tok_embeddings" if self.cfg.tie_embeddings else "lm_head"]
        return self.be.dense_linear(h2, head, keep=selection)

    def logits(self, idx):
        """Full-sequence logits [B, T, V] (no loss), used for sampling and export checks."""
        c = self.cfg
        xp = self.be.xp
        idx = xp.asarray(idx)
        b, t = idx.shape
        self.last_h_res = []
        h, _, _ = self.trunk(idx, None)
        hn = self.be.rmsnorm(h, self.params["norm"], eps=c.norm_eps)
        return self._logits(hn.reshape(b * t, c.dim)).reshape(b, t, c.vocab_size)

    def trunk(self, idx, selection):
        """Embedding -> blocks -> collapsed hidden state [B, T, C] (before the final norm)."""
        be, c, P = self.be, self.cfg, self.params
        xp = be.xp
        b, t = idx.shape
        positions = xp.arange(t)
        x = be.gather(P["tok_embeddings"], idx)
        n = c.n_streams
        streams = be.mhc_expand(x.reshape(b * t, c.dim), n) if n > 1 else None
        expert_load, aux_total = [], None
        for i, kind in enumerate(self.layer_kinds):
            p = f"layers.{i}."

            def mixer(u, p=p, kind=kind):
                un = be.rmsnorm(u, P[p + "attn_norm"], eps=c.norm_eps)
                if kind == "attention":
                    return self._attention(p + "attn.", un, positions, selection)
                return self._deltanet(p + "delta.", un, selection)

            def ffn(u, p=p, i=i):
                un = be.rmsnorm(u, P[p + "ffn_norm"], eps=c.norm_eps)
                if self._is_moe_layer(i):
                    out, load, aux = self._moe(p + "moe.", un, selection)
                    expert_load.append(load)
                    nonlocal aux_total
                    aux_total = aux if aux_total is None else aux_total + aux
                    return out
                return self._ffn(p + "ffn.", un, selection)

            for sub, fn in (("mhc_attn.", mixer), ("mhc_ffn.", ffn)):
                if n == 1:
                    x = x + fn(x)
                else:
                    streams = self._mhc_step(p + sub, streams, lambda u: fn(u.reshape(b, t, c.dim)).reshape(b * t, c.dim))
        if n > 1:
            x = be.mhc_collapse(streams).reshape(b, t, c.dim)
        return x, expert_load, aux_total

    def _bitlinear(self, x, name, selection):
        return self.be.ternary_linear(x, self.params[name], self.cfg.group_size, keep=selection)

    def _attention(self, p, x, positions, selection):
        be, c = self.be, self.cfg
        b, t, _ = x.shape
        hd = c.head_dim
        q = self._bitlinear(x, p + "wq", selection).reshape(b, t, c.n_heads, hd)
        k = self._bitlinear(x, p + "wk", selection).reshape(b, t, c.n_kv_heads, hd)
        v = self._bitlinear(x, p + "wv", selection).reshape(b, t, c.n_kv_heads, hd)
        q = be.rope(q, positions, theta=c.rope_theta)
        k = be.rope(k, positions, theta=c.rope_theta)
        o = be.attention(q, k, v, causal=True).reshape(b, t, c.n_heads * hd)
        if c.sub_norm:
            o = be.rmsnorm(o, self.params[p + "sub_norm"], eps=c.norm_eps)
        return self._bitlinear(o, p + "wo", selection)

    def _ffn(self, p, x, selection):
        be, c = self.be, self.cfg
        gate = self._bitlinear(x, p + "w_gate", selection)
        up = self._bitlinear(x, p + "w_up", selection)
        hidden = be.swiglu(gate, up) if c.ffn_type == "swiglu" else be.relu2_glu(gate, up)
        if c.sub_norm:
            hidden = be.rmsnorm(hidden, self.params[p + "sub_norm"], eps=c.norm_eps)
        return self._bitlinear(hidden, p + "w_down", selection)

    def _mhc_coeffs(self, p, streams):
        P, c = self.params, self.cfg
        res = P[p + ("alpha_logit" if c.n_streams == 2 else "res_logits")]
        args = (res, P[p + "pre_logits"], P[p + "pre_bias"], P[p + "post_logits"], P[p + "post_bias"])
        if c.mhc_mode == "static":
            return self.be.mhc_static_coeffs(*args)
        return self.be.mhc_dynamic_coeffs(streams, P[p + "dyn_weight"], P[p + "dyn_gate"], *args, eps=c.norm_eps)

    def _mhc_step(self, p, streams, fn):
        """One mHC unit: u = h_pre . X, y = F(u), X' = H_res (X + h_post (x) y)."""
        h_res, h_pre, h_post = self._mhc_coeffs(p, streams)
        self.last_h_res.append(h_res.data)
        u = self.be.mhc_pre(streams, h_pre)
        return self.be.mhc_post(streams, fn(u), h_res, h_post)

    def _moe(self, p, x, selection):
        """Top-k MoE FFN on x [B, T, C] -> (output, per-expert token counts, aux loss)."""
        be, c, P = self.be, self.cfg, self.params
        b, t, d = x.shape
        x2 = x.reshape(b * t, d)
        router_logits = x2 @ P[p + "router"].T
        weights, indices = be.topk_route(router_logits, c.moe_top_k)
        aux = be.load_balance_loss(router_logits, indices, c.n_experts)
        routes = be.moe_routes(indices, c.n_experts)
        outs = []
        for e, (token_ids, _) in enumerate(routes):
            sub = None if selection is None else SubsetSelection(selection, token_ids, b * t)
            xe = be.getitem(x2, token_ids)
            outs.append(self._ffn(f"{p}experts.{e}.", xe, sub))
        y = be.moe_combine(weights, outs, routes)
        if c.moe_shared_expert:
            y = y + self._ffn(p + "shared.", x2, selection)
        load = be.to_numpy(be.expert_load(indices, c.n_experts))
        return y.reshape(b, t, d), load, aux

    def _deltanet(self, p, x, selection):
        """Gated DeltaNet mixer on x [B, T, C] (chunkwise form in training)."""
        be, c, P = self.be, self.cfg, self.params
        b, t, _ = x.shape
        h, dk, dv = deltanet_dims(c)
        q = be.l2_normalize(self._bitlinear(x, p + "wq", selection).reshape(b, t, h, dk))
        k = be.l2_normalize(self._bitlinear(x, p + "wk", selection).reshape(b, t, h, dk))
        v = self._bitlinear(x, p + "wv", selection).reshape(b, t, h, dv)
        g = be.deltanet_gates(x @ P[p + "wa"].T, P[p + "dt_bias"], P[p + "A_log"])
        beta = be.deltanet_beta(x @ P[p + "wbeta"].T)
        o, _ = be.gated_delta_chunkwise(q, k, v, beta, g, chunk_size=c.deltanet_chunk_size)
        o = be.rmsnorm(o, P[p + "out_norm"], eps=c.norm_eps)
        gate = self._bitlinear(x, p + "wgate", selection).reshape(b, t, h, dv)
        o = o * be.silu(gate)
        return self._bitlinear(o.reshape(b, t, h * dv), p + "wo", selection)

    def _mtp_loss(self, h, tokens, weights, selection):
        """Sum over MTP heads of 0.5^i * CE(head i predicts token t+2+i)."""
        be, c, P = self.be, self.cfg, self.params
        xp = be.xp
        b, t1 = tokens.shape
        t = t1 - 1
        total = None
        for i in range(c.mtp_n_tokens):
            valid = t - 1 - i
            if valid <= 0:
                break
            targets = xp.full((b, t), IGNORE, dtype=tokens.dtype)
            targets[:, :valid] = tokens[:, 2 + i:]
            z = h + self._bitlinear(be.rmsnorm(h, P[f"mtp.{i}.norm"], eps=c.norm_eps), f"mtp.{i}.proj", selection)
            zn = be.rmsnorm(z, P["norm"], eps=c.norm_eps)
            logits = self._logits(zn.reshape(b * t, c.dim), selection)
            if weights is None:
                loss_i = be.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE)
            else:
                # As for the main CE under Collider: filtered positions weigh 0 and the sum is divided
                # by every scored position, so filtering does not rescale the MTP term.
                loss_i = be.cross_entropy(logits, targets.reshape(-1), weights, ignore_index=IGNORE,
                                          reduction="sum") * (1.0 / (b * valid))
            term = loss_i * (0.5 ** i)
            total = term if total is None else total + term
        return total


IGNORE = -100


class SubsetSelection(RowSelection):
    """The rows of a gathered subset (an expert's tokens) that a parent selection keeps."""

    def __init__(self, parent, token_ids, n_rows):
        self.parent, self.token_ids, self.n_rows = parent, token_ids, n_rows

    @property
    def rows(self):
        if self.parent.rows is None:
            return None
        xp = array_module(self.token_ids)
        mask = xp.zeros(self.n_rows, dtype=bool)
        mask[self.parent.rows] = True
        return xp.nonzero(mask[self.token_ids])[0]


def collider_keep(token_losses, sparsity, xp):
    """Per sequence, drop the ``sparsity`` fraction of tokens with the lowest loss.

    Returns (weights [B*T] with 0 for dropped tokens, kept flat row indices sorted)."""
    b, t = token_losses.shape
    n_drop = int(math.floor(sparsity * t))
    weights = xp.ones((b, t), dtype=token_losses.dtype)
    if n_drop > 0:
        order = xp.argsort(token_losses, axis=1, kind="stable")
        drop = order[:, :n_drop]
        weights[xp.arange(b)[:, None], drop] = 0
    weights = weights.reshape(-1)
    rows = xp.nonzero(weights)[0]
    return weights, rows


def layer_kinds(cfg):
    """'attention' or 'deltanet' per layer."""
    return [mixer for mixer, _ in cfg.block_kinds()]


def deltanet_dims(cfg):
    """(heads, d_k, d_v) of the DeltaNet layers."""
    return cfg.dn_heads, cfg.dn_key_dim, cfg.dn_value_dim
