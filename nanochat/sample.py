"""A simple sampler on the training model (full forward per token); the fast path is the engine."""
from __future__ import annotations

import numpy as np

from reference.autograd import no_grad


def sample_next(logits, temperature, top_k, rng):
    """Pick one token id from a logits vector [V] (greedy when temperature is 0)."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k and top_k < logits.size:
        cutoff = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < cutoff, -np.inf, logits)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return int(rng.choice(p.size, p=p))


def generate(model, prompt_ids, max_tokens, temperature=0.8, top_k=40, rng=None, stop_id=None):
    """Continue ``prompt_ids`` by up to ``max_tokens`` tokens; returns the new ids only."""
    rng = rng or np.random.default_rng(0)
    ids = list(prompt_ids) or [stop_id or 0]
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
