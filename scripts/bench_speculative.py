"""Self-speculative decoding with the MTP heads vs plain greedy decoding, on a trained model.

    .venv/bin/python scripts/bench_speculative.py --model RUN_DIR|model.gguf [--k 1 2 3] [--tokens 96]
        [--prompts 4] [--rounds 3] [--head float32]

The model must have been trained with ``model.mtp_n_tokens >= max(k)``. Prompts are the first
lines of files of the Python standard library (the default training corpus), tokenized with the
model's tokenizer. Per round, every prompt is decoded greedily with plain decoding and with each
k, alternating; reported: tokens/s (median over rounds, all prompts together), the speed-up over
plain decoding, the acceptance rate of the drafts, and whether every speculative output equals
the plain greedy one token for token. Not a test.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
from pathlib import Path


def prompts_from_stdlib(n):
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        head = "\n".join(text.splitlines()[:12])
        if len(head) > 80:
            out.append(head)
        if len(out) == n:
            break
    return out


def run(engine, ids, tokens, k):
    engine.reset()
    t0 = time.perf_counter()
    out = list(engine.generate_ids(ids, tokens, speculative=k, params=_greedy()))
    stats = engine.last_stats
    return out, stats.decode_seconds, stats.accepted, stats.drafted, time.perf_counter() - t0


def _greedy():
    from nanochat.infer.sampling import SamplingParams

    return SamplingParams(temperature=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--head", default="float32", choices=["float32", "int8"])
    p.add_argument("--backend", default="numba")
    args = p.parse_args(argv)
    from nanochat.infer.engine import Engine

    engine = Engine.from_path(args.model, args.backend, head=args.head)
    if engine.mtp_heads < max(args.k):
        print(f"error: {args.model} has {engine.mtp_heads} MTP heads; --k needs {max(args.k)}", file=sys.stderr)
        return 2
    tok = engine.require_tokenizer()
    prompts = [tok.encode(text) for text in prompts_from_stdlib(args.prompts)]
    modes = [0] + list(args.k)
    seconds = {k: [] for k in modes}
    accepted = {k: 0 for k in modes}
    drafted = {k: 0 for k in modes}
    same = {k: True for k in modes}
    run(engine, prompts[0], 4, 0)  # warm up (kernel compilation)
    for _ in range(args.rounds):
        outputs = {}
        for k in modes:
            total = 0.0
            for i, ids in enumerate(prompts):
                out, dec, acc, dr, _ = run(engine, ids, args.tokens, k)
                total += dec
                accepted[k] += acc
                drafted[k] += dr
                if k == 0:
                    outputs[i] = out
                elif out != outputs[i]:
                    same[k] = False
            seconds[k].append(total)
    n_tokens = args.tokens * len(prompts)
    base = n_tokens / statistics.median(seconds[0])
    print(f"{args.model}: {len(prompts)} prompts x {args.tokens} greedy tokens, {args.rounds} rounds, "
          f"{args.head} head, backend {engine.be.name}")
    print(f"  plain          {base:7.1f} tokens/s")
    for k in args.k:
        rate = n_tokens / statistics.median(seconds[k])
        print(f"  speculative k={k} {rate:7.1f} tokens/s  {rate / base:5.2f}x  acceptance "
              f"{accepted[k] / max(drafted[k], 1):5.1%}  output {'identical' if same[k] else 'DIFFERS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
