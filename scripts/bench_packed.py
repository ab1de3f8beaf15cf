"""Packed ternary GEMV/GEMM throughput of the numba backend's kernel paths, next to float32 NumPy.

    .venv/bin/python scripts/bench_packed.py                 # 1 and 2 threads, every runnable path
    .venv/bin/python scripts/bench_packed.py --threads 1 --repeats 9 --paths avx2,plain

GOPS = 2 * M * K * N / seconds (median over repeats, or the best with ``--stat best``). The float32 baselines run NumPy's BLAS on
the dequantized weights (``W @ x`` and ``X @ W.T``). Each thread count runs in a fresh process
so that both Numba and OpenBLAS start with that many threads.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from nanochat.bench import cpu_name as _report_cpu_name

REPO = Path(__file__).resolve().parents[1]
CASES = [  # (name, M, K, N)
    ("gemv 2048x2048", 2048, 2048, 1),
    ("gemv 4096x4096", 4096, 4096, 1),
    ("gemv 4096x11008", 4096, 11008, 1),
    ("gemv 11008x4096", 11008, 4096, 1),
    ("gemm N=64 4096x4096", 4096, 4096, 64),
]
GROUP_SIZE = 256


def seconds_per_call(fn, repeats, stat, min_batch_s=0.02):
    """Median seconds per call over batches that last ``min_batch_s`` each, or the best single
    call (``stat == "best"``: the least disturbed run on a shared machine)."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    batch = 1 if stat == "best" else max(1, int(min_batch_s / once))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        times.append((time.perf_counter() - t0) / batch)
    return float(np.median(times) if stat == "median" else np.min(times))


def worker(paths, repeats, stat):
    """Runs in a child process; prints one JSON line: {case: {column: GOPS}}."""
    from backends.numba_backend import packed, quant

    rng = np.random.default_rng(0)
    results = {}
    for name, m, k, n in CASES:
        q = rng.integers(-1, 2, (m, k)).astype(np.int8)
        scales = rng.uniform(0.5, 1.5, (m, k // GROUP_SIZE)).astype(np.float16).astype(np.float32)
        packed_w = quant.pack_ternary(q)
        xq = rng.integers(-127, 128, (n, k), dtype=np.int8)
        xs = rng.uniform(0.01, 0.1, n)
        ops = 2.0 * m * k * n
        row = {}
        for path in paths:
            handle = packed.prepare_packed(packed_w, scales, GROUP_SIZE, kernel=path)
            if n == 1:
                fn = lambda h=handle: packed.packed_gemv(h, xq[0], xs[0])  # noqa: E731
            else:
                fn = lambda h=handle: packed.packed_gemm(h, xq, xs)  # noqa: E731
            row[path] = ops / seconds_per_call(fn, repeats, stat) / 1e9
        w32 = (q.reshape(m, k // GROUP_SIZE, GROUP_SIZE) * scales[..., None]).reshape(m, k).astype(np.float32)
        x32 = rng.standard_normal((n, k)).astype(np.float32)
        if n == 1:
            fn = lambda: w32 @ x32[0]  # noqa: E731
        else:
            fn = lambda: x32 @ w32.T  # noqa: E731
        row["float32 numpy"] = ops / seconds_per_call(fn, repeats, stat) / 1e9
        results[name] = row
        del q, w32
    print(json.dumps(results))


def cpu_name():
    return _report_cpu_name() or "unknown CPU"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--repeats", type=int, default=7, help="timings per cell; the median is shown (default 7)")
    parser.add_argument("--stat", choices=("median", "best"), default="median", help="which timing to report (default median)")
    parser.add_argument("--paths", default="", help="comma-separated kernel paths (default: every runnable one but vnni_emulated)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from backends.numba_backend import cpu_features

    if args.paths:
        paths = [p.strip() for p in args.paths.split(",") if p.strip()]
        for p in paths:
            reason = cpu_features.unavailable_reason(p)
            if reason is not None:
                parser.error(f"kernel path {p!r} cannot run here: {reason}")
    else:
        paths = [p for p in cpu_features.runnable_paths() if p != "vnni_emulated"]
    if args.worker:
        worker(paths, args.repeats, args.stat)
        return

    try:
        threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads must be comma-separated integers, got {args.threads!r}")
    features = sorted(f for f in cpu_features.host_features() if "avx" in f or "vnni" in f)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; features: {', '.join(features) or 'none'}")
    print(f"G = {GROUP_SIZE}; GOPS = 2*M*K*N/s, {args.stat} of {args.repeats}; MxK is weights [out x in]")
    print(f"load average before the run: {', '.join(f'{v:.1f}' for v in os.getloadavg())}\n")
    columns = paths + ["float32 numpy"]
    for n_threads in threads:
        env = dict(os.environ, NUMBA_NUM_THREADS=str(n_threads), OPENBLAS_NUM_THREADS=str(n_threads), OMP_NUM_THREADS=str(n_threads))
        cmd = [sys.executable, __file__, "--worker", "--repeats", str(args.repeats), "--stat", args.stat, "--paths", ",".join(paths)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"benchmark worker with {n_threads} thread(s) failed:\n{done.stderr[-3000:]}")
        results = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{n_threads} thread(s)")
        header = f"{'case':<22}" + "".join(f"{c:>15}" for c in columns) + f"{'best/f32':>10}"
        print(header)
        print("-" * len(header))
        for name, row in results.items():
            best = max(row[p] for p in paths)
            print(f"{name:<22}" + "".join(f"{row[c]:>15.1f}" for c in columns) + f"{best / row['float32 numpy']:>9.2f}x")
        print()


if __name__ == "__main__":
    main()
