"""Whole models on the cupy backend's kernels, run on the CPU emulator (docs/cuda_emulator.md):
the engine's logits and KV-cache decoding agree with the training forward, and a few training
steps follow the numpy backend's loss curve. The Triangle checks each op alone; these check
the ops as the model, trainer and engine call them (shapes, dtypes, tensors vs arrays)."""
from __future__ import annotations

import numpy as np
import pytest

import backends
from backends.cupy_backend import emulator as cuda_emulator
from nanochat.infer.engine import Engine
from nanochat.model.gpt import Model
from reference.autograd import no_grad
from test_engine import CONFIGS, loaded_from_model, rel, small_cfg, token_ids
from test_trainer import make_trainer, tiny_config, train_records

pytestmark = cuda_emulator.skip_without_compiler()

ENGINE_CONFIGS = ["gqa_subln", "mhc4_dynamic", "hybrid"]


@pytest.fixture(scope="module")
def emulated():
    return cuda_emulator.emulated_cupy_backend()


@pytest.mark.parametrize("config_name", ENGINE_CONFIGS)
def test_engine_on_emulated_cupy_matches_training_forward_and_decodes(config_name, emulated):
    cfg = small_cfg(CONFIGS[config_name])
    model = Model(cfg.model, emulated, seed=7)
    engine = Engine(loaded_from_model(model, cfg), emulated)
    idx = token_ids((2, 20), seed=1)  # 40 tokens: the tensor-core GEMM path in prefill
    with no_grad():
        want = emulated.to_numpy(model.logits(idx).data)
    assert rel(engine.logits(idx), want) < 1e-4
    ids = token_ids(8, seed=2)
    full = engine.logits(ids[None])[0]
    engine.reset()
    stepped = np.stack([engine.step(int(t)) for t in ids])  # packed GEMV per token
    assert rel(stepped, full) < 1e-5


@pytest.fixture
def cupy_is_emulated(monkeypatch, emulated):
    """Make ``train.backend=cupy`` resolve to the emulated backend for one test."""
    monkeypatch.setitem(backends._REGISTRY, "cupy", (lambda: emulated, None))
    monkeypatch.setitem(backends._CACHE, "cupy", emulated)
    return emulated


# Every feature whose ops the cupy backend overrides: mHC with per-token coefficients, MoE,
# a DeltaNet block, MTP heads, Collider filtering, 8-bit Muon momentum and GaLore.
EVERYTHING = ["model.n_streams=2", "model.mhc_mode=dynamic", "model.n_layers=3", "model.deltanet_layers=[1]",
              "model.n_experts=4", "model.moe_top_k=2", "model.moe_layers=[2]", "model.mtp_n_tokens=1",
              "train.collider_sparsity=0.25", "optim.muon_8bit=true", "optim.galore=true", "optim.galore_rank=16",
              "optim.galore_min_dim=64"]


@pytest.mark.parametrize("features, steps", [([], 8), (EVERYTHING, 4)], ids=["plain", "everything"])
def test_training_on_emulated_cupy_follows_numpy(tmp_path, cupy_is_emulated, features, steps):
    """Same seed, a tenth of the preset learning rates (see the numpy-vs-numba test in
    test_trainer.py for why): per-step CE within 1e-3 relative."""
    curves = {}
    for backend in ("numpy", "cupy"):
        cfg = tiny_config(f"train.backend={backend}", f"train.steps={steps}", f"optim.warmup_steps={steps}",
                          "optim.muon_lr=0.002", "optim.embedding_lr=0.001", "optim.adamw_lr=0.0003", *features)
        trainer = make_trainer(cfg, tmp_path / backend)
        assert trainer.be.name == ("cupy-emulated" if backend == "cupy" else "numpy")
        trainer.train()
        curves[backend] = np.array([r["ce"] for r in train_records(trainer.out_dir)])
    assert curves["numpy"].shape == (steps,)
    np.testing.assert_allclose(curves["cupy"], curves["numpy"], rtol=1e-3)
