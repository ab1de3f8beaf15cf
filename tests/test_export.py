"""GGUF export and the hardened reader (SPEC sections 2, 3, 8, 9; docs/gguf.md)."""
from __future__ import annotations

import functools
import struct
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import backends
from nanochat.io import gguf as gguf_io
from nanochat.io import gguf_read
from nanochat.io.gguf_read import read_gguf
from nanochat.io.checkpoint import save_checkpoint
from nanochat.config import Config
from nanochat.cli.export import main as export_main
from nanochat.io.gguf import (
    GGUFError,
    loaded_from_checkpoint,
    parameter_specs,
    quantize_params,
    ternary_param_names,
    tq2_0_from_packed,
    write_gguf,
    write_loaded,
)
from nanochat.model.gpt import Model
from nanochat.train.losses import compute_loss
from reference.mhc import STATIC_PARAM_NAMES
from nanochat.io.mhc import read_mhc
from reference.ternary import dequantize_weights, pack_ternary, quantize_weights, unpack_ternary

pytestmark = pytest.mark.engine

TQ2_0 = gguf.GGMLQuantizationType.TQ2_0

BASE = dict(vocab_size=300, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=128, group_size=64,
            seq_len=16, sub_norm=True)
WIDE = dict(BASE, dim=256, ffn_hidden=512, group_size=256)
CONFIGS = {
    "plain_g64": {},
    "plain_g128": dict(dim=128, ffn_hidden=256, group_size=128, sub_norm=False, ffn_type="relu2"),
    "plain_g256": WIDE,
    "mhc2_static": dict(n_streams=2, mhc_mode="static"),
    "mhc4_static": dict(n_streams=4, mhc_mode="static"),
    "mhc2_dynamic": dict(n_streams=2, mhc_mode="dynamic"),
    "mhc4_dynamic_g256": dict(WIDE, n_streams=4, mhc_mode="dynamic", n_layers=1),
    "moe": dict(n_experts=3, moe_top_k=2, moe_shared_expert=True, moe_layers="every_other"),
    "moe_list": dict(n_experts=2, moe_top_k=1, moe_layers=[0]),
    "deltanet": dict(deltanet_layers=[1], deltanet_heads=2, deltanet_key_dim=16, deltanet_value_dim=32),
    "mtp_untied": dict(mtp_n_tokens=2, tie_embeddings=False),
    "hybrid_g256": dict(WIDE, n_layers=3, deltanet_ratio=0.34, n_experts=2, moe_top_k=1, mtp_n_tokens=1,
                        n_streams=2, mhc_mode="static"),
}


def make_config(**overrides) -> Config:
    return Config.from_dict({"model": dict(BASE, **overrides)})


@functools.lru_cache(maxsize=None)
def _model_params(key):
    cfg = make_config(**CONFIGS[key])
    model = Model(cfg.model, backends.get_backend("numpy"), seed=7)
    return cfg, {name: t.data for name, t in model.params.items()}


def model_params(key):
    cfg, params = _model_params(key)
    return cfg, {k: v.copy() for k, v in params.items()}


@functools.lru_cache(maxsize=None)
def tokenizer_json():
    from nanochat.data.tokenizer import Tokenizer

    texts = ["def add(a, b):\n    return a + b\n" * 8, "the quick brown fox jumps over the lazy dog " * 8,
             "for i in range(10):\n    print(i)\n" * 8]
    return Tokenizer.train(texts, vocab_size=290).to_json_str()


def assert_same_model(loaded, expected):
    assert loaded.config.model == expected.config.model
    assert set(loaded.floats) == set(expected.floats)
    assert set(loaded.ternary) == set(expected.ternary)
    for name, arr in expected.floats.items():
        got = loaded.floats[name]
        assert got.dtype == np.float32 and np.array_equal(got, arr), name
    for name, (packed, scales) in expected.ternary.items():
        got_packed, got_scales = loaded.ternary[name]
        assert got_packed.dtype == np.uint8 and np.array_equal(got_packed, packed), name
        assert got_scales.dtype == np.float32 and np.array_equal(got_scales, scales), name


# --- the parameter layout -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["mhc2_dynamic", "moe", "deltanet", "mtp_untied", "hybrid_g256"])
def test_parameter_specs_match_the_model_and_its_bitlinear_calls(key, monkeypatch):
    from nanochat.model.linear import TrainingLinear

    cfg, params = _model_params(key)
    specs = parameter_specs(cfg)
    assert list(specs) == list(params)
    assert {n: s.shape for n, s in specs.items()} == {n: a.shape for n, a in params.items()}
    # The ternary set is exactly what the forward pass sends through ternary_linear.
    model = Model(cfg.model, backends.get_backend("numpy"), seed=7)
    seen = set()
    original = TrainingLinear.__call__

    def recording(self, x, *names):
        seen.update(names)
        return original(self, x, *names)

    monkeypatch.setattr(TrainingLinear, "__call__", recording)
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, size=(2, 9))
    compute_loss(model, tokens)
    assert seen == set(ternary_param_names(cfg))


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(CONFIGS))
def test_round_trip_is_exact(key, tmp_path):
    cfg, params = model_params(key)
    tok = tokenizer_json() if key != "plain_g128" else None
    path = tmp_path / "model.gguf"
    summary = write_gguf(path, cfg, params, tok)
    loaded = read_gguf(path, cross_check=True)  # gguf.GGUFReader must read the same table
    assert_same_model(loaded, quantize_params(cfg, params))
    assert loaded.tokenizer_json == tok
    assert loaded.source == str(path)
    assert summary.n_bytes == path.stat().st_size
    assert summary.n_tensors == sum(summary.tensor_types.values())
    expected_kind = "TQ2_0" if cfg.model.group_size == 256 else "I8"
    assert summary.tensor_types[expected_kind] == len(ternary_param_names(cfg))
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]  # no temporary left behind


def test_quantized_weights_are_the_training_forwards():
    cfg, params = model_params("plain_g64")
    loaded = quantize_params(cfg, params)
    for name in ternary_param_names(cfg):
        q, s = quantize_weights(params[name], 64)
        packed, scales = loaded.ternary[name]
        assert np.array_equal(unpack_ternary(packed), q)
        assert np.array_equal(dequantize_weights(unpack_ternary(packed), scales, 64), dequantize_weights(q, s, 64))


def test_tq2_0_tensors_dequantize_to_q_times_s_exactly(tmp_path):
    cfg, params = model_params("plain_g256")
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, params, None)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name in ternary_param_names(cfg):
        t = tensors[name]
        assert t.tensor_type == TQ2_0
        q, s = quantize_weights(params[name], 256)
        got = gguf.quants.dequantize(np.asarray(t.data), TQ2_0)
        assert np.array_equal(got, dequantize_weights(q, s, 256)), name
        assert list(t.shape) == [params[name].shape[1], params[name].shape[0]]  # GGUF ne order is reversed


def test_packed_encoding_stores_canonical_bytes_and_scales(tmp_path):
    cfg, params = model_params("plain_g64")
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, params, None)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for name in ternary_param_names(cfg):
        q, s = quantize_weights(params[name], 64)
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.I8
        assert np.array_equal(np.asarray(tensors[name].data).view(np.uint8), pack_ternary(q))
        assert tensors[name + ".scales"].tensor_type == gguf.GGMLQuantizationType.F32
        assert np.array_equal(np.asarray(tensors[name + ".scales"].data), s)


@settings(max_examples=25)
@given(st.integers(1, 3), st.integers(1, 2), st.sampled_from([256, 512]), st.integers(0, 2**32 - 1))
def test_tq2_0_conversion_is_an_exact_inverse(m, blocks, group, seed):
    rng = np.random.default_rng(seed)
    k = group * blocks
    q = rng.integers(-1, 2, size=(m, k)).astype(np.int8)
    scales = rng.uniform(0, 4, size=(m, k // group)).astype(np.float16).astype(np.float32)
    raw = tq2_0_from_packed(pack_ternary(q), scales, group)
    assert np.array_equal(gguf.quants.dequantize(raw, TQ2_0), dequantize_weights(q, scales, group))
    packed, back = gguf_io._tq2_0_to_packed(raw, m, k, group, "test")
    assert np.array_equal(packed, pack_ternary(q)) and np.array_equal(back, scales)


def test_f16_option_halves_2d_floats_only(tmp_path):
    cfg, params = model_params("mhc2_dynamic")
    path = tmp_path / "m.gguf"
    summary = write_gguf(path, cfg, params, None, float_type="f16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["tok_embeddings"] == "F16"
    assert types["layers.0.mhc_attn.dyn_weight"] == "F32" and types["norm"] == "F32"
    assert summary.tensor_types["F16"] == 1
    loaded = read_gguf(path)
    emb = params["tok_embeddings"]
    assert np.array_equal(loaded.floats["tok_embeddings"], emb.astype(np.float16).astype(np.float32))
    assert np.array_equal(loaded.floats["layers.0.mhc_attn.dyn_weight"], params["layers.0.mhc_attn.dyn_weight"])


def test_metadata_keys_and_tokenizer(tmp_path):
    from nanochat.data.tokenizer import Tokenizer

    cfg, params = model_params("moe")
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, params, tokenizer_json())
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "nanochat-ternary"
    assert fields["nanochat-ternary.dim"].contents() == 64
    assert fields["nanochat-ternary.norm_eps"].contents() == 1e-6  # float64: exact
    assert fields["nanochat-ternary.moe_layers"].contents() == "every_other"
    assert fields["nanochat-ternary.ternary_encoding"].contents() == "packed_i8"
    tok = Tokenizer.from_json_str(tokenizer_json())
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == cfg.model.vocab_size and tokens[:tok.vocab_size] == tok.vocab_list
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tok.eot_id
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tok.eot_id] == 3 and types[-1] == 5
    assert types.count(1) == tok.vocab_size - 1 and types.count(5) == cfg.model.vocab_size - tok.vocab_size
    assert fields["tokenizer.ggml.merges"].contents() == tok.merge_strings()


def test_writer_rejects_bad_parameters(tmp_path):
    cfg, params = model_params("plain_g64")
    bad = dict(params, norm=params["norm"][:32])
    with pytest.raises(ValueError, match=r"parameter norm has shape \[32\], expected \[64\]"):
        write_gguf(tmp_path / "m.gguf", cfg, bad, None)
    nan = dict(params)
    nan["layers.0.attn.wq"] = params["layers.0.attn.wq"].copy()
    nan["layers.0.attn.wq"][0, 0] = np.nan
    with pytest.raises(ValueError, match="layers.0.attn.wq holds non-finite"):
        write_gguf(tmp_path / "m.gguf", cfg, nan, None)
    missing = {k: v for k, v in params.items() if k != "norm"}
    with pytest.raises(ValueError, match="parameter norm is missing"):
        write_gguf(tmp_path / "m.gguf", cfg, missing, None)
    with pytest.raises(ValueError, match="unknown architecture 'llama'"):
        write_gguf(tmp_path / "m.gguf", cfg, params, None, arch="llama")
    assert list(tmp_path.iterdir()) == []


# --- bitnet -------------------------------------------------------------------------------------


def test_bitnet_architecture_for_a_plain_config(tmp_path):
    cfg, params = model_params("plain_g256")
    path = tmp_path / "b.gguf"
    write_gguf(path, cfg, params, tokenizer_json(), arch="bitnet")
    reader = gguf.GGUFReader(path)
    names = {t.name: t.tensor_type.name for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_sub_norm",
            "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_sub_norm")}
    assert set(names) == expected
    assert names["blk.0.attn_q.weight"] == "TQ2_0" and names["blk.1.ffn_down.weight"] == "TQ2_0"
    f = reader.fields
    assert f["general.architecture"].contents() == "bitnet"
    m = cfg.model
    assert f["bitnet.embedding_length"].contents() == m.dim
    assert f["bitnet.block_count"].contents() == m.n_layers
    assert f["bitnet.feed_forward_length"].contents() == m.ffn_hidden
    assert f["bitnet.attention.head_count"].contents() == m.n_heads
    assert f["bitnet.attention.head_count_kv"].contents() == m.n_kv_heads
    assert f["bitnet.rope.dimension_count"].contents() == m.head_dim
    assert f["bitnet.context_length"].contents() == m.seq_len
    assert f["bitnet.vocab_size"].contents() == m.vocab_size
    assert f["bitnet.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(m.norm_eps)
    assert f["bitnet.rope.freq_base"].contents() == m.rope_theta
    t = {t.name: t for t in reader.tensors}["blk.1.ffn_down.weight"]
    q, s = quantize_weights(params["layers.1.ffn.w_down"], 256)
    assert np.array_equal(gguf.quants.dequantize(np.asarray(t.data), TQ2_0), dequantize_weights(q, s, 256))
    loaded = read_gguf(path, cross_check=True)
    assert_same_model(loaded, quantize_params(cfg, params))
    assert loaded.tokenizer_json == tokenizer_json()
    # converting back and forth between the architectures is lossless
    write_loaded(tmp_path / "n.gguf", loaded)
    write_loaded(tmp_path / "b2.gguf", read_gguf(tmp_path / "n.gguf"), arch="bitnet")
    assert (tmp_path / "b2.gguf").read_bytes() == path.read_bytes()


@pytest.mark.parametrize("key, fragment", [
    ("mhc2_static", "n_streams = 2"),
    ("moe", "n_experts = 3"),
    ("deltanet", "DeltaNet blocks [1]"),
    ("mtp_untied", "mtp_n_tokens = 2"),
    ("plain_g64", "group_size = 64"),
    ("plain_g128", "sub_norm = false"),
])
def test_bitnet_refuses_configs_it_cannot_express(key, fragment, tmp_path):
    cfg, params = model_params(key)
    with pytest.raises(ValueError, match="bitnet architecture cannot express") as err:
        write_gguf(tmp_path / "b.gguf", cfg, params, None, arch="bitnet")
    assert fragment in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --- checkpoint export CLI and the .mhc sidecar ---------------------------------------------------


def save_model_checkpoint(root, key, with_tokenizer=True):
    cfg, params = model_params(key)
    Path(root).mkdir(parents=True, exist_ok=True)
    tok_path = None
    if with_tokenizer:
        tok_path = Path(root) / "tok.json"
        tok_path.write_text(tokenizer_json())
    state = {"step": 5, "tokens": 0, "data_step": 0, "rng": np.random.default_rng(0).bit_generator.state}
    return cfg, params, save_checkpoint(Path(root) / "checkpoints", 5, params, {}, cfg.to_toml(), state,
                                        tokenizer_path=tok_path)


@pytest.mark.parametrize("key", ["mhc2_static", "mhc4_static"])
def test_cli_exports_gguf_and_mhc_sidecar(key, tmp_path, capsys):
    cfg, params, step_dir = save_model_checkpoint(tmp_path / "run", key)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    assert export_main([str(tmp_path / "run"), "--out", str(out)]) == 0  # run dir -> newest checkpoint
    printed = capsys.readouterr().out
    assert "model.gguf" in printed and "model.mhc" in printed and "tensors" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf", "model.mhc"]
    loaded = read_gguf(out)
    from_checkpoint = loaded_from_checkpoint(step_dir)
    assert_same_model(from_checkpoint, quantize_params(cfg, params))
    assert from_checkpoint.config == cfg and from_checkpoint.tokenizer_json == tokenizer_json()
    assert_same_model(loaded, from_checkpoint)
    assert loaded.tokenizer_json == tokenizer_json()
    n, records = read_mhc(out.with_suffix(".mhc"))
    n_streams = cfg.model.n_streams
    assert n == n_streams and len(records) == 2 * cfg.model.n_layers
    for index, record in enumerate(records):
        layer, sub = divmod(index, 2)
        prefix = f"layers.{layer}.{('mhc_attn', 'mhc_ffn')[sub]}."
        assert list(record) == list(STATIC_PARAM_NAMES[n_streams])
        for name, value in record.items():
            assert np.array_equal(value, params[prefix + name]), prefix + name


def test_cli_bitnet_and_explicit_mhc_path(tmp_path, capsys):
    save_model_checkpoint(tmp_path / "run", "plain_g256", with_tokenizer=False)
    out = tmp_path / "b.gguf"
    assert export_main([str(tmp_path / "run"), "--out", str(out), "--arch", "bitnet"]) == 0
    assert read_gguf(out).tokenizer_json is None
    assert not out.with_suffix(".mhc").exists()  # no mHC, no sidecar
    save_model_checkpoint(tmp_path / "run2", "mhc2_static")
    side = tmp_path / "elsewhere.mhc"
    assert export_main([str(tmp_path / "run2"), "--out", str(tmp_path / "c.gguf"), "--mhc", str(side)]) == 0
    assert side.exists() and not (tmp_path / "c.mhc").exists()
    assert export_main([str(tmp_path / "run2"), "--out", str(tmp_path / "d.gguf"), "--no-mhc"]) == 0
    assert not (tmp_path / "d.mhc").exists()


@pytest.mark.parametrize("case", ["missing_checkpoint", "dynamic_mhc_sidecar", "bitnet_non_plain", "out_dir_missing"])
def test_cli_bad_input_is_one_line_exit_2_and_no_files(case, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"
    if case == "missing_checkpoint":
        args = [str(tmp_path / "nope"), "--out", str(out)]
    elif case == "dynamic_mhc_sidecar":
        save_model_checkpoint(tmp_path / "run", "mhc2_dynamic")
        args = [str(tmp_path / "run"), "--out", str(out), "--mhc", str(out_dir / "m.mhc")]
    elif case == "bitnet_non_plain":
        save_model_checkpoint(tmp_path / "run", "moe")
        args = [str(tmp_path / "run"), "--out", str(out), "--arch", "bitnet"]
    else:
        save_model_checkpoint(tmp_path / "run", "plain_g64")
        args = [str(tmp_path / "run"), "--out", str(tmp_path / "no" / "such" / "m.gguf")]
    assert export_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert ".part" not in err  # messages name the requested output, not the temporary file
    assert list(out_dir.iterdir()) == []


# --- the hardened reader --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def valid_file_bytes(key="plain_g256", tokenizer=True):
    cfg, params = _model_params(key)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.gguf"
        write_gguf(path, cfg, params, tokenizer_json() if tokenizer else None)
        return path.read_bytes()


def header_length(data: bytes) -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.gguf"
        path.write_bytes(data)
        return gguf_read._scan(str(path)).data_offset


def rewrite(src, dst, kv=None, drop_kv=(), tensors=None, drop_tensors=(), add_tensors=None):
    """Copy a GGUF file with metadata and tensors replaced: ``kv = {key: (GGUFValueType, value, subtype)}``,
    ``tensors = {name: (array, raw GGML type or None)}``, ``add_tensors = {name: array}``."""
    header = gguf_read._scan(str(src))
    reader = gguf.GGUFReader(src)
    arch = (kv or {}).get("general.architecture", (None, header.kv["general.architecture"].value))[1]
    writer = gguf_io._writer_class()(dst, arch)
    for key, entry in header.kv.items():
        if key in drop_kv or key == "general.architecture":
            continue
        value = entry.value.tolist() if isinstance(entry.value, np.ndarray) else entry.value
        writer.add_key_value(key, value, gguf.GGUFValueType(entry.vtype),
                             sub_type=None if entry.subtype is None else gguf.GGUFValueType(entry.subtype))
    for key, (vtype, value, *sub) in (kv or {}).items():
        if key != "general.architecture":
            writer.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    for t in reader.tensors:
        if t.name in drop_tensors:
            continue
        if tensors and t.name in tensors:
            data, raw_type = tensors[t.name]
        else:
            data = np.array(t.data)
            raw_type = None if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                                                 gguf.GGMLQuantizationType.I8) else t.tensor_type
        writer.add_tensor(t.name, data, raw_dtype=raw_type)
    for name, data in (add_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture
def valid_path(tmp_path):
    path = tmp_path / "valid.gguf"
    path.write_bytes(valid_file_bytes())
    return path


def reject(path, *fragments):
    with pytest.raises(GGUFError) as err:
        read_gguf(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file_and_directory(tmp_path):
    reject(tmp_path / "nope.gguf", "does not exist")
    reject(tmp_path, "directory")


@pytest.mark.parametrize("where", ["empty", "magic", "counts", "kv", "tensor_info", "data_start", "data_end"])
def test_truncated_files_are_rejected(where, tmp_path):
    data = valid_file_bytes()
    cuts = {
        "empty": 0, "magic": 3, "counts": 20, "kv": 200,
        "tensor_info": header_length(data) - 40, "data_start": header_length(data) + 10, "data_end": len(data) - 1,
    }
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cuts[where]])
    reject(path, "truncated")


def test_wrong_magic_and_version(tmp_path):
    data = valid_file_bytes()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGML" + data[4:])
    reject(path, "magic", "not a GGUF file")
    path.write_bytes(data[:4] + struct.pack("<I", 99) + data[8:])
    reject(path, "version 99")
    path.write_bytes(data[:4] + struct.pack(">I", 3) + data[8:])
    reject(path, "big-endian")


def test_unknown_architecture(valid_path, tmp_path):
    out = tmp_path / "llama.gguf"
    rewrite(valid_path, out, kv={"general.architecture": (gguf.GGUFValueType.STRING, "llama")})
    reject(out, "architecture 'llama'")


def test_wrong_tensor_type(valid_path, tmp_path):
    out = tmp_path / "t.gguf"
    w = np.zeros((256, 256), np.float32)
    rewrite(valid_path, out, tensors={"layers.0.attn.wq": (w, None)})
    reject(out, "'layers.0.attn.wq'", "type F32", "expected TQ2_0")
    rewrite(valid_path, out, tensors={"norm": (np.ones(256, np.int32), None)})
    reject(out, "'norm'", "type I32", "expected F32 or F16")


def test_wrong_shape(tmp_path):
    src = tmp_path / "g64.gguf"
    cfg, params = model_params("plain_g64")
    write_gguf(src, cfg, params, None)
    out = tmp_path / "s.gguf"
    rewrite(src, out, tensors={"norm": (np.ones(32, np.float32), None)})
    reject(out, "'norm'", "shape [32]", "expected [64]")
    rewrite(src, out, tensors={"layers.1.ffn.w_down.scales": (np.ones((64, 1), np.float32), None)})
    reject(out, "'layers.1.ffn.w_down.scales'", "shape [64, 1]", "expected [64, 2]")


def test_non_finite_values(valid_path, tmp_path):
    out = tmp_path / "n.gguf"
    norm = np.ones(256, np.float32)
    norm[3] = np.nan
    rewrite(valid_path, out, tensors={"norm": (norm, None)})
    reject(out, "'norm'", "non-finite", "[3]")
    # A TQ2_0 block scale set to +inf (fp16 0x7C00) in place.
    header = gguf_read._scan(str(valid_path))
    info = header.tensors["layers.0.ffn.w_up"]
    data = bytearray(valid_path.read_bytes())
    data[info.offset + 64:info.offset + 66] = np.array([np.inf], np.float16).tobytes()
    out.write_bytes(bytes(data))
    reject(out, "'layers.0.ffn.w_up'", "non-finite TQ2_0 block scale")


def test_tq2_0_code_3_is_not_ternary(valid_path, tmp_path):
    header = gguf_read._scan(str(valid_path))
    info = header.tensors["layers.1.attn.wk"]
    data = bytearray(valid_path.read_bytes())
    data[info.offset + 66 + 5] = 0xFF  # block 1: four codes of 3
    out = tmp_path / "c.gguf"
    out.write_bytes(bytes(data))
    reject(out, "'layers.1.attn.wk'", "code 3", "block 1")


def test_missing_and_unexpected_tensors(valid_path, tmp_path):
    out = tmp_path / "m.gguf"
    rewrite(valid_path, out, drop_tensors={"layers.1.ffn_norm"})
    reject(out, "'layers.1.ffn_norm' is missing")
    rewrite(valid_path, out, add_tensors={"layers.9.extra": np.ones(4, np.float32)})
    reject(out, "'layers.9.extra' is not part of")


def test_bad_metadata(valid_path, tmp_path):
    V = gguf.GGUFValueType
    out = tmp_path / "k.gguf"
    rewrite(valid_path, out, drop_kv={"nanochat-ternary.n_heads"})
    reject(out, "'nanochat-ternary.n_heads' is missing")
    rewrite(valid_path, out, kv={"nanochat-ternary.dim": (V.STRING, "256")})
    reject(out, "'nanochat-ternary.dim' has type STRING", "expected int")
    rewrite(valid_path, out, kv={"nanochat-ternary.n_heads": (V.INT64, 3)})
    reject(out, "model.dim = 256 is not divisible by model.n_heads = 3")
    rewrite(valid_path, out, kv={"nanochat-ternary.n_layers": (V.INT64, 2**40)})
    reject(out, "n_layers = 1099511627776", "at most 4096")
    rewrite(valid_path, out, kv={"nanochat-ternary.format_version": (V.UINT32, 7)})
    reject(out, "format_version", "7")
    rewrite(valid_path, out, kv={"nanochat-ternary.tokenizer_json": (V.STRING, "{not json")})
    reject(out, "tokenizer_json", "not a valid tokenizer")


def test_hostile_lengths_do_not_allocate(valid_path, tmp_path):
    data = bytearray(valid_path.read_bytes())
    out = tmp_path / "h.gguf"
    # tensor count and metadata count far beyond the file
    out.write_bytes(bytes(data[:8]) + struct.pack("<Q", 2**60) + bytes(data[16:]))
    reject(out, "tensors, more than the file can hold")
    out.write_bytes(bytes(data[:16]) + struct.pack("<Q", 2**62) + bytes(data[24:]))
    reject(out, "metadata entries, more than the file can hold")
    # the first key's length field (right after the header) set to 2**63
    out.write_bytes(bytes(data[:24]) + struct.pack("<Q", 2**63) + bytes(data[32:]))
    reject(out)


def test_trailing_garbage(valid_path, tmp_path):
    out = tmp_path / "t.gguf"
    out.write_bytes(valid_path.read_bytes() + b"\0" * 64)
    reject(out, "trailing")


def _only_gguf_errors(data: bytes):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.gguf"
        path.write_bytes(data)
        try:
            loaded = read_gguf(path)
        except GGUFError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc)
            return None
        return loaded


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(lambda b: b"GGUF\x03\0\0\0" + b)))
def test_fuzz_random_bytes_raise_only_gguf_errors(data):
    assert _only_gguf_errors(data) is None


@functools.lru_cache(maxsize=None)
def _small_valid():
    data = valid_file_bytes("plain_g64", tokenizer=True)
    return data, header_length(data)


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_valid_file_raises_only_gguf_errors(draw):
    data, head = _small_valid()
    buf = bytearray(data)
    in_header = draw.draw(st.booleans())
    limit = head if in_header else len(buf)
    for _ in range(draw.draw(st.integers(1, 8))):
        buf[draw.draw(st.integers(0, limit - 1))] = draw.draw(st.integers(0, 255))
    if draw.draw(st.booleans()):
        buf = buf[:draw.draw(st.integers(0, len(buf)))]
    loaded = _only_gguf_errors(bytes(buf))
    if loaded is not None:  # a mutation the format cannot detect (a float value, a config number)
        assert all(np.isfinite(a).all() for a in loaded.floats.values())
