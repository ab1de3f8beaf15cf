"""Muon and 8-bit Muon: one optimizer step on one hidden matrix, and its state memory.

A step is the momentum update (float32 buffer, or int8 blocks of 256 with one float32
scale each for 8-bit Muon), five quintic Newton-Schulz iterations and the weight update
(``reference.optim.Muon`` with the backend's kernels). ``MuonState.track_state_bytes``
measures the optimizer state from its arrays (sum of ``nbytes``), as the SPEC asks.
"""
from __future__ import annotations

import numpy as np

from reference.autograd import Tensor
from reference.optim import Muon

from .common import backend_names, require_implementation, shape_of

SHAPES = ["1024x1024", "4096x1024"]  # rows x cols
MOMENTUM = ["float32", "int8"]


def _muon_on_random_matrix(xp, label, momentum, **kwargs):
    """A Muon optimizer over one random ``label``-shaped parameter with a gradient set."""
    rng = np.random.default_rng(0)
    shape = shape_of(label)
    param = Tensor(xp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)), requires_grad=True)
    param.grad = xp.asarray(rng.standard_normal(shape, dtype=np.float32))
    return Muon([param], lr=0.02, eightbit=(momentum == "int8"), **kwargs)


class MuonStep:
    """``Muon.step()`` on one matrix with a fixed gradient."""

    params = [backend_names(), SHAPES, MOMENTUM]
    param_names = ["backend", "shape", "momentum"]
    timeout = 600

    def setup(self, backend, label, momentum):
        impl = require_implementation(backend)
        self.opt = _muon_on_random_matrix(impl.xp, label, momentum, kernels=impl.be)
        self.sync = impl.sync
        self.opt.step()  # creates the state; compiles / warms caches
        self.sync()

    def time_step(self, backend, label, momentum):
        self.opt.step()
        self.sync()


class MuonState:
    """Bytes of Muon state per matrix: float32 momentum vs int8 blocks + float32 scales.

    The state layout belongs to the optimizer, not to a backend's kernels, so this runs
    once per shape on the reference. The state exists after the first step; with
    ``ns_steps = 0`` that step skips the Newton-Schulz products, which the state does not
    depend on.
    """

    params = [SHAPES, MOMENTUM]
    param_names = ["shape", "momentum"]

    def setup(self, label, momentum):
        self.opt = _muon_on_random_matrix(np, label, momentum, ns_steps=0)
        self.opt.step()

    def track_state_bytes(self, label, momentum):
        return self.opt.state_nbytes()

    track_state_bytes.unit = "bytes"
