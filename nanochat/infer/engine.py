"""The inference engine (SPEC section 8): loading, per-sequence caches with prefix reuse and
rewind, batched decode, sampling and streaming text. The network itself is
``nanochat.model.gpt.Model``'s one forward; the engine chooses its strategies.

    engine = Engine.from_path("model.gguf", backend="auto")
    for piece in engine.generate("def main():", max_new_tokens=64, temperature=0.8, seed=0):
        print(piece, end="", flush=True)
    engine.last_stats.decode_tokens_per_sec

    # several sequences at once (what the server's scheduler does)
    a, b = engine.new_sequence(), engine.new_sequence()
    la, lb = engine.prefill(a, ids_a), engine.prefill(b, ids_b)     # last-token logits [V]
    logits = engine.decode([a, b], [next_a, next_b])                 # one forward, [2, V]

Every ternary weight goes through ``backend.prepare_packed`` once at load time, with the
projections that read the same input stacked (``nanochat.model.linear.PackedLinear``): a
forward over N > 1 rows (prefill, or one new token of each of N sequences) runs
``packed_gemm``, one row runs ``packed_gemv``. ``dequantized=True`` swaps the kernels for
float32 matmuls with ``W = q * s`` (the baseline of ``scripts/bench_decode.py``).

Numerics: see ``nanochat.model.gpt`` (float64 islands) and docs/engine.md. Long prompts are
prefilled in chunks whose attention scores stay under ``PREFILL_SCORE_BYTES``, so memory grows
linearly with the prompt; caches start small and grow on demand.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import numpy as np

from backends.threads import inference_spin, inference_threads
from reference.autograd import no_grad
from nanochat.infer.sampling import (SamplingParams, apply_repetition_penalty, limit_vocab, next_token_distribution,
                                     sample_next)
from nanochat.infer.text import Completion, GenerationStats, TextStream
from nanochat.model.cache import MIN_CAPACITY, SNAPSHOT_EVERY
from nanochat.model.gpt import Model
from nanochat.model.linear import Int8Head, PackedLinear
from nanochat.model.params import inference_tensors

F32 = np.float32
PREFILL_SCORE_BYTES = 64 << 20  # float64 attention scores of one prefill chunk stay under this
MAX_PREFILL_CHUNK = 512
HEADS = ("float32", "int8")  # LM head kinds

__all__ = ["Completion", "Engine", "GenerationStats", "SNAPSHOT_EVERY", "SamplingParams", "Sequence", "TextStream",
           "apply_repetition_penalty", "expected_tensors", "load_model", "next_token_distribution", "random_model",
           "sample_next"]


def expected_tensors(cfg, mtp=False):
    """``(floats, ternary)``: parameter name -> shape of every tensor the engine needs (from the
    parameter table; the MTP heads only with ``mtp``: they serve speculative decoding)."""
    return inference_tensors(cfg, mtp=mtp)


def has_mtp_heads(loaded, cfg):
    """True when ``loaded`` carries every MTP head of ``cfg`` (a checkpoint does; a GGUF file
    does unless it was written for llama.cpp's layout)."""
    if not cfg.mtp_n_tokens:
        return False
    floats, ternary = inference_tensors(cfg, mtp=True)
    return all(n in loaded.floats for n in floats if n.startswith("mtp.")) and \
        all(n in loaded.ternary for n in ternary if n.startswith("mtp."))


def _check_loaded(loaded, cfg, mtp=False):
    floats, ternary = expected_tensors(cfg, mtp=mtp)
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
        from nanochat.io.gguf_read import read_gguf

        return read_gguf(p)
    if p.exists():
        raise ValueError(f"model path {p} is not a regular file or a directory (give a .gguf file or a checkpoint directory).")
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


class Sequence:
    """One sequence being decoded: its cache (KV entries, DeltaNet state) and token ids."""

    def __init__(self, cache):
        self.cache = cache
        self.tokens: list[int] = []

    @property
    def position(self):
        return self.cache.position

    @property
    def nbytes(self):
        """Bytes its cache holds now."""
        return self.cache.nbytes


class Engine:
    """Runs a loaded ternary model for generation and evaluation.

    ``loaded``: a ``nanochat.io.gguf.LoadedModel`` (``config``, ``floats``, ``ternary``,
    ``tokenizer_json``, ``source``). ``backend``: a name for ``backends.get_backend`` or a
    Backend. ``dequantized``: float32 matmuls with ``W = q * s`` instead of packed kernels.
    ``max_len``: initial cache capacity in positions (default 16; caches grow on demand).
    ``tokenizer``: overrides the one in ``loaded``. ``head``: ``float32`` (exact) or ``int8``
    (int8 weights and activations, exact int32 sums: a quarter of the bytes; logit error in
    docs/engine.md).
    """

    def __init__(self, loaded, backend="auto", *, dequantized=False, max_len=None, tokenizer=None, head="float32"):
        from backends import get_backend

        inference_spin()  # before numba starts its pool (backends/threads.py)
        cfg = getattr(loaded.config, "model", loaded.config)
        self.mtp_heads = cfg.mtp_n_tokens if has_mtp_heads(loaded, cfg) else 0  # drafters for speculative decoding
        _check_loaded(loaded, cfg, mtp=bool(self.mtp_heads))
        self.cfg = cfg
        self.be = get_backend(backend)
        self.xp = self.be.xp
        self.dequantized = bool(dequantized)
        self.source = getattr(loaded, "source", "")
        floats, ternary = expected_tensors(cfg, mtp=bool(self.mtp_heads))
        self.model = Model.from_weights(cfg, self.be, {name: loaded.floats[name] for name in floats})
        self.linear = PackedLinear(self.be, {name: loaded.ternary[name] for name in ternary}, cfg.group_size,
                                   dequantized=self.dequantized)
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}.")
        self.head_kind = head
        w = self.model.params["tok_embeddings" if cfg.tie_embeddings else "lm_head"]
        self.head = Int8Head(self.be, w) if head == "int8" else None
        self.context_length = int(cfg.seq_len)  # what the model was trained on (servers bound requests by it)
        self.max_len = max(int(max_len or MIN_CAPACITY), 1)
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

    # --------------------------------------------------------------- sequences
    def new_sequence(self, record=True) -> Sequence:
        """An empty sequence with its own cache (many may be decoded together)."""
        return Sequence(self.model.new_cache(self.max_len, record=record))

    def prefill(self, seq: Sequence, token_ids, all_logits=False, hidden=None):
        """Append tokens to ``seq`` (chunked); returns the last token's logits ``float32 [V]``
        (or all of them ``[T, V]`` with ``all_logits``). ``hidden``: see ``_forward``."""
        ids = self._check_ids(np.asarray(token_ids, dtype=np.int64).reshape(-1))
        if ids.size == 0:
            raise ValueError("prefill: no tokens given.")
        logits = self._forward(ids[None, :], [seq.cache], all_logits, hidden)
        seq.tokens.extend(int(i) for i in ids)
        return logits[0] if all_logits else logits[0, -1]

    def decode(self, seqs, token_ids):
        """One new token for each sequence in one forward (packed GEMM over the batch); returns
        ``float32 [B, V]``. Each sequence continues from its own position."""
        ids = self._check_ids(np.asarray(token_ids, dtype=np.int64).reshape(-1))
        if len(seqs) != ids.size or ids.size == 0:
            raise ValueError(f"decode: give one token per sequence, got {ids.size} tokens for {len(seqs)} sequences.")
        logits = self._forward(ids[:, None], [s.cache for s in seqs], False)[:, -1]
        for s, i in zip(seqs, ids):
            s.tokens.append(int(i))
        return logits

    def warm_up(self):
        """Run every kernel a request uses once, on scratch sequences (a two-token and a
        one-token prompt, one decode step, a decode step of both together), so that the
        backend compiles or loads them now: a server calls this before it reports ready."""
        a, b = self.new_sequence(record=False), self.new_sequence(record=False)
        self.prefill(a, [0, 0])
        self.prefill(b, [0])
        self.decode([a], [0])
        self.decode([a, b], [0, 0])

    def _draft(self, h, k):
        """Speculative drafting: the first ``k`` MTP heads on the hidden row ``h`` -> logits ``[k, V]`` (numpy)."""
        inference_threads()
        with no_grad():
            return self.be.to_numpy(self.model.draft_logits(h, k, self.linear, self.head))

    def _verify(self, seq: Sequence, token_ids, hidden):
        """Speculative verification: append ``token_ids`` and return all their logits ``[T, V]``."""
        return self.prefill(seq, token_ids, all_logits=True, hidden=hidden)

    def rewind_sequence(self, seq: Sequence, n_tokens):
        """Drop the last ``n_tokens`` tokens of ``seq`` (KV entries and DeltaNet state)."""
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)) or not 0 <= n_tokens <= seq.position:
            raise ValueError(f"rewind: n_tokens must be an integer in [0, {seq.position}], got {n_tokens!r}.")
        target = seq.position - int(n_tokens)
        with no_grad():
            seq.cache.rewind_to(self.be, target)
        del seq.tokens[target:]

    # ------------------------------------------------------------------ the engine's own sequence
    @property
    def position(self):
        """Number of tokens in the cache."""
        return self._seq.position

    @property
    def tokens(self):
        """The token ids in the cache, in order."""
        return list(self._seq.tokens)

    @property
    def cache(self):
        return self._seq.cache

    def reset(self):
        """Empty the cache."""
        self._seq = self.new_sequence()

    def rewind(self, n_tokens):
        """Drop the last ``n_tokens`` tokens from the cache (KV entries and DeltaNet state)."""
        self.rewind_sequence(self._seq, n_tokens)

    def feed(self, token_ids):
        """Append tokens to the cache; returns their logits ``float32 [T, V]`` (numpy).

        T > 1 runs the prefill path (packed GEMM), T = 1 the decode path (packed GEMV)."""
        return self.prefill(self._seq, token_ids, all_logits=True)

    def step(self, token_id):
        """Decode one token; returns its logits ``float32 [V]``."""
        return self.prefill(self._seq, [token_id])

    def logits(self, idx):
        """Stateless batched forward (prefill path): ``idx int [B, T] -> float32 [B, T, V]`` (numpy).

        Leaves the engine's own cache alone; what ``nanochat.eval`` runs."""
        idx = np.asarray(idx)
        if idx.ndim != 2 or idx.shape[1] == 0 or idx.shape[0] == 0 or idx.dtype.kind not in "iu":
            raise ValueError(f"logits: token ids must be a non-empty 2-D integer array [B, T], "
                             f"got {idx.dtype} shape {idx.shape}.")
        idx = self._check_ids(idx.astype(np.int64))
        caches = [self.model.new_cache(idx.shape[1], record=False) for _ in range(idx.shape[0])]
        return self._forward(idx, caches, True)

    def _check_ids(self, ids):
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}].")
        return ids

    def prefill_chunk(self, end_position):
        """Tokens per prefill chunk so that one chunk's float64 attention scores (every query
        head against ``end_position`` keys) stay under ``PREFILL_SCORE_BYTES``."""
        per_token = 8 * self.cfg.n_heads * max(int(end_position), 1)
        return int(max(1, min(MAX_PREFILL_CHUNK, PREFILL_SCORE_BYTES // per_token)))

    def _forward(self, idx, caches, all_logits, hidden=None):
        """Logits of ``idx [B, T]`` continuing ``caches`` (advanced by T): ``[B, T, V]`` numpy, or
        ``[B, 1, V]`` (the last position) without ``all_logits``. Long inputs run in chunks.
        ``hidden``: a list that receives the hidden states ``[B, n, C]`` (backend arrays) of
        every chunk (speculative decoding drafts from them)."""
        b, t = idx.shape
        out, start = [], 0
        inference_threads()  # one BLAS thread (backends/threads.py)
        with no_grad():
            while start < t:
                n = min(t - start, self.prefill_chunk(max(c.position for c in caches) + t))
                last = not all_logits and start + n == t
                o = self.model.forward(idx[:, start:start + n], caches, linear=self.linear, last_only=not all_logits,
                                       head=self.head)
                if all_logits or last:
                    out.append(self.be.to_numpy(o.logits))
                if hidden is not None:
                    hidden.append(o.hidden)
                start += n
        return out[0] if len(out) == 1 else np.concatenate(out, axis=1)

    # -------------------------------------------------------------------- generation
    def _prime(self, prompt_ids, hidden=None):
        """Bring the cache to exactly ``prompt_ids`` (reusing a common prefix); returns the
        last prompt token's logits and how many tokens were reused."""
        keep = 0
        for a, b in zip(self._seq.tokens, prompt_ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt_ids) - 1)  # the last prompt token is always run for its logits
        self.rewind(self.position - keep)
        return self.prefill(self._seq, prompt_ids[keep:], hidden=hidden), keep

    def generate_ids(self, prompt_ids, max_new_tokens=128, params=SamplingParams(), stop_ids=(), vocab_limit=None,
                     speculative=0):
        """Yield sampled token ids after ``prompt_ids`` (a generator; stats in ``last_stats``).

        Stops after ``max_new_tokens`` or at a token in ``stop_ids`` (not yielded). Ids at or
        past ``vocab_limit`` (a tokenizer smaller than the model's vocabulary) are never sampled.
        ``speculative = k > 0``: self-speculative decoding with the first k MTP heads as drafters
        (``nanochat.infer.speculative``; same output distribution, greedy output the same tokens).
        """
        k = self._check_speculative(speculative)
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
        hidden = [] if k else None
        logits, stats.reused_tokens = self._prime(prompt_ids, hidden)
        stats.prefill_seconds = time.perf_counter() - t0
        if max_new_tokens == 0:
            return
        history = list(prompt_ids)
        if k:
            from nanochat.infer.speculative import speculative_ids

            first = sample_next(limit_vocab(logits, vocab_limit), history, params, rng)
            tokens = speculative_ids(self, self._seq, first, hidden[-1][0, -1], history, params, rng, k,
                                     vocab_limit, stats)
        else:
            tokens = self._plain_ids(logits, history, params, rng, vocab_limit)
        busy, tick = 0.0, time.perf_counter()  # time spent sampling and decoding, not waiting for the consumer
        try:
            for token in tokens:
                busy += time.perf_counter() - tick
                if token in stop_ids:
                    stats.finish_reason = "stop_token"
                    break
                generated.append(token)
                stats.new_tokens += 1
                stats.decode_seconds = busy
                yield token
                if stats.new_tokens >= max_new_tokens:
                    break
                tick = time.perf_counter()
        finally:
            tokens.close()
            stats.decode_seconds = busy

    def _plain_ids(self, logits, history, params, rng, vocab_limit):
        """One token per forward, forever (the caller stops): sample, append, decode it."""
        while True:
            token = sample_next(limit_vocab(logits, vocab_limit), history, params, rng)
            yield token
            history.append(token)
            logits = self.step(token)

    def _check_speculative(self, speculative):
        if not speculative:
            return 0
        if isinstance(speculative, bool) or not isinstance(speculative, (int, np.integer)) or speculative < 0:
            raise ValueError(f"speculative must be an integer >= 0, got {speculative!r}.")
        if not self.mtp_heads:
            raise ValueError(f"{self.source or 'the model'} has no multi-token-prediction heads "
                             f"(mtp_n_tokens = {self.cfg.mtp_n_tokens} or none stored), so it cannot draft "
                             f"for speculative decoding.")
        if speculative > self.mtp_heads:
            raise ValueError(f"speculative = {speculative} asks for more drafts than the model's "
                             f"{self.mtp_heads} MTP heads.")
        return int(speculative)

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(f"{self.source or 'the model'} has no tokenizer, so text prompts cannot be encoded.")
        return self.tokenizer

    def generate(self, prompt, max_new_tokens=128, *, temperature=0.8, top_k=0, top_p=1.0,
                 repetition_penalty=1.0, seed=None, stop=(), stop_at_eot=True, speculative=0) -> Iterator[str]:
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
        tokens = self.generate_ids(ids, max_new_tokens, params, stop_ids, vocab_limit=tok.vocab_size,
                                   speculative=speculative)
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


