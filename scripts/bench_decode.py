"""Decode speed of the inference engine: packed ternary kernels vs float32 dequantized weights.

    .venv/bin/python scripts/bench_decode.py [--configs tiny nano_125m] [--tokens 32] [--backend numba]

For each preset, a model with random weights (trits uniform over {-1, 0, +1}, fp16-exact
scales; no training needed: speed does not depend on the values) runs twice on the same
backend: with the packed kernels (``packed_gemv`` per decode step) and with
``dequantized=True`` (float32 matmuls with ``W = q * s``). Reported: decode tokens/s (one
token per forward, KV cache on, greedy sampling included) after a prompt of ``--prompt``
tokens, the prefill rate of that prompt, and the weight bytes each path streams per token.
Not a test; numbers vary +-20% between runs on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from nanochat.bench import cpu_name as _report_cpu_name

from nanochat.config import count_parameters, load_config
from nanochat.infer.engine import Engine, random_model


def cpu_name():
    return _report_cpu_name() or "unknown CPU"


def decode_rate(engine, prompt, n_tokens, repeats):
    """(median decode tokens/s, prefill tokens/s) over ``repeats`` runs."""
    rates, prefill = [], []
    for _ in range(repeats):
        seq = engine.new_sequence()
        t0 = time.perf_counter()
        logits = engine.prefill(seq, prompt)  # the last position's logits (what generation needs)
        t1 = time.perf_counter()
        for _ in range(n_tokens):
            logits = engine.decode([seq], [int(np.argmax(logits))])[0]
        t2 = time.perf_counter()
        prefill.append(len(prompt) / (t1 - t0))
        rates.append(n_tokens / (t2 - t1))
    return statistics.median(rates), statistics.median(prefill)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "nano_125m"])
    p.add_argument("--tokens", type=int, default=32, help="decode steps per run")
    p.add_argument("--prompt", type=int, default=16, help="prompt length")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="numba")
    p.add_argument("--threads", type=int, default=0, help="numba threads (0: numba's default)")
    args = p.parse_args(argv)

    from backends import get_backend
    from backends.threads import inference_spin

    inference_spin()  # as the engine does, before numba's pool starts (set_num_threads starts it)
    be = get_backend(args.backend)
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical cores; backend {be.name} ({be.description})")
    try:
        import numba

        if args.threads:
            os.environ["NANOCHAT_THREADS"] = str(args.threads)  # fixed: the engine's thread policy keeps it
            numba.set_num_threads(args.threads)
        print(f"numba threads: {numba.get_num_threads()}")
    except ImportError:
        pass
    for name in args.configs:
        cfg = load_config(name)
        n_params = count_parameters(cfg.model)["total"]
        loaded = random_model(cfg)
        n_ternary = sum(packed.shape[0] * packed.shape[1] * 4 for packed, _ in loaded.ternary.values())
        prompt = np.random.default_rng(1).integers(0, cfg.model.vocab_size, args.prompt)
        print(f"\n{name}: {n_params / 1e6:.1f}M parameters ({n_ternary / 1e6:.1f}M ternary), "
              f"dim {cfg.model.dim}, {cfg.model.n_layers} layers, vocab {cfg.model.vocab_size}, "
              f"group {cfg.model.group_size}")
        results = {}
        for label, dequantized, head in (("packed", False, "float32"), ("packed + int8 head", False, "int8"),
                                         ("float32 dequantized", True, "float32")):
            t0 = time.perf_counter()
            engine = Engine(loaded, be, dequantized=dequantized, max_len=args.prompt + args.tokens + 1, head=head)
            load_s = time.perf_counter() - t0
            decode_rate(engine, prompt[:4], 2, 1)  # compile / warm up
            rate, pre = decode_rate(engine, prompt, args.tokens, args.repeats)
            kernel = ""
            if not dequantized:
                handle = next(iter(engine.linear.matrices.values()))
                kernel = f", kernel {getattr(handle, 'kernel', type(handle).__name__)}"
            weight_mb = n_ternary * (0.25 if not dequantized else 4) / 1e6
            results[label] = rate
            print(f"  {label:20s} decode {rate:8.1f} tokens/s | prefill {pre:8.1f} tokens/s | "
                  f"ternary weights {weight_mb:7.1f} MB | load {load_s:5.1f} s{kernel}")
            del engine
        print(f"  packed / float32 decode speed: {results['packed'] / results['float32 dequantized']:.2f}x; "
              f"with the int8 head {results['packed + int8 head'] / results['float32 dequantized']:.2f}x")


if __name__ == "__main__":
    main()
