"""Packed ternary GEMV/GEMM kernels that call x86 SIMD instructions from Numba.

LLVM does not form ``vpmaddubsw``/``vpdpbusd`` from plain loops, so the inner loop is written
directly in LLVM IR (``numba.extending.intrinsic``) and the row/token blocking, threading and
scaling stay in ``@njit`` drivers. A ``SimdPath`` argument selects the path at compile time.

Weight layout (built by ``packed.prepare_packed``): ``layout[r, 32*u + j]`` holds the offset codes
``w + 1`` (in {0, 1, 2}) of columns ``128*u + j + 32*i`` in bits ``2i..2i+1``. So the 32 codes of
"chunk" ``c`` (columns ``32*c .. 32*c + 31``) are ``(layout[r, 32*(c//4) : +32] >> 2*(c%4)) & 3``,
which line up with the contiguous activations ``x[32*c : 32*c + 32]``. With unsigned codes the
integer sum of a group is ``sum(code * x) - sum(x)``; the drivers subtract the per-group
activation sums.

The intrinsic made by ``_make_block_kernel`` computes one block of ``rows x tokens`` outputs:
per group (``cpg = G / 32`` chunks) the integer sums ``sum code * x``, then the reference's float64
epilogue in vector registers. A group that spans whole 128-column units runs a loop over units
with constant shifts; other group sizes (32, 64, 96, ...) run a loop over chunks. The
instructions per path:

- ``avx2``: ``vpmaddubsw`` into int16 accumulators (a pair is at most 2*2*128 = 512 in size, so 32
  chunks add up to at most 16384), widened with ``vpmaddwd`` by ones every 32 chunks.
- ``vnni``: ``vpdpbusd`` straight into int32 accumulators.
- ``vnni_emulated``: the ``vnni`` structure with ``vpdpbusd`` spelled as the two AVX2 steps.

Keep the intrinsics and the drivers that call them in this one file: Numba's cache is keyed on
the source file of the cached function, so a change to the IR must touch that file.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import NativeValue, intrinsic, models, register_model, typeof_impl, unbox

# Block shapes (rows x tokens) per kernel; the handle pads M to a multiple of ROW_PAD.
GEMV_ROWS = 4
GEMM_ROWS = 2
GEMM_TOKENS = 6
GEMM_TAIL_TOKENS = 2
# Tokens per outer chunk of the GEMM driver (a multiple of GEMM_TOKENS, so tails only at the end).
GEMM_TOKEN_CHUNK = 48
ROW_PAD = 8
assert ROW_PAD % GEMV_ROWS == 0 and ROW_PAD % GEMM_ROWS == 0
# int16 accumulators are widened after this many chunks (32 * 512 = 16384 < 32767).
_I16_SPAN = 32

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_V32I8 = ir.VectorType(_I8, 32)
_V16I16 = ir.VectorType(_I16, 16)
_V8I32 = ir.VectorType(_I32, 8)
_V4I32 = ir.VectorType(_I32, 4)
_V4F32 = ir.VectorType(ir.FloatType(), 4)
_V4F64 = ir.VectorType(ir.DoubleType(), 4)


class SimdPathType(types.Dummy):
    def __init__(self, path):
        self.path = path
        super().__init__(name=f"SimdPath[{path}]")


class SimdPath:
    """Names a SIMD kernel path for the jitted drivers; its Numba type carries the name, so each
    path compiles (and caches) its own specialization and no other path's instructions. The
    type is made once (``_numba_type_``, which numba's dispatcher reads without a Python-level
    ``typeof``: that lookup cost about 4 us of every product call)."""

    def __init__(self, name):
        if name not in ("avx2", "vnni", "vnni_emulated"):
            raise ValueError(f"SimdPath: unknown SIMD kernel path {name!r}")
        self.name = name
        self._numba_type_ = SimdPathType(name)

    def __repr__(self):
        return f"SimdPath({self.name!r})"


@typeof_impl.register(SimdPath)
def _typeof_simd_path(val, c):
    return SimdPathType(val.name)


register_model(SimdPathType)(models.OpaqueModel)


@unbox(SimdPathType)
def _unbox_simd_path(typ, obj, c):
    return NativeValue(c.context.get_dummy_value())


PATHS = {name: SimdPath(name) for name in ("avx2", "vnni", "vnni_emulated")}


def _declare(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _splat(vec_type, value):
    return ir.Constant(vec_type, [ir.Constant(vec_type.element, value)] * vec_type.count)


def _broadcast(builder, value, count):
    """A vector of ``count`` copies of the scalar ``value``."""
    vec_type = ir.VectorType(value.type, count)
    first = builder.insert_element(ir.Constant(vec_type, None), value, _I32(0))
    return builder.shuffle_vector(first, ir.Constant(vec_type, None), ir.Constant(ir.VectorType(_I32, count), [0] * count))


def _load_v32i8(builder, base, offset):
    ptr = builder.gep(base, [offset])
    return builder.load(builder.bitcast(ptr, _V32I8.as_pointer()), align=1)


def _pmaddubsw(builder, codes, x):
    fn = _declare(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16I16, [_V32I8, _V32I8])
    return builder.call(fn, [codes, x])


def _pmaddwd_ones(builder, v16):
    fn = _declare(builder, "llvm.x86.avx2.pmadd.wd", _V8I32, [_V16I16, _V16I16])
    return builder.call(fn, [v16, _splat(_V16I16, 1)])


def _vpdpbusd(builder, acc, codes, x):
    # <8 x i32> operands: the form every LLVM accepts (LLVM 22 upgrades it to <32 x i8>).
    fn = _declare(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I32, [_V8I32, _V8I32, _V8I32])
    return builder.call(fn, [acc, builder.bitcast(codes, _V8I32), builder.bitcast(x, _V8I32)])


def _pair_sums(builder, a, b):
    """``[a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]`` (``vphaddd``)."""
    even = builder.shuffle_vector(a, b, ir.Constant(_V8I32, [0, 2, 8, 10, 4, 6, 12, 14]))
    odd = builder.shuffle_vector(a, b, ir.Constant(_V8I32, [1, 3, 9, 11, 5, 7, 13, 15]))
    return builder.add(even, odd)


def _reduce_quad(builder, vecs):
    """The lane sums of four ``<8 x i32>`` vectors as one ``<4 x i32>``."""
    both = _pair_sums(builder, _pair_sums(builder, vecs[0], vecs[1]), _pair_sums(builder, vecs[2], vecs[3]))
    low = builder.shuffle_vector(both, both, ir.Constant(_V4I32, [0, 1, 2, 3]))
    high = builder.shuffle_vector(both, both, ir.Constant(_V4I32, [4, 5, 6, 7]))
    return builder.add(low, high)


def _element_ptr(builder, arr, ndim, indices, elem_type):
    """Pointer to ``arr[indices]`` (byte strides, so any layout works)."""
    strides = cgutils.unpack_tuple(builder, arr.strides, ndim)
    offset = _I64(0)
    for index, stride in zip(indices, strides):
        offset = builder.add(offset, builder.mul(index, stride))
    byte_ptr = builder.gep(builder.bitcast(arr.data, _I8.as_pointer()), [offset])
    return builder.bitcast(byte_ptr, elem_type.as_pointer())


def _make_block_kernel(rows, tokens):
    """An intrinsic ``block(path, layout, row0, xq, tok0, cpg, scales_t, xsums, xs, m, out)`` that
    computes ``out[tok0 + t, row0 + i]`` (rows below ``m``) for one ``rows x tokens`` block:

        out = float32(xs[t] * sum_g float64(scales_t[g, row]) * float64(isum[g] - xsums[t, g]))

    with ``isum[g]`` the code-times-activation sum of group ``g`` and the float64 sum taken in
    group order (multiply, then add: no fused multiply-add), exactly like the reference.
    ``path`` (a ``SimdPath``) picks the instructions at compile time."""

    def block(typingctx, path, layout, row0, xq, tok0, cpg, scales_t, xsums, xs, m, out):
        def array_of(a, dtype, ndim):
            return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim

        if not (
            isinstance(path, SimdPathType)
            and layout == types.Array(types.uint8, 2, "C")
            and array_of(xq, types.int8, 2)
            and xq.layout == "C"  # rows read as contiguous 32-byte vectors
            and array_of(scales_t, types.float32, 2)
            and array_of(xsums, types.int32, 2)
            and array_of(xs, types.float64, 1)
            and array_of(out, types.float32, 2)
            and all(isinstance(a, types.Integer) for a in (row0, tok0, cpg, m))
        ):
            return None
        isa = path.path
        sig = types.void(path, layout, row0, xq, tok0, cpg, scales_t, xsums, xs, m, out)

        def codegen(context, builder, signature, args):
            tys = signature.args
            arrays = {n: context.make_array(tys[n])(context, builder, args[n]) for n in (1, 3, 6, 7, 8, 10)}
            w_arr, x_arr, s_arr, xsum_arr, xs_arr, o_arr = (arrays[n] for n in (1, 3, 6, 7, 8, 10))
            row0_, tok0_, cpg_, m_ = (context.cast(builder, args[n], tys[n], types.int64) for n in (2, 4, 5, 9))
            n_groups = cgutils.unpack_tuple(builder, s_arr.shape, 2)[0]
            w_stride = cgutils.unpack_tuple(builder, w_arr.strides, 2)[0]
            x_stride = cgutils.unpack_tuple(builder, x_arr.strides, 2)[0]
            w_rows = [
                builder.gep(w_arr.data, [builder.mul(builder.add(row0_, _I64(i)), w_stride)])
                for i in range(rows)
            ]
            x_rows = [
                builder.gep(x_arr.data, [builder.mul(builder.add(tok0_, _I64(t)), x_stride)])
                for t in range(tokens)
            ]
            pairs = [(i, t) for t in range(tokens) for i in range(rows)]  # output order p = t*rows + i
            acc32 = {p: cgutils.alloca_once(builder, _V8I32) for p in pairs}
            acc16 = {p: cgutils.alloca_once(builder, _V16I16) for p in pairs}
            # float64 sums in quads of outputs (the last quad padded with unused lanes)
            quads = [pairs[q : q + 4] for q in range(0, len(pairs), 4)]
            facc = [cgutils.alloca_once(builder, _V4F64) for _ in quads]
            for ptr in facc:
                builder.store(ir.Constant(_V4F64, None), ptr)
            mask = _splat(_V16I16, 0x0303)

            def accumulate(codes, xv, i, t):
                if isa == "avx2":
                    ptr = acc16[(i, t)]
                    builder.store(builder.add(builder.load(ptr), _pmaddubsw(builder, codes, xv)), ptr)
                elif isa == "vnni":
                    ptr = acc32[(i, t)]
                    builder.store(_vpdpbusd(builder, builder.load(ptr), codes, xv), ptr)
                else:  # vnni_emulated: exact for these operand ranges (no saturation)
                    ptr = acc32[(i, t)]
                    dot = _pmaddwd_ones(builder, _pmaddubsw(builder, codes, xv))
                    builder.store(builder.add(builder.load(ptr), dot), ptr)

            def decode(raw16, shift_vec):
                return builder.bitcast(builder.and_(builder.lshr(raw16, shift_vec), mask), _V32I8)

            def load_rows(unit):
                off = builder.mul(unit, _I64(32))
                return [builder.bitcast(_load_v32i8(builder, w_rows[i], off), _V16I16) for i in range(rows)]

            def chunk_body(c):
                # One 32-column chunk: decode it for every row once, reuse it for every token.
                raws = load_rows(builder.lshr(c, _I64(2)))
                shift = builder.trunc(builder.shl(builder.and_(c, _I64(3)), _I64(1)), _I16)
                codes = [decode(raw, _broadcast(builder, shift, 16)) for raw in raws]
                x_off = builder.mul(c, _I64(32))
                for t in range(tokens):
                    xv = _load_v32i8(builder, x_rows[t], x_off)
                    for i in range(rows):
                        accumulate(codes[i], xv, i, t)

            def unit_body(unit):
                # The four chunks of one 128-column unit, with constant shifts.
                raws = load_rows(unit)
                for k in range(4):
                    codes = [decode(raw, _splat(_V16I16, 2 * k)) for raw in raws]
                    x_off = builder.mul(builder.add(builder.mul(unit, _I64(4)), _I64(k)), _I64(32))
                    for t in range(tokens):
                        xv = _load_v32i8(builder, x_rows[t], x_off)
                        for i in range(rows):
                            accumulate(codes[i], xv, i, t)

            def chunk_range(c0, c1):
                # Whole units when the range is unit-aligned (G a multiple of 128), else chunks.
                aligned = builder.icmp_signed("==", builder.and_(builder.or_(c0, c1), _I64(3)), _I64(0))
                with builder.if_else(aligned) as (then, otherwise):
                    with then:
                        u0, u1 = builder.ashr(c0, _I64(2)), builder.ashr(c1, _I64(2))
                        with cgutils.for_range(builder, u1, start=u0) as uloop:
                            unit_body(uloop.index)
                    with otherwise:
                        with cgutils.for_range(builder, c1, start=c0) as cloop:
                            chunk_body(cloop.index)

            def add_group(g):
                # facc[p] += float64(scales_t[g, row]) * float64(isum[p] - xsums[tok, g]), four
                # outputs per vector operation.
                sptr = _element_ptr(builder, s_arr, 2, [g, row0_], ir.VectorType(ir.FloatType(), rows))
                scales = builder.load(sptr, align=4)
                xsums = [
                    builder.load(_element_ptr(builder, xsum_arr, 2, [builder.add(tok0_, _I64(t)), g], _I32))
                    for t in range(tokens)
                ]
                for q, quad in enumerate(quads):
                    vecs = [builder.load(acc32[p]) for p in quad]
                    vecs += [ir.Constant(_V8I32, None)] * (4 - len(vecs))
                    isums = _reduce_quad(builder, vecs)
                    offsets = ir.Constant(_V4I32, None)
                    scale4 = ir.Constant(_V4F32, None)
                    for lane, (i, t) in enumerate(quad):
                        offsets = builder.insert_element(offsets, xsums[t], _I32(lane))
                        scale4 = builder.insert_element(scale4, builder.extract_element(scales, _I32(i)), _I32(lane))
                    exact = builder.sitofp(builder.sub(isums, offsets), _V4F64)
                    term = builder.fmul(builder.fpext(scale4, _V4F64), exact)
                    builder.store(builder.fadd(builder.load(facc[q]), term), facc[q])

            with cgutils.for_range(builder, n_groups) as gloop:
                g = gloop.index
                c_first = builder.mul(g, cpg_)
                c_end = builder.add(c_first, cpg_)
                for p in pairs:
                    builder.store(ir.Constant(_V8I32, None), acc32[p])
                if isa == "avx2":
                    n_spans = builder.sdiv(builder.add(cpg_, _I64(_I16_SPAN - 1)), _I64(_I16_SPAN))
                    with cgutils.for_range(builder, n_spans) as sloop:
                        s0 = builder.add(c_first, builder.mul(sloop.index, _I64(_I16_SPAN)))
                        s1 = builder.add(s0, _I64(_I16_SPAN))
                        s1 = builder.select(builder.icmp_signed("<", s1, c_end), s1, c_end)
                        for p in pairs:
                            builder.store(ir.Constant(_V16I16, None), acc16[p])
                        chunk_range(s0, s1)
                        for p in pairs:
                            wide = _pmaddwd_ones(builder, builder.load(acc16[p]))
                            builder.store(builder.add(builder.load(acc32[p]), wide), acc32[p])
                else:
                    chunk_range(c_first, c_end)
                add_group(g)

            xs_vals = [
                builder.load(_element_ptr(builder, xs_arr, 1, [builder.add(tok0_, _I64(t))], ir.DoubleType()))
                for t in range(tokens)
            ]
            for q, quad in enumerate(quads):
                sums = builder.load(facc[q])
                for lane, (i, t) in enumerate(quad):
                    y = builder.fptrunc(builder.fmul(xs_vals[t], builder.extract_element(sums, _I32(lane))), ir.FloatType())
                    row = builder.add(row0_, _I64(i))
                    with cgutils.if_likely(builder, builder.icmp_signed("<", row, m_)):
                        tok = builder.add(tok0_, _I64(t))
                        builder.store(y, _element_ptr(builder, o_arr, 2, [tok, row], ir.FloatType()))
            return context.get_dummy_value()

        return sig, codegen

    block.__name__ = f"block_{rows}x{tokens}"
    return intrinsic(block)


_block_gemv = _make_block_kernel(GEMV_ROWS, 1)
_block_gemm = _make_block_kernel(GEMM_ROWS, GEMM_TOKENS)
_block_gemm_tail = _make_block_kernel(GEMM_ROWS, GEMM_TAIL_TOKENS)
_block_gemm_one = _make_block_kernel(GEMM_ROWS, 1)


# --- drivers --------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def group_sums(xq, group_size):
    """``sums[t, g] = sum_{k in g} xq[t, k]`` (int32): undoes the +1 offset of the codes."""
    n_groups = xq.shape[1] // group_size
    sums = np.empty((xq.shape[0], n_groups), np.int32)
    for t in range(xq.shape[0]):
        row = xq[t]
        for g in range(n_groups):
            seg = row[g * group_size : (g + 1) * group_size]  # index from 0: vectorizes
            acc = np.int32(0)
            for k in range(group_size):
                acc = np.int32(acc + np.int32(seg[k]))
            sums[t, g] = acc
    return sums


@njit(cache=True)
def _gemv_blocks(path, layout, scales_t, xq, xs, xsums, cpg, m, b0, b1, out):
    """Row blocks ``b0 .. b1`` of ``GEMV_ROWS`` rows for one token."""
    for b in range(b0, b1):
        _block_gemv(path, layout, b * GEMV_ROWS, xq, 0, cpg, scales_t, xsums, xs, m, out)


@njit(cache=True)
def _gemm_blocks(path, layout, scales_t, xq, xs, xsums, cpg, m, b0, b1, out):
    """Row blocks ``b0 .. b1`` of ``GEMM_ROWS`` rows, all tokens: ``GEMM_TOKENS`` at a time,
    then ``GEMM_TAIL_TOKENS``, then one. Tokens go in chunks of ``GEMM_TOKEN_CHUNK`` (outer loop)
    so that a chunk's activations stay in cache while every row block passes over them; with
    thousands of tokens (training) streaming all activations once per row block was
    cache-bound. Each output is computed by the same instructions either way."""
    n_tok = xq.shape[0]
    for c0 in range(0, n_tok, GEMM_TOKEN_CHUNK):
        c1 = min(n_tok, c0 + GEMM_TOKEN_CHUNK)
        for b in range(b0, b1):
            row0 = b * GEMM_ROWS
            t = c0
            while t + GEMM_TOKENS <= c1:
                _block_gemm(path, layout, row0, xq, t, cpg, scales_t, xsums, xs, m, out)
                t += GEMM_TOKENS
            while t + GEMM_TAIL_TOKENS <= c1:
                _block_gemm_tail(path, layout, row0, xq, t, cpg, scales_t, xsums, xs, m, out)
                t += GEMM_TAIL_TOKENS
            while t < c1:
                _block_gemm_one(path, layout, row0, xq, t, cpg, scales_t, xsums, xs, m, out)
                t += 1


# Entry points: (path, layout, scales_t float32 [K // G, M_pad], xq int8 [N, K], xs float64 [N],
# group_size, m[, n_tasks]) -> float32 [N, m]. GEMV takes N == 1. The serial versions skip the
# thread pool, whose wake-up costs more than a small product.


@njit(cache=True)
def gemv(path, layout, scales_t, xq, xs, group_size, m):
    out = np.empty((xq.shape[0], m), np.float32)
    xsums = group_sums(xq, group_size)
    _gemv_blocks(path, layout, scales_t, xq, xs, xsums, group_size // 32, m, 0, layout.shape[0] // GEMV_ROWS, out)
    return out


@njit(cache=True, parallel=True)
def gemv_parallel(path, layout, scales_t, xq, xs, group_size, m, n_tasks):
    out = np.empty((xq.shape[0], m), np.float32)
    xsums = group_sums(xq, group_size)
    n_blocks = layout.shape[0] // GEMV_ROWS
    n_tasks = max(1, min(n_tasks, n_blocks))
    for task in prange(n_tasks):
        b0, b1 = task * n_blocks // n_tasks, (task + 1) * n_blocks // n_tasks
        _gemv_blocks(path, layout, scales_t, xq, xs, xsums, group_size // 32, m, b0, b1, out)
    return out


@njit(cache=True)
def gemm(path, layout, scales_t, xq, xs, group_size, m):
    out = np.empty((xq.shape[0], m), np.float32)
    xsums = group_sums(xq, group_size)
    _gemm_blocks(path, layout, scales_t, xq, xs, xsums, group_size // 32, m, 0, layout.shape[0] // GEMM_ROWS, out)
    return out


@njit(cache=True, parallel=True)
def gemm_parallel(path, layout, scales_t, xq, xs, group_size, m, n_tasks):
    out = np.empty((xq.shape[0], m), np.float32)
    xsums = group_sums(xq, group_size)
    n_blocks = layout.shape[0] // GEMM_ROWS
    n_tasks = max(1, min(n_tasks, n_blocks))
    for task in prange(n_tasks):
        b0, b1 = task * n_blocks // n_tasks, (task + 1) * n_blocks // n_tasks
        _gemm_blocks(path, layout, scales_t, xq, xs, xsums, group_size // 32, m, b0, b1, out)
    return out
