"""Training-side ternary linear layer: ``ternary_linear`` forward + STE backward.

x ``[4096, 1024]`` (tokens x K) through w ``[1024, 1024]`` (M x K), both requiring
gradients; the backward starts from ``dY = ones``. The baseline is the same graph with a
plain float32 matmul ``x @ w.T`` (forward and both gradients on BLAS). One forward plus
backward is three products of 2 * T * M * K operations each, which ``track_gops`` counts.
"""
from __future__ import annotations

import numpy as np

from reference.autograd import Tensor

from .common import best_seconds, implementation_names, require_implementation

TOKENS, IN_FEATURES, OUT_FEATURES = 4096, 1024, 1024
GROUP_SIZE = 256


class TernaryLinear:
    """``ternary_linear`` (or the float32 matmul baseline) forward and backward."""

    params = [implementation_names()]
    param_names = ["impl"]
    timeout = 300

    def setup(self, impl_name):
        impl = require_implementation(impl_name)
        xp = impl.xp
        rng = np.random.default_rng(0)
        self.x = Tensor(xp.asarray(rng.standard_normal((TOKENS, IN_FEATURES), dtype=np.float32)), requires_grad=True)
        w = rng.standard_normal((OUT_FEATURES, IN_FEATURES), dtype=np.float32) * np.float32(0.02)
        self.w = Tensor(xp.asarray(w), requires_grad=True)
        self.grad_out = xp.ones((TOKENS, OUT_FEATURES), dtype=np.float32)
        if impl.baseline:
            self.forward = lambda: self.x @ self.w.T
        else:
            op = impl.be.ternary_linear
            self.forward = lambda: op(self.x, self.w, group_size=GROUP_SIZE)
        self.sync = impl.sync
        self.step()  # compile / warm caches
        self.sync()

    def step(self):
        self.x.grad = self.w.grad = None
        self.forward().backward(self.grad_out)

    def time_forward_backward(self, impl_name):
        self.step()
        self.sync()

    def track_gops(self, impl_name):
        return 3 * 2.0 * TOKENS * OUT_FEATURES * IN_FEATURES / best_seconds(self.step, self.sync) / 1e9

    track_gops.unit = "GOPS"
