"""Self-speculative decoding with the model's own multi-token-prediction heads.

A model trained with ``mtp_n_tokens = n`` has n extra heads; head i, applied to the hidden state
at position p, guesses the token at position p + 2 + i. Each round:

1. the pending token ``x`` (already chosen, not yet in the cache) and the hidden state ``h`` of
   the position before it are known;
2. the first k heads on ``h`` draft ``d_1 .. d_k`` (the tokens after ``x``), each drawn from its
   head's distribution ``q_j`` (after the same penalty/temperature/top-k/top-p as sampling);
3. one forward over ``[x, d_1 .. d_k]`` (the prefill path: packed GEMM over k + 1 rows) gives
   the model's own distributions ``p_1 .. p_{k+1}``;
4. the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): ``d_j`` is accepted
   with probability ``min(1, p_j(d_j) / q_j(d_j))``; at the first rejection the token is drawn
   from ``normalize(max(0, p_j - q_j))`` and the rest is discarded (the cache and DeltaNet state
   roll back with ``rewind_sequence``); if all k are accepted the next token comes from
   ``p_{k+1}``. Either way that token becomes the next round's pending token.

The output distribution is exactly the model's. Greedy decoding (temperature 0) makes every
``p`` and ``q`` one-hot, so the rule reduces to "accept while the draft is the argmax": the
tokens are those of plain greedy decoding (up to float32 rounding ties between the k+1-row
verify forward and one-row decode steps, see docs/engine.md).
"""
from __future__ import annotations

import numpy as np

from nanochat.infer.sampling import limit_vocab, next_token_distribution


def _draw(p, rng, greedy):
    if greedy:
        return int(np.argmax(p))
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), p.size - 1))


def speculative_ids(engine, seq, pending, h, history, params, rng, k, vocab_limit, stats):
    """Yield token ids forever (the caller stops): ``pending`` first, then what each round accepts.

    ``seq``: the engine sequence whose cache ends just before ``pending``; ``h`` the hidden state
    (backend array ``[C]``) of its last position; ``history``: every token so far (extended
    here); ``stats``: a ``GenerationStats`` whose ``drafted`` / ``accepted`` counters advance.
    """
    greedy = params.temperature == 0
    xp = engine.xp
    while True:
        yield pending
        history.append(pending)
        # Drafts from the MTP heads on h (independent of each other except through the penalty).
        draft_logits = limit_vocab(engine._draft(h, k), vocab_limit)
        drafts, qs, hist = [], [], list(history)
        for j in range(k):
            q = next_token_distribution(draft_logits[j], hist, params)
            d = _draw(q, rng, greedy)
            drafts.append(d)
            qs.append(q)
            hist.append(d)
        # One forward verifies them all.
        hidden = []
        logits = limit_vocab(engine._verify(seq, [pending] + drafts, hidden), vocab_limit)
        hidden = hidden[0] if len(hidden) == 1 else xp.concatenate(hidden, axis=1)
        stats.drafted += k
        for j, d in enumerate(drafts):
            p = next_token_distribution(logits[j], history, params)
            q = qs[j]
            if greedy:
                ok = int(np.argmax(p)) == d
            else:
                ok = q[d] > 0 and rng.random() < min(1.0, p[d] / q[d])
            if ok:
                stats.accepted += 1
                yield d
                history.append(d)
                continue
            if greedy:
                pending = int(np.argmax(p))
            else:
                residual = np.maximum(p - q, 0.0)
                pending = _draw(residual / residual.sum(), rng, False) if residual.sum() > 0 else _draw(p, rng, False)
            engine.rewind_sequence(seq, k - j)
            h = hidden[0, j]
            break
        else:
            pending = _draw(next_token_distribution(logits[k], history, params), rng, greedy)
            h = hidden[0, k]
