"""Self-speculative decoding with the MTP heads: greedy output is plain greedy's token for token
(attention, DeltaNet with rollback, MoE, mHC), and sampled output has the model's distribution."""
from __future__ import annotations

import numpy as np
import pytest

from backends import get_backend
from nanochat.config import load_config
from nanochat.infer.engine import Engine
from nanochat.infer.sampling import SamplingParams, next_token_distribution
from nanochat.io import gguf as gguf_io
from nanochat.model.gpt import Model

pytestmark = pytest.mark.engine

SMALL = ["dim=64", "n_layers=2", "n_heads=4", "n_kv_heads=2", "ffn_hidden=128", "group_size=64", "seq_len=32",
         "mtp_n_tokens=3"]


def engine_for(extra, vocab=300, seed=7, backend="numba"):
    cfg = load_config("tiny", [f"model.{kv}" for kv in SMALL + [f"vocab_size={vocab}"] + list(extra)])
    model = Model(cfg.model, get_backend(backend), seed=seed)
    params = {name: t.data for name, t in model.params.items()}
    loaded = gguf_io.quantize_params(cfg, params, None, source="live model")
    return Engine(loaded, backend)


@pytest.mark.parametrize("extra", [[], ["deltanet_layers=[1]"], ["n_experts=4", "moe_top_k=2"],
                                   ["n_streams=4", "mhc_mode=static", "deltanet_layers=[0]"]],
                         ids=["attention", "deltanet", "moe", "mhc4_hybrid"])
def test_greedy_speculative_output_is_plain_greedy(extra):
    engine = engine_for(extra)
    assert engine.mtp_heads == 3
    prompt = list(np.random.default_rng(1).integers(0, 300, 21))  # DeltaNet snapshots every 64: rollback replays
    greedy = SamplingParams(temperature=0)
    plain = list(engine.generate_ids(prompt, 70, greedy))
    for k in (1, 2, 3):
        engine.reset()
        spec = list(engine.generate_ids(prompt, 70, greedy, speculative=k))
        assert spec == plain, k
        s = engine.last_stats
        assert s.drafted >= k and 0 <= s.accepted <= s.drafted and s.new_tokens == 70


def test_speculative_sampling_keeps_the_model_distribution():
    """Tokens 2 and 3 of a sampled continuation come from accepted drafts or corrections; their
    empirical distribution must match the exact one (enumerated: top-k 6 keeps the support small;
    the drafts' own top-6 sets differ from the model's, so rejections happen)."""
    vocab, k, n = 300, 2, 1500
    engine = engine_for([], vocab=vocab, seed=3, backend="numpy")
    params = SamplingParams(temperature=1.0, top_k=6)
    prompt = [1, 5, 7]
    # Exact marginals of generated tokens 2 and 3.
    engine.reset()
    p1 = next_token_distribution(engine.feed(prompt)[-1], prompt, params)
    p2 = np.zeros(vocab)
    p3 = np.zeros(vocab)
    for a in np.nonzero(p1)[0]:
        a = int(a)
        engine.reset()
        la = engine.feed(prompt + [a])[-1]
        pa = next_token_distribution(la, prompt + [a], params)
        p2 += p1[a] * pa
        for b in np.nonzero(pa)[0]:
            lb = engine.feed([int(b)])[-1]
            p3 += p1[a] * pa[b] * next_token_distribution(lb, prompt + [a, int(b)], params)
            engine.rewind(1)
    counts2, counts3 = np.zeros(vocab), np.zeros(vocab)
    drafted = accepted = 0
    for seed in range(n):
        engine.reset()
        out = list(engine.generate_ids(prompt, 3, SamplingParams(temperature=1.0, top_k=6, seed=seed), speculative=k))
        counts2[out[1]] += 1
        counts3[out[2]] += 1
        drafted += engine.last_stats.drafted
        accepted += engine.last_stats.accepted
    assert 0 < accepted < drafted  # both the accept and the reject branch ran
    from scipy.stats import chisquare

    for counts, p in ((counts2, p2), (counts3, p3 / p3.sum())):
        keep = p * n >= 5  # chi-square needs expected counts >= 5; pool the rest
        obs = np.append(counts[keep], counts[~keep].sum())
        exp = np.append(p[keep] * n, p[~keep].sum() * n)
        if exp[-1] == 0:
            obs, exp = obs[:-1], exp[:-1]
        assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_speculative_needs_mtp_heads_and_a_valid_k():
    engine = engine_for([], backend="numpy")
    with pytest.raises(ValueError, match="more drafts"):
        list(engine.generate_ids([1, 2], 4, speculative=4))
    with pytest.raises(ValueError, match="integer >= 0"):
        list(engine.generate_ids([1, 2], 4, speculative=-1))
    plain = load_config("tiny", [f"model.{kv}" for kv in SMALL[:-1] + ["vocab_size=300"]])
    model = Model(plain.model, get_backend("numpy"), seed=1)
    no_heads = Engine(gguf_io.quantize_params(plain, {n: t.data for n, t in model.params.items()}, None), "numpy")
    with pytest.raises(ValueError, match="no multi-token-prediction heads"):
        list(no_heads.generate_ids([1, 2], 4, speculative=1))
