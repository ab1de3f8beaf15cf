"""How a BitLinear layer runs: one strategy object per forward, chosen by the caller.

    linear(x, "layers.0.attn.wq", "layers.0.attn.wk", "layers.0.attn.wv") -> [q, k, v]

``x`` is ``[..., K]``; each output is ``[..., M_i]``.

- ``TrainingLinear``: the STE ``ternary_linear`` on the model's float shadow weights, with
  Collider's row selection (``keep``) for a sparse backward. Autograd sees every call.
- ``PackedLinear``: inference on packed 2-bit weights. Projections that read the same input
  (attention q/k/v, DeltaNet q/k/v/gate, FFN gate/up) are stacked into one matrix at load
  time, so one activation quantization and one product serve them all (``packed_linear``:
  int8 activations per row, then the packed GEMM, or GEMV for one row). With
  ``dequantized=True`` the product is a float32 matmul with ``W = q * s`` on the same int8
  activations (the float baseline of the decode benchmark).
"""
from __future__ import annotations

import numpy as np

from reference.autograd import array_module
from reference.ternary import RowSelection

F32 = np.float32

# Projections of one block that read the same input, largest group first.
FUSED_PROJECTIONS = (("wq", "wk", "wv", "wgate"), ("wq", "wk", "wv"), ("w_gate", "w_up"))


class TrainingLinear:
    """``ternary_linear(x, params[name], group_size, keep)`` per name (SPEC 3, STE backward)."""

    def __init__(self, be, params, group_size, keep=None):
        self.be, self.params, self.group_size, self.keep = be, params, group_size, keep

    def __call__(self, x, *names):
        return [self.be.ternary_linear(x, self.params[name], self.group_size, keep=self.keep) for name in names]

    def subset(self, token_ids, n_rows):
        """The strategy for a gathered subset of rows (an expert's tokens)."""
        if self.keep is None:
            return self
        return TrainingLinear(self.be, self.params, self.group_size, SubsetSelection(self.keep, token_ids, n_rows))


class SubsetSelection(RowSelection):
    """The rows of a gathered subset (an expert's tokens) that a parent selection keeps."""

    def __init__(self, parent, token_ids, n_rows):
        self.parent, self.token_ids, self.n_rows = parent, token_ids, n_rows

    @property
    def rows(self):
        if self.parent.rows is None:
            return None
        xp = array_module(self.token_ids)
        mask = xp.zeros(self.n_rows, dtype=bool)
        mask[self.parent.rows] = True
        return xp.nonzero(mask[self.token_ids])[0]


def fusion_groups(names):
    """``[(key, members)]`` covering every ternary tensor name once: stacked groups of
    ``FUSED_PROJECTIONS`` where all members exist under one prefix, singletons otherwise."""
    left, groups = list(names), []
    for suffixes in FUSED_PROJECTIONS:
        prefixes = {n[: -len(suffixes[0])] for n in left if n.endswith("." + suffixes[0])}
        for prefix in sorted(prefixes):
            members = [prefix + s for s in suffixes]
            if all(m in left for m in members):
                groups.append((prefix + "+".join(suffixes), members))
                left = [n for n in left if n not in members]
    return groups + [(n, [n]) for n in left]


class PackedLinear:
    """Packed ternary products for inference (see the module docstring).

    ``ternary``: name -> (packed uint8 [M, K/4], scales float32 [M, K/G]) host arrays.
    ``matrices`` maps a stacked key to the prepared weight; ``members`` maps a member name to
    (key, first row, last row). Each output row is the same dot product as without stacking.
    """

    def __init__(self, be, ternary, group_size, dequantized=False):
        self.be, self.xp, self.group_size, self.dequantized = be, be.xp, group_size, bool(dequantized)
        self.matrices, self.members, self.stacks = {}, {}, {}
        self._layers: dict = {}
        for key, members in fusion_groups(ternary):
            self.stacks[key] = tuple(members)
            rows = [ternary[name][0].shape[0] for name in members]
            packed = np.concatenate([np.asarray(ternary[name][0]) for name in members])
            scales = np.concatenate([np.asarray(ternary[name][1], dtype=F32) for name in members])
            self.matrices[key] = self._prepare(packed, scales)
            for name, first, last in zip(members, np.cumsum([0] + rows[:-1]), np.cumsum(rows)):
                self.members[name] = (key, int(first), int(last)) if len(members) > 1 else (key, None, None)
        self._input = None  # the last input and its products: members asked for later reuse them
        self._products: dict = {}

    def _prepare(self, packed, scales):
        xp, g = self.xp, self.group_size
        packed, scales = np.ascontiguousarray(packed), np.ascontiguousarray(scales, dtype=F32)
        if self.dequantized:
            q = self.be.unpack_ternary(xp.asarray(packed))
            return xp.ascontiguousarray(self.be.dequantize_weights(q, xp.asarray(scales), g).astype(F32))
        return self.be.prepare_packed(xp.asarray(packed), xp.asarray(scales), g)

    def __call__(self, x, *names):
        lead, k = x.shape[:-1], x.shape[-1]
        if x is not self._input:
            self._input, self._products = x, {}
        x2 = x.reshape(-1, k)
        out = []
        for name in names:
            key, first, last = self.members[name]
            if key not in self._products:
                self._products[key] = self._product(key, x2)
            y = self._products[key][:, first:last]
            out.append(y.reshape(lead + (y.shape[-1],)))
        return out

    def stacked(self, *names):
        """The prepared matrix whose rows are exactly ``names``' in this order, or None."""
        key = self.members[names[0]][0]
        return self.matrices[key] if self.stacks[key] == names else None

    def decode_layer(self, key, make):
        """The ``DecodeLayer`` of block ``key``, made once by ``make(self)`` (None: the block
        has no fused step with these weights, e.g. dequantized float products)."""
        if key not in self._layers:
            self._layers[key] = None if self.dequantized else make(self)
        return self._layers[key]

    def forget(self):
        """Drop the reference to the last input (called at the end of a forward)."""
        self._input, self._products = None, {}

    def subset(self, token_ids, n_rows):
        return self

    def _product(self, key, x2):
        """The (stacked) matrix ``key`` times int8-quantized rows ``x2`` (one scale per row)."""
        w = self.matrices[key]
        if not self.dequantized:
            return self.be.packed_linear(w, x2)
        xq, xs = self.be.quantize_acts(x2 if x2.flags.c_contiguous else self.xp.ascontiguousarray(x2))
        return (xq.astype(F32) @ w.T) * xs[:, None]


class Int8Head:
    """The LM head with int8 weights (absmax per vocabulary row, ``quantize_acts``) and int8
    activations (absmax per token): ``int8_linear``, exact int32 sums. A quarter of the float32
    head's bytes per token; its logit error is measured in docs/engine.md (``--head int8``)."""

    def __init__(self, be, w):
        self.be = be
        self.wq, self.ws = be.quantize_acts(be.xp.ascontiguousarray(w))

    def __call__(self, h2):
        xq, xs = self.be.quantize_acts(h2 if h2.flags.c_contiguous else self.be.xp.ascontiguousarray(h2))
        return self.be.int8_linear(xq, xs, self.wq, self.ws)
