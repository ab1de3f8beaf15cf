"""Shared test helpers for training runs: a learnable synthetic token stream and a reader of
TensorBoard scalar tags (imported by test modules and by tests/distributed_worker.py)."""
from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np

VOCAB = 300


def token_stream(n, seed=0, vocab=VOCAB):
    """A learnable stream: a repeating stride-7 cycle with 10% random substitutions."""
    rng = np.random.default_rng(seed)
    tokens = np.tile(np.arange(0, vocab, 7), n // len(range(0, vocab, 7)) + 1)[:n]
    noise = rng.random(n) < 0.1
    tokens[noise] = rng.integers(0, vocab, int(noise.sum()))
    return tokens.astype(np.uint16)


def synthetic_data(n_train=4000, n_val=400, vocab=VOCAB):
    """What ``Trainer(data=...)`` takes: train/val token streams with no tokenizer."""
    return SimpleNamespace(train_tokens=token_stream(n_train, 1, vocab), val_tokens=token_stream(n_val, 2, vocab),
                           vocab_size=vocab, tokenizer=None, tokenizer_path=None)


def tensorboard_scalars(tb_dir):
    """``{tag: [values]}`` from TensorBoard event files (TFRecord framing: u64 length, u32 crc,
    data, u32 crc)."""
    from tensorboardX.proto import event_pb2

    tags = {}
    for path in Path(tb_dir).glob("events.out.tfevents.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append(v.simple_value)
    return tags
