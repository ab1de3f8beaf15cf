"""Resuming with a different ``--steps`` (issue 16, item 5; rule in nanochat/train/schedule.py):
before the learning-rate decay the schedule stretches to the new length; once the decay has
begun, the run keeps its schedule and holds the final rate past its end, never warming up again.
The screen says which, and that the resumed run writes into the old run directory."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from nanochat.config import load_config
from nanochat.io.checkpoint import load_checkpoint
from nanochat.train.metrics import read_metrics
from nanochat.train.schedule import decay_start, resumed_schedule, trained_schedule_steps
from nanochat.cli.train import main
from nanochat.train.trainer import lr_multiplier

pytestmark = pytest.mark.trainer

SHAPE = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.group_size=64",
         "model.ffn_hidden=128", "model.seq_len=16", "model.vocab_size=300",
         "train.batch_size=2", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1",
         "train.backend=numpy", "train.sample_tokens=0", "train.tensorboard=false", "train.keep_last_k=5",
         "optim.warmup_steps=2", "optim.decay_frac=0.5", "optim.min_lr_ratio=0.1"]
MUON_LR = 0.02  # the tiny preset's


def _args(tmp_path, steps, *extra):
    tokens = tmp_path / "tokens.bin"
    if not tokens.exists():
        np.random.default_rng(0).integers(0, 300, 4000).astype(np.uint16).tofile(tokens)
    args = ["--config", "tiny", "--data", str(tokens), "--out", str(tmp_path / "run"), "--quiet",
            "--steps", str(steps)]
    for item in SHAPE:
        args += ["--set", item]
    return args + list(extra)


def _lrs(run):
    """Learning rate per logged step (the last record per step: a resumed run re-logs none here)."""
    return {r["step"]: r["lr"] for r in read_metrics(run) if r["kind"] == "train"}


def test_extending_a_finished_run_holds_the_final_rate_and_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(tmp_path, 6)) == 0
    capsys.readouterr()
    assert main(["--resume", str(run), "--steps", "10", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"resume: writing into the same run directory {run}" in out
    assert "extending a run whose learning-rate decay had begun (at step 3 of its 6-step schedule)" in out
    assert "stays at its final value (0.1 x each base rate) for steps 7-10; it does not warm up again" in out
    lrs = _lrs(run)
    assert sorted(lrs) == list(range(1, 11))
    final = MUON_LR * 0.1
    assert lrs[6] == pytest.approx(final)
    for step in range(7, 11):  # never above the finished run's last rate (it was 0.002 -> 0.013 before)
        assert lrs[step] == pytest.approx(final)
    assert all(lrs[s + 1] <= lrs[s] + 1e-12 for s in range(2, 10))
    # the checkpoint records the schedule, so a second extension keeps it too
    assert load_checkpoint(run)["state"]["schedule_steps"] == 6
    assert main(["--resume", str(run), "--steps", "12", "--quiet"]) == 0
    assert "for steps 11-12" in capsys.readouterr().out
    assert _lrs(run)[12] == pytest.approx(final)


def test_resuming_before_the_decay_stretches_the_schedule(tmp_path, capsys):
    run = tmp_path / "run"
    # 10 steps (decay from step 5) with a checkpoint at step 3; resume that one as a 20-step run.
    assert main(_args(tmp_path, 10, "--set", "train.checkpoint_every=3")) == 0
    one_go = _lrs(run)
    capsys.readouterr()
    other = tmp_path / "longer"
    assert main(["--resume", str(run / "checkpoints" / "step-000003"), "--steps", "20", "--out", str(other),
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"resume: writing into the given run directory {other}" in out
    assert "train.steps changed from 10 to 20 at step 3, before the learning-rate decay (due at step 5)" in out
    assert "now spans 20 steps and decays from step 10" in out
    lrs = _lrs(other)
    assert lrs[4] == pytest.approx(one_go[4]) == pytest.approx(MUON_LR)  # stable phase, no jump
    assert all(lrs[s] == pytest.approx(MUON_LR) for s in range(4, 11))     # still stable up to step 10
    assert lrs[20] == pytest.approx(MUON_LR * 0.1)
    assert load_checkpoint(other)["state"]["schedule_steps"] == 20


def test_resuming_with_the_same_steps_prints_no_schedule_note(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(tmp_path, 4, "--set", "train.checkpoint_every=2")) == 0
    capsys.readouterr()
    assert main(["--resume", str(run / "checkpoints" / "step-000002"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "resume: writing into the same run directory" in out and "schedule:" not in out


def test_schedule_rule_and_multiplier():
    optim = load_config("tiny", ["optim.decay_frac=0.2"]).optim
    assert decay_start(100, 0.2) == 80
    assert resumed_schedule(50, 100, 100, optim) == (100, None)
    assert resumed_schedule(50, 100, 200, optim)[0] == 200      # before the decay: stretch
    assert resumed_schedule(80, 100, 200, optim)[0] == 100      # decay begun: keep
    assert resumed_schedule(100, 100, 200, optim)[0] == 100     # finished: keep, hold the floor
    assert resumed_schedule(90, 100, 95, optim)[0] == 100       # shorter, mid-decay: stop on the same curve
    assert resumed_schedule(120, 100, 110, optim) == (100, None)  # nothing left to train
    cfg = load_config("tiny", ["train.steps=200", "optim.decay_frac=0.2", "optim.min_lr_ratio=0.1"])
    assert lr_multiplier(150, cfg, 100) == pytest.approx(0.1)
    assert lr_multiplier(150, cfg) == 1.0
    # checkpoints written before schedule_steps existed: the config's train.steps
    assert trained_schedule_steps({}, "[train]\nsteps = 30\n", 7) == 30
    assert trained_schedule_steps({"schedule_steps": 12}, "[train]\nsteps = 30\n", 7) == 12
    assert trained_schedule_steps({}, "not toml [", 7) == 7
    assert trained_schedule_steps(SimpleNamespace(get=lambda k: None), None, 7) == 7
