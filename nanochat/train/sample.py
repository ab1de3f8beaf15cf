"""A simple sampler on the training model (full forward per token); the fast path is the engine."""
from __future__ import annotations

import numpy as np

from reference.autograd import no_grad


def sample_next(logits, temperature, top_k, rng):
    """Pick one token id from a logits vector [V] (greedy when temperature is 0).

    ``top_k`` > 0 keeps the k largest logits. The filtering and the draw are the inference
    engine's (``nanochat.infer.engine.sample_next``); this adds the checks a training run needs.
    """
    from nanochat.infer.engine import SamplingParams, sample_next as engine_sample_next

    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"sample_next: logits must be a non-empty 1-D vector, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise ValueError("sample_next: the logits contain NaN or Inf (the model weights are not finite)")
    if temperature < 0:
        raise ValueError(f"sample_next: temperature must be >= 0, got {temperature}")
    return engine_sample_next(logits, (), SamplingParams(temperature=temperature, top_k=top_k or 0), rng)


def generate(model, prompt_ids, max_tokens, temperature=0.8, top_k=40, rng=None, stop_id=None):
    """Continue ``prompt_ids`` by up to ``max_tokens`` tokens; returns the new ids only.

    An empty prompt starts from ``stop_id`` (the end-of-text token opens a document) or 0.
    The context is the last ``seq_len`` tokens.
    """
    if max_tokens < 0:
        raise ValueError(f"generate: max_tokens must be >= 0, got {max_tokens}")
    vocab = model.cfg.vocab_size
    bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"generate: prompt token id {bad[0]} is outside the vocabulary 0..{vocab - 1}")
    rng = np.random.default_rng(0) if rng is None else rng
    ids = [int(t) for t in prompt_ids] or [0 if stop_id is None else int(stop_id)]
    out = []
    window = model.cfg.seq_len
    with no_grad():
        for _ in range(max_tokens):
            ctx = np.asarray(ids[-window:], dtype=np.int64)[None, :]
            logits = model.be.to_numpy(model.logits(ctx).data)[0, -1]
            nxt = sample_next(logits, temperature, top_k, rng)
            if stop_id is not None and nxt == stop_id:
                break
            ids.append(nxt)
            out.append(nxt)
    return out
