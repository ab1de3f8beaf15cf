"""``python -m nanochat.eval``: validation loss, perplexity and bits per byte of a model.

    python -m nanochat.eval --model model.gguf [--data PATH] [--max-batches N]

The model runs on the inference engine's batched forward (the prefill path, packed kernels)
over fixed windows ``tokens[i*T : i*T + T + 1]`` of the validation split (``loader.val_batches``),
so every validation token after the first is scored exactly once.

- Text data (the standard library by default, a directory or a text file): the documents of
  the validation split that ``nanochat.data.corpus`` makes (``Corpus.split``, the same rule as
  ``prepare_data``), tokenized with the model's own tokenizer, an end-of-text token after each
  document. The model's tokenizer, not one trained on the data, is what the numbers must use.
- A pre-tokenized ``.bin``: its validation split from ``prepare_data`` (ids must fit the model).

Loss is the mean next-token cross-entropy in nats, perplexity ``exp(loss)``, and bits per byte
``sum(CE) / ln 2 / sum(bytes of the scored target tokens)`` with the true UTF-8 byte count of
each token (``Tokenizer.token_bytes``; the end-of-text token has none).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from nanochat.cli.common import (EXIT_BAD_INPUT, OneLineParser, add_backend_argument, check_model_path,
                                 fail, non_negative_int, say_if_compiling)


@dataclass
class EvalResult:
    loss: float            # mean cross-entropy, nats per token
    perplexity: float
    bits_per_byte: float   # NaN when the scored tokens hold no bytes (no tokenizer)
    tokens: int            # scored target tokens
    bytes: int             # UTF-8 bytes of those tokens
    batches: int
    seconds: float

    def summary(self):
        return (f"val loss {self.loss:.4f} | perplexity {self.perplexity:.2f} | bits per byte "
                f"{self.bits_per_byte:.4f} | {self.tokens} tokens ({self.bytes} bytes) in {self.batches} "
                f"batches, {self.seconds:.1f} s ({self.tokens / max(self.seconds, 1e-9):.0f} tokens/s)")


def token_byte_lengths(tokenizer, vocab_size):
    """int64 ``[vocab_size]`` bytes per token id; ids past the tokenizer count 0."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    if tokenizer is not None:
        own = tokenizer.token_byte_lengths()[:vocab_size]
        lengths[: own.size] = own
    return lengths


def validation_tokens(data_path, tokenizer, vocab_size, val_fraction):
    """1-D token array of the validation split of ``data_path`` (None: the standard library).

    Returns ``(tokens, tokenizer_for_bytes)``: a ``.bin`` may bring its own tokenizer."""
    from pathlib import Path

    from nanochat.data import corpus as data_mod

    if data_path is not None and Path(data_path).suffix.lower() == ".bin" and not Path(data_path).is_dir():
        ds = data_mod.prepare_data(data_path, vocab_size=vocab_size, val_fraction=val_fraction, progress=False)
        if ds.vocab_size > vocab_size:
            raise ValueError(f"token file {data_path} declares vocab size {ds.vocab_size}, larger than the "
                             f"model's {vocab_size}.")
        return np.asarray(ds.val_tokens), tokenizer if tokenizer is not None else ds.tokenizer
    if tokenizer is None:
        raise ValueError("the model has no tokenizer, so text data cannot be tokenized; give a .bin of token ids.")
    corpus = data_mod.discover_corpus(data_path)
    _, val_docs = corpus.split(val_fraction)
    pieces = []
    for doc in val_docs:
        text = doc.read()
        if text is None:  # not UTF-8: prepare_data skips it too
            continue
        pieces.append(np.asarray(tokenizer.encode(text), dtype=np.int64))
        if doc.ends_document:
            pieces.append(np.asarray([tokenizer.eot_id], dtype=np.int64))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    if tokens.size and int(tokens.max()) >= vocab_size:
        raise ValueError(f"the tokenizer produced id {int(tokens.max())}, outside the model's vocab size {vocab_size}.")
    return tokens, tokenizer


def evaluate(engine, tokens, byte_lengths, seq_len, batch_size=8, max_batches=None):
    """Score ``tokens`` in windows of ``seq_len`` with ``engine.logits``; returns an ``EvalResult``."""
    from nanochat.data.loader import val_batches

    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size < seq_len + 1:
        raise ValueError(f"the validation split has {tokens.size} tokens, fewer than one window of "
                         f"seq_len + 1 = {seq_len + 1}; lower --seq-len or give more data.")
    total_nats, n_tokens, n_bytes, n_batches = 0.0, 0, 0, 0
    t0 = time.perf_counter()
    for batch in val_batches(tokens, batch_size, seq_len, max_batches):
        batch = np.asarray(batch, dtype=np.int64)
        logits = engine.logits(batch[:, :-1]).astype(np.float64)
        targets = batch[:, 1:]
        top = logits.max(axis=-1, keepdims=True)
        lse = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[..., 0]
        picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        total_nats += float((lse - picked).sum())
        n_tokens += targets.size
        n_bytes += int(byte_lengths[targets].sum())
        n_batches += 1
    loss = total_nats / n_tokens
    bpb = total_nats / math.log(2) / n_bytes if n_bytes else float("nan")
    return EvalResult(loss, math.exp(min(loss, 700.0)), bpb, n_tokens, n_bytes, n_batches, time.perf_counter() - t0)


def build_parser():
    p = OneLineParser(prog="python -m nanochat.eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a .gguf file or a checkpoint directory")
    p.add_argument("--data", default=None,
                   help="text file, directory or .bin (default: the model config's data path, else the stdlib)")
    p.add_argument("--max-batches", type=non_negative_int, default=0, help="stop after N batches; 0 = the whole split")
    p.add_argument("--batch-size", type=non_negative_int, default=8, help="windows per batch (8)")
    p.add_argument("--seq-len", type=non_negative_int, default=0, help="window length; 0 = the model's seq_len")
    add_backend_argument(p)
    p.add_argument("--dequantized", action="store_true", help="float32 matmuls instead of the packed kernels")
    p.add_argument("--head", choices=("float32", "int8"), default="float32", help="LM head (float32 exact, or int8)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from nanochat.infer.engine import Engine, load_model

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
        check_model_path(args.model)
        loaded = load_model(args.model)
        engine = Engine(loaded, args.backend, dequantized=args.dequantized, head=args.head)
        say_if_compiling(engine)
        cfg = engine.cfg
        data_cfg = getattr(loaded.config, "data", None)
        data_path = args.data or (data_cfg.path if data_cfg is not None and data_cfg.path else None)
        val_fraction = data_cfg.val_fraction if data_cfg is not None else 0.01
        tokens, tok = validation_tokens(data_path, engine.tokenizer, cfg.vocab_size, val_fraction)
        seq_len = args.seq_len or cfg.seq_len
        result = evaluate(engine, tokens, token_byte_lengths(tok, cfg.vocab_size), seq_len,
                          args.batch_size, args.max_batches or None)
    except ValueError as exc:
        return fail(exc)
    except OSError as exc:
        print(f"error: {getattr(exc, 'filename', None) or args.model}: {exc.strerror or exc}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(asdict(result)) if args.json else result.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
