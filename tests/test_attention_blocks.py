"""The numba backend's two attention paths (backends/numba_backend/nn.py ``Attention``).

The blocked path (query blocks, P recomputed in the backward) and the whole-plane path both
agree with the float64 reference to 1e-5 (the Triangle's tolerance) on shapes that cut the
query blocks awkwardly: several blocks per head with a partial last one, causal with T < S,
S not a multiple of 8, GQA groups, fewer (batch, kv head) planes than threads, and gradients
for a subset of the inputs. Small blocks keep the cases fast.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

from backends.numba_backend import gemm, nn
from reference import nn as ref_nn
from reference.autograd import Tensor

CASES = [  # B, T, S, Hq, Hkv, hd, dv, causal, scale, block rows
    (1, 130, 130, 4, 1, 64, 64, True, None, 64),  # one plane, split over threads by blocks; 2-row tail
    (2, 37, 45, 4, 2, 24, 40, True, None, 8),  # T < S, partial blocks, dv != hd
    (3, 50, 83, 6, 3, 48, 16, True, 0.3, 16),  # S odd: the last blocks span all keys
    (2, 37, 45, 2, 2, 16, 16, False, None, 8),  # non-causal
    (1, 1, 7, 3, 1, 4, 6, True, None, 64),  # one query at the end of a KV cache
    (2, 9, 9, 2, 1, 8, 8, True, 4.0, 4),  # sharp softmax
]


def _run(attention, inputs, gy, wrt, **options):
    tensors = [Tensor(x, requires_grad=i in wrt) for i, x in enumerate(inputs)]
    out = attention(*tensors, **options)
    out.backward(gy)
    return [out.data] + [t.grad for t in tensors]


def _rel(got, want):
    want = np.asarray(want, np.float64)
    return np.linalg.norm(np.asarray(got, np.float64) - want) / max(np.linalg.norm(want), 1e-30)


@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "whole"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}S{}H{}/{}hd{}dv{}{}".format(*c[:7], "" if c[7] else "-full"))
def test_attention_matches_reference(monkeypatch, blocked, case):
    if blocked and not gemm.AVAILABLE:
        pytest.skip("numpy's BLAS has no cblas_sgemm64_ here: only the whole-plane path runs")
    b, t, s, hq, hkv, hd, dv, causal, scale, block = case
    monkeypatch.setattr(nn, "ATTENTION_BLOCKED", blocked)
    monkeypatch.setattr(nn, "ATTENTION_BLOCK_ROWS", block)
    rng = np.random.default_rng(t * 1000 + s)
    inputs = [rng.standard_normal(shape) for shape in ((b, t, hq, hd), (b, s, hkv, hd), (b, s, hkv, dv))]
    gy = rng.standard_normal((b, t, hq, dv))
    options = {"causal": causal, "scale": scale}
    for wrt in ((0, 1, 2), (1,), (0, 2)):
        got = _run(nn.attention, [x.astype(np.float32) for x in inputs], gy.astype(np.float32), wrt, **options)
        want = _run(ref_nn.attention, inputs, gy, wrt, **options)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            assert (g is None) == (w is None), name
            if g is not None:
                assert g.dtype == np.float32 and g.shape == w.shape, name
                assert _rel(g, w) <= 1e-5, f"{name} (grads for {wrt}): relative error {_rel(g, w):.3g}"


def test_blocked_attention_does_not_depend_on_thread_count(monkeypatch):
    """Each query block's products and each plane's dK/dV sums run the same on any thread
    (the shape is large enough for the parallel kernels: 6 planes, 60 query blocks)."""
    if not gemm.AVAILABLE or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs the blocked path and two numba threads")
    monkeypatch.setattr(nn, "ATTENTION_BLOCKED", True)
    monkeypatch.setattr(nn, "ATTENTION_BLOCK_ROWS", 16)
    rng = np.random.default_rng(3)
    inputs = [rng.standard_normal(shape).astype(np.float32) for shape in ((3, 70, 4, 64), (3, 90, 2, 64), (3, 90, 2, 64))]
    gy = rng.standard_normal((3, 70, 4, 64)).astype(np.float32)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(threads)
            results.append(_run(nn.attention, inputs, gy, (0, 1, 2)))
    finally:
        numba.set_num_threads(before)
    for name, one, two in zip(("out", "dq", "dk", "dv"), *results):
        assert np.array_equal(one, two), name
