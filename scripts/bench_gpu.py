"""GPU benchmarks for scripts/gpu_check.sh: ternary GEMM/GEMV vs cuBLAS, ternary_linear, training steps.

Times are medians of CUDA-event-timed repeats. Every section is independent: a failure is
recorded in the JSON and the next section runs.

    python scripts/bench_gpu.py --out bench_gpu.json          # on a GPU, the issue's shapes
    python scripts/bench_gpu.py --emulated --small             # the same code on the CPU emulator
                                                               # (checks the script, times nothing)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# name -> shapes at full size (the issue's) and small (for the emulated dry run)
SHAPES = {
    "gemm": {"full": (8192, 4096, 4096, 256), "small": (40, 128, 256, 64)},  # n, m, k, g
    "gemv": {"full": (8192, 8192, 256), "small": (96, 512, 128)},  # m, k, g
    "linear": {"full": (8192, 4096, 4096), "small": (40, 256, 128)},  # n, k, m
    "attention": {"full": (16, 1024, 12, 64), "small": (1, 40, 2, 16)},  # b, t, heads, head_dim
}


class Timer:
    """Median seconds of ``fn``: CUDA events on a GPU, wall clock elsewhere."""

    def __init__(self, be):
        self.be = be
        self.cuda = be.name == "cupy"

    def __call__(self, fn, repeats=20, warmup=3):
        if not self.cuda:
            repeats, warmup = min(repeats, 2), 1
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                import cupy as cp

                start, end = cp.cuda.Event(), cp.cuda.Event()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return float(np.median(times))


def rel_err(xp, got, want):
    return float(xp.linalg.norm(got - want) / xp.linalg.norm(want))


def bench_gemm(ctx, results):
    be, xp, ops = ctx.be, ctx.be.xp, ctx.ops
    n, m, k, g = SHAPES["gemm"][ctx.size]
    rng = np.random.default_rng(0)
    xq = xp.asarray(rng.integers(-127, 128, size=(n, k), dtype=np.int8))
    xs = xp.asarray(rng.random(n, dtype=np.float32))
    q = rng.integers(-1, 2, size=(m, k)).astype(np.int8)
    handle = be.prepare_packed(be.pack_ternary(xp.asarray(q)), xp.asarray(rng.random((m, k // g), dtype=np.float32)), g)
    # Exactness at full size: the tensor-core result on 256 tokens against cuBLAS in float64.
    rows = min(n, 256)
    y = be.packed_gemm(handle, xq[:rows], xs[:rows])
    want = ops._grouped_gemm_fallback(xq[:rows], xs[:rows], handle.int8, handle.scales, g)
    t_mma = ctx.time(lambda: be.packed_gemm(handle, xq, xs))
    saved, ops.MMA_MIN_TOKENS = ops.MMA_MIN_TOKENS, n + 1  # the dp4a kernel on the same shape
    try:
        t_dp4a = ctx.time(lambda: be.packed_gemm(handle, xq, xs), repeats=5)
    finally:
        ops.MMA_MIN_TOKENS = saved
    a16 = xp.asarray(rng.standard_normal((n, k)), dtype=xp.float16)
    b16 = xp.asarray(rng.standard_normal((k, m)), dtype=xp.float16)
    t_fp16 = ctx.time(lambda: a16 @ b16)
    count = 2.0 * n * m * k
    results[f"gemm_{n}x{m}x{k}_g{g}"] = {
        "mma_int8_tops": count / t_mma / 1e12, "dp4a_int8_tops": count / t_dp4a / 1e12,
        "cublas_fp16_tops": count / t_fp16 / 1e12, "ratio_mma_vs_fp16": t_fp16 / t_mma,
        "kernel": ops.gemm_kernel_for(n, g), f"rel_err_vs_float64_{rows}_tokens": rel_err(xp, y, want),
    }


def bench_gemv(ctx, results):
    be, xp = ctx.be, ctx.be.xp
    m, k, g = SHAPES["gemv"][ctx.size]
    rng = np.random.default_rng(1)
    q = rng.integers(-1, 2, size=(m, k)).astype(np.int8)
    packed = be.pack_ternary(xp.asarray(q))
    scales = xp.asarray(rng.random((m, k // g), dtype=np.float32))
    handle = be.prepare_packed(packed, scales, g)
    xq = xp.asarray(rng.integers(-127, 128, size=k, dtype=np.int8))
    xs = xp.full((1,), 0.01, dtype=xp.float32)  # on the device, as the engine passes it
    got = be.packed_gemv(handle, xq, xs)
    want = ctx.ops._grouped_gemm_fallback(xq[None, :], xs, handle.int8, handle.scales, g)[0]  # cuBLAS, float64
    t = ctx.time(lambda: be.packed_gemv(handle, xq, xs), repeats=50)
    src = xp.zeros((256 << 20) if ctx.size == "full" else (1 << 20), dtype=xp.uint8)
    dst = xp.empty_like(src)
    t_copy = ctx.time(lambda: xp.copyto(dst, src))
    copy_bw = 2 * src.nbytes / t_copy
    moved = packed.nbytes + scales.nbytes + k
    results[f"gemv_{m}x{k}_g{g}"] = {
        "seconds": t, "gops": 2.0 * m * k / t / 1e9, "achieved_gb_s": moved / t / 1e9,
        "copy_gb_s": copy_bw / 1e9, "fraction_of_copy_bandwidth": moved / t / copy_bw,
        "rel_err_vs_float64": rel_err(xp, got, want),
    }


def bench_ternary_linear(ctx, results):
    from reference.autograd import Tensor

    be, xp = ctx.be, ctx.be.xp
    n, k, m = SHAPES["linear"][ctx.size]
    rng = np.random.default_rng(2)
    x = Tensor(xp.asarray(rng.standard_normal((n, k)), dtype=xp.float32), requires_grad=True)
    w = Tensor(xp.asarray(rng.standard_normal((m, k)) * 0.02, dtype=xp.float32), requires_grad=True)
    gy = xp.ones((n, m), dtype=xp.float32)

    def fwd_bwd():
        x.grad = w.grad = None
        be.ternary_linear(x, w, 256 if k % 256 == 0 else 64).backward(gy)

    a16 = xp.asarray(rng.standard_normal((n, k)), dtype=xp.float16)
    w16 = xp.asarray(rng.standard_normal((m, k)), dtype=xp.float16)
    g16 = xp.ones((n, m), dtype=xp.float16)

    def fp16_fwd_bwd():
        a16 @ w16.T
        g16 @ w16
        g16.T @ a16

    t_tern, t_fp16 = ctx.time(fwd_bwd, repeats=10), ctx.time(fp16_fwd_bwd, repeats=10)
    results[f"ternary_linear_fwd_bwd_{n}x{k}x{m}"] = {
        "ternary_seconds": t_tern, "cublas_fp16_3gemm_seconds": t_fp16, "ratio_fp16_vs_ternary": t_fp16 / t_tern,
    }


def bench_attention(ctx, results):
    """The backend's attention (no score matrix) against the reference on the same arrays
    (cuBLAS products, probabilities kept for the backward), forward + backward, causal."""
    from reference import nn as ref_nn
    from reference.autograd import Tensor

    be, xp = ctx.be, ctx.be.xp
    b, t, h, hd = SHAPES["attention"][ctx.size]
    rng = np.random.default_rng(4)
    arrays = [xp.asarray(rng.standard_normal((b, t, h, hd)), dtype=xp.float32) for _ in range(3)]
    gy = xp.asarray(rng.standard_normal((b, t, h, hd)), dtype=xp.float32)

    def run(op):
        tensors = [Tensor(a, requires_grad=True) for a in arrays]
        op(*tensors, causal=True).backward(gy)
        return tensors

    got, want = run(be.attention), run(ref_nn.attention)
    err = max(rel_err(xp, g.grad, w.grad) for g, w in zip(got, want))
    t_kernel, t_ref = ctx.time(lambda: run(be.attention), repeats=5), ctx.time(lambda: run(ref_nn.attention), repeats=5)
    results[f"attention_fwd_bwd_b{b}_t{t}_h{h}_d{hd}"] = {
        "kernel_seconds": t_kernel, "reference_seconds": t_ref, "speedup_vs_reference": t_ref / t_kernel,
        "reference_probability_bytes": 4 * b * h * t * t, "max_rel_err_of_gradients": err,
    }


def bench_training(ctx, results, preset, steps=5):
    from nanochat.config import load_config
    from nanochat.data.loader import BatchLoader
    from nanochat.train.trainer import Trainer

    overrides = ["train.backend=cupy", "train.async_loader=false", "train.tensorboard=false"]
    if ctx.size == "small":  # the dry run: the preset's code paths at a toy size
        overrides += ["model.dim=64", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=2",
                      "model.ffn_hidden=128", "model.group_size=64", "model.seq_len=32", "model.vocab_size=300",
                      "train.batch_size=2"]
        steps = 1
    cfg = load_config(preset, overrides)
    rng = np.random.default_rng(3)
    toks = rng.integers(0, cfg.model.vocab_size, size=200_000).astype(np.uint16)
    data = SimpleNamespace(train_tokens=toks, val_tokens=toks[:100_000], vocab_size=cfg.model.vocab_size,
                           tokenizer=None, tokenizer_path=None)
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, out_dir=d, progress=False, data=data)
        loader = BatchLoader(toks, cfg.train.batch_size, cfg.model.seq_len, 0)
        tr.train_step(loader)
        ctx.be.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step(loader)
        ctx.be.synchronize()
        dt = (time.perf_counter() - t0) / steps
    tokens = cfg.train.batch_size * cfg.model.seq_len * cfg.train.grad_accum
    results[f"train_step_{preset}"] = {"seconds_per_step": dt, "tokens_per_sec": tokens / dt,
                                       "tokens_per_step": tokens, "backend": tr.be.name}


SECTIONS = (
    ("gemm", bench_gemm), ("gemv", bench_gemv), ("ternary_linear", bench_ternary_linear), ("attention", bench_attention),
    ("train_tiny", lambda c, r: bench_training(c, r, "tiny")),
    ("train_nano_125m", lambda c, r: bench_training(c, r, "nano_125m", steps=3)),
)


def cupy_context(size):
    import backends
    import cupy as cp
    from backends.cupy_backend import ops

    be = backends.get_backend("cupy")
    return SimpleNamespace(be=be, ops=ops, size=size, time=Timer(be),
                           device=cp.cuda.runtime.getDeviceProperties(0)["name"].decode())


def emulated_context(size):
    """The cupy backend's code on the CPU emulator, registered as "cupy" for the trainer."""
    import backends
    from backends.cupy_backend import emulator as cuda_emulator

    be = cuda_emulator.emulated_cupy_backend()
    backends.register("cupy", lambda: be)
    return SimpleNamespace(be=be, ops=cuda_emulator.emulated_ops(), size=size, time=Timer(be),
                           device="CPU emulator (no timings)")


# The performance targets (H100/H200, CUDA-event medians).
TARGETS = {
    "gemm": ("ratio_mma_vs_fp16", 1.0, "int8 x ternary GEMM >= 1.0x cuBLAS FP16 throughput"),
    "gemv": ("fraction_of_copy_bandwidth", 0.70, "packed GEMV >= 70% of the copy bandwidth"),
}


def verdicts(results):
    """PASS/FAIL per performance target, from whatever sections ran."""
    out = {}
    for prefix, (key, target, what) in TARGETS.items():
        found = [v[key] for k, v in results.items() if k.startswith(prefix + "_") and isinstance(v, dict) and key in v]
        out[what] = "not measured" if not found else f"{'PASS' if found[0] >= target else 'FAIL'} ({found[0]:.3f})"
    return out


def run(ctx, sections=SECTIONS):
    results = {"date": time.strftime("%Y-%m-%d"), "host": platform.node(), "device": ctx.device, "size": ctx.size}
    for name, fn in sections:
        try:
            fn(ctx, results)
        except Exception:
            results[f"{name}_error"] = traceback.format_exc(limit=3)
        print(json.dumps({k: v for k, v in results.items() if k.startswith(name.split("_")[0])}, indent=1), flush=True)
    if ctx.size == "full":
        results["targets"] = verdicts(results)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_gpu.json")
    p.add_argument("--small", action="store_true", help="toy shapes (a dry run of the script)")
    p.add_argument("--emulated", action="store_true", help="run the cupy backend's kernels on the CPU emulator")
    args = p.parse_args(argv)
    size = "small" if args.small else "full"
    try:
        ctx = emulated_context(size) if args.emulated else cupy_context(size)
    except (ImportError, ValueError) as exc:  # no cupy, or no usable GPU
        print(f"error: {exc} (use --emulated --small for a dry run on the CPU)", file=sys.stderr)
        return 2
    results = run(ctx)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1)
    print(json.dumps(results, indent=1))
    return 1 if any(k.endswith("_error") for k in results) else 0


if __name__ == "__main__":
    sys.exit(main())
