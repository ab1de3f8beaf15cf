"""Lion's own learning rates (issue 16, item 3): with ``optim.scalar_optimizer = "lion"`` the
embedding, head and scalar groups run at ``optim.lion_lr_scale`` (0.3) times the AdamW rates;
AdamW and the Muon group are unchanged."""
from __future__ import annotations

import pytest

import backends
from nanochat.config import ConfigError, load_config
from nanochat.model.gpt import Model
from nanochat.train.trainer import build_optimizers, lr_multiplier
from reference import optim as ref_optim

pytestmark = pytest.mark.trainer

SHAPE = ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2", "model.group_size=64",
         "model.ffn_hidden=128", "model.seq_len=16", "model.vocab_size=300", "model.tie_embeddings=false",
         "train.backend=numpy"]


def _groups(*extra):
    cfg = load_config("tiny", SHAPE + list(extra))
    model = Model(cfg.model, backends.get_backend("numpy"), seed=0)
    return cfg, {label: (opt, base) for label, opt, base in build_optimizers(model, cfg)}


def test_lion_runs_at_a_fraction_of_the_adamw_rates():
    cfg, adamw = _groups()
    _, lion = _groups("optim.scalar_optimizer=lion")
    o = cfg.optim
    assert o.lion_lr_scale == 0.3
    expected = {"embedding": o.embedding_lr, "head": o.head_lr, "scalars": o.adamw_lr}
    for label, rate in expected.items():
        assert isinstance(adamw[label][0], ref_optim.AdamW) and adamw[label][1] == rate
        assert isinstance(lion[label][0], ref_optim.Lion) and lion[label][1] == pytest.approx(0.3 * rate)
    assert lion["hidden"][1] == adamw["hidden"][1] == o.muon_lr
    # the schedule scales the Lion base rate like any other
    mult = lr_multiplier(5, cfg)
    assert lion["scalars"][1] * mult == pytest.approx(0.3 * o.adamw_lr * mult)


def test_lion_scale_is_configurable_and_bounded():
    _, lion = _groups("optim.scalar_optimizer=lion", "optim.lion_lr_scale=0.1")
    assert lion["embedding"][1] == pytest.approx(0.1 * 0.01)
    with pytest.raises(ConfigError, match="optim.lion_lr_scale"):
        load_config("tiny", ["optim.lion_lr_scale=0"])
    with pytest.raises(ConfigError, match="optim.lion_lr_scale"):
        load_config("tiny", ["optim.lion_lr_scale=2"])
