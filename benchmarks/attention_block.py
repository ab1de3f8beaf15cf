"""Time the numba backend's training attention, forward + backward, blocked vs whole planes.

    .venv/bin/python benchmarks/attention_block.py [--rounds 7] [--shapes tiny nano_125m]

Runs ``backends.numba_backend.nn.attention`` (causal, float32, gradients for q, k and v) at
the ``tiny`` training shape (B 8, T = S = 256, 4 heads / 4 kv heads, head_dim 64) and the
``nano_125m`` one (B 2, T = S = 1024, 12 / 12, head_dim 64), with numba on 2 threads and
BLAS on 1 (``backends.threads.ThreadPolicy``). Each round times both paths once, alternating
which goes first (``nn.ATTENTION_BLOCKED`` picks the path); prints the median and the
range of forward, backward and their sum in ms, and the peak of numpy's allocations during
one forward + backward (``tracemalloc``, a separate untimed pass; the blocked kernels' own
per-thread scratch, [block, S] floats, is not in it).
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from backends.numba_backend import nn  # noqa: E402
from backends.threads import ThreadPolicy  # noqa: E402
from reference.autograd import Tensor  # noqa: E402

SHAPES = {"tiny": (8, 256, 4, 4, 64), "nano_125m": (2, 1024, 12, 12, 64)}  # B, T, Hq, Hkv, hd
PATHS = {"whole": False, "blocked": True}  # nn.ATTENTION_BLOCKED for each path


def step(inputs, gy):
    """One forward + backward; returns (forward s, backward s)."""
    q, k, v = (Tensor(x, requires_grad=True) for x in inputs)
    t0 = time.perf_counter()
    out = nn.attention(q, k, v)
    t1 = time.perf_counter()
    out.backward(gy)
    return t1 - t0, time.perf_counter() - t1


def peak_mb(inputs, gy):
    tracemalloc.start()
    step(inputs, gy)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args()
    ThreadPolicy(threads=2, adaptive=False).apply()
    rng = np.random.default_rng(0)
    for name in args.shapes:
        b, t, hq, hkv, hd = SHAPES[name]
        inputs = [rng.standard_normal((b, t, h, hd)).astype(np.float32) for h in (hq, hkv, hkv)]
        gy = rng.standard_normal((b, t, hq, hd)).astype(np.float32)
        times = {p: [] for p in PATHS}
        for r in range(args.rounds + 1):  # round 0 warms up (compiles)
            for p in (list(PATHS) if r % 2 else list(PATHS)[::-1]):
                nn.ATTENTION_BLOCKED = PATHS[p]
                f, bw = step(inputs, gy)
                if r:
                    times[p].append((f, bw))
        for p in PATHS:
            nn.ATTENTION_BLOCKED = PATHS[p]
            mem = peak_mb(inputs, gy)
            cols = []
            for i, what in enumerate(("fwd", "bwd", "fwd+bwd")):
                ms = [1e3 * (x[i] if i < 2 else x[0] + x[1]) for x in times[p]]
                cols.append(f"{what} {median(ms):7.1f} ms ({min(ms):.1f}-{max(ms):.1f})")
            print(f"{name:9s} {p:7s}  " + "  ".join(cols) + f"  peak {mem:6.1f} MB", flush=True)


if __name__ == "__main__":
    main()
