"""Checkpoint directories: atomic writes, crash recovery, pruning, and clear errors on bad input."""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.numpy

from nanochat.io import checkpoint as ckpt
from nanochat.io.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from nanochat.config import load_config
from nanochat.train.trainer import Trainer

pytestmark = pytest.mark.trainer

CONFIG_TOML = "[train]\nsteps = 4\n"


def arrays(step):
    """Parameters and optimizer state whose values encode the step (to tell checkpoints apart)."""
    params = {"w": np.full((4, 8), float(step), np.float32), "norm": np.arange(8, dtype=np.float32) + step}
    opt = {"hidden/0.step": np.array(step, np.int64), "hidden/0.qbuf": np.arange(16, dtype=np.int8),
           "hidden/0.scales": np.array([0.5], np.float32), "scalars/0.m": np.zeros(8, np.float32)}
    return params, opt


def state(step):
    rng = np.random.default_rng(step)
    return {"step": step, "tokens": 64 * step, "data_step": step, "rng": ckpt.rng_state_to_json(rng)}


def save(root, step, keep_last=3, **kwargs):
    params, opt = arrays(step)
    return save_checkpoint(root, step, params, opt, CONFIG_TOML, state(step), keep_last=keep_last, **kwargs)


def one_sentence(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ------------------------------------------------------------------------- round trip

def test_round_trip_keeps_values_dtypes_and_zero_d_shapes(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text('{"model": "bpe"}')
    path = save(tmp_path / "ck", 7, tokenizer_path=tok)
    assert path.name == "step-000007"
    loaded = load_checkpoint(path)
    params, opt = arrays(7)
    for name, a in params.items():
        assert loaded["params"][name].dtype == a.dtype and np.array_equal(loaded["params"][name], a)
    for name, a in opt.items():
        got = loaded["optimizer"][name]
        assert got.shape == a.shape and got.dtype == a.dtype and np.array_equal(got, a), name
    assert loaded["optimizer"]["hidden/0.step"].shape == ()  # step counters stay 0-d
    assert loaded["config_toml"] == CONFIG_TOML
    assert loaded["state"]["tokenizer"] == "tokenizer.json"
    assert loaded["tokenizer_path"].read_text() == '{"model": "bpe"}'
    restored = ckpt.rng_from_json(loaded["state"]["rng"])
    assert restored.integers(0, 1 << 62) == np.random.default_rng(7).integers(0, 1 << 62)


def test_run_directory_resolves_to_the_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (2, 10, 4):
        save(run / "checkpoints", step)
    assert load_checkpoint(run)["path"].name == "step-000010"
    assert load_checkpoint(run / "checkpoints")["state"]["step"] == 10
    assert latest_checkpoint(run / "checkpoints").name == "step-000010"


# ------------------------------------------------------------------------- atomicity

@pytest.mark.parametrize("failing_call", [1, 2])
def test_crash_while_writing_tensors_leaves_the_previous_checkpoint(tmp_path, monkeypatch, failing_call):
    root = tmp_path / "ck"
    previous = save(root, 1)
    real_save_file = safetensors.numpy.save_file
    calls = {"n": 0}

    def save_file_then_crash(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == failing_call:
            real_save_file(dict(list(tensors.items())[:1]), filename)  # part of the file is on disk
            raise OSError("No space left on device")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", save_file_then_crash)
    with pytest.raises(OSError, match="No space left"):
        save(root, 2)
    assert list_checkpoints(root) == [previous]
    assert sorted(p.name for p in root.iterdir()) == ["step-000001"]  # no temporary directory left behind
    assert load_checkpoint(root)["state"]["step"] == 1
    assert np.array_equal(load_checkpoint(root)["params"]["w"], arrays(1)[0]["w"])


def test_crash_at_the_rename_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    previous = save(root, 1)

    def replace_fails(src, dst):
        raise OSError("simulated power loss")

    monkeypatch.setattr(ckpt.os, "replace", replace_fails)
    with pytest.raises(OSError, match="power loss"):
        save(root, 2)
    monkeypatch.undo()
    assert list_checkpoints(root) == [previous]
    assert load_checkpoint(root)["state"]["step"] == 1


def test_leftovers_of_a_killed_process_are_invisible_and_cleaned_up(tmp_path):
    root = tmp_path / "ck"
    save(root, 3)
    torn = root / ".tmp-step-000004-99999"  # a process killed mid-write leaves this behind
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"\x08\x00")
    incomplete = root / "step-000005"  # a step directory without all its files is never listed
    incomplete.mkdir()
    (incomplete / "state.json").write_text("{}")
    assert [p.name for p in list_checkpoints(root)] == ["step-000003"]
    assert load_checkpoint(root)["state"]["step"] == 3
    save(root, 4)
    assert not torn.exists()
    assert [p.name for p in list_checkpoints(root)] == ["step-000003", "step-000004"]


def test_crash_inside_a_same_step_swap_is_repaired_by_the_next_save(tmp_path):
    root = tmp_path / "ck"
    save(root, 2)
    save(root, 3)
    os.replace(root / "step-000003", root / ".old-step-000003-4242")  # renamed aside, new one never arrived
    assert [p.name for p in list_checkpoints(root)] == ["step-000002"]
    save(root, 4, keep_last=5)
    assert [p.name for p in list_checkpoints(root)] == ["step-000002", "step-000003", "step-000004"]
    assert not any(p.name.startswith(".old-") for p in root.iterdir())


def test_resaving_a_step_replaces_it(tmp_path):
    root = tmp_path / "ck"
    save(root, 2)
    params, opt = arrays(2)
    params["w"][:] = 42.0
    save_checkpoint(root, 2, params, opt, CONFIG_TOML, state(2))
    assert [p.name for p in list_checkpoints(root)] == ["step-000002"]
    assert load_checkpoint(root)["params"]["w"][0, 0] == 42.0


def test_keep_last_k_prunes_oldest_and_never_the_one_just_written(tmp_path):
    root = tmp_path / "ck"
    for step in range(1, 6):
        save(root, step, keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-000004", "step-000005"]
    # resuming an older checkpoint and saving: the new one survives even though step 5 is newer
    save(root, 3, keep_last=1)
    assert [p.name for p in list_checkpoints(root)] == ["step-000003"]


@pytest.mark.parametrize("where", ["params", "optimizer"])
def test_nonfinite_state_is_never_written(tmp_path, where):
    params, opt = arrays(1)
    (params["norm"] if where == "params" else opt["scalars/0.m"])[2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(tmp_path / "ck", 1, params, opt, CONFIG_TOML, state(1))
    assert list_checkpoints(tmp_path / "ck") == []
    assert not (tmp_path / "ck").exists()  # refused before anything touched the disk


# ---------------------------------------------------------------------------- bad input

def test_missing_directory_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as exc:
        load_checkpoint(tmp_path / "nope")
    assert str(tmp_path / "nope") in one_sentence(exc)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "file.txt")
    path = save(tmp_path / "ck", 1)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint \(missing optimizer.safetensors\)") as exc:
        load_checkpoint(path)
    assert str(path) in one_sentence(exc)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"tokens": 0, "data_step": 0, "rng": {}}', "step: the field is missing"),
    ('{"step": -1, "tokens": 0, "data_step": 0, "rng": {}}', "step: must be a non-negative integer"),
    ('{"step": 1, "tokens": 0, "data_step": 1, "rng": {"bit_generator": "seed"}}', "does not hold a numpy bit generator"),
    ('{"step": 1, "tokens": 0, "data_step": 1, "rng": {"bit_generator": "PCG64", "state": 3}}', "not a valid PCG64 state"),
])
def test_bad_state_json(tmp_path, content, problem):
    path = save(tmp_path / "ck", 1)
    (path / "state.json").write_text(content)
    with pytest.raises(CheckpointError, match=problem) as exc:
        load_checkpoint(path)
    assert str(path / "state.json") in one_sentence(exc)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_safetensors(tmp_path, damage):
    path = save(tmp_path / "ck", 1)
    target = path / "model.safetensors"
    data = target.read_bytes()
    target.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\xff" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="cannot read safetensors data") as exc:
        load_checkpoint(path)
    assert str(target) in one_sentence(exc)


@pytest.mark.parametrize("name, value", [("model.safetensors", np.nan), ("optimizer.safetensors", np.inf)])
def test_nonfinite_tensors_are_rejected_on_load(tmp_path, name, value):
    path = save(tmp_path / "ck", 1)
    params, opt = arrays(1)
    tensors = params if name == "model.safetensors" else opt
    key = "norm" if name == "model.safetensors" else "scalars/0.m"
    tensors[key][1] = value
    safetensors.numpy.save_file(tensors, str(path / name))
    with pytest.raises(CheckpointError, match=f"{key}: the tensor has NaN or Inf values") as exc:
        load_checkpoint(path)
    assert str(path / name) in one_sentence(exc)


# -------------------------------------------------------------- checkpoints vs the model

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.group_size=64",
        "model.ffn_hidden=128", "model.seq_len=32", "model.vocab_size=300", "train.batch_size=2", "train.steps=1",
        "train.eval_batches=1", "train.backend=numpy", "train.sample_tokens=0", "train.tensorboard=false"]


def _data():
    tokens = (np.arange(2000) * 7 % 300).astype(np.uint16)
    return SimpleNamespace(train_tokens=tokens, val_tokens=tokens[:200], vocab_size=300, tokenizer=None,
                           tokenizer_path=None)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    Trainer(load_config("tiny", TINY), out_dir=run, progress=False, data=_data()).train()
    return run


@pytest.mark.parametrize("override, file, problem", [
    ("model.ffn_hidden=192", "model.safetensors", "has shape"),
    ("model.n_layers=3", "model.safetensors", "parameters do not match the model"),
    ("optim.muon_8bit=true", "optimizer.safetensors", "group 'hidden'"),
    ("optim.galore=true", "optimizer.safetensors", "group 'hidden'"),
])
def test_resuming_with_an_incompatible_config_names_the_file(tmp_path, trained_run, override, file, problem):
    extra = [override] + (["optim.galore_min_dim=32", "optim.galore_rank=16"] if "galore" in override else [])
    cfg = load_config("tiny", TINY + extra)
    with pytest.raises(CheckpointError, match=problem) as exc:
        Trainer(cfg, out_dir=tmp_path, progress=False, data=_data(), resume=trained_run)
    assert file in one_sentence(exc)


def test_checkpoint_carries_config_and_data_cursor(trained_run):
    loaded = load_checkpoint(trained_run)
    assert load_config(str(loaded["path"] / "config.toml")) == load_config("tiny", TINY)
    s = loaded["state"]
    assert (s["step"], s["data_step"], s["tokens"], s["skipped_steps"]) == (1, 1, 64, 0)
    assert s["backend"] == "numpy" and [h[0] for h in s["val_history"]] == [0, 1]
