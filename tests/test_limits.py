"""Resource bounds and hostile input (issue 15): each class of problem, not only the quoted examples.

- sizes from configs and flags are bounded before anything is allocated (config bounds, the
  memory estimate of nanochat.train.budget);
- readers of outside files never block (FIFOs, devices) and fail with one ValueError sentence;
- writers name the target and leave files with the umask's mode;
- text that is not UTF-8 is a clean error.
"""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanochat.config import ConfigError, load_config
from nanochat.train.budget import check_memory, estimate_memory, machine_memory

ROOT = Path(__file__).resolve().parents[1]


def run_cli(module, *args, env=None, timeout=60):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, timeout=timeout,
                          cwd=ROOT, env=full_env)


def one_error_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr.decode(errors="replace"))
    err = proc.stderr.decode(errors="replace").strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# --- sizes from configs and flags --------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("model.dim=1000000000", "model.dim"), ("model.ffn_hidden=1099511627776", "model.ffn_hidden"),
    ("model.n_layers=1000000000", "model.n_layers"), ("train.batch_size=1000000000", "train.batch_size"),
    ("model.n_experts=1000000", "model.n_experts"), ("model.vocab_size=2147483648", "model.vocab_size"),
    ("model.seq_len=1099511627776", "model.seq_len"), ("train.steps=4611686018427387904", "train.steps"),
    ("model.moe_hidden=1099511627776", "model.moe_hidden"), ("train.grad_accum=1000000000", "train.grad_accum"),
    ("model.deltanet_key_dim=1000000000", "model.deltanet_key_dim"), ("train.loader_workers=100000", "train.loader_workers"),
])
def test_every_size_key_has_an_upper_bound(override, key):
    with pytest.raises(ConfigError, match=f"{key} = .* it must be at most"):
        load_config(None, [override])


@pytest.mark.parametrize("overrides, key", [
    (["model.dim=65536", "model.ffn_hidden=65536", "model.n_heads=256", "model.n_kv_heads=256"], "model.dim"),
    (["model.n_layers=4096"], "model.n_layers"),
    (["train.batch_size=65536"], "train.batch_size"),
    (["model.n_experts=1024"], "model.n_experts"),
    (["model.ffn_hidden=262144"], "model.ffn_hidden"),
    (["model.vocab_size=1048576", "model.dim=4096", "model.ffn_hidden=4096"], "model.vocab_size"),
    (["model.seq_len=1048576"], "model.seq_len"),
])
def test_a_config_past_the_machine_is_refused_naming_the_key(overrides, key, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MEMORY_LIMIT", "16G")
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=f"^{key} = .*needs an estimated .* of memory to train, more than the 16.0 GiB"):
        check_memory(cfg)


def test_the_estimate_counts_every_part_and_the_presets_fit_their_machines(monkeypatch):
    est = estimate_memory(load_config("tiny"))
    assert est["total"] == sum(est[k] for k in ("parameters", "gradients", "optimizer", "activations"))
    assert est["parameters"] == 4 * est["parameter_count"]
    # measured on the development machine: tiny's one-step peak is 481 MiB; the estimate is 551 MiB
    assert 400 << 20 < est["total"] < 700 << 20
    eight = estimate_memory(load_config("tiny", ["optim.muon_8bit=true"]))
    assert eight["optimizer"] < est["optimizer"]
    monkeypatch.setenv("NANOCHAT_MEMORY_LIMIT", "1G")
    check_memory(load_config("tiny"))
    assert machine_memory()[0] == 1 << 30


@pytest.mark.parametrize("value", ["lots", "-1G", "nan", "0"])
def test_a_bad_memory_limit_variable_is_one_sentence(value, monkeypatch):
    monkeypatch.setenv("NANOCHAT_MEMORY_LIMIT", value)
    with pytest.raises(ConfigError, match="NANOCHAT_MEMORY_LIMIT"):
        check_memory(load_config("tiny"))


def test_the_trainer_refuses_before_preparing_data(tmp_path):
    cache = tmp_path / "cache"
    proc = run_cli("nanochat.train", "--set", "train.batch_size=60000", "--set", f"data.cache_dir=\"{cache}\"",
                   "--out", str(tmp_path / "run"), "--quiet", env={"NANOCHAT_MEMORY_LIMIT": "8G"})
    one_error_line(proc, "train.batch_size = 60000", "needs an estimated")
    assert not cache.exists()


def test_the_vocab_bound_protects_the_tokenizer_trainer(tmp_path):
    from nanochat.data.corpus import prepare_data

    (tmp_path / "a.txt").write_text("hello world\n" * 100)
    with pytest.raises(ValueError, match="vocab_size must be between 257"):
        prepare_data(tmp_path / "a.txt", vocab_size=2**31, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("declared", [2**32, 2**21, 2**40])
def test_a_sidecar_declaring_a_huge_vocabulary_is_refused(tmp_path, declared):
    from nanochat.data.tokenfile import load_token_file

    np.arange(100, dtype="<u4").tofile(tmp_path / "t.bin")
    (tmp_path / "t.json").write_text(f'{{"vocab_size": {declared}, "dtype": "uint32"}}')
    with pytest.raises(ValueError, match="field 'vocab_size' must be an integer in"):
        load_token_file(tmp_path / "t.bin")


def test_sidecar_size_nesting_and_kind(tmp_path):
    from nanochat.data.tokenfile import load_token_file

    np.arange(100, dtype="<u2").tofile(tmp_path / "t.bin")
    side = tmp_path / "t.json"
    side.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="more than the"):
        load_token_file(tmp_path / "t.bin")
    side.write_text("[" * 20000 + "]" * 20000)
    with pytest.raises(ValueError, match="nests JSON too deeply|must hold a JSON object"):
        load_token_file(tmp_path / "t.bin")
    side.unlink()
    os.mkfifo(side)
    with pytest.raises(ValueError, match="FIFO"):
        load_token_file(tmp_path / "t.bin")


# --- readers that must not block -------------------------------------------------------------------

@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("reader", ["gguf", "mhc", "tokenizer", "config"])
def test_readers_refuse_fifos_without_blocking(reader, fifo, tmp_path):
    code = {
        "gguf": "from nanochat.io.gguf_read import read_gguf as r",
        "mhc": "from nanochat.io.mhc import read_mhc as r",
        "tokenizer": "from nanochat.data.tokenizer import Tokenizer; r = Tokenizer.load",
        "config": "from nanochat.config import load_config as r",
    }[reader]
    target = fifo
    if reader == "config":
        target = tmp_path / "pipe.toml"
        os.mkfifo(target)
    script = f"{code}\ntry:\n    r({str(target)!r})\nexcept ValueError as e:\n    print('clean:', e)\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith(b"clean:"), proc.stderr


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_read_mhc_raises_one_value_error(tmp_path, make):
    from nanochat.io.mhc import read_mhc

    path = tmp_path / "x.mhc"
    if make == "directory":
        path.mkdir()
    with pytest.raises(ValueError, match="x.mhc: the (path is a directory|.mhc file does not exist)"):
        read_mhc(path)


@pytest.mark.parametrize("model, words", [("/dev/null", "is a device"), ("{fifo}", "is a FIFO"),
                                          ("{missing}", "does not exist")])
@pytest.mark.parametrize("cli", ["nanochat.generate", "nanochat.eval"])
def test_model_paths_are_described_correctly(cli, model, words, fifo, tmp_path):
    model = model.format(fifo=fifo, missing=tmp_path / "nothing.gguf")
    one_error_line(run_cli(cli, "--model", model), words)


def test_a_prompt_that_is_not_utf8_is_one_error_line():
    proc = subprocess.run([sys.executable, "-m", "nanochat.generate", "--model", "/dev/null",
                           "--prompt", os.fsdecode(b"def \xff")], capture_output=True, timeout=60, cwd=ROOT)
    one_error_line(proc, "--prompt is not valid UTF-8", "0xff")


def test_the_tokenizer_refuses_text_that_is_not_utf8():
    from nanochat.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["hello world " * 50], vocab_size=300)
    for text in (os.fsdecode(b"def \xff"), "a\ud800b"):
        with pytest.raises(ValueError, match="not valid UTF-8"):
            tok.encode(text)
        with pytest.raises(ValueError, match="not valid UTF-8"):
            tok.encode_batch(["fine", text])
    with pytest.raises(ValueError, match="encodes text"):
        tok.encode(b"bytes")


# --- writers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_get_the_umask_mode_and_keep_an_existing_mode(tmp_path, umask):
    from nanochat.io.atomic import atomic_write_bytes

    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o666 & ~umask
    os.chmod(tmp_path / "a", 0o640)
    atomic_write_bytes(tmp_path / "a", b"y")
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o640
    assert (tmp_path / "a").read_bytes() == b"y" and sorted(os.listdir(tmp_path)) == ["a"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_target_is_named_not_the_temporary_file(tmp_path):  # pragma: no cover - root in CI
    from nanochat.io.atomic import atomic_write_bytes

    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(PermissionError) as info:
        atomic_write_bytes(locked / "model.gguf", b"x")
    assert info.value.filename == str(locked / "model.gguf")


def test_a_failed_temporary_file_names_the_target(tmp_path):
    from nanochat.io.atomic import atomic_write_bytes

    target = tmp_path / "no" / "such" / "model.gguf"
    with pytest.raises(FileNotFoundError) as info:
        atomic_write_bytes(target, b"x")
    assert info.value.filename == str(target)
