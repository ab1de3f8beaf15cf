"""Decode and prefill speed of this engine and llama.cpp on the same GGUF file, runs alternated.

    .venv/bin/python scripts/compare_llamacpp.py --model model.gguf [--threads 1 2] [--tokens 64]
        [--prompt 256] [--rounds 3] [--head float32 int8] [--llama-python PATH]

Needs ``llama-cpp-python`` (not a dependency: it builds llama.cpp from source, about 40 minutes
on 2 cores: ``pip install llama-cpp-python``), installed for this interpreter or for the one
given by ``--llama-python``, and a ``--arch bitnet`` export (the layout llama.cpp reads).

Each measurement is a fresh process (so the two runtimes never share a process: both use
OpenMP thread pools, and llama.cpp's would otherwise set up the one numba's kernels run on):
per thread count and round, llama.cpp and each of this engine's heads run in turn, so machine
noise hits every side. A run loads the model, warms up, then runs the same random prompt of
``--prompt`` tokens (prefill tokens/s) and ``--tokens`` greedy decode steps (decode tokens/s).
The script prints the medians, the ratios and whether the greedy tokens were the same (on a
barely trained model many logits nearly tie, so a last-bit difference may pick another token).
Not a test; never run in CI.
"""
from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import time

import numpy as np


def prompt_ids(vocab, n):
    return [int(t) for t in np.random.default_rng(0).integers(0, vocab, n)]


def run_ours(model, head, threads, n_prompt, n_tokens):
    import numba

    from nanochat.infer.engine import Engine

    engine = Engine.from_path(model, "numba", head=head)
    os.environ["NANOCHAT_THREADS"] = str(threads)  # a fixed count: the engine's thread policy keeps it
    numba.set_num_threads(threads)
    prompt = prompt_ids(engine.cfg.vocab_size, n_prompt)

    def once(ids, steps):
        seq = engine.new_sequence()
        t0 = time.perf_counter()
        logits = engine.prefill(seq, ids)
        t1 = time.perf_counter()
        out = []
        for _ in range(steps):
            tok = int(np.argmax(logits))
            out.append(tok)
            logits = engine.decode([seq], [tok])[0]
        return len(ids) / (t1 - t0), steps / (time.perf_counter() - t1), out

    once(prompt[:8], 2)  # warm up
    return once(prompt, n_tokens)


def run_llama(model, threads, n_prompt, n_tokens):
    from llama_cpp import Llama

    llm = Llama(model_path=model, n_ctx=n_prompt + n_tokens + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=n_prompt, verbose=False)
    prompt = prompt_ids(llm.n_vocab(), n_prompt)

    def once(ids, steps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        out = []
        for _ in range(steps):
            tok = int(np.argmax(llm._scores[-1]))
            out.append(tok)
            llm.eval([tok])
        return len(ids) / (t1 - t0), steps / (time.perf_counter() - t1), out

    once(prompt[:8], 2)
    return once(prompt, n_tokens)


def measure(args, side, threads):
    """One fresh process for one run of ``side`` ("llama.cpp" or a head name)."""
    python = args.llama_python if side == "llama.cpp" and args.llama_python else sys.executable
    cmd = [python, __file__, "--model", args.model, "--prompt", str(args.prompt), "--tokens", str(args.tokens),
           "--run", side, "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        sys.exit(f"error: the {side} run failed:\n{res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a GGUF file written with --arch bitnet")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--head", nargs="+", default=["float32", "int8"], choices=["float32", "int8"])
    p.add_argument("--llama-python", default=None, help="a Python interpreter that has llama-cpp-python (default: this one)")
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = p.parse_args(argv)
    if args.run is not None:
        threads = args.threads[0]
        if args.run == "llama.cpp":
            pre, dec, out = run_llama(args.model, threads, args.prompt, args.tokens)
        else:
            pre, dec, out = run_ours(args.model, args.run, threads, args.prompt, args.tokens)
        print(json.dumps({"prefill": pre, "decode": dec, "tokens": out}))
        return 0
    check = [args.llama_python or sys.executable, "-c", "import llama_cpp"]
    if subprocess.run(check, capture_output=True).returncode != 0:
        print("error: llama-cpp-python is not installed for that interpreter (pip install llama-cpp-python; it builds "
              "llama.cpp, about 40 minutes on 2 cores; or pass --llama-python)", file=sys.stderr)
        return 2
    sides = ["llama.cpp"] + list(args.head)
    for threads in args.threads:
        results = {side: {"prefill": [], "decode": []} for side in sides}
        tokens = {}
        for _ in range(args.rounds):
            for side in sides:
                r = measure(args, side, threads)
                results[side]["prefill"].append(r["prefill"])
                results[side]["decode"].append(r["decode"])
                tokens[side] = r["tokens"]
        base = results["llama.cpp"]
        print(f"\n{threads} thread(s), prompt {args.prompt}, {args.tokens} decode steps, {args.rounds} rounds (medians):")
        for side, r in results.items():
            pre, dec = statistics.median(r["prefill"]), statistics.median(r["decode"])
            name = side if side == "llama.cpp" else f"ours ({side} head)"
            ratio = (f"  ({dec / statistics.median(base['decode']):.2f}x / "
                     f"{pre / statistics.median(base['prefill']):.2f}x llama.cpp)") if side != "llama.cpp" else ""
            same = "" if side == "llama.cpp" else f"  greedy tokens {'equal' if tokens[side] == tokens['llama.cpp'] else 'differ'}"
            print(f"  {name:22s} decode {dec:7.1f} tok/s  prefill {pre:7.1f} tok/s{ratio}{same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
