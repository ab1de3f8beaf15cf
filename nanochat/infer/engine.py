"""The inference engine (SPEC section 8): packed ternary kernels, KV cache, DeltaNet state,
sampling and streaming text.

    loaded = load_model("model.gguf")            # or a checkpoint directory
    engine = Engine(loaded, backend="auto")
    for piece in engine.generate("def main():", max_new_tokens=64, temperature=0.8, seed=0):
        print(piece, end="", flush=True)
    engine.last_stats.decode_tokens_per_sec

The forward pass is the training forward of ``nanochat.model.gpt.Model`` on plain arrays, with
every BitLinear replaced by the backend's packed kernels: each ternary weight goes through
``backend.prepare_packed`` once at load time; a chunk of N > 1 new tokens (prefill) runs
``packed_gemm`` on the per-token int8 activations from ``quantize_acts``, one new token
(decode) runs ``packed_gemv``. ``dequantized=True`` swaps the kernels for float32 matmuls
with ``W = q * s`` (same activations, same model): the baseline of ``scripts/bench_decode.py``.

Numerics. The engine runs in float32 like training, except for the parts whose float32
result would depend on how many tokens a call holds: the attention core (scores, softmax,
weighted sum), the Gated DeltaNet recurrence and its gates, the small float projections that
feed routing and gates (MoE router, DeltaNet ``wa``/``wbeta``) and the dynamic mHC
coefficients run in float64 and are rounded to float32 at their outputs. A matrix product of
float32 operands sums in an order that BLAS picks by shape, so a one-token decode step and a
many-token prefill would otherwise differ in the last bits, and a last-bit difference that
lands on a rounding tie of the next layer's int8 activation quantizer grows to a visible one.
With float64 islands the decode path and the prefill path give the same activations up to
float32 rounding ties, and both agree with ``Model.logits`` to ~1e-6 (the SPEC asks 1e-4).

Caches. Attention layers keep keys and values (after RoPE, float64) in arrays preallocated
for ``max_len`` positions that double when a longer context arrives. DeltaNet layers keep
their state ``S`` (float64) plus, for ``rewind``, the per-token recurrence inputs and a
snapshot of ``S`` every ``SNAPSHOT_EVERY`` positions: rewinding restores the nearest snapshot
at or before the target and replays the stored inputs with ``gated_delta_step`` (exact: the
same step function decode uses). Memory per DeltaNet layer and position is
``H * (2 d_k + d_v + 2)`` floats of inputs, plus one state per 64 positions.

Sampling order (``sample_next``): repetition penalty -> temperature (0 = greedy) -> top-k ->
top-p -> draw from a ``numpy.random.Generator`` seeded per call.
"""
from __future__ import annotations

import codecs
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from reference.autograd import no_grad, data_of as _arr
from reference.mhc import RES_NAME, RES_SIZE, n_logits

F32 = np.float32
F64 = np.float64
SNAPSHOT_EVERY = 64  # DeltaNet state snapshots (for rewind) every this many positions
MIN_CAPACITY = 16


# --------------------------------------------------------------------------- tensor layout
def expected_tensors(cfg):
    """``(floats, ternary)``: parameter name -> shape of every tensor the engine needs.

    ``cfg`` is a ``ModelConfig``. The names are ``nanochat.model.gpt.Model``'s; ternary names are
    the BitLinear weights (``[M, K]`` shadow shapes). MTP heads are training-only and absent.
    """
    d, hd, V = cfg.dim, cfg.head_dim, cfg.vocab_size
    floats: dict[str, tuple] = {"tok_embeddings": (V, d)}
    ternary: dict[str, tuple] = {}
    if not cfg.tie_embeddings:
        floats["lm_head"] = (V, d)

    def ffn(p, hidden):
        ternary[p + "w_gate"] = (hidden, d)
        ternary[p + "w_up"] = (hidden, d)
        if cfg.sub_norm:
            floats[p + "sub_norm"] = (hidden,)
        ternary[p + "w_down"] = (d, hidden)

    n = cfg.n_streams
    for i, (mixer, ffn_kind) in enumerate(cfg.block_kinds()):
        p = f"layers.{i}."
        floats[p + "attn_norm"] = (d,)
        if mixer == "attention":
            ternary[p + "attn.wq"] = (cfg.n_heads * hd, d)
            ternary[p + "attn.wk"] = (cfg.n_kv_heads * hd, d)
            ternary[p + "attn.wv"] = (cfg.n_kv_heads * hd, d)
            if cfg.sub_norm:
                floats[p + "attn.sub_norm"] = (cfg.n_heads * hd,)
            ternary[p + "attn.wo"] = (d, cfg.n_heads * hd)
        else:
            h, dk, dv = cfg.dn_heads, cfg.dn_key_dim, cfg.dn_value_dim
            q = p + "delta."
            ternary[q + "wq"] = (h * dk, d)
            ternary[q + "wk"] = (h * dk, d)
            ternary[q + "wv"] = (h * dv, d)
            ternary[q + "wgate"] = (h * dv, d)
            floats[q + "wa"] = (h, d)
            floats[q + "wbeta"] = (h, d)
            floats[q + "A_log"] = (h,)
            floats[q + "dt_bias"] = (h,)
            floats[q + "out_norm"] = (dv,)
            ternary[q + "wo"] = (d, h * dv)
        floats[p + "ffn_norm"] = (d,)
        if ffn_kind == "moe":
            floats[p + "moe.router"] = (cfg.n_experts, d)
            for e in range(cfg.n_experts):
                ffn(f"{p}moe.experts.{e}.", cfg.expert_hidden)
            if cfg.moe_shared_expert:
                ffn(p + "moe.shared.", cfg.expert_hidden)
        else:
            ffn(p + "ffn.", cfg.ffn_hidden)
        if n > 1:
            for sub in ("mhc_attn.", "mhc_ffn."):
                floats[p + sub + RES_NAME[n]] = (RES_SIZE[n],)
                for name in ("pre_logits", "pre_bias", "post_logits", "post_bias"):
                    floats[p + sub + name] = (n,)
                if cfg.mhc_mode == "dynamic":
                    floats[p + sub + "dyn_weight"] = (n_logits(n), n * d)
                    floats[p + sub + "dyn_gate"] = (1,)
    floats["norm"] = (d,)
    return floats, ternary


def _check_loaded(loaded, cfg):
    floats, ternary = expected_tensors(cfg)
    src = getattr(loaded, "source", "the model")
    for name, shape in floats.items():
        a = loaded.floats.get(name)
        if a is None:
            raise ValueError(f"{src}: float tensor {name!r} is missing (the config needs it with shape {shape}).")
        if tuple(a.shape) != shape:
            raise ValueError(f"{src}: float tensor {name!r} has shape {tuple(a.shape)}, the config needs {shape}.")
        if not np.isfinite(np.asarray(a)).all():
            raise ValueError(f"{src}: float tensor {name!r} has non-finite values.")
    g = cfg.group_size
    for name, (m, k) in ternary.items():
        pair = loaded.ternary.get(name)
        if pair is None:
            raise ValueError(f"{src}: ternary tensor {name!r} is missing (the config needs it with shape {(m, k)}).")
        packed, scales = pair
        if tuple(packed.shape) != (m, k // 4) or packed.dtype != np.uint8:
            raise ValueError(f"{src}: ternary tensor {name!r} is packed as {packed.dtype} {tuple(packed.shape)}, "
                             f"the config needs uint8 {(m, k // 4)}.")
        if tuple(scales.shape) != (m, k // g):
            raise ValueError(f"{src}: scales of ternary tensor {name!r} have shape {tuple(scales.shape)}, "
                             f"the config needs {(m, k // g)} (group size {g}).")
        if not np.isfinite(np.asarray(scales)).all():
            raise ValueError(f"{src}: scales of ternary tensor {name!r} have non-finite values.")


def load_model(path):
    """A ``LoadedModel`` from a ``.gguf`` file or a checkpoint directory (``nanochat.io.gguf``)."""
    from nanochat.io import gguf as gguf_io

    p = Path(path)
    if p.is_dir():
        return gguf_io.loaded_from_checkpoint(p)
    if p.is_file():
        return gguf_io.read_gguf(p)
    raise ValueError(f"model path {p} does not exist (give a .gguf file or a checkpoint directory).")


def random_model(cfg, seed=0):
    """A ``LoadedModel`` with random weights for the config ``cfg`` (for speed measurements:
    decode time does not depend on the values). Trits are uniform over {-1, 0, +1}, scales
    fp16-exact, norms one, other floats N(0, 0.02)."""
    from nanochat.io import gguf as gguf_io
    from reference.ternary import pack_ternary

    rng = np.random.default_rng(seed)
    floats, ternary = expected_tensors(cfg.model)
    f = {name: np.ones(shape, F32) if name.endswith("norm") else (rng.standard_normal(shape) * 0.02).astype(F32)
         for name, shape in floats.items()}
    t = {}
    for name, (m, k) in ternary.items():
        q = rng.integers(-1, 2, size=(m, k), dtype=np.int8)
        scales = rng.uniform(0.01, 0.05, size=(m, k // cfg.model.group_size)).astype(np.float16).astype(F32)
        t[name] = (pack_ternary(q), scales)
    return gguf_io.LoadedModel(config=cfg, floats=f, ternary=t, tokenizer_json=None, source=f"random weights, seed {seed}")


# --------------------------------------------------------------------------------- caches
class KVCache:
    """Keys (after RoPE) and values of one attention layer: float64 ``[B, capacity, Hkv, hd]``."""

    def __init__(self, xp, batch, capacity, n_kv, head_dim):
        self.k = xp.zeros((batch, capacity, n_kv, head_dim), F64)
        self.v = xp.zeros_like(self.k)

    def reserve(self, xp, length):
        cap = self.k.shape[1]
        if length <= cap:
            return
        new_cap = max(length, 2 * cap)
        for name in ("k", "v"):
            old = getattr(self, name)
            grown = xp.zeros((old.shape[0], new_cap) + old.shape[2:], F64)
            grown[:, :cap] = old
            setattr(self, name, grown)

    def write(self, start, k, v):
        t = k.shape[1]
        self.k[:, start:start + t] = k
        self.v[:, start:start + t] = v


class DeltaState:
    """Recurrent state of one Gated DeltaNet layer (float64 ``S [B, H, dk, dv]``).

    With ``record`` (the engine's own cache) it also keeps the per-token recurrence inputs
    and a snapshot of ``S`` at every multiple of ``SNAPSHOT_EVERY`` so that ``rewind_to`` can
    restore any earlier position exactly.
    """

    def __init__(self, xp, batch, heads, dk, dv, capacity, chunk_size, record):
        self.xp, self.record, self.chunk_size = xp, record, chunk_size
        self.S = xp.zeros((batch, heads, dk, dv), F64)
        self.snapshots: dict[int, object] = {}
        self.inputs = None
        if record:
            self.inputs = {
                "q": xp.zeros((batch, capacity, heads, dk), F64),
                "k": xp.zeros((batch, capacity, heads, dk), F64),
                "v": xp.zeros((batch, capacity, heads, dv), F64),
                "beta": xp.zeros((batch, capacity, heads), F64),
                "g": xp.zeros((batch, capacity, heads), F64),
            }

    def reserve(self, length):
        if not self.record:
            return
        cap = self.inputs["q"].shape[1]
        if length <= cap:
            return
        new_cap = max(length, 2 * cap)
        for name, old in self.inputs.items():
            grown = self.xp.zeros((old.shape[0], new_cap) + old.shape[2:], F64)
            grown[:, :cap] = old
            self.inputs[name] = grown

    def run(self, be, start, q, k, v, beta, g):
        """Advance over ``T`` tokens from position ``start``; returns ``o [B, T, H, dv]`` (float64)."""
        xp = self.xp
        t_total = q.shape[1]
        if self.record:
            for name, a in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g)):
                self.inputs[name][:, start:start + t_total] = a
        if t_total == 1:
            o, self.S = be.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0], self.S)
            self._maybe_snapshot(start + 1)
            return _arr(o)[:, None]
        o = xp.empty(v.shape, F64)
        t = 0
        while t < t_total:
            # Segments end on snapshot boundaries so that their states can be kept.
            end = min(t_total, t + SNAPSHOT_EVERY - (start + t) % SNAPSHOT_EVERY) if self.record else t_total
            seg = slice(t, end)
            o_seg, S = be.gated_delta_chunkwise(q[:, seg], k[:, seg], v[:, seg], beta[:, seg], g[:, seg],
                                                chunk_size=self.chunk_size, initial_state=self.S)
            o[:, seg] = _arr(o_seg)
            self.S = _arr(S)
            t = end
            self._maybe_snapshot(start + t)
        return o

    def _maybe_snapshot(self, position):
        if self.record and position % SNAPSHOT_EVERY == 0:
            self.snapshots[position] = self.S.copy()

    def rewind_to(self, be, position):
        """Restore the state after ``position`` tokens: nearest snapshot, then replay."""
        base = max([p for p in self.snapshots if p <= position], default=0)
        S = self.snapshots[base].copy() if base else self.xp.zeros_like(self.S)
        inp = self.inputs
        for t in range(base, position):
            _, S = be.gated_delta_step(inp["q"][:, t], inp["k"][:, t], inp["v"][:, t],
                                       inp["beta"][:, t], inp["g"][:, t], S)
        self.S = _arr(S)
        self.snapshots = {p: s for p, s in self.snapshots.items() if p <= position}


class InferenceCache:
    """Per-layer caches (``KVCache`` or ``DeltaState``) and the number of positions they hold."""

    def __init__(self, engine, batch, capacity, record):
        c, xp = engine.cfg, engine.xp
        capacity = max(int(capacity), 1)
        self.position = 0
        self.layers = []
        for kind in engine.layer_kinds:
            if kind == "attention":
                self.layers.append(KVCache(xp, batch, capacity, c.n_kv_heads, c.head_dim))
            else:
                self.layers.append(DeltaState(xp, batch, c.dn_heads, c.dn_key_dim, c.dn_value_dim,
                                              capacity, c.deltanet_chunk_size, record))

    def reserve(self, xp, length):
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.reserve(xp, length)
            else:
                layer.reserve(length)


# ------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked. ``temperature = 0`` is greedy; ``top_k = 0`` and
    ``top_p = 1`` switch those filters off; ``repetition_penalty = 1`` is none."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}.")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}.")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}.")


def apply_repetition_penalty(logits, history, penalty):
    """CTRL-style penalty on every token id in ``history``: positive logits are divided by
    ``penalty``, negative ones multiplied, so a penalty > 1 always makes them less likely."""
    z = np.array(logits, dtype=F64)
    if penalty != 1.0 and len(history):
        ids = np.unique(np.asarray(history, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < z.size)]
        seen = z[ids]
        z[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return z


def next_token_distribution(logits, history=(), params=SamplingParams()):
    """Probabilities ``float64 [V]`` after penalty, temperature, top-k and top-p (in that order).

    Greedy (``temperature = 0``) returns a one-hot on the first maximum of the penalised logits.
    """
    z = apply_repetition_penalty(logits, history, params.repetition_penalty)
    v = z.size
    if params.temperature == 0:
        p = np.zeros(v)
        p[int(np.argmax(z))] = 1.0
        return p
    z = z / params.temperature
    if params.top_k and params.top_k < v:
        keep = np.argsort(-z, kind="stable")[: params.top_k]  # ties go to the lower id
        masked = np.full(v, -np.inf)
        masked[keep] = z[keep]
        z = masked
    finite = np.isfinite(z)
    if not finite.any():
        raise ValueError("every logit is -inf or NaN, so there is nothing to sample.")
    e = np.where(finite, np.exp(z - z[finite].max()), 0.0)
    p = e / e.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cum, params.top_p * cum[-1])) + 1  # smallest prefix reaching top_p
        kept = np.zeros(v)
        kept[order[:n_keep]] = p[order[:n_keep]]
        p = kept / kept.sum()
    return p


def sample_next(logits, history, params, rng):
    """One token id from ``logits [V]`` (see ``next_token_distribution``) drawn with ``rng``."""
    p = next_token_distribution(logits, history, params)
    if params.temperature == 0:
        return int(np.argmax(p))
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), p.size - 1))


# ---------------------------------------------------------------------------- text stream
class TextStream:
    """Token ids in, safe-to-show text out.

    Bytes of byte-level tokens are decoded incrementally, so a UTF-8 character split across
    tokens comes out whole once its last byte arrives (invalid bytes become U+FFFD). Text that
    could be the start of a stop string is held back until it is known not to be; when a stop
    string appears, the text before it is released, the stop string and everything after it
    are dropped and ``stopped`` turns True.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], stop: Sequence[str] = ()):
        stop = [s for s in stop]
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}.")
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._pending = ""
        self.stopped = False
        self.text = ""

    def push(self, token_id) -> str:
        """Feed one token; returns the text that became safe to show (may be empty)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(self._token_bytes(int(token_id)))
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: flush the decoder and release what is left."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final):
        cut = -1
        for s in self._stop:
            i = self._pending.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        elif final:
            out, self._pending = self._pending, ""
        else:
            hold = self._held_suffix()
            out = self._pending[: len(self._pending) - hold]
            self._pending = self._pending[len(self._pending) - hold:]
        self.text += out
        return out

    def _held_suffix(self):
        """Length of the longest suffix of the pending text that begins some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(s[:n]):
                    best = n
                    break
        return best


@dataclass
class GenerationStats:
    """Counts and timings of the last generation. Decode speed counts the tokens sampled
    after the prompt over the time from the end of the prefill to the last token."""

    prompt_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens whose cache entries were kept from the previous call
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "length", "stop_token", "stop_string"

    @property
    def prefill_tokens_per_sec(self):
        n = self.prompt_tokens - self.reused_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_sec(self):
        return self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self):
        return (f"{self.new_tokens} tokens in {self.decode_seconds:.2f} s ({self.decode_tokens_per_sec:.1f} tokens/s); "
                f"prompt {self.prompt_tokens} tokens in {self.prefill_seconds:.2f} s "
                f"({self.prefill_tokens_per_sec:.1f} tokens/s, {self.reused_tokens} reused from the cache); "
                f"finished by {self.finish_reason or 'length'}")


@dataclass
class Completion:
    text: str
    token_ids: list = field(default_factory=list)
    stats: GenerationStats = field(default_factory=GenerationStats)


# --------------------------------------------------------------------------------- engine
# Projections of one block that read the same input, largest group first: attention q/k/v,
# DeltaNet q/k/v and output gate, FFN gate/up.
FUSED_PROJECTIONS = (("wq", "wk", "wv", "wgate"), ("wq", "wk", "wv"), ("w_gate", "w_up"))


def _fusion_groups(names):
    """``[(key, members)]`` covering every ternary tensor name once: stacked groups of
    ``FUSED_PROJECTIONS`` where all members exist under one prefix, singletons otherwise."""
    left, groups = list(names), []
    for suffixes in FUSED_PROJECTIONS:
        prefixes = {n[: -len(suffixes[0])] for n in left if n.endswith("." + suffixes[0])}
        for prefix in sorted(prefixes):
            members = [prefix + s for s in suffixes]
            if all(m in left for m in members):
                groups.append((prefix + "+".join(suffixes), members))
                left = [n for n in left if n not in members]
    return groups + [(n, [n]) for n in left]


class Engine:
    """Runs a loaded ternary model for generation and evaluation.

    ``loaded``: a ``nanochat.io.gguf.LoadedModel`` (``config``, ``floats``, ``ternary``,
    ``tokenizer_json``, ``source``). ``backend``: a name for ``backends.get_backend`` or a
    Backend. ``dequantized``: float32 matmuls with ``W = q * s`` instead of packed kernels.
    ``max_len``: initial cache capacity in positions (default the config's ``seq_len``; the
    cache grows past it on demand). ``tokenizer``: overrides the one in ``loaded``.
    """

    def __init__(self, loaded, backend="auto", *, dequantized=False, max_len=None, tokenizer=None):
        from backends import get_backend

        cfg = getattr(loaded.config, "model", loaded.config)
        _check_loaded(loaded, cfg)
        self.cfg = cfg
        self.be = get_backend(backend)
        self.xp = self.be.xp
        self.dequantized = bool(dequantized)
        self.source = getattr(loaded, "source", "")
        self.layer_kinds = [mixer for mixer, _ in cfg.block_kinds()]
        self.moe_layers = set(cfg.moe_layer_ids)
        floats, ternary = expected_tensors(cfg)
        xp = self.xp
        self.w = {name: xp.asarray(np.asarray(loaded.floats[name], dtype=F32)) for name in floats}
        self._w64: dict[str, object] = {}
        # Projections that read the same input are stacked into one matrix (one activation
        # quantization and one GEMV/GEMM instead of three or four); self.fused maps a member
        # to (stacked name, first row, last row). Each output row is the same dot product as
        # before, so the logits do not change.
        self.linear, self.fused = {}, {}
        for key, members in _fusion_groups(ternary):
            rows = [loaded.ternary[name][0].shape[0] for name in members]
            packed = np.concatenate([np.asarray(loaded.ternary[name][0]) for name in members])
            scales = np.concatenate([np.asarray(loaded.ternary[name][1], dtype=F32) for name in members])
            self.linear[key] = self._prepare_linear(packed, scales)
            if len(members) > 1:
                for name, first, last in zip(members, np.cumsum([0] + rows[:-1]), np.cumsum(rows)):
                    self.fused[name] = (key, int(first), int(last))
        self.head = self.w["tok_embeddings" if cfg.tie_embeddings else "lm_head"]
        self._static_mhc = self._static_mhc_coeffs() if cfg.n_streams > 1 and cfg.mhc_mode == "static" else {}
        self.max_len = int(max_len or cfg.seq_len)
        self.tokenizer = tokenizer
        if tokenizer is None and getattr(loaded, "tokenizer_json", None):
            from nanochat.data.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_json_str(loaded.tokenizer_json, source=f"tokenizer of {self.source}")
        self.last_stats = GenerationStats()
        self.last_token_ids: list[int] = []
        self.reset()

    @classmethod
    def from_path(cls, path, backend="auto", **options):
        """An engine for a ``.gguf`` file or a checkpoint directory."""
        return cls(load_model(path), backend, **options)

    # ------------------------------------------------------------------ cache control
    @property
    def position(self):
        """Number of tokens in the cache."""
        return self.cache.position

    @property
    def tokens(self):
        """The token ids in the cache, in order."""
        return list(self._tokens)

    def reset(self):
        """Empty the cache."""
        self.cache = InferenceCache(self, 1, self.max_len, record=True)
        self._tokens: list[int] = []

    def rewind(self, n_tokens):
        """Drop the last ``n_tokens`` tokens from the cache (KV entries and DeltaNet state)."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or not 0 <= n_tokens <= self.position:
            raise ValueError(f"rewind: n_tokens must be an integer in [0, {self.position}], got {n_tokens!r}.")
        target = self.position - int(n_tokens)
        with no_grad():
            for layer in self.cache.layers:
                if isinstance(layer, DeltaState):
                    layer.rewind_to(self.be, target)
        self.cache.position = target
        del self._tokens[target:]

    def feed(self, token_ids):
        """Append tokens to the cache; returns their logits ``float32 [T, V]`` (numpy).

        T > 1 runs the prefill path (packed GEMM), T = 1 the decode path (packed GEMV)."""
        ids = self._check_ids(np.asarray(token_ids, dtype=np.int64).reshape(-1))
        if ids.size == 0:
            raise ValueError("feed: no tokens given.")
        logits = self._forward(ids[None, :], self.cache)
        self._tokens.extend(int(i) for i in ids)
        return self.be.to_numpy(logits[0])

    def step(self, token_id):
        """Decode one token; returns its logits ``float32 [V]``."""
        return self.feed([token_id])[0]

    def logits(self, idx):
        """Stateless batched forward (prefill path): ``idx int [B, T] -> float32 [B, T, V]`` (numpy).

        Leaves the engine's own cache alone; what ``nanochat.cli.eval`` runs."""
        idx = np.asarray(idx)
        if idx.ndim != 2 or idx.shape[1] == 0 or idx.shape[0] == 0 or idx.dtype.kind not in "iu":
            raise ValueError(f"logits: token ids must be a non-empty 2-D integer array [B, T], "
                             f"got {idx.dtype} shape {idx.shape}.")
        idx = self._check_ids(idx.astype(np.int64))
        cache = InferenceCache(self, idx.shape[0], idx.shape[1], record=False)
        return self.be.to_numpy(self._forward(idx, cache))

    def _check_ids(self, ids):
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}].")
        return ids

    # ----------------------------------------------------------------------- forward
    def _forward(self, idx, cache):
        """Logits ``[B, T, V]`` for ``idx [B, T]`` at positions ``cache.position ...``; advances the cache."""
        c, xp, be = self.cfg, self.xp, self.be
        b, t = idx.shape
        start = cache.position
        cache.reserve(xp, start + t)
        n, d = c.n_streams, c.dim
        with no_grad():
            # RoPE tables of these positions, shared by every attention layer (the same float32
            # tables the training forward's rope builds).
            rope = be.rope_tables(xp.arange(start, start + t), c.head_dim, c.rope_theta, F32)
            x = self.w["tok_embeddings"][xp.asarray(idx)]  # [B, T, C]
            streams = _arr(be.mhc_expand(x.reshape(b * t, d), n)) if n > 1 else None
            for i, kind in enumerate(self.layer_kinds):
                p = f"layers.{i}."
                layer_cache = cache.layers[i]

                def mixer(u, p=p, kind=kind, layer_cache=layer_cache):
                    un = self._rmsnorm(u, p + "attn_norm")
                    if kind == "attention":
                        return self._attention(p + "attn.", un, layer_cache, start, rope)
                    return self._deltanet(p + "delta.", un, layer_cache, start)

                def ffn(u, p=p, i=i):
                    un = self._rmsnorm(u, p + "ffn_norm")
                    if i in self.moe_layers:
                        return self._moe(p + "moe.", un.reshape(b * t, d)).reshape(b, t, d)
                    return self._ffn(p + "ffn.", un.reshape(b * t, d)).reshape(b, t, d)

                for sub, fn in (("mhc_attn.", mixer), ("mhc_ffn.", ffn)):
                    if n == 1:
                        x = x + fn(x)
                    else:
                        streams = self._mhc_unit(p + sub, streams,
                                                 lambda u, fn=fn: fn(u.reshape(b, t, d)).reshape(b * t, d))
            if n > 1:
                x = _arr(be.mhc_collapse(streams)).reshape(b, t, d)
            hn = self._rmsnorm(x, "norm")
            logits = hn.reshape(b * t, d) @ self.head.T
        cache.position = start + t
        return logits.reshape(b, t, c.vocab_size)

    def _rmsnorm(self, x, name):
        return _arr(self.be.rmsnorm(x, self.w[name], eps=self.cfg.norm_eps))

    def _f64(self, name):
        """A float64 copy of a (small) float parameter, made once."""
        a = self._w64.get(name)
        if a is None:
            a = self._w64[name] = self.w[name].astype(F64)
        return a

    def _prepare_linear(self, packed, scales):
        xp, g = self.xp, self.cfg.group_size
        packed, scales = np.ascontiguousarray(packed), np.ascontiguousarray(scales, dtype=F32)
        if self.dequantized:
            q = self.be.unpack_ternary(xp.asarray(packed))
            return xp.ascontiguousarray(self.be.dequantize_weights(q, xp.asarray(scales), g).astype(F32))
        return self.be.prepare_packed(xp.asarray(packed), xp.asarray(scales), g)

    def _linears(self, names, x2):
        """BitLinears on rows ``x2 [N, K]`` float32 -> ``[N, M_i]`` float32 each; members of one
        stacked matrix come from a single product."""
        products, out = {}, []
        for name in names:
            key, first, last = self.fused.get(name, (name, None, None))
            if key not in products:
                products[key] = self._product(key, x2)
            out.append(products[key][:, first:last])
        return out

    def _linear(self, name, x2):
        return self._linears([name], x2)[0]

    def _product(self, key, x2):
        """The (stacked) matrix ``key`` times int8-quantized rows ``x2`` (one scale per row)."""
        xq, xs = self.be.quantize_acts(x2 if x2.flags.c_contiguous else self.xp.ascontiguousarray(x2))
        w = self.linear[key]
        if self.dequantized:
            return (xq.astype(F32) @ w.T) * xs[:, None]
        if xq.shape[0] == 1:
            return self.be.packed_gemv(w, xq[0], xs[0])[None, :]
        return self.be.packed_gemm(w, xq, xs)

    def _attention(self, p, x, kv, start, rope):
        c, be = self.cfg, self.be
        b, t, d = x.shape
        hd = c.head_dim
        x2 = x.reshape(b * t, d)
        q, k, v = self._linears([p + "wq", p + "wk", p + "wv"], x2)
        q = q.reshape(b, t, c.n_heads, hd)
        k = k.reshape(b, t, c.n_kv_heads, hd)
        v = v.reshape(b, t, c.n_kv_heads, hd)
        q = _arr(be.rope_rotate(q, *rope))
        k = _arr(be.rope_rotate(k, *rope))
        kv.write(start, k, v)
        o = causal_attention(q, kv.k[:, :start + t], kv.v[:, :start + t]).reshape(b * t, c.n_heads * hd)
        if c.sub_norm:
            o = self._rmsnorm(o, p + "sub_norm")
        return self._linear(p + "wo", o).reshape(b, t, d)

    def _ffn(self, p, x2):
        c, be = self.cfg, self.be
        gate, up = self._linears([p + "w_gate", p + "w_up"], x2)
        hidden = _arr(be.swiglu(gate, up) if c.ffn_type == "swiglu" else be.relu2_glu(gate, up))
        if c.sub_norm:
            hidden = self._rmsnorm(hidden, p + "sub_norm")
        return self._linear(p + "w_down", hidden)

    def _moe(self, p, x2):
        """Top-k MoE on rows ``x2 [N, C]``: softmax over the selected router logits, shared expert."""
        c, be, xp = self.cfg, self.be, self.xp
        router_logits = (x2.astype(F64) @ self._f64(p + "router").T).astype(F32)
        weights, indices = be.topk_route(router_logits, c.moe_top_k)
        routes = be.moe_routes(indices, c.n_experts)
        outs = []
        for e, (token_ids, _) in enumerate(routes):
            if len(token_ids) == 0:
                outs.append(xp.zeros((0, c.dim), F32))
            else:
                outs.append(self._ffn(f"{p}experts.{e}.", x2[token_ids]))
        y = _arr(be.moe_combine(_arr(weights), outs, routes))
        if c.moe_shared_expert:
            y = y + self._ffn(p + "shared.", x2)
        return y

    def _deltanet(self, p, x, state, start):
        c, be = self.cfg, self.be
        b, t, d = x.shape
        h, dk, dv = c.dn_heads, c.dn_key_dim, c.dn_value_dim
        x2 = x.reshape(b * t, d)
        x64 = x2.astype(F64)
        q, k, v, gate = self._linears([p + "wq", p + "wk", p + "wv", p + "wgate"], x2)
        q = _arr(be.l2_normalize(q.astype(F64).reshape(b, t, h, dk)))
        k = _arr(be.l2_normalize(k.astype(F64).reshape(b, t, h, dk)))
        v = v.astype(F64).reshape(b, t, h, dv)
        g = _arr(be.deltanet_gates((x64 @ self._f64(p + "wa").T).reshape(b, t, h),
                                   self._f64(p + "dt_bias"), self._f64(p + "A_log")))
        beta = _arr(be.deltanet_beta((x64 @ self._f64(p + "wbeta").T).reshape(b, t, h)))
        o = state.run(be, start, q, k, v, beta, g).astype(F32)
        o = self._rmsnorm(o, p + "out_norm")
        gate = gate.reshape(b, t, h, dv)
        o = o * _arr(be.silu(gate))
        return self._linear(p + "wo", o.reshape(b * t, h * dv)).reshape(b, t, d)

    def _static_mhc_coeffs(self):
        """Static mHC coefficients per sub-layer, computed once (they do not depend on tokens)."""
        out = {}
        with no_grad():
            for i in range(self.cfg.n_layers):
                for sub in ("mhc_attn.", "mhc_ffn."):
                    p = f"layers.{i}.{sub}"
                    out[p] = tuple(_arr(a) for a in self.be.mhc_static_coeffs(*self._mhc_logits(p)))
        return out

    def _mhc_logits(self, p):
        """The five static logit/bias vectors of an mHC unit."""
        names = (RES_NAME[self.cfg.n_streams], "pre_logits", "pre_bias", "post_logits", "post_bias")
        return tuple(self.w[p + k] for k in names)

    def _mhc_unit(self, p, streams, fn):
        """u = h_pre . X, y = F(u), X' = H_res (X + h_post (x) y).

        The dynamic-coefficient op computes in float64 and rounds once, so prefill, decode and
        the training forward get identical coefficients."""
        be = self.be
        if self.cfg.mhc_mode == "static":
            h_res, h_pre, h_post = self._static_mhc[p]
        else:
            coeffs = be.mhc_dynamic_coeffs(streams, self.w[p + "dyn_weight"], self.w[p + "dyn_gate"],
                                           *self._mhc_logits(p), eps=self.cfg.norm_eps)
            h_res, h_pre, h_post = (_arr(a) for a in coeffs)
        u = _arr(be.mhc_pre(streams, h_pre))
        return _arr(be.mhc_post(streams, fn(u), h_res, h_post))

    # -------------------------------------------------------------------- generation
    def _prime(self, prompt_ids):
        """Bring the cache to exactly ``prompt_ids`` (reusing a common prefix); returns the
        last prompt token's logits and how many tokens were reused."""
        keep = 0
        for a, b in zip(self._tokens, prompt_ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt_ids) - 1)  # the last prompt token is always run for its logits
        self.rewind(self.position - keep)
        return self.feed(prompt_ids[keep:])[-1], keep

    def generate_ids(self, prompt_ids, max_new_tokens=128, params=SamplingParams(), stop_ids=(), vocab_limit=None):
        """Yield sampled token ids after ``prompt_ids`` (a generator; stats in ``last_stats``).

        Stops after ``max_new_tokens`` or at a token in ``stop_ids`` (not yielded). Ids at or
        past ``vocab_limit`` (a tokenizer smaller than the model's vocabulary) are never sampled.
        """
        prompt_ids = [int(i) for i in prompt_ids]
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
        self._check_ids(np.asarray(prompt_ids))
        stats = self.last_stats = GenerationStats(prompt_tokens=len(prompt_ids), finish_reason="length")
        self.last_token_ids = generated = []
        rng = np.random.default_rng(params.seed)
        stop_ids = {int(s) for s in stop_ids}
        t0 = time.perf_counter()
        logits, stats.reused_tokens = self._prime(prompt_ids)
        stats.prefill_seconds = time.perf_counter() - t0
        history = list(prompt_ids)
        busy = 0.0  # time spent sampling and decoding, not waiting for the consumer
        try:
            for i in range(max_new_tokens):
                tick = time.perf_counter()
                if vocab_limit is not None and vocab_limit < logits.size:
                    logits = logits.copy()
                    logits[vocab_limit:] = -np.inf
                token = sample_next(logits, history, params, rng)
                busy += time.perf_counter() - tick
                if token in stop_ids:
                    stats.finish_reason = "stop_token"
                    break
                history.append(token)
                generated.append(token)
                stats.new_tokens += 1
                stats.decode_seconds = busy
                yield token
                if i + 1 < max_new_tokens:
                    tick = time.perf_counter()
                    logits = self.step(token)
                    busy += time.perf_counter() - tick
        finally:
            stats.decode_seconds = busy

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.source or 'the model'} has no tokenizer, so text prompts cannot be encoded.")
        return self.tokenizer

    def generate(self, prompt, max_new_tokens=128, *, temperature=0.8, top_k=0, top_p=1.0,
                 repetition_penalty=1.0, seed=None, stop=(), stop_at_eot=True) -> Iterator[str]:
        """Stream the continuation of ``prompt`` (text, or a list of token ids) as text pieces.

        Multi-byte characters split across tokens are emitted whole; stop strings end the
        generation and are not emitted; the end-of-text token ends it when ``stop_at_eot``.
        An empty text prompt starts from the end-of-text token (a document boundary).
        """
        tok = self.require_tokenizer()
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(stop, str):
            stop = [stop]
        stream = TextStream(tok.token_bytes, stop)
        if isinstance(prompt, str):
            ids = tok.encode(prompt) or [tok.eot_id]
        else:
            ids = list(prompt)
        stop_ids = [tok.eot_id] if stop_at_eot else []
        tokens = self.generate_ids(ids, max_new_tokens, params, stop_ids, vocab_limit=tok.vocab_size)
        try:
            for token in tokens:
                piece = stream.push(token)
                if piece:
                    yield piece
                if stream.stopped:
                    break
        finally:
            tokens.close()
        if stream.stopped:
            self.last_stats.finish_reason = "stop_string"
        else:
            tail = stream.finish()
            if tail:
                yield tail

    def complete(self, prompt, max_new_tokens=128, **options) -> Completion:
        """Non-streaming ``generate``: the whole continuation, its token ids and the stats."""
        pieces = list(self.generate(prompt, max_new_tokens, **options))
        return Completion("".join(pieces), list(self.last_token_ids), self.last_stats)


def causal_attention(q, k, v):
    """GQA causal attention in float64: ``q [B, T, Hq, hd]`` (float32, the last T positions),
    ``k, v [B, S, Hkv, hd]`` (float64, positions 0 .. S-1) -> float32 ``[B, T, Hq, hd]``.

    Query head ``h`` reads kv head ``h // (Hq // Hkv)``; query ``i`` sees keys ``0 .. S - T + i``.
    """
    from reference.autograd import array_module

    xp = array_module(q, k)
    b, t, n_q, hd = q.shape
    s_len, n_kv = k.shape[1], k.shape[2]
    group = n_q // n_kv
    qg = q.astype(F64).reshape(b, t, n_kv, group, hd).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, T, hd]
    kg = k.transpose(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, S, hd]
    vg = v.transpose(0, 2, 1, 3)[:, :, None]
    scores = (qg @ kg.swapaxes(-1, -2)) * (1.0 / math.sqrt(hd))  # [B, Hkv, G, T, S]
    if t > 1:
        hidden = xp.arange(s_len)[None, :] > (xp.arange(t)[:, None] + (s_len - t))
        scores = xp.where(hidden, -xp.inf, scores)
    e = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = e / e.sum(axis=-1, keepdims=True)
    out = probs @ vg  # [B, Hkv, G, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n_q, hd).astype(F32)
