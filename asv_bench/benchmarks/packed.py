"""Packed ternary inference kernels: GEMV (one token) and GEMM (a batch of tokens).

Backends run ``prepare_packed`` once in ``setup`` and then ``packed_gemv`` /
``packed_gemm`` on int8 activations, exactly as the engine decodes. The float32
baselines multiply the dequantized weights ``W_deq = q * s`` (``W_deq @ x`` and
``X @ W_deq.T``) with BLAS. Throughput follows the SPEC: GOPS = 2 * M * K / s for a
GEMV and 2 * N * M * K / s for a GEMM of N tokens.
"""
from __future__ import annotations

import numpy as np

from .common import (
    best_seconds, implementation_names, random_int8_acts, random_ternary, require_implementation, shape_of,
)

GROUP_SIZE = 256
GEMV_SHAPES = ["2048x2048", "4096x4096", "4096x11008", "11008x4096"]  # M x K
GEMM_SHAPE = "4096x4096"
GEMM_TOKENS = 64


def _prepare(impl, packed, scales):
    """A callable-ready operand: the backend's packed handle, or the baseline's W_deq."""
    xp = impl.xp
    if impl.baseline:
        be_np = require_implementation("numpy").be
        w = be_np.dequantize_weights(be_np.unpack_ternary(packed), scales, GROUP_SIZE)
        return xp.asarray(w, dtype=np.float32)
    return impl.be.prepare_packed(xp.asarray(packed), xp.asarray(scales), GROUP_SIZE)


class PackedGemv:
    """y = W x for one token, M x K weights (the decode hot loop)."""

    params = [implementation_names(), GEMV_SHAPES]
    param_names = ["impl", "MxK"]
    timeout = 600

    def setup_cache(self):
        rng = np.random.default_rng(0)
        return {label: random_ternary(rng, *shape_of(label), GROUP_SIZE) for label in GEMV_SHAPES}

    def setup(self, weights, impl_name, label):
        impl = require_implementation(impl_name)
        packed, scales = weights[label]
        m, k = shape_of(label)
        rng = np.random.default_rng(1)
        xq = random_int8_acts(rng, (k,))
        xs = np.float32(0.013)
        operand = _prepare(impl, packed, scales)
        if impl.baseline:
            x = impl.xp.asarray(xq.astype(np.float32) * xs)
            self.call = lambda: operand @ x
        else:
            xq_dev = impl.xp.asarray(xq)
            op = impl.be.packed_gemv
            self.call = lambda: op(operand, xq_dev, xs)
        self.sync = impl.sync
        self.ops = 2.0 * m * k
        self.call()  # compile / warm caches
        self.sync()

    def time_gemv(self, weights, impl_name, label):
        self.call()
        self.sync()

    def track_gops(self, weights, impl_name, label):
        return self.ops / best_seconds(self.call, self.sync) / 1e9

    track_gops.unit = "GOPS"


class PackedGemm:
    """Y = X W^T for 64 tokens through 4096 x 4096 weights (prefill, batched decode)."""

    params = [implementation_names()]
    param_names = ["impl"]
    timeout = 600

    def setup_cache(self):
        return random_ternary(np.random.default_rng(2), *shape_of(GEMM_SHAPE), GROUP_SIZE)

    def setup(self, weights, impl_name):
        impl = require_implementation(impl_name)
        packed, scales = weights
        m, k = shape_of(GEMM_SHAPE)
        rng = np.random.default_rng(3)
        xq = random_int8_acts(rng, (GEMM_TOKENS, k))
        xs = rng.uniform(0.005, 0.02, size=GEMM_TOKENS).astype(np.float32)
        operand = _prepare(impl, packed, scales)
        if impl.baseline:
            x = impl.xp.asarray(xq.astype(np.float32) * xs[:, None])
            self.call = lambda: x @ operand.T
        else:
            xq_dev, xs_dev = impl.xp.asarray(xq), impl.xp.asarray(xs)
            op = impl.be.packed_gemm
            self.call = lambda: op(operand, xq_dev, xs_dev)
        self.sync = impl.sync
        self.ops = 2.0 * GEMM_TOKENS * m * k
        self.call()
        self.sync()

    def time_gemm(self, weights, impl_name):
        self.call()
        self.sync()

    def track_gops(self, weights, impl_name):
        return self.ops / best_seconds(self.call, self.sync) / 1e9

    track_gops.unit = "GOPS"
