"""The learning-rate schedule: warmup-stable-decay (WSD), SPEC section 4.

``wsd_lr`` is a pure function of the step, so resuming from a checkpoint needs nothing but
the step counter. Exact endpoints (``step`` counts from 0, ``D = round(decay_frac * total)``):

- warmup, ``step < warmup_steps``: ``base * (step + 1) / warmup_steps``. Step 0 already moves
  (``base / warmup_steps``); step ``warmup_steps - 1`` is exactly ``base``.
- stable: exactly ``base``.
- decay, the last ``D`` steps ``total - D <= step < total``: progress
  ``t = (step - (total - D) + 1) / D`` runs over ``1/D, 2/D, ..., 1``, and
  ``lr = base * (min_ratio + (1 - min_ratio) * f(t))`` with ``f(t) = (1 + cos(pi t)) / 2`` (cosine)
  or ``1 - t`` (linear). The last step ``total - 1`` is exactly ``min_ratio * base``, the
  mirror image of warmup's first step. Steps past the end stay at ``min_ratio * base``.
- When warmup and decay overlap (a short run with a long warmup), the smaller of the two
  factors wins, so the schedule never errors on a shortened run.
"""
from __future__ import annotations

import math

DECAY_SHAPES = ("cosine", "linear")


def wsd_lr(step, total_steps, base_lr, warmup_steps, decay_frac, min_lr_ratio, decay="cosine"):
    """Learning rate at ``step`` (0-based) of a ``total_steps`` warmup-stable-decay run."""
    if total_steps < 1:
        raise ValueError(f"wsd_lr: total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"wsd_lr: step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"wsd_lr: warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= decay_frac <= 1.0:
        raise ValueError(f"wsd_lr: decay_frac must lie in [0, 1], got {decay_frac}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"wsd_lr: min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    if decay not in DECAY_SHAPES:
        raise ValueError(f"wsd_lr: decay must be one of {DECAY_SHAPES}, got {decay!r}")

    warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0

    decay_steps = int(round(decay_frac * total_steps))
    decay_start = total_steps - decay_steps
    if decay_steps == 0 or step < decay_start:
        cool = 1.0
    else:
        t = min(1.0, (step - decay_start + 1) / decay_steps)
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if decay == "cosine" else 1.0 - t
        cool = min_lr_ratio + (1.0 - min_lr_ratio) * shape
    return base_lr * min(warm, cool)
