"""Decode and prefill speed of this engine and llama.cpp on the same GGUF file, runs alternated.

    .venv/bin/python scripts/compare_llamacpp.py --model model.gguf [--threads 1 2] [--tokens 64]
        [--prompt 256] [--rounds 3] [--head float32 int8]

Needs ``llama-cpp-python`` (not a dependency: it builds llama.cpp from source, about 40 minutes
on 2 cores: ``pip install llama-cpp-python``) and a ``--arch bitnet`` export (the layout
llama.cpp reads). Per thread count and round, each side runs the same random prompt of
``--prompt`` tokens (prefill tokens/s) and then ``--tokens`` greedy decode steps (decode tokens/s),
llama.cpp and this engine alternating so that machine noise hits both. It prints the medians,
the ratios and whether both produced the same greedy tokens. Not a test; never run in CI.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def run_ours(engine, prompt, n_tokens):
    seq = engine.new_sequence()
    t0 = time.perf_counter()
    logits = engine.prefill(seq, prompt)
    t1 = time.perf_counter()
    out = []
    for _ in range(n_tokens):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = engine.decode([seq], [tok])[0]
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_tokens / (t2 - t1), out


def run_llama(llm, prompt, n_tokens):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    out = []
    for _ in range(n_tokens):
        tok = int(np.argmax(llm._scores[-1]))
        out.append(tok)
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n_tokens / (t2 - t1), out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a GGUF file written with --arch bitnet")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--head", nargs="+", default=["float32", "int8"], choices=["float32", "int8"])
    args = p.parse_args(argv)
    try:
        from llama_cpp import Llama
    except ImportError:
        print("error: llama-cpp-python is not installed (pip install llama-cpp-python; it builds llama.cpp, "
              "about 40 minutes on 2 cores)", file=sys.stderr)
        return 2
    import numba

    from nanochat.infer.engine import Engine

    engines = {head: Engine.from_path(args.model, "numba", head=head) for head in args.head}
    vocab = next(iter(engines.values())).cfg.vocab_size
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, vocab, args.prompt)]
    for threads in args.threads:
        numba.set_num_threads(threads)
        llm = Llama(model_path=args.model, n_ctx=args.prompt + args.tokens + 8, n_threads=threads,
                    n_threads_batch=threads, n_batch=args.prompt, verbose=False)
        results = {name: {"prefill": [], "decode": []} for name in ["llama.cpp"] + [f"ours ({h} head)" for h in engines]}
        tokens = {}
        run_llama(llm, prompt[:8], 2)  # warm up
        for engine in engines.values():
            run_ours(engine, prompt[:8], 2)
        for _ in range(args.rounds):
            sides = [("llama.cpp", lambda: run_llama(llm, prompt, args.tokens))]
            sides += [(f"ours ({h} head)", lambda e=e: run_ours(e, prompt, args.tokens)) for h, e in engines.items()]
            for name, fn in sides:
                pre, dec, out = fn()
                results[name]["prefill"].append(pre)
                results[name]["decode"].append(dec)
                tokens[name] = out
        base = results["llama.cpp"]
        print(f"\n{threads} thread(s), prompt {args.prompt}, {args.tokens} decode steps, {args.rounds} rounds (medians):")
        for name, r in results.items():
            pre, dec = statistics.median(r["prefill"]), statistics.median(r["decode"])
            ratio = (f"  ({dec / statistics.median(base['decode']):.2f}x / "
                     f"{pre / statistics.median(base['prefill']):.2f}x llama.cpp)") if name != "llama.cpp" else ""
            same = "" if name == "llama.cpp" else f"  greedy tokens {'equal' if tokens[name] == tokens['llama.cpp'] else 'differ'}"
            print(f"  {name:22s} decode {dec:7.1f} tok/s  prefill {pre:7.1f} tok/s{ratio}{same}")
        llm = None  # free the model before the next thread count loads it again
    return 0


if __name__ == "__main__":
    sys.exit(main())
