"""Fuzz: GGUF files, .mhc sidecars and checkpoint directories (every file), damaged by hypothesis.

Property (tests/fuzzing.py): a valid result or one ValueError sentence, never a traceback, a
peak allocation over 256 MiB or a hang. The seeds are real files written by this project.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzzing import guarded, mutate, report

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    from nanochat.config import load_config
    from nanochat.data.tokenizer import Tokenizer
    from nanochat.io.checkpoint import rng_state_to_json, save_checkpoint
    from nanochat.io.gguf import parameter_specs, write_gguf
    from nanochat.io.mhc import write_mhc

    root = tmp_path_factory.mktemp("seeds")
    cfg = load_config(None, ["model.dim=64", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=128",
                             "model.n_layers=1", "model.vocab_size=300", "model.seq_len=16", "model.group_size=64",
                             "model.n_streams=2", "model.mhc_mode=\"static\""])
    tok = Tokenizer.train(["def main():\n    return 1\n" * 40, "hello world " * 40], vocab_size=300)
    rng = np.random.default_rng(0)
    params = {n: (rng.standard_normal(s.shape) * 0.02).astype(np.float32) for n, s in parameter_specs(cfg).items()}
    write_gguf(root / "m.gguf", cfg, params, tok.to_json_str())
    records = [{"alpha_logit": [0.5], "pre_logits": [0.1, 0.2], "pre_bias": [0.0, 0.0], "post_logits": [0.3, 0.4],
                "post_bias": [0.0, 0.1]} for _ in range(4)]
    write_mhc(root / "m.mhc", records, 2)
    tok.save(root / "tokenizer.json")
    opt = {"hidden/0.step": np.array(3, np.int64), "hidden/0.buf": np.zeros((4, 4), np.float32),
           "scalars/0.step": np.array(3, np.int64), "scalars/0.m": np.zeros(8, np.float32)}
    state = {"step": 3, "tokens": 96, "data_step": 3, "rng": rng_state_to_json(np.random.default_rng(1)),
             "val_history": [[0, 5.5], [3, 5.0]], "skipped_steps": 0, "backend": "numpy"}
    ck = save_checkpoint(root / "run" / "checkpoints", 3, params, opt, cfg.to_toml(), state,
                         tokenizer_path=root / "tokenizer.json")
    yield {"gguf": (root / "m.gguf").read_bytes(), "mhc": (root / "m.mhc").read_bytes(), "ck": ck}
    print("\n" + report())


def _header_size(data: bytes) -> int:
    """Bytes before the GGUF tensor data (where damage matters most)."""
    return min(len(data), 64 * 1024)


@FUZZ
@given(data=st.data())
def test_fuzz_gguf(seeds, tmp_path, data):
    from nanochat.io.gguf_read import read_gguf

    raw = mutate(seeds["gguf"], data.draw, st, region=_header_size(seeds["gguf"]))
    path = tmp_path / "f.gguf"
    path.write_bytes(raw)
    guarded("gguf", lambda: read_gguf(path))


@FUZZ
@given(data=st.data())
def test_fuzz_mhc(seeds, tmp_path, data):
    from nanochat.io.mhc import read_mhc

    raw = mutate(seeds["mhc"], data.draw, st)
    path = tmp_path / "f.mhc"
    path.write_bytes(raw)
    guarded("mhc", lambda: read_mhc(path))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                    | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
STATE_KEYS = ["step", "tokens", "data_step", "rng", "val_history", "skipped_steps", "backend", "tokenizer"]


def _copy_checkpoint(seeds, tmp_path):
    dst = tmp_path / "ck" / seeds["ck"].name
    if dst.parent.exists():
        shutil.rmtree(dst.parent)
    shutil.copytree(seeds["ck"], dst)
    return dst


def _load_both(ck):
    """The resume path's reader and the export path's reader must both answer cleanly."""
    from nanochat.io.checkpoint import load_checkpoint
    from nanochat.io.gguf import loaded_from_checkpoint

    load_checkpoint(ck)
    return loaded_from_checkpoint(ck)


@FUZZ
@given(key=st.sampled_from(STATE_KEYS + ["rng.state", "rng.bit_generator", "val_history.0"]), value=JSON,
       deep=st.integers(0, 3))
def test_fuzz_checkpoint_state_json(seeds, tmp_path, key, value, deep):
    ck = _copy_checkpoint(seeds, tmp_path)
    state = json.loads((ck / "state.json").read_text())
    head, _, tail = key.partition(".")
    if tail == "":
        state[head] = value
    elif head == "rng":
        state["rng"][tail] = value
    else:
        state["val_history"][0] = value
    text = json.dumps(state)
    if deep == 3:
        text = text[:-1] + ', "deep": ' + "[" * 50000 + "]" * 50000 + "}"
    (ck / "state.json").write_text(text)
    guarded("checkpoint/state.json", lambda: _load_both(ck))


@FUZZ
@given(data=st.data(), name=st.sampled_from(["model.safetensors", "optimizer.safetensors", "config.toml",
                                             "tokenizer.json", "state.json"]))
def test_fuzz_checkpoint_files(seeds, tmp_path, data, name):
    ck = _copy_checkpoint(seeds, tmp_path)
    raw = (ck / name).read_bytes()
    (ck / name).write_bytes(mutate(raw, data.draw, st, region=min(len(raw), 4096)))
    guarded(f"checkpoint/{name}", lambda: _load_both(ck))


@FUZZ
@given(key=st.sampled_from(["hidden/0.step", "scalars/0.step", "hidden/0.buf", "scalars/0.m", "hidden/7.step",
                            "junk", "hidden/x.step"]),
       dtype=st.sampled_from(["int64", "int32", "float32", "float16", "int8", "uint8", "float64"]),
       value=st.integers(-2**63, 2**63 - 1), drop=st.booleans())
def test_fuzz_checkpoint_optimizer_entries(seeds, tmp_path, key, dtype, value, drop):
    from safetensors.numpy import load_file, save_file

    ck = _copy_checkpoint(seeds, tmp_path)
    arrays = load_file(str(ck / "optimizer.safetensors"))
    if drop and key in arrays:
        del arrays[key]
    else:
        shape = arrays[key].shape if key in arrays else ()
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
        v = min(max(value, info.min), info.max) if info else float(value)
        arrays[key] = np.full(shape, v, dtype=dtype)
    save_file(arrays, str(ck / "optimizer.safetensors"))
    guarded("checkpoint/optimizer entries", lambda: _load_both(ck))
