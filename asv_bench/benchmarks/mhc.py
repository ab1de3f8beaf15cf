"""mHC residual streams around one sub-layer: coefficients, ``mhc_pre``, ``mhc_post``.

256 tokens of width 4096 in N = 2 or 4 streams (X is ``[256, N, 4096]`` float32, 8 or
16 MB). The sub-layer itself is the identity (``y = u``) so that the time is the mHC
bookkeeping alone: coefficients (``static``: one set shared by every token;
``dynamic``: mHC-lite, per token from ``rmsnorm(flatten(X))``), then
``u = mhc_pre(X, h_pre)`` and ``X' = mhc_post(X, u, H_res, h_post)``.
"""
from __future__ import annotations

import numpy as np

from reference.autograd import Tensor, no_grad
from reference.mhc import DYNAMIC_PARAM_NAMES, STATIC_PARAM_NAMES, mhc_init_params

from .common import backend_names, require_implementation

TOKENS, DIM = 256, 4096


class MhcApply:
    """One mHC unit applied to a batch of tokens, forward only and forward + backward."""

    params = [backend_names(), [2, 4], ["static", "dynamic"]]
    param_names = ["backend", "n_streams", "mode"]
    timeout = 300

    def setup(self, backend, n, mode):
        impl = require_implementation(backend)
        be, xp = impl.be, impl.xp
        rng = np.random.default_rng(0)
        init = mhc_init_params(n, 1, mode, DIM, rng, dtype=np.float32)
        names = DYNAMIC_PARAM_NAMES[n] if mode == "dynamic" else STATIC_PARAM_NAMES[n]
        self.coeff_params = [Tensor(xp.asarray(init[name]), requires_grad=True) for name in names]
        x = rng.standard_normal((TOKENS, n, DIM), dtype=np.float32)
        self.x = Tensor(xp.asarray(x), requires_grad=True)
        self.grad_out = xp.ones((TOKENS, n, DIM), dtype=np.float32)
        self.be = be
        self.mode = mode
        self.sync = impl.sync
        self.forward_backward()  # compile / warm caches
        self.sync()

    def apply(self):
        be = self.be
        if self.mode == "dynamic":
            weight, gate, *static = self.coeff_params[-2:] + self.coeff_params[:-2]
            h_res, h_pre, h_post = be.mhc_dynamic_coeffs(self.x, weight, gate, *static)
        else:
            h_res, h_pre, h_post = be.mhc_static_coeffs(*self.coeff_params)
        u = be.mhc_pre(self.x, h_pre)
        return be.mhc_post(self.x, u, h_res, h_post)

    def forward_backward(self):
        self.x.grad = None
        for p in self.coeff_params:
            p.grad = None
        self.apply().backward(self.grad_out)

    def time_forward(self, backend, n, mode):
        with no_grad():
            self.apply()
        self.sync()

    def time_forward_backward(self, backend, n, mode):
        self.forward_backward()
        self.sync()
