"""Decode speed of the inference engine: one token per forward with the KV cache, per backend.

``Engine.step`` on a random-weight ``tiny`` model (``nanochat.infer.engine.random_model``) after a
16-token prompt, with the packed ternary kernels and with ``dequantized=True`` (float32
weights, the same int8 activations). Tokens per second over 16 decode steps.
"""
from __future__ import annotations

import time

import numpy as np

from nanochat.config import load_config
from nanochat.infer.engine import Engine, random_model

from .common import backend_names, require_implementation

STEPS = 16


class Decode:
    """Decode tokens per second of ``tiny``, packed vs float32 weights."""

    params = [backend_names(), ["packed", "float32"]]
    param_names = ["backend", "weights"]
    timeout = 300

    def setup(self, backend, weights):
        impl = require_implementation(backend)
        self.engine = Engine(random_model(load_config("tiny")), impl.be, dequantized=weights == "float32")
        self.prompt = np.arange(16)
        self.sync = impl.sync
        self._decode()  # compile / warm caches

    def _decode(self):
        engine = self.engine
        engine.reset()
        token = int(np.argmax(engine.feed(self.prompt)[-1]))
        t0 = time.perf_counter()
        for _ in range(STEPS):
            token = int(np.argmax(engine.step(token)))
        self.sync()
        return STEPS / (time.perf_counter() - t0)

    def track_tokens_per_sec(self, backend, weights):
        return self._decode()

    track_tokens_per_sec.unit = "tokens/s"
