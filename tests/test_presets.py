"""The production presets (issue 16): the features the replaced system specified are on, each
preset's comment says what E3 measured for them, and one training step of each preset with all
of its features runs through the command line at a reduced width (``--set`` overrides)."""
from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

from nanochat.config import load_config
from nanochat.train.metrics import read_metrics
from nanochat.cli.train import main

pytestmark = pytest.mark.trainer

PRODUCTION = ("nano_125m", "small_560m", "medium_3b")


def _preset_text(name):
    return resources.files("nanochat").joinpath("presets", f"{name}.toml").read_text(encoding="utf-8")


@pytest.mark.parametrize("preset", PRODUCTION)
def test_production_presets_turn_on_the_specified_features(preset):
    cfg = load_config(preset)
    m, o, t = cfg.model, cfg.optim, cfg.train
    # MTP: 4 future tokens, weight 0.2; Collider: 35% filtered; async loader: 4 workers, 8 batches queued.
    assert (m.mtp_n_tokens, m.mtp_weight) == (4, 0.2)
    assert t.collider_sparsity == 0.35
    assert (t.async_loader, t.loader_workers, t.loader_prefetch) == (True, 4, 8)
    if preset == "nano_125m":
        assert not m.deltanet_layer_ids and m.n_experts == 0 and m.n_streams == 1 and not o.muon_8bit
    if preset == "small_560m":
        assert m.deltanet_ratio == 0.2 and len(m.deltanet_layer_ids) == 5
        assert m.n_experts == 0 and m.n_streams == 1
    if preset == "medium_3b":
        assert o.muon_8bit and (m.n_experts, m.moe_top_k) == (8, 2) and m.n_streams == 4
        assert not m.deltanet_layer_ids


@pytest.mark.parametrize("preset", PRODUCTION)
def test_production_preset_comments_say_what_e3_measured(preset):
    text = _preset_text(preset)
    header = text.split("[model]")[0]
    assert header.startswith(f"# {preset}:")
    for needle in ("benchmarks/e3/REPORT.md", "MTP", "Collider", "loader", "threshold 0.3",
                   "mtp_n_tokens=0 --set train.collider_sparsity=0"):
        assert needle in header, needle


# Shrinks width and depth only; every feature switch of the preset stays as shipped.
REDUCED = ["model.vocab_size=300", "model.dim=128", "model.group_size=64", "model.seq_len=16",
           "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=256",
           "train.batch_size=2", "train.grad_accum=1", "train.backend=numpy", "train.tensorboard=false",
           "train.eval_batches=1", "train.sample_tokens=0"]
REDUCED_SHAPES = {
    "nano_125m": ["model.n_layers=2"],
    "small_560m": ["model.n_layers=5"],
    "medium_3b": ["model.n_layers=2", "model.n_heads=4", "model.ffn_hidden=128", "model.moe_hidden=64"],
}


@pytest.mark.parametrize("preset", PRODUCTION)
def test_one_step_of_each_production_preset_with_all_features(tmp_path, preset, capsys):
    tokens = tmp_path / "tokens.bin"
    rng = np.random.default_rng(0)
    rng.integers(0, 300, 6000).astype(np.uint16).tofile(tokens)
    run = tmp_path / "run"
    args = ["--config", preset, "--data", str(tokens), "--out", str(run), "--steps", "1", "--quiet"]
    for item in REDUCED + REDUCED_SHAPES[preset]:
        args += ["--set", item]
    assert main(args) == 0, capsys.readouterr().err
    cfg = load_config(preset, REDUCED + REDUCED_SHAPES[preset])
    assert cfg.model.mtp_n_tokens == 4 and cfg.train.collider_sparsity == 0.35 and cfg.train.loader_workers == 4
    (train,) = [r for r in read_metrics(run) if r["kind"] == "train"]
    # (under Collider the total is the kept tokens' loss over all tokens plus 0.2 x MTP, so it may be below ce)
    assert np.isfinite(train["loss"]) and np.isfinite(train["ce"]) and train["mtp"] > 0
    # 35% of a 16-token sequence: floor(5.6) = 5 tokens filtered, 11 of 16 kept.
    assert train["kept_fraction"] == pytest.approx(11 / 16)
    if preset == "small_560m":
        assert cfg.model.deltanet_layer_ids == (2,)
    if preset == "medium_3b":
        assert len(train["expert_load"]) == 2 and train["composite_gain"] > 0


def test_start_up_estimates_step_time_and_warns_far_beyond_a_cpu():
    """Issue 16 item 8: the trainer says how long a step will take (calibrated on tiny's measured
    2,412 tokens/s) and warns when a preset is far beyond a CPU."""
    from nanochat.train.budget import FAR_BEYOND_SECONDS, describe_time, estimate_step_seconds

    tiny = load_config("tiny")
    assert estimate_step_seconds(tiny) == pytest.approx(tiny.train.batch_size * tiny.model.seq_len / 2412.0)
    assert "warning" not in describe_time(tiny)
    big = load_config("nano_125m")
    assert estimate_step_seconds(big) > FAR_BEYOND_SECONDS
    assert "warning" in describe_time(big) and "far beyond a CPU" in describe_time(big)
