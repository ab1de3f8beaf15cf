"""GPU benchmarks for scripts/gpu_check.sh: ternary GEMM/GEMV vs cuBLAS, ternary_linear, training steps.

Times are medians of CUDA-event-timed repeats. Every section is independent: a failure is
recorded in the JSON and the next section runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
import traceback

import numpy as np


def cuda_time(fn, repeats=20, warmup=3):
    import cupy as cp

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
    return float(np.median(times))


def bench_gemm(be, results):
    import cupy as cp

    from backends.cupy_backend import ops

    rng = np.random.default_rng(0)
    n, m, k, g = 8192, 4096, 4096, 256
    xq = cp.asarray(rng.integers(-127, 128, size=(n, k), dtype=np.int8))
    xs = cp.asarray(rng.random(n, dtype=np.float32))
    q = rng.integers(-1, 2, size=(m, k)).astype(np.int8)
    handle = be.prepare_packed(be.pack_ternary(cp.asarray(q)), cp.asarray(rng.random((m, k // g), dtype=np.float32)), g)
    # Exactness at full size: the tensor-core result on 256 tokens against cuBLAS in float64.
    y = be.packed_gemm(handle, xq[:256], xs[:256])
    want = ops._grouped_gemm_fallback(xq[:256], xs[:256], handle.int8, handle.scales, g)
    rel = float(cp.linalg.norm(y - want) / cp.linalg.norm(want))
    t_mma = cuda_time(lambda: be.packed_gemm(handle, xq, xs))
    saved, ops.MMA_MIN_TOKENS = ops.MMA_MIN_TOKENS, n + 1  # the dp4a kernel on the same shape
    try:
        t_dp4a = cuda_time(lambda: be.packed_gemm(handle, xq, xs), repeats=5)
    finally:
        ops.MMA_MIN_TOKENS = saved
    a16 = cp.asarray(rng.standard_normal((n, k)), dtype=cp.float16)
    b16 = cp.asarray(rng.standard_normal((k, m)), dtype=cp.float16)
    t_fp16 = cuda_time(lambda: a16 @ b16)
    ops_count = 2.0 * n * m * k
    results["gemm_8192x4096x4096"] = {
        "mma_int8_tops": ops_count / t_mma / 1e12, "dp4a_int8_tops": ops_count / t_dp4a / 1e12,
        "cublas_fp16_tops": ops_count / t_fp16 / 1e12, "ratio_mma_vs_fp16": t_fp16 / t_mma,
        "rel_err_vs_float64_256_tokens": rel,
    }


def bench_gemv(be, results):
    import cupy as cp

    rng = np.random.default_rng(1)
    m = k = 8192
    g = 256
    q = rng.integers(-1, 2, size=(m, k)).astype(np.int8)
    packed = be.pack_ternary(cp.asarray(q))
    scales = cp.asarray(rng.random((m, k // g), dtype=np.float32))
    handle = be.prepare_packed(packed, scales, g)
    xq = cp.asarray(rng.integers(-127, 128, size=k, dtype=np.int8))
    xs = cp.full((1,), 0.01, dtype=cp.float32)  # on the device, as the engine passes it
    t = cuda_time(lambda: be.packed_gemv(handle, xq, xs), repeats=50)
    src = cp.zeros(256 << 20, dtype=cp.uint8)
    dst = cp.empty_like(src)
    t_copy = cuda_time(lambda: cp.copyto(dst, src))
    copy_bw = 2 * src.nbytes / t_copy
    bytes_moved = packed.nbytes + scales.nbytes + k
    results["gemv_8192x8192"] = {
        "seconds": t, "gops": 2.0 * m * k / t / 1e9, "achieved_gb_s": bytes_moved / t / 1e9,
        "copy_gb_s": copy_bw / 1e9, "fraction_of_copy_bandwidth": bytes_moved / t / copy_bw,
    }


def bench_ternary_linear(be, results):
    import cupy as cp

    from reference.autograd import Tensor

    rng = np.random.default_rng(2)
    n, k, m = 8192, 4096, 4096
    x = Tensor(cp.asarray(rng.standard_normal((n, k)), dtype=cp.float32), requires_grad=True)
    w = Tensor(cp.asarray(rng.standard_normal((m, k)) * 0.02, dtype=cp.float32), requires_grad=True)
    gy = cp.ones((n, m), dtype=cp.float32)

    def fwd_bwd():
        x.grad = w.grad = None
        be.ternary_linear(x, w, 256).backward(gy)

    a16 = cp.asarray(rng.standard_normal((n, k)), dtype=cp.float16)
    w16 = cp.asarray(rng.standard_normal((m, k)), dtype=cp.float16)
    g16 = cp.ones((n, m), dtype=cp.float16)

    def fp16_fwd_bwd():
        a16 @ w16.T
        g16 @ w16
        g16.T @ a16

    results["ternary_linear_fwd_bwd_8192x4096x4096"] = {
        "ternary_seconds": cuda_time(fwd_bwd, repeats=10), "cublas_fp16_3gemm_seconds": cuda_time(fp16_fwd_bwd, repeats=10),
    }


def bench_training(be, results, preset, steps=5, seq_len=None, batch=None):
    from types import SimpleNamespace

    from nanochat.config import load_config
    from nanochat.loader import BatchLoader
    from nanochat.train import Trainer

    overrides = ["train.backend=cupy", "train.async_loader=false", "train.tensorboard=false"]
    cfg = load_config(preset, overrides)
    rng = np.random.default_rng(3)
    toks = rng.integers(0, cfg.model.vocab_size, size=2_000_000).astype(np.uint16)
    data = SimpleNamespace(train_tokens=toks, val_tokens=toks[:100000], vocab_size=cfg.model.vocab_size,
                           tokenizer=None, tokenizer_path=None)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, out_dir=d, progress=False, data=data)
        loader = BatchLoader(toks, cfg.train.batch_size, cfg.model.seq_len, 0)
        tr.train_step(loader)
        be.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step(loader)
        be.synchronize()
        dt = (time.perf_counter() - t0) / steps
    tokens = cfg.train.batch_size * cfg.model.seq_len * cfg.train.grad_accum
    results[f"train_step_{preset}"] = {"seconds_per_step": dt, "tokens_per_sec": tokens / dt}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench_gpu.json")
    args = p.parse_args()
    import backends

    be = backends.get_backend("cupy")
    results = {"date": time.strftime("%Y-%m-%d"), "host": platform.node()}
    import cupy as cp

    results["device"] = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    for name, fn in (("gemm", bench_gemm), ("gemv", bench_gemv), ("ternary_linear", bench_ternary_linear),
                     ("train_tiny", lambda b, r: bench_training(b, r, "tiny")),
                     ("train_nano_125m", lambda b, r: bench_training(b, r, "nano_125m", steps=3))):
        try:
            fn(be, results)
        except Exception:
            results[f"{name}_error"] = traceback.format_exc(limit=3)
        print(json.dumps({k: v for k, v in results.items() if k.startswith(name.split("_")[0])}, indent=1), flush=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
