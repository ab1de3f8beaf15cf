"""The numba ternary_linear's packed-kernel forward (issue 17) against its sgemm forward and the
reference: same outputs and gradients, including dead and non-finite rows and groups."""
from __future__ import annotations

import numpy as np
import pytest

from reference import ternary as ref
from reference.autograd import Tensor

from backends.numba_backend import linear  # numba is a core dependency: no skip

pytestmark = pytest.mark.triangle

SHAPES = [(2048, 256, 256, 128), (512, 768, 256, 128), (300, 96, 768, 64), (61, 40, 128, 32), (7, 8, 96, 32)]


def _run(x, w, g, gy, packed, monkeypatch, keep=None):
    monkeypatch.setattr(linear, "PACKED_FORWARD", packed)
    monkeypatch.setattr(linear, "PACKED_MIN_MACS", 0)
    xt, wt = Tensor(x.copy(), requires_grad=True), Tensor(w.copy(), requires_grad=True)
    y = linear.ternary_linear(xt, wt, g, keep=keep)
    (y * Tensor(gy)).sum().backward()
    return y.data, xt.grad, wt.grad


@pytest.mark.parametrize("n,m,k,g", SHAPES)
def test_packed_forward_matches_sgemm_forward(n, m, k, g, monkeypatch):
    if linear._packed.DEFAULT_PATH == "plain":
        pytest.skip("no SIMD packed kernel on this CPU")
    rng = np.random.default_rng(n + m + k)
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = (rng.standard_normal((m, k)) / 16).astype(np.float32)
    w[0, :g] = 0                 # a dead weight group
    x[min(3, n - 1)] = 0         # a dead token
    if m > 2:
        w[2, g - 1] = np.nan     # a non-finite group
    if n > 5:
        x[5, 0] = np.inf         # a non-finite token
    gy = rng.standard_normal((n, m)).astype(np.float32)
    a = _run(x, w, g, gy, False, monkeypatch)
    b = _run(x, w, g, gy, True, monkeypatch)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    y_ref = ref.ternary_linear(x, w, g)
    np.testing.assert_allclose(b[0], getattr(y_ref, "data", y_ref), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_packed_forward_with_keep(monkeypatch):
    if linear._packed.DEFAULT_PATH == "plain":
        pytest.skip("no SIMD packed kernel on this CPU")
    rng = np.random.default_rng(7)
    n, m, k, g = 96, 64, 256, 128
    x = rng.standard_normal((n, k)).astype(np.float32)
    w = (rng.standard_normal((m, k)) / 16).astype(np.float32)
    gy = rng.standard_normal((n, m)).astype(np.float32)
    keep = np.arange(0, n, 3)
    a = _run(x, w, g, gy, False, monkeypatch, keep=keep)
    b = _run(x, w, g, gy, True, monkeypatch, keep=keep)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
