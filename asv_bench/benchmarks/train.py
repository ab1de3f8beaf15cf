"""One full training step of the ``tiny`` preset (forward, backward, clipping, optimizers).

``Trainer.train_step`` on synthetic tokens (a ``SimpleNamespace`` data object, no
tokenizer or corpus), batch 8 x 256 tokens, per backend. The loader hands out one fixed
batch, so the time is the step alone. Tokens per second = batch_size * seq_len / step time.
"""
from __future__ import annotations

import itertools
import shutil
import tempfile
import time
from types import SimpleNamespace

import numpy as np

from nanochat.config import load_config
from nanochat.train.trainer import Trainer

from .common import backend_names, require_implementation


def _synthetic_data(vocab_size, rng):
    tokens = rng.integers(0, vocab_size, size=200_000).astype(np.uint16)
    return SimpleNamespace(train_tokens=tokens, val_tokens=tokens[:10_000], vocab_size=vocab_size,
                           tokenizer=None, tokenizer_path=None)


class TinyTrainStep:
    """``Trainer.train_step`` on the tiny preset, as tokens per second.

    Only a ``track_`` benchmark: a step takes seconds (tens of seconds with the NumPy reference), and
    every asv benchmark pays its own ``setup`` (model build plus one compiling step).
    """

    params = [backend_names()]
    param_names = ["backend"]
    timeout = 600

    def setup(self, backend):
        impl = require_implementation(backend)
        cfg = load_config("tiny", [f"train.backend={backend}"])
        rng = np.random.default_rng(0)
        self.out_dir = tempfile.mkdtemp(prefix="bench-train-")
        self.trainer = Trainer(cfg, out_dir=self.out_dir, progress=False, data=_synthetic_data(cfg.model.vocab_size, rng))
        batch = rng.integers(0, cfg.model.vocab_size, size=(cfg.train.batch_size, cfg.model.seq_len + 1))
        self.loader = itertools.repeat(batch)
        self.tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
        self.sync = impl.sync
        self.trainer.train_step(self.loader)  # compile / warm caches
        self.sync()

    def teardown(self, backend):
        # asv calls teardown after a skipped setup too, before out_dir exists.
        if getattr(self, "out_dir", None):
            shutil.rmtree(self.out_dir, ignore_errors=True)

    def track_tokens_per_sec(self, backend):
        t0 = time.perf_counter()
        self.trainer.train_step(self.loader)
        self.sync()
        return self.tokens_per_step / (time.perf_counter() - t0)

    track_tokens_per_sec.unit = "tokens/s"
