"""The training loop: bit-exact resume, loaders, NaN guard, Ctrl-C, CLI errors, presets, logs.

Every run here is a tiny model (dim 64, 2 layers, group 64, seq 32, batch 2, vocab 300) on
synthetic token arrays, so a few steps take well under a second on the numpy backend.
"""
from __future__ import annotations

import math
import signal
from types import SimpleNamespace

import numpy as np
import pytest

import backends
from nanochat.io.checkpoint import list_checkpoints, load_checkpoint
from nanochat.config import ConfigError, available_presets, count_parameters, load_config
from nanochat.data.loader import BatchLoader
from nanochat.train.metrics import TB_TAGS, read_metrics
from nanochat.model.gpt import Model
from nanochat.train.sample import generate, sample_next
from nanochat.train import trainer as trainer_module
from nanochat.train.losses import compute_loss
from nanochat.cli.train import main
from nanochat.train.trainer import Trainer, TrainingError

pytestmark = pytest.mark.trainer

from run_helpers import VOCAB, synthetic_data, tensorboard_scalars, token_stream  # noqa: E402
TINY = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.group_size=64",
    "model.ffn_hidden=128", "model.seq_len=32", f"model.vocab_size={VOCAB}",
    "train.batch_size=2", "train.steps=4", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1",
    "train.backend=numpy", "train.sample_tokens=0", "train.tensorboard=false", "train.keep_last_k=5",
    "optim.warmup_steps=2",
]


def tiny_config(*extra):
    return load_config("tiny", TINY + list(extra))




def make_trainer(cfg, out_dir, **kwargs):
    return Trainer(cfg, out_dir=out_dir, progress=False, data=synthetic_data(), **kwargs)


def params_of(trainer):
    return {name: np.array(trainer.be.to_numpy(p.data)) for name, p in trainer.model.params.items()}


def assert_params_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name]), f"parameter {name} differs"


def train_records(run_dir, kind="train"):
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def count_training_forwards(monkeypatch, trainer, on_call):
    """Wrap the model's forward; ``on_call(n, result)`` sees the n-th training forward (evaluation
    forwards pass no collider_sparsity and are not counted)."""
    original = trainer_module.compute_loss
    calls = {"n": 0}

    def forward(model, batch, *args, **kwargs):
        if "collider_sparsity" not in kwargs:
            return original(model, batch, *args, **kwargs)
        calls["n"] += 1
        return on_call(calls["n"], lambda: original(model, batch, *args, **kwargs))

    monkeypatch.setattr(trainer_module, "compute_loss", forward)
    return calls


# --------------------------------------------------------------------------- resume

RESUME_VARIANTS = {
    "muon_adamw": [],
    "muon_8bit": ["optim.muon_8bit=true"],
    # min_dim/rank small enough that the 64-wide matrices are projected; with a refresh every 3
    # steps the resumed half first uses the projector read back from the checkpoint, then refreshes.
    "galore": ["optim.galore=true", "optim.galore_min_dim=32", "optim.galore_rank=16", "optim.galore_update_freq=3"],
    "lion_grad_accum_sync_loader": ["optim.scalar_optimizer=lion", "train.grad_accum=2", "train.async_loader=false"],
}


def _resume_matches_one_go(tmp_path, cfg):
    """4 steps in one go (checkpointing at step 2) vs a fresh Trainer resumed from that checkpoint."""
    one_go = make_trainer(cfg, tmp_path / "one_go")
    one_go.train()
    half = one_go.out_dir / "checkpoints" / "step-000002"
    assert half in list_checkpoints(one_go.out_dir / "checkpoints")
    resumed = make_trainer(cfg, tmp_path / "resumed", resume=half)
    assert resumed.state.step == 2
    result = resumed.train()
    assert result["step"] == 4
    assert_params_identical(params_of(one_go), params_of(resumed))
    # Optimizer state too, so a third segment would also continue identically.
    a, b = load_checkpoint(one_go.out_dir), load_checkpoint(resumed.out_dir)
    assert a["optimizer"].keys() == b["optimizer"].keys()
    for key in a["optimizer"]:
        assert np.array_equal(a["optimizer"][key], b["optimizer"][key]), key
    return one_go, resumed


@pytest.mark.parametrize("variant", sorted(RESUME_VARIANTS))
def test_resume_is_bit_exact(tmp_path, variant):
    cfg = tiny_config("train.checkpoint_every=2", *RESUME_VARIANTS[variant])
    one_go, _ = _resume_matches_one_go(tmp_path, cfg)
    if variant == "muon_8bit":  # the int8 momentum really is in the checkpoint
        opt = load_checkpoint(one_go.out_dir)["optimizer"]
        assert any(k.endswith(".qbuf") and v.dtype == np.int8 for k, v in opt.items())
    if variant == "galore":
        opt = load_checkpoint(one_go.out_dir)["optimizer"]
        assert any(k.endswith(".P") for k in opt)


def test_stop_save_and_resume_in_a_new_trainer_is_bit_exact(tmp_path):
    """N steps in one go vs N/2 (train(until=...)) + save + new Trainer(resume=ckpt) + N/2, async loader on."""
    cfg = tiny_config("train.async_loader=true", "train.loader_workers=2")
    one_go = make_trainer(cfg, tmp_path / "a")
    one_go.train()
    first = make_trainer(cfg, tmp_path / "b")
    result = first.train(until=2)
    assert result["step"] == 2 and result["checkpoint"].name == "step-000002"
    second = make_trainer(cfg, tmp_path / "c", resume=result["checkpoint"])
    second.train()
    assert_params_identical(params_of(one_go), params_of(second))
    ce_one_go = [r["ce"] for r in train_records(one_go.out_dir)]
    ce_split = [r["ce"] for r in train_records(first.out_dir) + train_records(second.out_dir)]
    assert ce_one_go == ce_split


def test_resume_is_bit_exact_on_numba(tmp_path):
    cfg = tiny_config("train.backend=numba", "train.checkpoint_every=2", "optim.muon_8bit=true")
    one_go, _ = _resume_matches_one_go(tmp_path, cfg)
    assert one_go.be.name == "numba"


def test_async_loader_gives_the_same_run_as_sync(tmp_path):
    runs = {}
    for flag in ("true", "false"):
        cfg = tiny_config(f"train.async_loader={flag}", "train.loader_prefetch=2", "train.steps=3")
        trainer = make_trainer(cfg, tmp_path / flag)
        trainer.train()
        runs[flag] = (params_of(trainer), [(r["loss"], r["grad_norm"]) for r in train_records(trainer.out_dir)])
    assert runs["true"][1] == runs["false"][1]
    assert len(runs["true"][1]) == 3
    assert_params_identical(runs["true"][0], runs["false"][0])


# ------------------------------------------------------------------ gradient accumulation

def test_accumulated_gradient_is_the_mean_of_micro_batch_gradients(tmp_path):
    cfg = tiny_config("train.grad_accum=2", "train.dtype=float64")
    trainer = make_trainer(cfg, tmp_path)
    loader = BatchLoader(trainer.data.train_tokens, 2, 32, cfg.train.seed)
    record = trainer.accumulate_gradients(loader)
    accumulated = {n: p.grad.copy() for n, p in trainer.model.params.items()}
    assert loader.step == 2

    per_batch, losses = [], []
    for step in (0, 1):
        for p in trainer.model.params.values():
            p.grad = None
        res = compute_loss(trainer.model, loader.batch_at(step))
        res.loss.backward()
        losses.append(float(res.loss.data))
        per_batch.append({n: p.grad.copy() for n, p in trainer.model.params.items()})
    assert record["loss"] == pytest.approx(np.mean(losses), rel=1e-12)
    assert not np.allclose(per_batch[0]["layers.0.attn.wq"], per_batch[1]["layers.0.attn.wq"])
    for name, g in accumulated.items():
        np.testing.assert_allclose(g, 0.5 * (per_batch[0][name] + per_batch[1][name]), rtol=1e-10, atol=1e-14)


def test_float64_dtype_reaches_parameters_and_optimizer(tmp_path):
    trainer = make_trainer(tiny_config("train.dtype=float64", "train.steps=1"), tmp_path)
    trainer.train()
    assert all(p.data.dtype == np.float64 for p in trainer.model.params.values())
    assert backends.get_backend("numpy").dtype == np.float32  # the shared registry instance is untouched
    assert load_checkpoint(tmp_path)["params"]["norm"].dtype == np.float64


# -------------------------------------------------------------------------- NaN guard

def test_nonfinite_steps_are_skipped_logged_and_training_continues(tmp_path, monkeypatch):
    cfg = tiny_config("train.max_nonfinite_steps=3")
    trainer = make_trainer(cfg, tmp_path)

    def nan_on_calls_2_and_3(n, run):
        res = run()
        if n in (2, 3):
            res.loss = res.loss * float("nan")
        return res

    count_training_forwards(monkeypatch, trainer, nan_on_calls_2_and_3)
    result = trainer.train()
    assert result["step"] == 4 and not result["interrupted"]
    skips = train_records(tmp_path, "skip")
    assert [s["step"] for s in skips] == [1, 1]
    assert [s["nonfinite_in_row"] for s in skips] == [1, 2]
    assert all(math.isnan(s["loss"]) for s in skips)
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2, 3, 4]
    assert all(np.isfinite(p).all() for p in params_of(trainer).values())
    state = load_checkpoint(result["checkpoint"])["state"]
    assert state["skipped_steps"] == 2 and state["step"] == 4
    assert state["data_step"] == 6  # the skipped batches count as consumed


def test_too_many_nonfinite_steps_stop_without_a_checkpoint(tmp_path):
    cfg = tiny_config("train.max_nonfinite_steps=3", "train.checkpoint_every=1")
    trainer = make_trainer(cfg, tmp_path)
    trainer.model.params["layers.0.attn_norm"].data[:] = np.nan
    with pytest.raises(TrainingError, match=r"3 steps in a row had a non-finite loss or gradient"):
        trainer.train()
    assert [s["nonfinite_in_row"] for s in train_records(tmp_path, "skip")] == [1, 2, 3]
    assert list_checkpoints(tmp_path / "checkpoints") == []
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_save_refuses_nonfinite_weights_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tiny_config("train.steps=1"), tmp_path)
    good = trainer.train()["checkpoint"]
    trainer.model.params["norm"].data[3] = np.inf
    trainer.state.step += 1
    with pytest.raises(TrainingError, match=r"not writing a checkpoint at step 2: norm has non-finite values"):
        trainer.save()
    assert list_checkpoints(tmp_path / "checkpoints") == [good]
    assert np.isfinite(load_checkpoint(good)["params"]["norm"]).all()


# ----------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_mid_step_saves_the_current_step_and_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_config()
    one_go = make_trainer(cfg, tmp_path / "one_go")
    one_go.train()

    interrupted = make_trainer(cfg, tmp_path / "interrupted")

    def interrupt_third_forward(n, run):
        if n == 3:
            raise KeyboardInterrupt
        return run()

    count_training_forwards(monkeypatch, interrupted, interrupt_third_forward)
    result = interrupted.train()
    assert result["interrupted"] is True
    assert result["step"] == 2 and result["checkpoint"].name == "step-000002"
    state = load_checkpoint(result["checkpoint"])["state"]
    assert (state["step"], state["data_step"]) == (2, 2)  # the interrupted step's batch is replayed
    summary = train_records(interrupted.out_dir, "summary")[-1]
    assert summary["interrupted"] is True
    assert all(p.grad is None for p in interrupted.model.params.values())

    resumed = make_trainer(cfg, tmp_path / "interrupted", resume=tmp_path / "interrupted")
    resumed.train()
    assert_params_identical(params_of(one_go), params_of(resumed))


def test_ctrl_c_during_the_update_finishes_the_update_first(tmp_path):
    """A SIGINT that lands inside the optimizer update is held until the step is complete."""
    cfg = tiny_config()
    reference = make_trainer(cfg, tmp_path / "ref")
    reference.train(until=1)

    trainer = make_trainer(cfg, tmp_path / "run")
    _, first_opt, _ = trainer.optimizers[0]
    original_step = first_opt.step

    def step_with_signal():
        signal.raise_signal(signal.SIGINT)  # arrives before any parameter of this step moved
        original_step()

    first_opt.step = step_with_signal
    result = trainer.train()
    assert result["interrupted"] is True and result["step"] == 1
    assert_params_identical(params_of(reference), params_of(trainer))
    saved = load_checkpoint(result["checkpoint"])["params"]
    assert_params_identical(params_of(reference), saved)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------------------- CLI

def _write_bin(path, n=5000):
    token_stream(n, 3).tofile(path)
    return path


def _cli_args(tmp_path, *extra):
    args = ["--config", "tiny", "--data", str(_write_bin(tmp_path / "tokens.bin")), "--out", str(tmp_path / "run"),
            "--quiet"]
    for item in TINY + ["train.tensorboard=true", "train.sample_tokens=8"]:
        args += ["--set", item]
    return args + list(extra)


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


def test_cli_unknown_key_is_one_line_naming_the_key_and_a_suggestion(capsys):
    assert main(["--set", "model.dimm=3"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error:") and "model.dimm" in line and "did you mean 'model.dim'" in line


def test_cli_inconsistent_shapes_are_one_line(capsys):
    assert main(["--set", "model.dim=384"]) == 2
    line = _one_error_line(capsys)
    assert "--set model.dim=384" in line and "model.dim = 384 is not a multiple of model.group_size = 256" in line
    assert main(["--set", "model.n_heads=3"]) == 2
    assert "model.dim = 256 is not divisible by model.n_heads = 3" in _one_error_line(capsys)


def test_cli_resume_of_a_missing_or_broken_checkpoint_is_a_clean_error(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["--resume", str(missing)]) == 2
    line = _one_error_line(capsys)
    assert str(missing) in line and "does not exist" in line

    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert main(["--resume", str(empty)]) == 2
    assert "no complete checkpoint" in _one_error_line(capsys)


def test_cli_trains_resumes_and_plots(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_cli_args(tmp_path, "--steps", "2")) == 0
    out = capsys.readouterr().out
    assert "checkpoint:" in out and "loss plot:" in out and "--- sample" not in out  # a .bin has no tokenizer
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000002"]
    # --resume with a larger --steps continues the same run directory from its config
    assert main(["--resume", str(run), "--steps", "3", "--quiet"]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000002", "step-000003"]
    assert [r["step"] for r in train_records(run)] == [1, 2, 3]
    (run / "loss.png").unlink()
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in _one_error_line(capsys)


def test_cli_stops_with_exit_code_3_on_nonfinite_steps(tmp_path, monkeypatch, capsys):
    original = trainer_module.compute_loss

    def nan_forward(model, batch, *args, **kwargs):
        res = original(model, batch, *args, **kwargs)
        if "collider_sparsity" in kwargs:
            res.loss = res.loss * float("nan")
        return res

    monkeypatch.setattr(trainer_module, "compute_loss", nan_forward)
    assert main(_cli_args(tmp_path, "--set", "train.max_nonfinite_steps=2")) == 3
    line = _one_error_line(capsys)
    assert line.startswith("error: stopping at step 0: 2 steps in a row had a non-finite loss")
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_cli_ctrl_c_exits_130_after_saving(tmp_path, monkeypatch, capsys):
    original = trainer_module.compute_loss
    calls = {"n": 0}

    def interrupting_forward(model, batch, *args, **kwargs):
        if "collider_sparsity" in kwargs:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_loss", interrupting_forward)
    assert main(_cli_args(tmp_path)) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "interrupted at step 1; resume with --resume" in captured.out
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000001"]


def test_cli_help_runs(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--resume" in capsys.readouterr().out


def test_trainer_rejects_data_shorter_than_one_window(tmp_path):
    data = synthetic_data()
    data.val_tokens = data.val_tokens[:20]
    with pytest.raises(ValueError, match=r"the val split holds 20 tokens, fewer than one window of model.seq_len \+ 1 = 33"):
        Trainer(tiny_config(), out_dir=tmp_path, progress=False, data=data)
    data = synthetic_data()
    data.vocab_size = 512
    with pytest.raises(ConfigError, match="model.vocab_size = 300 is smaller than the data's vocabulary"):
        Trainer(tiny_config(), out_dir=tmp_path, progress=False, data=data)


# ------------------------------------------------------------------- numpy vs numba

@pytest.mark.slow
def test_numpy_and_numba_loss_curves_agree(tmp_path):
    """20 steps, same seed: per-step training CE within 1e-3 relative.

    The learning rates are a tenth of the preset's: at the full rates Muon's orthogonalisation
    and the ternary rounding make this tiny run chaotic (a 1e-6 relative nudge of the numpy
    run's own initial weights moves its 20-step curve by 1-4%), so the comparison would measure
    that sensitivity rather than the backend. The loss still falls clearly here.
    """
    curves = {}
    for backend in ("numpy", "numba"):
        cfg = tiny_config(f"train.backend={backend}", "train.steps=20", "optim.warmup_steps=20",
                          "optim.muon_lr=0.002", "optim.embedding_lr=0.001", "optim.adamw_lr=0.0003")
        trainer = make_trainer(cfg, tmp_path / backend)
        trainer.train()
        curves[backend] = np.array([r["ce"] for r in train_records(trainer.out_dir)])
    assert curves["numpy"].shape == (20,)
    assert curves["numpy"][-1] < curves["numpy"][0] - 0.1
    np.testing.assert_allclose(curves["numba"], curves["numpy"], rtol=1e-3)


# ---------------------------------------------------------------------------- presets

SMALL_PRESETS = ["tiny"] + [p for p in available_presets() if p.startswith("e3_")]


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_small_presets_build_and_take_a_training_step(tmp_path, preset):
    # Full model shape; only the batch is shrunk (seq_len does not change any parameter).
    cfg = load_config(preset, ["model.seq_len=16", "train.batch_size=1", "train.backend=numpy",
                               "train.tensorboard=false"])
    assert len(SMALL_PRESETS) >= 6
    data = SimpleNamespace(train_tokens=token_stream(400, 4), val_tokens=token_stream(100, 5),
                           vocab_size=VOCAB, tokenizer=None, tokenizer_path=None)
    trainer = Trainer(cfg, out_dir=tmp_path, progress=False, data=data)
    counts = count_parameters(cfg)
    assert trainer.model.num_parameters() == counts["total"]
    before = params_of(trainer)
    loader = BatchLoader(data.train_tokens, 1, 16, 0)
    record = trainer.train_step(loader)
    assert record["finite"] and math.isfinite(record["loss"]) and trainer.state.step == 1
    if cfg.model.mtp_n_tokens:
        assert record["mtp"] > 0
    after = params_of(trainer)
    assert not np.array_equal(before["layers.0.attn.wq"], after["layers.0.attn.wq"])
    assert not np.array_equal(before["tok_embeddings"], after["tok_embeddings"])


@pytest.mark.parametrize("preset, low, high", [
    ("nano_125m", 100e6, 150e6), ("small_560m", 450e6, 650e6), ("medium_3b", 2.5e9, 3.5e9)])
def test_large_presets_validate_and_count_without_allocating(preset, low, high):
    cfg = load_config(preset)
    counts = count_parameters(cfg)
    assert low <= counts["total"] <= high
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    if preset == "small_560m":
        assert cfg.model.deltanet_layer_ids and counts["deltanet_qkv"] > 0
    if preset == "medium_3b":
        assert cfg.model.n_experts == 8 and cfg.model.moe_top_k == 2 and cfg.model.n_streams == 4
        assert cfg.optim.muon_8bit and counts["moe_experts"] > counts["embedding"]


NARROW = ["model.vocab_size=300", "model.dim=128", "model.group_size=64", "model.seq_len=16",
          "train.batch_size=1", "train.grad_accum=2", "train.backend=numpy", "train.tensorboard=false"]
NARROW_SHAPES = {
    "nano_125m": ["model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=256"],
    "small_560m": ["model.n_layers=5", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=256"],
    "medium_3b": ["model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=128",
                  "model.moe_hidden=64"],
}


@pytest.mark.parametrize("preset", sorted(NARROW_SHAPES))
def test_large_preset_structures_train_at_narrow_width(tmp_path, preset):
    """Every structural choice of the large presets (DeltaNet share, GQA, MoE with a shared expert,
    4 dynamic mHC streams, 8-bit Muon, grad accumulation) at a width that trains in milliseconds;
    the model's real parameter count matches count_parameters."""
    cfg = load_config(preset, NARROW + NARROW_SHAPES[preset])
    data = SimpleNamespace(train_tokens=token_stream(400, 4), val_tokens=token_stream(100, 5),
                           vocab_size=VOCAB, tokenizer=None, tokenizer_path=None)
    trainer = Trainer(cfg, out_dir=tmp_path, progress=False, data=data)
    assert trainer.model.num_parameters() == count_parameters(cfg)["total"]
    if preset == "small_560m":
        assert cfg.model.deltanet_layer_ids == (2,) and count_parameters(cfg)["deltanet_qkv"] > 0
    record = trainer.train_step(BatchLoader(data.train_tokens, 1, 16, 0))
    assert record["finite"] and trainer.state.step == 1 and trainer.state.data_step == 2
    if preset == "medium_3b":
        assert len(record["expert_load"]) == 2 and record["moe_aux"] > 0 and record["composite_gain"] > 0
        opt = dict(trainer.optimizers[0][1].state_dict())
        assert any(k.endswith(".qbuf") for k in opt)


# ------------------------------------------------------------------------------- logs

def test_metrics_tensorboard_and_plot(tmp_path):
    pytest.importorskip("tensorboardX")
    cfg = tiny_config("train.tensorboard=true", "train.steps=2", "train.eval_every=1", "model.n_streams=2",
                      "model.n_experts=2", "model.moe_top_k=1", "model.moe_hidden=64", "model.mtp_n_tokens=1")
    result = make_trainer(cfg, tmp_path).train()
    train = train_records(tmp_path)
    assert [r["step"] for r in train] == [1, 2]
    for field in ("loss", "ce", "mtp", "moe_aux", "grad_norm", "lr", "tokens", "tokens_per_sec", "data_wait_frac",
                  "composite_gain", "expert_load", "time_forward", "time_backward", "time_optimizer", "time_step"):
        assert field in train[0], field
    assert train[0]["mtp"] > 0 and train[0]["loss"] > train[0]["ce"]
    assert len(train[0]["expert_load"]) == 2 and sum(train[0]["expert_load"][0]) == 2 * 32
    assert 0 <= train[0]["data_wait_frac"] < 1 and train[1]["tokens"] == 2 * 2 * 32
    assert [r["step"] for r in train_records(tmp_path, "val")] == [0, 1, 2]
    tags = set(tensorboard_scalars(result["tensorboard"]))
    assert set(TB_TAGS.values()) <= tags
    assert any(t.startswith("moe/expert_load/") for t in tags)
    assert result["plot"].read_bytes()[:4] == b"\x89PNG"


def test_resumed_run_appends_metrics_after_a_torn_last_line(tmp_path):
    trainer = make_trainer(tiny_config("train.steps=2"), tmp_path)
    trainer.train(until=1)
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "st')  # a crash mid-write
    make_trainer(tiny_config("train.steps=2"), tmp_path, resume=tmp_path).train()
    with pytest.raises(ValueError, match=r"metrics.jsonl: line \d+ is not valid JSON"):
        read_metrics(tmp_path)
    steps = [r["step"] for r in read_metrics(tmp_path, skip_bad_lines=True) if r["kind"] == "train"]
    assert steps == [1, 2]
    assert main(["plot", str(tmp_path)]) == 0


# ------------------------------------------------------------------------------ sampler

def test_sampler_greedy_top_k_and_stop():
    rng = np.random.default_rng(0)
    logits = np.array([0.1, 2.0, -1.0, 1.9])
    assert sample_next(logits, 0, 0, rng) == 1
    assert {sample_next(logits, 1.0, 1, rng) for _ in range(20)} == {1}
    assert {sample_next(logits, 5.0, 2, rng) for _ in range(200)} == {1, 3}
    with pytest.raises(ValueError, match="NaN or Inf"):
        sample_next(np.array([0.0, np.nan]), 1.0, 0, rng)

    model = Model(tiny_config().model, backends.get_backend("numpy"), seed=0)
    greedy = generate(model, [5, 12], 6, temperature=0)
    assert len(greedy) == 6 and greedy == generate(model, [5, 12], 6, temperature=0)
    assert generate(model, [5, 12], 6, temperature=0, stop_id=greedy[2]) == greedy[:2]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [VOCAB], 1)
