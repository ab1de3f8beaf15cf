"""What a run leaves and tells (issue 16, items 4, 6 and 9): Collider's kept fraction in
metrics.jsonl and TensorBoard, one loss-plot title for training and ``train plot``, and a
TensorBoard line that works (or says how to get the viewer)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nanochat.config import load_config
from nanochat.train import metrics
from nanochat.train import trainer as trainer_module
from nanochat.train.metrics import read_metrics, run_title, tensorboard_hint
from nanochat.cli import train as train_cli
from nanochat.cli.train import main
from nanochat.train.trainer import Trainer
from run_helpers import tensorboard_scalars

pytestmark = pytest.mark.trainer

SHAPE = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.group_size=64",
         "model.ffn_hidden=128", "model.seq_len=32", "model.vocab_size=300",
         "train.batch_size=2", "train.steps=2", "train.eval_every=0", "train.eval_batches=1", "train.log_every=1",
         "train.backend=numpy", "train.sample_tokens=0"]


def _data():
    rng = np.random.default_rng(0)
    return SimpleNamespace(train_tokens=rng.integers(0, 300, 3000).astype(np.uint16),
                           val_tokens=rng.integers(0, 300, 300).astype(np.uint16),
                           vocab_size=300, tokenizer=None, tokenizer_path=None)




def test_collider_kept_fraction_is_logged_to_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboardX")
    cfg = load_config("tiny", SHAPE + ["train.collider_sparsity=0.25", "train.tensorboard=true"])
    result = Trainer(cfg, out_dir=tmp_path, progress=False, data=_data()).train()
    train = [r for r in read_metrics(tmp_path) if r["kind"] == "train"]
    # floor(0.25 * 32) = 8 of every 32 tokens filtered
    assert [r["kept_fraction"] for r in train] == [0.75, 0.75]
    assert metrics.TB_TAGS["kept_fraction"] == "collider/kept_fraction"
    assert tensorboard_scalars(result["tensorboard"])["collider/kept_fraction"] == [0.75, 0.75]


def test_kept_fraction_is_one_without_collider(tmp_path):
    cfg = load_config("tiny", SHAPE + ["train.tensorboard=false"])
    Trainer(cfg, out_dir=tmp_path, progress=False, data=_data()).train()
    assert {r["kept_fraction"] for r in read_metrics(tmp_path) if r["kind"] == "train"} == {1.0}


def test_training_and_train_plot_draw_the_same_title(tmp_path, monkeypatch):
    titles = []
    real = trainer_module.plot_losses

    def spy(metrics_path, png_path, title=None):
        titles.append(title)
        return real(metrics_path, png_path, title=title)

    monkeypatch.setattr(trainer_module, "plot_losses", spy)
    monkeypatch.setattr(train_cli, "plot_losses", spy)
    run = tmp_path / "my-run"
    cfg = load_config("tiny", SHAPE + ["train.tensorboard=false"])
    result = Trainer(cfg, out_dir=run, progress=False, data=_data()).train()
    assert result["plot"].is_file()
    assert main(["plot", str(run)]) == 0
    assert titles == ["my-run: 64d x 2 layers, numpy backend"] * 2
    assert run_title(tmp_path) == tmp_path.name  # no checkpoint: the directory name alone


def test_tensorboard_hint_names_the_viewer_or_how_to_install_it(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/tensorboard")
    assert tensorboard_hint("RUN/tb") == "tensorboard --logdir RUN/tb"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    bindir = tmp_path / "venv" / "bin"
    bindir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    hint = tensorboard_hint("RUN/tb")
    assert hint.startswith("tensorboard --logdir RUN/tb") and "pip install tensorboard" in hint
    (bindir / "tensorboard").write_text("#!/bin/sh\n")
    assert tensorboard_hint("RUN/tb") == f"{bindir / 'tensorboard'} --logdir RUN/tb"


def test_the_tensorboard_extra_installs_the_viewer():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    extra = metrics._toml_loads(text)["project"]["optional-dependencies"]["tensorboard"]
    names = {req.split(">")[0].split("=")[0].strip() for req in extra}
    assert {"tensorboardX", "tensorboard"} <= names
