"""Benchmark (not a test): the step's collectives alone on this machine's loopback.

    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/distributed/comm_micro.py

Times ``DataParallel``'s pattern on a flat float32 buffer: every 4 MiB bucket reduced onto its
owner (``Ireduce``) and broadcast back (``Ibcast``), owners alternating; prints the median over
repeats for a few sizes (4.5M parameters is the ``tiny`` preset) and the implied bus bandwidth.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from nanochat.train.distributed import DEFAULT_BUCKET_BYTES, MPICommunicator


def main():
    comm = MPICommunicator()
    per = DEFAULT_BUCKET_BYTES // 4
    for n in (1 << 18, 1 << 20, 4_500_000, 16 << 20):
        buf = np.ones(n, dtype=np.float32)
        buckets = [(s, min(s + per, n), (s // per) % comm.size) for s in range(0, n, per)]
        times = []
        for _ in range(7):
            comm.barrier()
            t0 = time.perf_counter()
            comm.wait_all([comm.reduce(buf[a:b], r) for a, b, r in buckets])
            comm.wait_all([comm.bcast(buf[a:b], r) for a, b, r in buckets])
            times.append(time.perf_counter() - t0)
        t = statistics.median(times[1:])
        if comm.is_main:
            print(f"{comm.size} ranks, {n * 4 / 2**20:7.1f} MiB gradients + weights: {t * 1e3:8.2f} ms "
                  f"(reduce + broadcast, {2 * n * 4 / t / 1e9:.2f} GB/s of buffer per rank)", flush=True)


if __name__ == "__main__":
    main()
