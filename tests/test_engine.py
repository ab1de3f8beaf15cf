"""Inference engine: logits against the training forward, KV-cache decoding, rewind, sampling,
streaming text, and the generate/eval command lines."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest

from backends import Backend, get_backend
from nanochat.io import gguf as gguf_io
from nanochat.config import load_config
from nanochat.infer.engine import (
    SNAPSHOT_EVERY,
    Engine,
    SamplingParams,
    TextStream,
    apply_repetition_penalty,
    expected_tensors,
    next_token_distribution,
    sample_next,
)
from nanochat.model.gpt import Model
from nanochat.train.losses import compute_loss
from reference.autograd import no_grad

pytestmark = pytest.mark.engine

SMALL = ["vocab_size=300", "dim=64", "n_layers=2", "n_heads=4", "n_kv_heads=2", "ffn_hidden=128",
         "group_size=64", "seq_len=32"]
CONFIGS = {
    "gqa_subln": [],
    "mha_relu2_untied_no_subln": ["n_kv_heads=4", "sub_norm=false", "ffn_type=relu2", "tie_embeddings=false"],
    "mhc2_static": ["n_streams=2", "mhc_mode=static"],
    "mhc2_dynamic": ["n_streams=2", "mhc_mode=dynamic"],
    "mhc4_static": ["n_streams=4", "mhc_mode=static"],
    "mhc4_dynamic": ["n_streams=4", "mhc_mode=dynamic"],
    "moe_shared": ["n_experts=4", "moe_top_k=2", "moe_shared_expert=true"],
    "deltanet": ["deltanet_layers=[1]"],
    "hybrid": ["deltanet_layers=[0]", "n_experts=4", "moe_layers=every_other", "n_streams=4", "n_kv_heads=1"],
}
BACKENDS = ["numpy", "numba"]


@pytest.fixture(scope="module", autouse=True)
def one_numba_thread():
    """The checks here are about numbers, not speed: one kernel thread keeps the tiny kernels
    of these small models from waiting on a second thread when the 2-core machine is busy."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(before)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def small_cfg(extra=(), **kw):
    return load_config("tiny", SMALL + list(extra) + [f"{k}={v}" for k, v in kw.items()])


def loaded_from_model(model, cfg, tokenizer_json=None):
    """The LoadedModel of a live model: the training forward's exact ternary weights, packed."""
    params = {name: t.data for name, t in model.params.items()}
    return gguf_io.quantize_params(cfg, params, tokenizer_json, source="live model")


@functools.lru_cache(maxsize=None)
def built(config_name, backend_name):
    cfg = small_cfg(CONFIGS[config_name])
    model = Model(cfg.model, get_backend(backend_name), seed=7)
    return cfg, model, Engine(loaded_from_model(model, cfg), backend_name)


def token_ids(shape, seed=0, vocab=300):
    return np.random.default_rng(seed).integers(0, vocab, size=shape)


# ------------------------------------------------------------------------ layout and load
def test_expected_tensors_are_the_model_parameters():
    cfg = small_cfg(CONFIGS["hybrid"] + ["moe_shared_expert=true", "mhc_mode=dynamic", "tie_embeddings=false"])
    model = Model(cfg.model, get_backend("numpy"), seed=0)
    floats, ternary = expected_tensors(cfg.model)
    assert set(floats) | set(ternary) == set(model.params)
    assert not set(floats) & set(ternary)
    for name, shape in {**floats, **ternary}.items():
        assert model.params[name].shape == shape, name
    assert set(ternary) == set(gguf_io.ternary_param_names(cfg.model))


def test_bad_loaded_model_is_rejected_with_the_tensor_name():
    cfg, model, _ = built("gqa_subln", "numpy")
    loaded = loaded_from_model(model, cfg)
    del loaded.floats["layers.1.ffn_norm"]
    with pytest.raises(ValueError, match="layers.1.ffn_norm"):
        Engine(loaded, "numpy")
    loaded = loaded_from_model(model, cfg)
    packed, scales = loaded.ternary["layers.0.attn.wq"]
    loaded.ternary["layers.0.attn.wq"] = (packed, scales[:, :0])
    with pytest.raises(ValueError, match="layers.0.attn.wq"):
        Engine(loaded, "numpy")
    loaded = loaded_from_model(model, cfg)
    loaded.floats["norm"] = np.full_like(loaded.floats["norm"], np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        Engine(loaded, "numpy")


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_engine_logits_match_training_forward(config_name, backend_name):
    cfg, model, engine = built(config_name, backend_name)
    idx = token_ids((2, 12), seed=1)
    with no_grad():
        want = model.be.to_numpy(model.logits(idx).data)
    got = engine.logits(idx)
    assert got.shape == want.shape and got.dtype == np.float32
    assert rel(got, want) < 1e-4


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_kv_cache_decoding_matches_full_forward(config_name, backend_name):
    _, _, engine = built(config_name, backend_name)
    ids = token_ids(14, seed=2)
    full = engine.logits(ids[None])[0]
    engine.reset()
    stepped = np.stack([engine.step(int(t)) for t in ids])
    assert rel(stepped, full) < 1e-5
    # prefill a prefix, decode the rest
    engine.reset()
    mixed = np.concatenate([engine.feed(ids[:5]), np.stack([engine.step(int(t)) for t in ids[5:]])])
    assert rel(mixed, full) < 1e-5
    # rewind into the middle and decode again: same logits as the first time
    engine.rewind(6)
    assert engine.position == 8 and engine.tokens == [int(t) for t in ids[:8]]
    again = np.concatenate([engine.feed(ids[8:10]), np.stack([engine.step(int(t)) for t in ids[10:]])])
    assert rel(again, full[8:]) < 1e-5


def test_rewind_restores_deltanet_state_across_snapshots():
    _, _, engine = built("hybrid", "numpy")
    n = 2 * SNAPSHOT_EVERY + 20
    ids = token_ids(n, seed=3)
    full = engine.logits(ids[None])[0]  # grows past the initial capacity (seq_len 32)
    engine.reset()
    engine.feed(ids[:SNAPSHOT_EVERY + 30])
    for t in ids[SNAPSHOT_EVERY + 30:]:
        engine.step(int(t))
    assert engine.position == n
    for target in (SNAPSHOT_EVERY + 5, SNAPSHOT_EVERY, 3):
        engine.rewind(engine.position - target)
        tail = np.concatenate([engine.feed(ids[target:target + 2]),
                               np.stack([engine.step(int(t)) for t in ids[target + 2:target + 6]])])
        assert rel(tail, full[target:target + 6]) < 1e-5
    engine.rewind(engine.position)
    assert engine.position == 0
    assert rel(engine.feed(ids[:4]), full[:4]) < 1e-5
    with pytest.raises(ValueError, match="rewind"):
        engine.rewind(5)


def test_prefill_and_decode_run_one_packed_product_per_stacked_matrix():
    rows = []
    ref = get_backend("numpy")

    def packed_linear(h, x):
        rows.append(x.shape[0])
        return ref.packed_linear(h, x)

    spy = Backend("spy", np, {"packed_linear": packed_linear})
    cfg, model, _ = built("gqa_subln", "numpy")
    engine = Engine(loaded_from_model(model, cfg), spy)
    # q/k/v and gate/up are stacked: per layer one product for q/k/v, wo, gate/up, w_down.
    n_products = 4 * cfg.model.n_layers
    assert len(engine.linear.matrices) == n_products < len(expected_tensors(cfg.model)[1])
    engine.feed(token_ids(6))
    assert rows == [6] * n_products  # prefill: all six tokens in each product (GEMM)
    engine.step(5)
    assert rows == [6] * n_products + [1] * n_products  # decode: one row (GEMV)


def test_dequantized_float_path_computes_the_same_model():
    cfg, model, packed = built("moe_shared", "numpy")
    floaty = Engine(loaded_from_model(model, cfg), "numpy", dequantized=True)
    idx = token_ids((1, 10), seed=4)
    assert rel(floaty.logits(idx), packed.logits(idx)) < 1e-4
    assert rel(np.stack([floaty.step(int(t)) for t in idx[0]]), packed.logits(idx)[0]) < 1e-4


def test_gguf_file_gives_the_training_logits(tmp_path):
    cfg, model, _ = built("mhc2_static", "numpy")
    path = tmp_path / "m.gguf"
    gguf_io.write_gguf(path, cfg, {n: t.data for n, t in model.params.items()}, None)
    engine = Engine.from_path(path, "numpy")
    idx = token_ids((1, 9), seed=5)
    with no_grad():
        want = model.logits(idx).data
    assert rel(engine.logits(idx), want) < 1e-4


def test_bad_token_ids_are_rejected():
    _, _, engine = built("gqa_subln", "numpy")
    with pytest.raises(ValueError, match=r"\[0, 300\)"):
        engine.feed([1, 300])
    with pytest.raises(ValueError, match="2-D"):
        engine.logits(np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="no tokens"):
        engine.feed([])


# ----------------------------------------------------------------------------- sampling
LOGITS = np.array([2.0, -1.0, 0.5, 3.0, 1.0, -3.0, 0.0, 2.5])


def test_greedy_is_the_argmax_and_ignores_the_seed():
    p = next_token_distribution(LOGITS, (), SamplingParams(temperature=0))
    assert p[3] == 1.0 and p.sum() == 1.0
    rng = np.random.default_rng(0)
    assert {sample_next(LOGITS, (), SamplingParams(temperature=0, seed=s), rng) for s in range(5)} == {3}


def test_top_k_and_top_p_restrict_the_support():
    p = next_token_distribution(LOGITS, (), SamplingParams(temperature=1.0, top_k=3))
    assert set(np.flatnonzero(p)) == {0, 3, 7}
    full = next_token_distribution(LOGITS, (), SamplingParams(temperature=1.0))
    order = np.argsort(-full)
    p = next_token_distribution(LOGITS, (), SamplingParams(temperature=1.0, top_p=0.8))
    support = set(np.flatnonzero(p))
    n_keep = int(np.searchsorted(np.cumsum(full[order]), 0.8)) + 1
    assert support == set(order[:n_keep].tolist())
    assert full[order[: n_keep - 1]].sum() < 0.8 <= full[order[:n_keep]].sum()
    assert math.isclose(p.sum(), 1.0)
    # top-k then top-p: the nucleus of the 3 survivors
    p = next_token_distribution(LOGITS, (), SamplingParams(temperature=1.0, top_k=3, top_p=0.5))
    assert set(np.flatnonzero(p)) <= {0, 3, 7}
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=1.3, top_k=2)
    draws = {sample_next(LOGITS, (), params, rng) for _ in range(300)}
    assert draws == {3, 7}


def test_repetition_penalty_lowers_repeated_tokens():
    history = [3, 5]  # one positive and one negative logit
    z = apply_repetition_penalty(LOGITS, history, 1.5)
    assert z[3] == pytest.approx(3.0 / 1.5) and z[5] == pytest.approx(-3.0 * 1.5)
    np.testing.assert_array_equal(np.delete(z, [3, 5]), np.delete(LOGITS, [3, 5]))
    base = next_token_distribution(LOGITS, (), SamplingParams(temperature=1.0))
    pen = next_token_distribution(LOGITS, history, SamplingParams(temperature=1.0, repetition_penalty=1.5))
    assert pen[3] < base[3] and pen[5] < base[5]
    assert next_token_distribution(LOGITS, [3], SamplingParams(temperature=0, repetition_penalty=2.0))[7] == 1.0


def test_temperature_sharpens_and_flattens():
    cold = next_token_distribution(LOGITS, (), SamplingParams(temperature=0.5))
    hot = next_token_distribution(LOGITS, (), SamplingParams(temperature=2.0))
    assert cold.max() > hot.max()


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(repetition_penalty=0.0), dict(seed=-3), dict(temperature=float("nan"))])
def test_bad_sampling_parameters_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_greedy_generation_is_deterministic_and_follows_the_argmax():
    _, _, engine = built("deltanet", "numpy")
    prompt = [5, 17, 42]
    a = list(engine.generate_ids(prompt, 8, SamplingParams(temperature=0)))
    b = list(engine.generate_ids(prompt, 8, SamplingParams(temperature=0)))
    assert a == b and len(a) == 8
    logits = engine.logits(np.asarray([prompt + a[:-1]]))[0]
    assert [int(i) for i in logits[len(prompt) - 1:].argmax(axis=-1)] == a
    assert engine.last_stats.reused_tokens == 2  # the second call kept the cached prompt
    assert engine.last_stats.new_tokens == 8 and engine.last_stats.finish_reason == "length"


def test_seeded_sampling_is_reproducible():
    _, _, engine = built("gqa_subln", "numpy")
    params = SamplingParams(temperature=1.5, seed=11)
    a = list(engine.generate_ids([1, 2, 3], 12, params))
    engine.reset()
    b = list(engine.generate_ids([1, 2, 3], 12, params))
    c = list(engine.generate_ids([1, 2, 3], 12, SamplingParams(temperature=1.5, seed=12)))
    assert a == b and a != c


def test_stop_token_ends_generation_without_being_yielded():
    _, _, engine = built("gqa_subln", "numpy")
    free = list(engine.generate_ids([1, 2, 3], 10, SamplingParams(temperature=0)))
    stop = free[4]
    cut = list(engine.generate_ids([1, 2, 3], 10, SamplingParams(temperature=0), stop_ids=[stop]))
    assert cut == free[: free.index(stop)] and engine.last_stats.finish_reason == "stop_token"


# -------------------------------------------------------------------------- text stream
class ByteTokenizer:
    """Ids 0-255 are single bytes, 256 is end-of-text, 257+ are two ASCII letters."""

    def __init__(self, vocab_size=300):
        self.vocab_size, self.eot_id = vocab_size, 256

    def token_bytes(self, i):
        if i < 256:
            return bytes([i])
        return b"" if i == 256 else bytes([97 + (i - 257) % 26, 65 + (i - 257) // 26])

    def encode(self, text):
        return list(text.encode("utf-8"))


def test_text_stream_reassembles_multibyte_characters():
    tok = ByteTokenizer()
    stream = TextStream(tok.token_bytes)
    euro = "€".encode()  # three bytes
    assert [stream.push(b) for b in euro] == ["", "", "€"]
    pieces = [stream.push(b) for b in "añ🎉b".encode()]
    assert "".join(pieces) == "añ🎉b" and "" in pieces
    stream.push(0xE2)  # a dangling lead byte at the end becomes U+FFFD
    assert stream.finish() == "\ufffd"
    assert stream.text == "€añ🎉b\ufffd"


def test_text_stream_holds_back_and_drops_stop_strings():
    tok = ByteTokenizer()
    stream = TextStream(tok.token_bytes, stop=["END", "\n\n"])
    out = [stream.push(b) for b in b"abEN"]
    assert "".join(out) == "ab"  # "EN" may begin "END": held back
    assert stream.push(ord("x")) == "ENx"  # it did not
    assert [stream.push(b) for b in b"yEND"] == ["y", "", "", ""]
    assert stream.stopped and stream.text == "abENxy"
    assert stream.push(ord("z")) == "" and stream.finish() == ""
    stream = TextStream(tok.token_bytes, stop=["END"])
    for b in b"qE":
        stream.push(b)
    assert stream.finish() == "E" and stream.text == "qE"


def test_generate_streams_text_and_stops_on_stop_strings():
    cfg, model, _ = built("gqa_subln", "numpy")
    tok = ByteTokenizer(cfg.model.vocab_size)
    engine = Engine(loaded_from_model(model, cfg), "numpy", tokenizer=tok)
    pieces = list(engine.generate("hi", 24, temperature=0, stop_at_eot=False))
    ids = engine.last_token_ids
    text = "".join(pieces)
    assert text == b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
    done = engine.complete("hi", 24, temperature=0, stop_at_eot=False)
    assert done.text == text and done.token_ids == ids and done.stats.new_tokens == 24
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = engine.complete("hi", 24, temperature=0, stop_at_eot=False, stop=[stop])
    assert cut.text == text[: text.index(stop)] and stop not in cut.text
    assert cut.stats.finish_reason == "stop_string"
    assert engine.complete("hi", 0).text == "" and engine.last_stats.new_tokens == 0
    with pytest.raises(ValueError, match="empty"):
        engine.complete([], 3)


# ------------------------------------------------------------------------ command lines
@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A checkpoint of a small random model with a real tokenizer, and a text corpus."""
    from nanochat.io.checkpoint import rng_state_to_json, save_checkpoint
    from nanochat.data.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("engine_cli")
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # café\n" for i in range(400)]
    corpus = root / "corpus.txt"
    corpus.write_text("".join(lines), encoding="utf-8")
    tok = Tokenizer.train(lines, vocab_size=300)
    tok_path = root / "tokenizer.json"
    tok.save(tok_path)
    cfg = small_cfg(vocab_size=max(300, tok.vocab_size), seq_len=16)
    model = Model(cfg.model, get_backend("numpy"), seed=3)
    params = {n: t.data for n, t in model.params.items()}
    state = {"step": 1, "tokens": 0, "data_step": 1, "rng": rng_state_to_json(np.random.default_rng(0))}
    ckpt = save_checkpoint(root / "checkpoints", 1, params, {}, cfg.to_toml(), state, tokenizer_path=tok_path)
    return ckpt, corpus, model, tok


def test_generate_cli_prints_text_and_speed(trained_checkpoint, capsys):
    from nanochat.cli import generate

    ckpt = trained_checkpoint[0]
    argv = ["--model", str(ckpt), "--prompt", "def f(", "--max-tokens", "6", "--temperature", "0", "--backend", "numpy"]
    assert generate.main(argv) == 0
    first = capsys.readouterr()
    assert first.out.startswith("def f(") and "tokens/s" in first.err
    assert generate.main(argv + ["--stream"]) == 0
    assert capsys.readouterr().out == first.out  # greedy: streaming prints the same text


@pytest.mark.parametrize("argv, needle", [
    (["--model", "/nonexistent/model.gguf"], "does not exist"),
    (["--temperature", "-1"], "temperature"),
    (["--top-p", "2"], "top_p"),
    (["--max-tokens", "-5"], "max-tokens"),
])
def test_generate_cli_bad_input_is_one_line_and_exit_2(trained_checkpoint, capsys, argv, needle):
    from nanochat.cli import generate

    base = ["--model", str(trained_checkpoint[0])] if argv[0] != "--model" else []
    try:
        code = generate.main(base + argv + ["--backend", "numpy"])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_eval_cli_reports_loss_perplexity_and_bits_per_byte(trained_checkpoint, capsys):
    import json

    from nanochat.cli import eval as eval_mod
    from nanochat.data.corpus import discover_corpus
    from nanochat.data.loader import val_batches

    ckpt, corpus, model, tok = trained_checkpoint
    assert eval_mod.main(["--model", str(ckpt), "--data", str(corpus), "--max-batches", "2", "--batch-size", "2",
                          "--backend", "numpy", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    # the same numbers from the training forward and the tokenizer's bytes
    _, val_docs = discover_corpus(corpus).split(0.01)
    ids = []
    for d in val_docs:
        ids += tok.encode(d.read()) + ([tok.eot_id] if d.ends_document else [])
    batches = list(val_batches(np.asarray(ids), 2, 16, 2))
    with no_grad():
        losses = [compute_loss(model, b, need_token_losses=True).token_losses for b in batches]
    nats = float(np.concatenate([l.reshape(-1) for l in losses]).astype(np.float64).sum())
    n_bytes = sum(len(tok.token_bytes(int(t))) for b in batches for t in b[:, 1:].reshape(-1))
    assert got["tokens"] == sum(b[:, 1:].size for b in batches) and got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(nats / got["tokens"], rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]), rel=1e-9)
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-4)


def test_eval_cli_bad_input_is_one_line_and_exit_2(trained_checkpoint, tmp_path, capsys):
    from nanochat.cli import eval as eval_mod

    ckpt = str(trained_checkpoint[0])
    short = tmp_path / "short.txt"
    short.write_text("a\nb\n")
    for argv, needle in ((["--model", str(tmp_path / "missing")], "does not exist"),
                         (["--model", ckpt, "--data", str(tmp_path / "nope.txt")], "does not exist"),
                         (["--model", ckpt, "--data", str(short)], "fewer than one window")):
        assert eval_mod.main(argv + ["--backend", "numpy"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("config_name", ["gqa_subln", "mha_relu2_untied_no_subln", "deltanet"])
def test_int8_head_stays_within_its_documented_tolerance(config_name):
    """The int8 LM head (int8 weights per vocabulary row, int8 activations per token, exact int32
    sums) changes logits by a bounded relative error; decode and prefill agree with each other."""
    cfg, model, exact = built(config_name, "numba")
    int8 = Engine(loaded_from_model(model, cfg), "numba", head="int8")
    idx = token_ids((2, 12), seed=4)
    want, got = exact.logits(idx), int8.logits(idx)
    assert rel(got, want) < 2e-2  # docs/engine.md: about 1% on these models
    ids = idx[0]
    assert rel(np.stack([int8.step(int(t)) for t in ids]), got[0]) < 1e-5
    with pytest.raises(ValueError, match="head must be one of"):
        Engine(loaded_from_model(model, cfg), "numba", head="int4")


@pytest.mark.parametrize("config_name", ["gqa_subln", "deltanet", "hybrid"])
def test_long_prompts_prefill_in_chunks_with_the_same_logits(config_name, monkeypatch):
    """A prompt is prefilled in chunks whose float64 attention scores stay under
    PREFILL_SCORE_BYTES (memory linear in the prompt, never [T, T]); chunking changes no logit
    beyond float32 rounding, and caches start small and grow."""
    from nanochat.infer import engine as engine_module

    cfg, model, engine = built(config_name, "numba")
    idx = token_ids((1, 70), seed=9)
    want = engine.logits(idx)[0]
    monkeypatch.setattr(engine_module, "PREFILL_SCORE_BYTES", 8 * cfg.model.n_heads * 80 * 7)  # ~7 tokens a chunk
    assert engine.prefill_chunk(80) == 7
    engine.reset()
    got = engine.feed(idx[0])
    assert rel(got, want) < 1e-5
    seq = engine.new_sequence()
    assert all(getattr(s, "k", np.zeros((1, 16))).shape[1] <= 16 for s in seq.cache.layers)  # starts small
    last = engine.prefill(seq, idx[0])
    assert rel(last, want[-1]) < 1e-5
