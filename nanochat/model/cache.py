"""Per-sequence inference state: one ``SequenceCache`` per sequence, one state per block.

The block that uses a state creates it (``AttentionMixer.new_state`` -> ``KVCache``,
``DeltaNetMixer.new_state`` -> ``DeltaState``), so the cache interface is the same for every
block kind: ``reserve(length)`` before a forward writes positions up to ``length`` and
``rewind_to(position)`` to drop what follows ``position``. Capacity grows on demand (doubling),
so memory follows the tokens in use, not the configured context.

Attention layers keep keys (after RoPE) and values in float32 (exactly the values the
float32 projections and RoPE produce; the attention core reads them into float64); DeltaNet
layers keep their state ``S`` (float64) plus, with ``record``, the per-token recurrence
inputs and a snapshot of ``S`` every ``SNAPSHOT_EVERY`` positions: rewinding restores the
nearest snapshot at or before the target and replays the stored inputs with
``gated_delta_step`` (exact: the same step function decode uses).
"""
from __future__ import annotations

import numpy as np

from reference.autograd import data_of

F64 = np.float64
SNAPSHOT_EVERY = 64  # DeltaNet state snapshots (for rewind) every this many positions
MIN_CAPACITY = 16


def _grown(xp, old, length):
    """``old`` [1, cap, ...] copied into a zeroed array of capacity >= ``length`` (doubling)."""
    cap = old.shape[1]
    new = xp.zeros((old.shape[0], max(length, 2 * cap)) + old.shape[2:], old.dtype)
    new[:, :cap] = old
    return new


class KVCache:
    """Keys (after RoPE) and values of one attention layer: float32 ``[1, capacity, Hkv, hd]``,
    written by the ``cached_attention`` op."""

    def __init__(self, xp, capacity, n_kv, head_dim):
        self.xp = xp
        self.k = xp.zeros((1, max(int(capacity), 1), n_kv, head_dim), np.float32)
        self.v = xp.zeros_like(self.k)

    def reserve(self, length):
        if length > self.k.shape[1]:
            self.k, self.v = _grown(self.xp, self.k, length), _grown(self.xp, self.v, length)

    def rewind_to(self, be, position):
        """Entries past ``position`` are simply overwritten later."""

    @property
    def nbytes(self):
        return self.k.nbytes + self.v.nbytes


class DeltaState:
    """Recurrent state of one Gated DeltaNet layer (float64 ``S [1, H, dk, dv]``)."""

    def __init__(self, xp, heads, dk, dv, capacity, chunk_size, record):
        self.xp, self.record, self.chunk_size = xp, record, chunk_size
        self.S = xp.zeros((1, heads, dk, dv), F64)
        self.snapshots: dict[int, object] = {}
        self.inputs = None
        if record:
            cap = max(int(capacity), 1)
            self.inputs = {name: xp.zeros((1, cap) + tail, F64) for name, tail in
                           (("q", (heads, dk)), ("k", (heads, dk)), ("v", (heads, dv)), ("beta", (heads,)), ("g", (heads,)))}

    def reserve(self, length):
        if self.record and length > self.inputs["q"].shape[1]:
            self.inputs = {name: _grown(self.xp, old, length) for name, old in self.inputs.items()}

    def run(self, be, start, q, k, v, beta, g):
        """Advance over ``T`` tokens from position ``start``; returns ``o [1, T, H, dv]`` (float64)."""
        xp = self.xp
        t_total = q.shape[1]
        if self.record:
            for name, a in (("q", q), ("k", k), ("v", v), ("beta", beta), ("g", g)):
                self.inputs[name][:, start:start + t_total] = a
        if t_total == 1:
            o, self.S = be.gated_delta_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0], self.S)
            self.S = data_of(self.S)
            self._maybe_snapshot(start + 1)
            return data_of(o)[:, None]
        o = xp.empty(v.shape, F64)
        t = 0
        while t < t_total:
            # Segments end on snapshot boundaries so that their states can be kept.
            end = min(t_total, t + SNAPSHOT_EVERY - (start + t) % SNAPSHOT_EVERY) if self.record else t_total
            seg = slice(t, end)
            o_seg, S = be.gated_delta_chunkwise(q[:, seg], k[:, seg], v[:, seg], beta[:, seg], g[:, seg],
                                                chunk_size=self.chunk_size, initial_state=self.S)
            o[:, seg] = data_of(o_seg)
            self.S = data_of(S)
            t = end
            self._maybe_snapshot(start + t)
        return o

    def _maybe_snapshot(self, position):
        if self.record and position % SNAPSHOT_EVERY == 0:
            self.snapshots[position] = self.S.copy()

    def rewind_to(self, be, position):
        """Restore the state after ``position`` tokens: nearest snapshot, then replay."""
        base = max([p for p in self.snapshots if p <= position], default=0)
        S = self.snapshots[base].copy() if base else self.xp.zeros_like(self.S)
        inp = self.inputs
        for t in range(base, position):
            _, S = be.gated_delta_step(inp["q"][:, t], inp["k"][:, t], inp["v"][:, t],
                                       inp["beta"][:, t], inp["g"][:, t], S)
            S = data_of(S)
        self.S = S
        self.snapshots = {p: s for p, s in self.snapshots.items() if p <= position}

    @property
    def nbytes(self):
        return self.S.nbytes + sum(a.nbytes for a in (self.inputs or {}).values()) + \
            sum(s.nbytes for s in self.snapshots.values())


class SequenceCache:
    """The state of one sequence: a position and one state per block (``model.new_cache``)."""

    def __init__(self, layers):
        self.layers = layers
        self.position = 0

    def reserve(self, length):
        for layer in self.layers:
            layer.reserve(length)

    def rewind_to(self, be, position):
        if not 0 <= position <= self.position:
            raise ValueError(f"rewind: position must lie in [0, {self.position}], got {position}.")
        for layer in self.layers:
            layer.rewind_to(be, position)
        self.position = position

    @property
    def nbytes(self):
        return sum(layer.nbytes for layer in self.layers)
