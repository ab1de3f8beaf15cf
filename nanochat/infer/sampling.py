"""Sampling: how the next token is picked from a logits vector.

Order (``next_token_distribution``): repetition penalty -> temperature (0 = greedy) -> top-k ->
top-p; ``sample_next`` draws from a ``numpy.random.Generator`` the caller seeds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F64 = np.float64


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked. ``temperature = 0`` is greedy; ``top_k = 0`` and
    ``top_p = 1`` switch those filters off; ``repetition_penalty = 1`` is none."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}.")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}.")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}.")


def apply_repetition_penalty(logits, history, penalty):
    """CTRL-style penalty on every token id in ``history``: positive logits are divided by
    ``penalty``, negative ones multiplied, so a penalty > 1 always makes them less likely."""
    z = np.array(logits, dtype=F64)
    if penalty != 1.0 and len(history):
        ids = np.unique(np.asarray(history, dtype=np.int64))
        ids = ids[(ids >= 0) & (ids < z.size)]
        seen = z[ids]
        z[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return z


def next_token_distribution(logits, history=(), params=SamplingParams()):
    """Probabilities ``float64 [V]`` after penalty, temperature, top-k and top-p (in that order).

    Greedy (``temperature = 0``) returns a one-hot on the first maximum of the penalised logits.
    """
    z = apply_repetition_penalty(logits, history, params.repetition_penalty)
    v = z.size
    if params.temperature == 0:
        p = np.zeros(v)
        p[int(np.argmax(z))] = 1.0
        return p
    z = z / params.temperature
    if params.top_k and params.top_k < v:
        keep = np.argsort(-z, kind="stable")[: params.top_k]  # ties go to the lower id
        masked = np.full(v, -np.inf)
        masked[keep] = z[keep]
        z = masked
    finite = np.isfinite(z)
    if not finite.any():
        raise ValueError("every logit is -inf or NaN, so there is nothing to sample.")
    e = np.where(finite, np.exp(z - z[finite].max()), 0.0)
    p = e / e.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(cum, params.top_p * cum[-1])) + 1  # smallest prefix reaching top_p
        kept = np.zeros(v)
        kept[order[:n_keep]] = p[order[:n_keep]]
        p = kept / kept.sum()
    return p


def sample_next(logits, history, params, rng):
    """One token id from ``logits [V]`` (see ``next_token_distribution``) drawn with ``rng``."""
    p = next_token_distribution(logits, history, params)
    if params.temperature == 0:
        return int(np.argmax(p))
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), p.size - 1))


def limit_vocab(logits, vocab_limit):
    """``logits`` with ids at or past ``vocab_limit`` set to -inf (a tokenizer smaller than the
    model's vocabulary never gets them); the input itself is left alone."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = np.array(logits, copy=True)
        logits[..., vocab_limit:] = -np.inf
    return logits
