"""Float matrix products on numba's threads, with BLAS itself on one thread.

Training alternates numba kernels (numba's OpenMP pool) with float BLAS products (the LM head,
the STE backward, attention, Newton-Schulz). With both pools at two threads on the 2-core
machine, OpenBLAS's idle workers spin after each product while numba's workers want the same
cores, and the reverse: measured 2026-12-08 on the 2-core AMD EPYC (``tiny`` peer shape,
``benchmarks/peer/project_step.py``), numba 2 + BLAS 2 threads ran 1,620-1,680 tokens/s, numba
1 + BLAS 1 2,160-2,210 and numba 2 + BLAS 1 2,400-2,420.

So BLAS runs one thread (``backends.threads``) and ``matmul`` splits a large product into row
(or column, or batch) blocks, one per numba thread, each a single-thread call of numpy's own
``cblas_?gemm`` made from a numba ``prange`` loop: the same worker threads that run the numba
kernels run the blocks, and nothing else is left spinning. (A pool of Python threads for the
blocks measured worse: a product right after a numba kernel took 12 ms instead of 8.5, the
helper thread landing on the busy core.) Each row, column or batch block is the whole
product's BLAS kernel over the same K order, so the result is bit-identical to one
``np.matmul`` on the same library (tested at the training shapes). The split syrk (two
diagonal syrks and one gemm) matched numpy's syrk bit for bit on the machines measured; that
rests on OpenBLAS blocking K alike in its two drivers, so the tests ask float32 agreement.

Where numpy's BLAS is not an OpenBLAS with the ``cblas_?gemm64_`` symbols (another BLAS, an
unusual build), ``AVAILABLE`` is False, every product is ``np.matmul`` and the thread policy
gives BLAS its own threads back.
"""
from __future__ import annotations

import ctypes
import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# Below this many multiply-adds a product runs whole in the calling thread (one parallel
# region costs a few microseconds to start; 64 x 256 x 256 takes about 0.09 ms on one core).
PARALLEL_MIN_MACS = 1 << 22
# Row/column blocks start at multiples of this (the sgemm kernels' register tiles).
ALIGN = 32

_ROW_MAJOR, _NO_TRANS, _TRANS, _UPPER = 101, 111, 112, 121
_LP = ctypes.c_int64  # blasint of the 64_ symbols
_ADDR = ctypes.c_uint64  # pointers travel as 64-bit integers (LP64 ABI: same registers)


def _find_cblas():
    """numpy's OpenBLAS ``cblas_?gemm`` and ``cblas_?syrk`` (64-bit-int interface) as ctypes
    functions, ``{"s": (gemm, syrk), "d": (gemm, syrk)}``, or None."""
    try:
        from threadpoolctl import threadpool_info

        numpy_dir = os.path.dirname(os.path.dirname(np.__file__))
        paths = [i["filepath"] for i in threadpool_info()
                 if i.get("internal_api") == "openblas" and os.path.basename(os.path.dirname(i["filepath"])).startswith("numpy")
                 and i["filepath"].startswith(numpy_dir)]
        if not paths:
            return None
        lib = ctypes.CDLL(paths[0])
        found = {}
        for kind in ("s", "d"):
            real = ctypes.c_float if kind == "s" else ctypes.c_double
            for prefix in ("scipy_cblas_", "cblas_"):
                gemm_name, syrk_name = f"{prefix}{kind}gemm64_", f"{prefix}{kind}syrk64_"
                if hasattr(lib, gemm_name) and hasattr(lib, syrk_name):
                    gemm = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, _LP, _LP, _LP, real,
                                            _ADDR, _LP, _ADDR, _LP, real, _ADDR, _LP)
                    syrk = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, _LP, _LP, real,
                                            _ADDR, _LP, real, _ADDR, _LP)
                    found[kind] = (gemm(ctypes.cast(getattr(lib, gemm_name), ctypes.c_void_p).value),
                                   syrk(ctypes.cast(getattr(lib, syrk_name), ctypes.c_void_p).value))
                    break
        return found if len(found) == 2 else None
    except Exception:  # no threadpoolctl, no OpenBLAS, an unloadable library: np.matmul only
        return None


_CBLAS = _find_cblas()
AVAILABLE = _CBLAS is not None
# The address of cblas_sgemm, for ``sgemm`` below (0 when not AVAILABLE).
SGEMM = ctypes.cast(_CBLAS["s"][0], ctypes.c_void_p).value if AVAILABLE else 0


@intrinsic
def sgemm(typingctx, fn, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """``C = alpha op(A) op(B) + beta C`` (row-major float32) from a numba kernel: a call of
    the cblas_sgemm at address ``fn`` (``SGEMM``), with A, B, C given as byte addresses.

    The address is an argument, not a constant compiled in (as in ``_kernels``), so kernels
    that call this can be cached on disk. Integer arguments are int64, trans_a/trans_b the
    CBLAS codes (111 no transpose, 112 transpose), alpha/beta float32."""
    u64, i64, f32 = types.uint64, types.int64, types.float32
    sig = types.void(u64, i64, i64, i64, i64, i64, f32, u64, i64, u64, i64, f32, u64, i64)

    def codegen(context, builder, signature, args):
        i32, l64, ptr = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, l64, l64, l64, ir.FloatType(), ptr, l64,
                                               ptr, l64, ir.FloatType(), ptr, l64])
        f, ta, tb, m_, n_, k_, al, a_, lda_, b_, ldb_, be, c_, ldc_ = args
        builder.call(builder.inttoptr(f, fnty.as_pointer()),
                     [ir.Constant(i32, _ROW_MAJOR), builder.trunc(ta, i32), builder.trunc(tb, i32), m_, n_, k_, al,
                      builder.inttoptr(a_, ptr), lda_, builder.inttoptr(b_, ptr), ldb_, be, builder.inttoptr(c_, ptr), ldc_])
        return context.get_dummy_value()

    return sig, codegen


def _kernels(real, gemm, syrk):
    """The two block kernels for one float type (``real``) over its cblas ``gemm``/``syrk``.
    Not cached on disk: the function addresses are this process's.

    ``blocks(ints, ptrs)``: block i is ``ints[i]`` = (transA, transB, M, N, K, lda, ldb, ldc),
    ``ptrs[i]`` = byte addresses of (A, B, C).

    ``gram(ints, ptrs, c)``: ``x x^T`` (or ``x^T x``) as numpy computes it (syrk into the upper
    triangle, then the lower one copied from it), in two halves: one thread runs the syrk of
    both diagonal blocks, the other the gemm of the off-diagonal block (the same flops each),
    then the mirror. ``ints`` = (trans, h, n, k, lda, ldc, gemm transA, gemm transB),
    ``ptrs`` = (rows 0.. of op(x), rows h.. of op(x), C)."""
    one, zero, item = real(1.0), real(0.0), np.dtype(real).itemsize

    @njit(parallel=True, nogil=True)
    def blocks(ints, ptrs):
        for i in prange(ints.shape[0]):
            gemm(_ROW_MAJOR, ints[i, 0], ints[i, 1], ints[i, 2], ints[i, 3], ints[i, 4], one,
                 ptrs[i, 0], ints[i, 5], ptrs[i, 1], ints[i, 6], zero, ptrs[i, 2], ints[i, 7])

    @njit(parallel=True, nogil=True)
    def gram(ints, ptrs, c):
        tr, h, n, k, lda, ldc, ta, tb = ints[0], ints[1], ints[2], ints[3], ints[4], ints[5], ints[6], ints[7]
        x0, x1, c0 = ptrs[0], ptrs[1], ptrs[2]
        for task in prange(2):
            if task == 0:
                syrk(_ROW_MAJOR, _UPPER, tr, h, k, one, x0, lda, zero, c0, ldc)
                syrk(_ROW_MAJOR, _UPPER, tr, n - h, k, one, x1, lda, zero, c0 + np.uint64(item * (h * ldc + h)), ldc)
            else:
                gemm(_ROW_MAJOR, ta, tb, h, n - h, k, one, x0, lda, x1, lda, zero, c0 + np.uint64(item * h), ldc)
        for i in prange(n):
            for j in range(i + 1, n):
                c[j, i] = c[i, j]

    return blocks, gram


if AVAILABLE:
    _KERNELS = {np.dtype(np.float32): _kernels(np.float32, *_CBLAS["s"]),
                np.dtype(np.float64): _kernels(np.float64, *_CBLAS["d"])}


def _gram(a, b, out):
    """``a @ b`` where ``b`` is ``a``'s transpose (same memory): the split syrk, or None
    when the layout is not one for it (numpy then does its own syrk)."""
    fa = _operand(a)
    if fa is None or not out.flags.c_contiguous:
        return None
    n, k = a.shape
    trans, lda = fa
    h = (n // 2 // ALIGN) * ALIGN or n // 2
    item = a.itemsize
    # op(x) rows: a's rows when a is row-major (syrk NoTrans), else a's columns of x = a^T
    step = lda * item if trans == _NO_TRANS else item
    ints = np.array([trans, h, n, k, lda, n, trans, _TRANS if trans == _NO_TRANS else _NO_TRANS], np.int64)
    ptrs = np.array([a.ctypes.data, a.ctypes.data + h * step, out.ctypes.data], np.uint64)
    _KERNELS[a.dtype][1](ints, ptrs, out)
    return out


def _operand(x):
    """(trans, ld) describing a 2-D view for row-major cblas, or None when BLAS cannot read it
    in place (no unit stride)."""
    rows, cols = x.shape
    item = x.itemsize
    s0, s1 = x.strides
    if (s1 == item or cols == 1) and s0 % item == 0 and s0 // item >= max(1, cols):
        return _NO_TRANS, s0 // item
    if (s0 == item or rows == 1) and s1 % item == 0 and s1 // item >= max(1, rows):
        return _TRANS, s1 // item
    return None


def _cuts(n, parts):
    """``parts + 1`` nondecreasing cut points over ``range(n)``, inner ones on multiples of
    ALIGN when the blocks are long enough."""
    cuts = [0]
    for i in range(1, parts):
        c = (n * i) // parts
        if n >= parts * ALIGN:
            c = (c // ALIGN) * ALIGN
        cuts.append(max(cuts[-1], c))
    cuts.append(n)
    return cuts


def _plan(a, b, out, threads):
    """Block table (ints, ptrs) for ``out = a @ b``, or None when some operand is not one BLAS
    can read in place."""
    mats = [(a, b, out)] if a.ndim == 2 else [(a[i], b[i], out[i]) for i in range(a.shape[0])]
    m, k, n = out.shape[-2], a.shape[-1], out.shape[-1]
    blocks = []
    for x, y, o in mats:
        fa, fb = _operand(x), _operand(y)
        if fa is None or fb is None or not (o.strides[1] == o.itemsize or n == 1):
            return None
        ldc = o.strides[0] // o.itemsize
        if len(mats) >= threads:  # batched: whole matrices per block
            blocks.append((fa, fb, m, n, x.ctypes.data, y.ctypes.data, o.ctypes.data, ldc))
        elif m >= n:  # rows: A's rows and C's rows move
            step_a = x.strides[0]
            c = _cuts(m, threads)
            for r0, r1 in zip(c, c[1:]):
                if r1 > r0:
                    blocks.append((fa, fb, r1 - r0, n, x.ctypes.data + r0 * step_a, y.ctypes.data,
                                   o.ctypes.data + r0 * o.strides[0], ldc))
        else:  # columns: B's columns and C's columns move
            step_b = y.strides[1]
            c = _cuts(n, threads)
            for c0, c1 in zip(c, c[1:]):
                if c1 > c0:
                    blocks.append((fa, fb, m, c1 - c0, x.ctypes.data, y.ctypes.data + c0 * step_b,
                                   o.ctypes.data + c0 * o.itemsize, ldc))
    ints = np.empty((len(blocks), 8), np.int64)
    ptrs = np.empty((len(blocks), 3), np.uint64)
    for i, ((ta, lda), (tb, ldb), bm, bn, pa, pb, pc, ldc) in enumerate(blocks):
        ints[i] = (ta, tb, bm, bn, k, lda, ldb, ldc)
        ptrs[i] = (pa, pb, pc)
    return ints, ptrs


def matmul(a, b, out=None):
    """``np.matmul(a, b, out=out)``; 2-D and same-batch 3-D float32/float64 products of at
    least ``PARALLEL_MIN_MACS`` run as blocks on numba's threads, everything else (and any
    error) is numpy's own."""
    threads = numba.get_num_threads()
    if (not AVAILABLE or threads < 2 or a.ndim not in (2, 3) or b.ndim != a.ndim or a.dtype != b.dtype
            or a.dtype not in (np.float32, np.float64) or not a.dtype.isnative
            or a.shape[-1] != b.shape[-2] or (a.ndim == 3 and a.shape[0] != b.shape[0])):
        return np.matmul(a, b, out=out)
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    batch = a.shape[0] if a.ndim == 3 else 1
    if batch * m * k * n < PARALLEL_MIN_MACS or m == 0 or n == 0 or k == 0:
        return np.matmul(a, b, out=out)
    shape = a.shape[:-1] + (n,)
    if out is not None and (out.shape != shape or out.dtype != a.dtype or not out.flags.aligned
                            or not out.flags.writeable or np.may_share_memory(out, a) or np.may_share_memory(out, b)):
        return np.matmul(a, b, out=out)
    if not (a.flags.aligned and b.flags.aligned):
        return np.matmul(a, b, out=out)
    target = np.empty(shape, a.dtype) if out is None else out
    if a.ndim == 2 and a.ctypes.data == b.ctypes.data and a.shape == b.shape[::-1] and a.strides == b.strides[::-1]:
        if _gram(a, b, target) is not None:  # numpy's syrk case, split
            return target
        return np.matmul(a, b, out=out)
    plan = _plan(a, b, target, threads)
    if plan is None:
        return np.matmul(a, b, out=out)
    _KERNELS[a.dtype][0](*plan)
    return target
