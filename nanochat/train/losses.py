"""The training objective on top of the model's logits: next-token cross-entropy, Collider token
filtering, multi-token prediction and the MoE load-balancing loss (SPEC 4, 5).

    res = compute_loss(model, tokens, collider_sparsity=0.35)
    res.loss.backward(); res.ce, res.mtp, res.aux, res.kept_fraction, res.expert_load

The scalar numbers stay on the device until read (``LossResult`` converts on first access), so
the forward has no host synchronisation per loss term.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from reference.ternary import RowSelection

IGNORE = -100


@dataclass
class LossResult:
    loss: object                          # the Tensor backward runs on (CE + MTP and MoE terms)
    be: object
    ce_value: object                      # device scalar: main next-token loss over all scored tokens
    mtp_value: object = None              # device scalar: weighted-sum MTP loss (before mtp_weight)
    aux_value: object = None              # device scalar: MoE load-balancing loss
    kept_fraction: float = 1.0
    token_losses: np.ndarray | None = None
    expert_indices: list = field(default_factory=list)
    n_experts: int = 0
    h_res: list = field(default_factory=list)

    def _float(self, a):
        return 0.0 if a is None else float(self.be.to_numpy(a))

    @property
    def ce(self) -> float:
        return self._float(self.ce_value)

    @property
    def mtp(self) -> float:
        return self._float(self.mtp_value)

    @property
    def aux(self) -> float:
        return self._float(self.aux_value)

    @property
    def expert_load(self) -> list:
        """Tokens per expert, one array per MoE block."""
        return [self.be.to_numpy(self.be.expert_load(ind, self.n_experts)) for ind in self.expert_indices]


def compute_loss(model, tokens, collider_sparsity=0.0, need_token_losses=False, with_mtp=True,
                 moe_counts=None) -> LossResult:
    """``tokens`` int [B, T+1] windows -> ``LossResult`` (loss over all T positions).

    ``with_mtp=False`` skips the MTP heads (validation reports the main loss only).
    ``moe_counts``: data parallelism's ``indices -> token-slots per expert over all ranks``, so the
    load-balancing loss uses the global batch's expert fractions (nanochat/train/distributed.py).
    """
    be, c, xp = model.be, model.cfg, model.be.xp
    tokens = xp.asarray(tokens)
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    b, t = idx.shape
    selection = RowSelection() if collider_sparsity > 0 else None
    out = model.forward(idx, keep=selection)
    flat_targets = targets.reshape(-1)
    logits = out.logits.reshape(b * t, c.vocab_size)
    token_losses = weights = None
    kept = 1.0
    if selection is not None or need_token_losses:
        token_losses = be.cross_entropy_per_token(logits.data, flat_targets)
    if selection is not None:
        weights, rows = collider_keep(token_losses.reshape(b, t), collider_sparsity, xp)
        selection.set(rows)
        kept = rows.size / (b * t)
    if weights is None:
        ce_loss = be.cross_entropy(logits, flat_targets)
        ce_value = ce_loss.data
    else:
        # Filtered tokens get zero weight; normalise by all tokens so kept tokens keep their scale.
        ce_loss = be.cross_entropy(logits, flat_targets, weights, reduction="sum") * (1.0 / (b * t))
        ce_value = token_losses.mean()  # the reported loss averages all tokens
    loss = ce_loss
    mtp_value = None
    if c.mtp_n_tokens and with_mtp:
        mtp_loss = mtp_loss_of(model, out.hidden, tokens, weights, selection)
        mtp_value = mtp_loss.data
        loss = loss + mtp_loss * c.mtp_weight
    aux = None
    for router_logits, indices in out.moe:
        counts = None if moe_counts is None else moe_counts(indices, c.n_experts)
        term = be.load_balance_loss(router_logits, indices, c.n_experts, counts=counts)
        aux = term if aux is None else aux + term
    if aux is not None:
        loss = loss + aux * c.moe_aux_loss_weight
    return LossResult(
        loss=loss, be=be, ce_value=ce_value, mtp_value=mtp_value, aux_value=None if aux is None else aux.data,
        kept_fraction=kept, token_losses=be.to_numpy(token_losses) if need_token_losses else None,
        expert_indices=[ind for _, ind in out.moe], n_experts=c.n_experts, h_res=out.h_res,
    )


def mtp_loss_of(model, h, tokens, weights, selection):
    """Sum over MTP heads of 0.5^i * CE(head i predicts token t+2+i)."""
    be, c = model.be, model.cfg
    xp = be.xp
    b, t1 = tokens.shape
    t = t1 - 1
    total = None
    for i in range(c.mtp_n_tokens):
        valid = t - 1 - i
        if valid <= 0:
            break
        targets = xp.full((b, t), IGNORE, dtype=tokens.dtype)
        targets[:, :valid] = tokens[:, 2 + i:]
        zn = model.mtp_hidden(h, i, selection)
        logits = model.head(zn.reshape(b * t, c.dim), selection)
        if weights is None:
            loss_i = be.cross_entropy(logits, targets.reshape(-1), ignore_index=IGNORE)
        else:
            # As for the main CE under Collider: filtered positions weigh 0 and the sum is divided
            # by every scored position, so filtering does not rescale the MTP term.
            loss_i = be.cross_entropy(logits, targets.reshape(-1), weights, ignore_index=IGNORE,
                                      reduction="sum") * (1.0 / (b * valid))
        term = loss_i * (0.5 ** i)
        total = term if total is None else total + term
    return total


def collider_keep(token_losses, sparsity, xp):
    """Per sequence, drop the ``sparsity`` fraction of tokens with the lowest loss.

    Returns (weights [B*T] with 0 for dropped tokens, kept flat row indices sorted)."""
    b, t = token_losses.shape
    n_drop = int(math.floor(sparsity * t))
    weights = xp.ones((b, t), dtype=token_losses.dtype)
    if n_drop > 0:
        order = xp.argsort(token_losses, axis=1, kind="stable")
        drop = order[:, :n_drop]
        weights[xp.arange(b)[:, None], drop] = 0
    weights = weights.reshape(-1)
    rows = xp.nonzero(weights)[0]
    return weights, rows
