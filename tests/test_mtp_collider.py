"""Multi-token prediction and Collider token filtering, checked against the SPEC (section 5).

MTP: head i predicts token t+2+i with weight 0.5^i, the weighted sum times mtp_weight joins
the main loss, heads share the trunk and the tied unembedding, main CE and MTP are reported
apart, and gradient accumulation splits both correctly.

Collider: the lowest-loss fraction of each sequence is filtered, filtered tokens have zero
loss weight, every BitLinear's weight gradient equals a reference computed by hand on the
gathered kept rows, and the activation gradient is zero at filtered rows of every linear
input. Each ternary_linear call is wrapped in identity probes that record the gradient
arriving at its output (dY) and the one it sends to its input (dX).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import backends
from nanochat.config import load_config
from nanochat.model.gpt import Model
from nanochat.train.losses import collider_keep, compute_loss
from reference import ternary as ref_ternary
from reference.autograd import Function, Tensor, no_grad

pytestmark = pytest.mark.trainer

SMALL = [
    "model.dim=64", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_hidden=128",
    "model.group_size=64", "model.n_layers=2", "model.seq_len=16", "model.vocab_size=300",
]
# Every block kind at once: one DeltaNet layer, MoE FFNs with a shared expert, mHC with 2 streams.
EVERY_KIND = SMALL + [
    "model.deltanet_ratio=0.5", "model.n_experts=4", "model.moe_top_k=2", "model.moe_shared_expert=true",
    "model.n_streams=2",
]
CPU_BACKENDS = [name for name in ("numpy", "numba") if name in backends.available()]


def model_cfg(overrides=(), mtp=0):
    return load_config("tiny", list(SMALL) + list(overrides) + [f"model.mtp_n_tokens={mtp}"]).model


def batch(b=3, t=16, vocab=300, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, t + 1))


def grads(model):
    return {name: None if p.grad is None else p.grad.copy() for name, p in model.params.items()}


def bitlinear_names(model):
    """Names of the ternary (BitLinear) weights, from the parameter table."""
    return {spec.name for spec in model.table if spec.ternary}


# ----------------------------------------------------------------------- probing ternary_linear


class GradProbe(Function):
    """Identity whose backward stores the gradient passing through it in ``record[slot]``."""

    @staticmethod
    def forward(ctx, x, record=None, slot=None):
        ctx.record, ctx.slot = record, slot
        return x

    @staticmethod
    def backward(ctx, g):
        ctx.record[ctx.slot] = g.copy()
        return g


class ProbingBackend:
    """A backend whose ternary_linear records (x, w, keep, dX, dY) per call; everything else passes through."""

    def __init__(self, inner):
        self._inner = inner
        self.calls = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def ternary_linear(self, x, w, group_size, keep=None):
        rec = {"x": np.array(x.data, copy=True), "w": w, "keep": keep, "group_size": group_size}
        self.calls.append(rec)
        y = self._inner.ternary_linear(GradProbe.apply(x, record=rec, slot="dx"), w, group_size, keep=keep)
        return GradProbe.apply(y, record=rec, slot="dy")


def reference_weight_grad(x_rows, w, dy_rows, group_size):
    """dW by the reference ternary_linear backward, run by hand on the given rows in float64."""
    wt = Tensor(np.asarray(w, np.float64), requires_grad=True)
    y = ref_ternary.ternary_linear(Tensor(np.asarray(x_rows, np.float64)), wt, group_size)
    y.backward(np.asarray(dy_rows, np.float64))
    return wt.grad


def reference_input_grad(w, dy_rows, group_size):
    q, s = ref_ternary.quantize_weights(np.asarray(w, np.float64), group_size)
    return np.asarray(dy_rows, np.float64) @ ref_ternary.dequantize_weights(q, s, group_size)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# --------------------------------------------------------------------------------------- MTP


def hand_mtp_loss(model, tokens):
    """Sum over heads of 0.5^i * mean CE of head i against token t+2+i, computed step by step."""
    be, c, P = model.be, model.cfg, model.params
    b, t1 = tokens.shape
    t = t1 - 1
    with no_grad():
        h = model.forward(tokens[:, :-1]).hidden
        total = 0.0
        for i in range(c.mtp_n_tokens):
            z = h + be.ternary_linear(be.rmsnorm(h, P[f"mtp.{i}.norm"], eps=c.norm_eps), P[f"mtp.{i}.proj"], c.group_size)
            zn = be.rmsnorm(z, P["norm"], eps=c.norm_eps).data.reshape(b, t, c.dim)
            logits = zn[:, : t - 1 - i] @ P["tok_embeddings"].data.T  # tied unembedding
            target = tokens[:, 2 + i:]
            logits = logits.astype(np.float64)
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            picked = np.take_along_axis(logits, target[..., None], -1)[..., 0]
            total += 0.5 ** i * float((lse - picked).mean())
    return total


@pytest.mark.parametrize("n_heads", [1, 3])
def test_mtp_heads_predict_t_plus_2_plus_i_with_halving_weights(n_heads):
    cfg = model_cfg(mtp=n_heads)
    model = Model(cfg, backends.get_backend("numpy"), seed=3)
    tokens = batch()
    res = compute_loss(model, tokens)
    expected = hand_mtp_loss(model, tokens)
    assert res.mtp == pytest.approx(expected, rel=2e-6)
    assert float(res.loss.data) == pytest.approx(res.ce + cfg.mtp_weight * res.mtp, rel=2e-6)


def test_mtp_leaves_the_main_loss_and_trunk_unchanged_and_is_reported_apart():
    plain = Model(model_cfg(mtp=0), backends.get_backend("numpy"), seed=5)
    mtp = Model(model_cfg(mtp=2), backends.get_backend("numpy"), seed=5)
    for name, p in plain.params.items():  # MTP parameters come last: the trunk init is identical
        np.testing.assert_array_equal(p.data, mtp.params[name].data)
    tokens = batch(seed=1)
    a, b = compute_loss(plain, tokens), compute_loss(mtp, tokens)
    assert a.ce == b.ce  # main next-token loss, bit for bit
    assert a.mtp == 0.0 and b.mtp > 0.0
    assert float(a.loss.data) == pytest.approx(a.ce, rel=1e-6)
    assert float(b.loss.data) == pytest.approx(b.ce + 0.2 * b.mtp, rel=1e-6)


def test_mtp_heads_share_trunk_and_tied_unembedding_and_stay_small():
    cfg = model_cfg(mtp=2)
    model = Model(cfg, backends.get_backend("numpy"), seed=2)
    head_params = {n: p for n, p in model.params.items() if n.startswith("mtp.")}
    assert sorted(head_params) == ["mtp.0.norm", "mtp.0.proj", "mtp.1.norm", "mtp.1.proj"]
    for i in range(2):
        size = sum(p.size for n, p in head_params.items() if n.startswith(f"mtp.{i}."))
        assert size <= cfg.dim * cfg.dim + cfg.dim < cfg.dim * cfg.vocab_size
    assert "lm_head" not in model.params
    # Same trunk init with and without heads: the gradient difference is the MTP term's, and it
    # reaches the embedding (through the tied head), the trunk and the shared final norm.
    tokens = batch(seed=4)
    compute_loss(model, tokens).loss.backward()
    full = grads(model)
    plain = Model(model_cfg(mtp=0), backends.get_backend("numpy"), seed=2)
    compute_loss(plain, tokens).loss.backward()
    for name in ("tok_embeddings", "layers.0.attn.wq", "layers.1.ffn.w_down", "norm"):
        diff = np.abs(full[name] - plain.params[name].grad).max()
        assert diff > 1e-6, f"{name}: the MTP loss does not reach this shared parameter"
    for name in head_params:
        assert np.abs(full[name]).max() > 0, f"{name} gets no gradient"


def test_mtp_with_gradient_accumulation_matches_one_large_batch(tmp_path):
    """grad_accum=2 over two halves gives the gradients and logged losses of one full batch."""
    tokens = batch(b=4, seed=7)
    data = SimpleNamespace(train_tokens=np.arange(400) % 300, val_tokens=np.arange(100) % 300, vocab_size=300,
                           tokenizer=None, tokenizer_path=None)
    from nanochat.train.trainer import Trainer

    results = {}
    for accum, bsz, batches in ((1, 4, [tokens]), (2, 2, [tokens[:2], tokens[2:]])):
        cfg = load_config("tiny", SMALL + [
            "model.mtp_n_tokens=2", f"train.grad_accum={accum}", f"train.batch_size={bsz}",
            "train.backend=numpy", "optim.grad_clip=0", "train.tensorboard=false"])
        trainer = Trainer(cfg, out_dir=tmp_path / f"a{accum}", progress=False, data=data)
        captured = {}
        for label, opt, _ in trainer.optimizers:
            opt.step = (lambda o=opt: captured.update({id(p): p.grad.copy() for p in o.params}))
        record = trainer.train_step(iter(batches))
        names = {id(p): n for n, p in trainer.model.params.items()}
        results[accum] = (record, {names[k]: v for k, v in captured.items()})
    (r1, g1), (r2, g2) = results[1], results[2]
    for key in ("loss", "ce", "mtp"):
        assert r2[key] == pytest.approx(r1[key], rel=1e-5), key
    assert r1["mtp"] > 0
    assert set(g1) == set(g2)
    for name in g1:
        assert rel_err(g2[name], g1[name]) < 1e-4, name


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mtp_runs_on_every_backend_and_agrees_with_numpy(backend):
    cfg = model_cfg(mtp=2)
    tokens = batch(seed=9)
    out = {}
    for name in ("numpy", backend):
        model = Model(cfg, backends.get_backend(name), seed=11)
        res = compute_loss(model, tokens)
        res.loss.backward()
        out[name] = (res, grads(model))
    (ra, ga), (rb, gb) = out["numpy"], out[backend]
    assert rb.mtp == pytest.approx(ra.mtp, rel=1e-4)
    assert rb.ce == pytest.approx(ra.ce, rel=1e-4)
    for name in ga:
        assert rel_err(gb[name], ga[name]) < 2e-3, name


# ----------------------------------------------------------------------------------- Collider


def test_collider_keep_drops_the_lowest_loss_fraction_of_each_sequence(rng):
    losses = rng.random((4, 20))
    weights, rows = collider_keep(losses, 0.4, np)
    assert weights.shape == (80,) and set(np.unique(weights)) == {0.0, 1.0}
    kept = weights.reshape(4, 20).astype(bool)
    for s in range(4):
        assert kept[s].sum() == 20 - 8  # floor(0.4 * 20) dropped per sequence
        assert losses[s][kept[s]].min() > losses[s][~kept[s]].max()
    np.testing.assert_array_equal(rows, np.nonzero(weights)[0])
    _, none_dropped = collider_keep(losses, 0.01, np)  # floor(0.2) = 0 tokens
    assert none_dropped.size == 80


def test_collider_sparsity_zero_is_the_dense_path_exactly():
    cfg = model_cfg(mtp=1)
    tokens = batch(seed=12)
    out = []
    for kwargs in ({}, {"collider_sparsity": 0.0}):
        model = Model(cfg, backends.get_backend("numpy"), seed=13)
        res = compute_loss(model, tokens, **kwargs)
        res.loss.backward()
        out.append((float(res.loss.data), res.ce, grads(model)))
    assert out[0][0] == out[1][0] and out[0][1] == out[1][1]
    for name, g in out[0][2].items():
        np.testing.assert_array_equal(g, out[1][2][name], err_msg=name)


def test_collider_that_drops_nothing_matches_dense():
    """A selection holding every row takes the sparse code path and still gives the dense gradients."""
    cfg = model_cfg(mtp=1)
    tokens = batch(seed=14)
    out = []
    for s in (0.0, 0.01):  # floor(0.01 * 16) = 0 tokens dropped
        model = Model(cfg, backends.get_backend("numpy"), seed=15)
        res = compute_loss(model, tokens, collider_sparsity=s)
        res.loss.backward()
        out.append((res, grads(model)))
    assert out[1][0].kept_fraction == 1.0
    assert float(out[1][0].loss.data) == pytest.approx(float(out[0][0].loss.data), rel=1e-6)
    for name, g in out[0][1].items():
        assert rel_err(out[1][1][name], g) < 1e-5, name


def test_collider_loss_weights_and_reported_loss():
    cfg = model_cfg()
    model = Model(cfg, backends.get_backend("numpy"), seed=16)
    tokens = batch(b=4, seed=17)
    res = compute_loss(model, tokens, collider_sparsity=0.25, need_token_losses=True)
    losses = res.token_losses.reshape(4, 16)
    weights, rows = collider_keep(losses, 0.25, np)
    assert res.kept_fraction == rows.size / 64 == 0.75
    assert res.ce == pytest.approx(float(losses.mean()), rel=1e-6)  # reported over all tokens
    kept_sum = float((res.token_losses * weights).sum())
    assert float(res.loss.data) == pytest.approx(kept_sum / 64, rel=1e-5)  # filtered tokens weigh 0


def check_sparse_backward(backend_name, overrides, sparsity, mtp, tol):
    """Run one sparse step through the probing backend and check every BitLinear call."""
    cfg = model_cfg(overrides, mtp=mtp)
    probe = ProbingBackend(backends.get_backend(backend_name))
    model = Model(cfg, probe, seed=21)
    tokens = batch(seed=22)
    res = compute_loss(model, tokens, collider_sparsity=sparsity)
    res.loss.backward()
    names = {id(p): n for n, p in model.params.items()}
    seen = set()
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    token_rows = None
    for rec in probe.calls:
        name = names[id(rec["w"])]
        seen.add(name)
        x = rec["x"].reshape(-1, rec["x"].shape[-1])
        assert isinstance(rec["keep"], ref_ternary.RowSelection), f"{name}: called without the Collider selection"
        kept = ref_ternary.resolve_keep(rec["keep"], x.shape[0])
        assert kept is not None, name
        if x.shape[0] == n_tokens:
            token_rows = kept if token_rows is None else token_rows
            np.testing.assert_array_equal(kept, token_rows, err_msg=f"{name}: other rows than the token selection")
        filtered = np.setdiff1d(np.arange(x.shape[0]), kept)
        w = rec["w"].data
        dy = rec["dy"].reshape(-1, w.shape[0]) if "dy" in rec else np.zeros((x.shape[0], w.shape[0]), w.dtype)
        # Weight gradient: the reference backward run by hand on the gathered kept rows.
        expected_dw = reference_weight_grad(x[kept], w, dy[kept], rec["group_size"])
        assert rel_err(rec["w"].grad, expected_dw) <= tol, f"{name}: dW differs from the kept-row reference"
        # Activation gradient: zero at filtered rows, dY W_q at kept rows.
        if "dx" in rec:
            dx = rec["dx"].reshape(x.shape)
            assert not np.any(dx[filtered]), f"{name}: non-zero input gradient at a filtered row"
            assert rel_err(dx[kept], reference_input_grad(w, dy[kept], rec["group_size"])) <= tol, name
        if filtered.size and np.any(dy[filtered]):
            # The filtered rows did receive gradient (attention mixes tokens), so the sparse result
            # genuinely differs from the dense product over all rows.
            dense_dw = reference_weight_grad(x, w, dy, rec["group_size"])
            assert rel_err(rec["w"].grad, dense_dw) > tol, name
    assert seen == bitlinear_names(model)  # every BitLinear of every layer (and of the MTP heads)
    per_seq = np.bincount(token_rows // (tokens.shape[1] - 1), minlength=tokens.shape[0])
    expected_kept = (tokens.shape[1] - 1) - int(np.floor(sparsity * (tokens.shape[1] - 1)))
    assert np.all(per_seq == expected_kept)
    return res


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_collider_sparse_backward_on_every_bitlinear(backend):
    # numpy: the same float32 reference code on gathered rows; numba: float32 sgemm vs float64.
    tol = 1e-6 if backend == "numpy" else 1e-5
    res = check_sparse_backward(backend, (), 0.4, mtp=2, tol=tol)
    assert res.kept_fraction == pytest.approx(10 / 16)


def test_collider_sparse_backward_with_deltanet_moe_and_mhc():
    # Experts see a gathered subset of tokens: their selection is the kept part of that subset.
    check_sparse_backward("numpy", EVERY_KIND, 0.5, mtp=1, tol=1e-6)


def test_collider_trains_through_the_trainer(tmp_path):
    from nanochat.train.trainer import Trainer

    data = SimpleNamespace(train_tokens=np.arange(2000) % 300, val_tokens=np.arange(400) % 300, vocab_size=300,
                           tokenizer=None, tokenizer_path=None)
    cfg = load_config("tiny", SMALL + ["train.collider_sparsity=0.4", "train.backend=numpy",
                                       "train.tensorboard=false", "model.mtp_n_tokens=1"])
    trainer = Trainer(cfg, out_dir=tmp_path, progress=False, data=data)
    before = {n: p.data.copy() for n, p in trainer.model.params.items()}
    tokens = batch(b=cfg.train.batch_size, seed=30)
    record = trainer.train_step(iter([tokens]))
    assert record["finite"] and record["mtp"] > 0
    with no_grad():
        probe = Model(cfg.model, backends.get_backend("numpy"), seed=cfg.train.seed)
        for n, p in probe.params.items():
            p.data = before[n]
        expected_ce = compute_loss(probe, tokens).ce
    assert record["ce"] == pytest.approx(expected_ce, rel=1e-6)  # logged CE averages every token
    moved = [n for n, p in trainer.model.params.items() if not np.array_equal(p.data, before[n])]
    assert bitlinear_names(trainer.model) <= set(moved)
