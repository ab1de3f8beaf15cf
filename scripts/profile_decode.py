"""Where a decode step's time goes: per-op profile of the engine on a random-weight preset shape.

    .venv/bin/python scripts/profile_decode.py [--config nano_125m] [--threads 2] [--steps 40] [--head float32] [--prompt 256]

Runs ``--steps`` single-token decode steps (after a ``--prompt``-token prompt and a warm-up)
under cProfile and prints the step time without the profiler, then the time per step of each
group of kernels (their own time: the packed ternary products, the LM head, activation
quantization, the attention step, RMSNorm, SwiGLU) and the rest: the Python around them
(dispatch, checks, reshapes, small numpy ops), which is the step time the kernels do not
explain. Not a test; the numbers of docs/decode_profile.md come from it.
"""
from __future__ import annotations

import argparse
import os
import cProfile
import pstats
import time

import numpy as np

GROUPS = (  # (label, substrings of "file:function" that belong to it), first match wins
    ("fused blocks (decode_layer: norms, quantizer, packed GEMV, attention step, GLU)", ("layer.py:_layer", "packed_x86.py:gemv", "packed_x86.py:gemm", "packed_plain.py:gemm")),
    ("LM head", ("decode.py:_rows_times", "decode.py:linear_rows", "int8.py:_int8_rows", "int8.py:int8_linear")),
    ("activation quantization", ("quant.py:_quantize_acts",)),
    ("attention (RoPE, cache, float64 core)", ("decode.py:_step",)),
    ("RMSNorm", ("nn.py:_rmsnorm",)),
    ("SwiGLU", ("nn.py:_swiglu",)),
)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="nano_125m")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--head", default="float32", choices=["float32", "int8"])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens before the timed steps")
    args = p.parse_args(argv)
    import numba

    from nanochat.config import load_config
    from nanochat.infer.engine import Engine, random_model

    cfg = load_config(args.config)
    # the engine sets up spinning workers before numba's pool starts; set_num_threads starts it
    engine = Engine(random_model(cfg), "numba", head=args.head, max_len=args.prompt + 3 * args.steps + 8)
    os.environ["NANOCHAT_THREADS"] = str(args.threads)  # a fixed count: the engine's thread policy keeps it
    numba.set_num_threads(args.threads)
    seq = engine.new_sequence()
    engine.prefill(seq, list(np.random.default_rng(1).integers(0, cfg.model.vocab_size, args.prompt)))
    for _ in range(5):
        engine.decode([seq], [1])
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.decode([seq], [1])
    step = (time.perf_counter() - t0) / args.steps
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        engine.decode([seq], [1])
    prof.disable()
    stats = pstats.Stats(prof).stats
    total_prof = sum(tt for (_, _, tt, _, _) in stats.values())
    groups = {label: 0.0 for label, _ in GROUPS}
    for (file, _, fn), (_, _, tt, _, _) in stats.items():
        key = f"{file.rsplit('/', 1)[-1]}:{fn}"
        for label, needles in GROUPS:
            if any(key.startswith(n) for n in needles):
                groups[label] += tt
                break
    scale = step / (total_prof / args.steps)  # profiler overhead: report shares of the unprofiled step
    print(f"{args.config}, {args.threads} thread(s), {args.head} head: {step * 1e3:.2f} ms per decode step "
          f"({1 / step:.1f} tokens/s)")
    explained = 0.0
    for label, tt in groups.items():
        ms = tt / args.steps * scale * 1e3
        explained += ms
        print(f"  {label:38s} {ms:7.2f} ms  {ms / (step * 1e3):6.1%}")
    rest = step * 1e3 - explained
    print(f"  {'Python and small numpy ops':38s} {rest:7.2f} ms  {rest / (step * 1e3):6.1%}")


if __name__ == "__main__":
    main()
