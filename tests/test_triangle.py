"""Triangle of Truth: every op an accelerated backend overrides agrees with the reference.

One module for every backend except "numpy" (which *is* the reference). ``CHECKS`` maps an
op name to a check ``fn(backend, rng)`` that runs the op on the backend and on
``reference.OPS[name]`` over awkward inputs and asserts agreement:

- integer outputs (trits, packed bytes) and quantizer scales: exactly equal;
- float outputs and gradients: relative Frobenius error <= ``TOL`` (1e-5, SPEC 2) of the
  float32 backend against the reference, which runs in float64 (ternary ops: on the same
  float32 inputs, because quantization is defined in the input's dtype, and the reference
  then forms its products in float64);
- differentiable ops: the output and the gradient of every float input.

Inputs are made in numpy and moved with ``backend.asarray`` / ``backend.to_numpy``, so the
same checks run on cupy. Adding a check for a new op is a few lines:

    @check("my_op")
    def _check_my_op(be, rng):
        compare(be, "my_op", [rng.standard_normal((3, 5))], options={"alpha": 0.5})

``test_every_overridden_op_is_checked`` fails when a backend overrides an op without a check.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import backends
from backends.cupy_backend import emulator as cuda_emulator
import reference
from reference import mhc as ref_mhc
from reference import optim as ref_optim
from reference.autograd import Tensor, data_of, no_grad
from reference.ternary import RowSelection

pytestmark = pytest.mark.triangle

# "cupy-emulated" is the cupy backend with its kernels compiled for the CPU (cuda_emulator.py),
# so the kernels' logic is checked on machines without a GPU.
# "cupy-emulated-reverse" and "cupy-emulated-warpwise" run the same with the emulator
# interleaving threads differently, which exposes a missing __syncthreads() that one order
# happens to hide.
EMULATED = {"cupy-emulated": "forward", "cupy-emulated-reverse": "reverse", "cupy-emulated-warpwise": "warpwise"}
BACKENDS = ["numba", "cupy", *EMULATED]
TOL = 1e-5


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param in EMULATED:
        reason = cuda_emulator.unavailable_reason()
        if reason is not None:
            pytest.skip(f"the CUDA emulator cannot run here: {reason}")
        monkeypatch.setattr(cuda_emulator, "schedule", EMULATED[request.param])
        return cuda_emulator.emulated_cupy_backend()
    reason = backends.unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param!r} is not available here: {reason}")
    return backends.get_backend(request.param)


# --- comparison helpers -------------------------------------------------------------------------


def rel_err(got, want):
    """||got - want||_F / ||want||_F in float64 (absolute error when want is all zero)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != reference shape {want.shape}"
    same_nan = np.isnan(got) == np.isnan(want)
    assert same_nan.all(), "NaN pattern differs from the reference"
    got, want = np.nan_to_num(got, nan=0.0), np.nan_to_num(want, nan=0.0)
    scale = np.linalg.norm(want)
    err = np.linalg.norm(got - want)
    return err / scale if scale > 0 else err


def assert_close(got, want, what, tol=TOL):
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def assert_exact(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != reference shape {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != reference dtype {want.dtype}"
    assert np.array_equal(got, want, equal_nan=got.dtype.kind == "f"), f"{what}: differs from the reference"


def _is_float(a):
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"


def _to_numpy(be, a):
    a = a.data if isinstance(a, Tensor) else a
    return be.to_numpy(a)


def compare(be, name, inputs, *, options=None, wrt=None, ref_dtype=np.float64, tol=TOL, label=""):
    """Run op ``name`` on ``be`` (float inputs as float32) and on the reference (float inputs
    as ``ref_dtype``) with the same upstream gradient; compare the output and the gradient of
    every float input (or of the inputs indexed by ``wrt``). Array inputs and options are
    numpy arrays; the backend receives them through ``be.asarray``."""
    options = options or {}
    what = f"{be.name}.{name}{label}"
    floats = [i for i, a in enumerate(inputs) if _is_float(a)]
    wrt = floats if wrt is None else list(wrt)
    inputs32 = [a.astype(np.float32) if _is_float(a) else a for a in inputs]
    inputs_ref = [a.astype(ref_dtype) if _is_float(a) else a for a in inputs32]

    def run(op, arrays, convert, opts):
        tensors = [Tensor(convert(a), requires_grad=i in wrt) if i in floats else convert(a) for i, a in enumerate(arrays)]
        out = op(*tensors, **opts)
        return out, tensors

    def to_be(a):
        return be.asarray(a) if isinstance(a, np.ndarray) else a

    out, tensors = run(be.op(name), inputs32, to_be, {k: to_be(v) for k, v in options.items()})
    out_ref, tensors_ref = run(reference.OPS[name], inputs_ref, lambda a: a, options)
    got = _to_numpy(be, out)
    assert got.dtype == np.float32, f"{what}: output dtype {got.dtype}, expected float32"
    assert_close(got, out_ref.data, f"{what} output", tol)
    if not wrt:
        return
    gy = np.random.default_rng(len(got.shape) + got.size).standard_normal(got.shape)
    out.backward(be.asarray(gy.astype(np.float32)))
    out_ref.backward(gy.astype(out_ref.dtype))
    for i in wrt:
        assert tensors[i].grad is not None, f"{what}: no gradient for input {i}"
        grad = _to_numpy(be, tensors[i].grad)
        assert grad.dtype == np.float32, f"{what}: gradient {i} dtype {grad.dtype}, expected float32"
        assert_close(grad, tensors_ref[i].grad, f"{what} gradient of input {i}", tol)


CHECKS = {}


def check(*names):
    """Register a check for the named ops."""

    def register(fn):
        for name in names:
            assert name not in CHECKS, f"two checks for {name}"
            CHECKS[name] = fn
        return fn

    return register


# --- ternary numerics ---------------------------------------------------------------------------


def _awkward_acts(rng, n, k):
    """Activations with a zero row, a tiny row, a row whose scale is exactly 1 with ties at
    +-0.5, +-2.5 and -126.5 (after scaling), and rows of mixed magnitude."""
    x = (rng.standard_normal((n, k)) * rng.uniform(0.01, 30.0, (n, 1))).astype(np.float32)
    if n > 1:
        x[1] = 0.0
    if n > 2:
        x[2] = 1e-9
    if n > 3 and k >= 6:
        x[3] = rng.uniform(-100, 100, k).round()
        x[3, :6] = [127.0, 0.5, -0.5, 2.5, -126.5, -1.5]
    return x


def _awkward_weights(rng, m, k, group_size):
    """Weights with an all-zero group, a group below the 1e-8 mean, and a group whose mean is
    exactly 1 with entries at +-0.5 (ties of w / s)."""
    w = (rng.standard_normal((m, k)) * rng.uniform(0.001, 0.1, (m, 1))).astype(np.float32)
    if m > 1:
        w[1, :group_size] = 0.0
    if m > 2:
        w[2, :group_size] = 1e-9
    if m > 3 and group_size % 4 == 0:
        w[3, :group_size] = np.tile(np.array([0.5, -0.5, 1.5, 1.5], np.float32), group_size // 4)
    return w


@check("quantize_acts")
def _check_quantize_acts(be, rng):
    for shape in [(1, 1), (7, 13), (2, 3, 64), (5, 300)]:
        x = _awkward_acts(rng, int(np.prod(shape[:-1])), shape[-1]).reshape(shape)
        if x.shape[0] > 4:
            x.reshape(-1, shape[-1])[4, 0] = np.nan
        q, s = be.quantize_acts(be.asarray(x))
        q_ref, s_ref = reference.OPS["quantize_acts"](x)
        assert_exact(be.to_numpy(q), q_ref, f"{be.name}.quantize_acts q {shape}")
        assert_exact(be.to_numpy(s), s_ref, f"{be.name}.quantize_acts s {shape}")


@check("quantize_weights")
def _check_quantize_weights(be, rng):
    for m, k, g in [(1, 4, 4), (5, 12, 4), (6, 64, 64), (9, 96, 32), (4, 15, 5)]:
        w = _awkward_weights(rng, m, k, g)
        if m > 4:
            w[4, g - 1] = np.inf
        q, s = be.quantize_weights(be.asarray(w), g)
        q_ref, s_ref = reference.OPS["quantize_weights"](w, g)
        assert_exact(be.to_numpy(q), q_ref, f"{be.name}.quantize_weights q {(m, k, g)}")
        assert_exact(be.to_numpy(s), s_ref, f"{be.name}.quantize_weights s {(m, k, g)}")


@check("ternary_linear")
def _check_ternary_linear(be, rng):
    cases = [  # x shape, M, group size, keep
        ((7, 12), 5, 4, None),
        ((2, 3, 12), 5, 12, None),  # K = G: one group
        ((1, 20), 3, 5, None),  # one row, odd sizes
        ((33, 96), 17, 32, None),
        ((70, 192), 130, 32, None),  # past one dp4a tile in both directions (cupy: 64 x 64)
        ((70, 192), 130, 64, None),
        ((3, 50, 256), 131, 128, None),  # tensor-core tiles (cupy: 128 x 128) with both tails
        ((17, 128), 9, 64, None),  # the fewest tokens the cupy tensor-core path takes
        ((16, 128), 9, 64, None),  # one token fewer: the dp4a path
        ((9, 8), 4, 2, np.array([0, 3, 8])),
        ((9, 8), 4, 8, np.array([], dtype=np.int64)),
        ((0, 8), 3, 4, None),
    ]
    for shape, m, g, keep in cases:
        n, k = int(np.prod(shape[:-1])), shape[-1]
        x = _awkward_acts(rng, n, k).reshape(shape)
        w = _awkward_weights(rng, m, k, g)
        options = {"group_size": g} if keep is None else {"group_size": g, "keep": keep}
        compare(be, "ternary_linear", [x, w], options=options, ref_dtype=np.float32, label=f" {shape}x{(m, k)} G={g}")
    # Non-finite input: a NaN token and an Inf weight group turn their outputs NaN, as in the reference.
    x, w = _awkward_acts(rng, 5, 16), _awkward_weights(rng, 4, 16, 8)
    x[0, 3] = np.nan
    w[2, 9] = np.inf
    compare(be, "ternary_linear", [x, w], options={"group_size": 8}, ref_dtype=np.float32, label=" non-finite")
    # Gradient for one input only, and a RowSelection filled in after the forward.
    x, w = _awkward_acts(rng, 6, 16), _awkward_weights(rng, 5, 16, 8)
    compare(be, "ternary_linear", [x, w], options={"group_size": 8}, wrt=[1], ref_dtype=np.float32, label=" dW only")
    compare(be, "ternary_linear", [x, w], options={"group_size": 8}, wrt=[0], ref_dtype=np.float32, label=" dX only")
    gy = rng.standard_normal((6, 5)).astype(np.float32)
    grads = []
    for op, convert, to_np in ((be.ternary_linear, be.asarray, be.to_numpy),
                               (reference.OPS["ternary_linear"], np.asarray, np.asarray)):
        selection = RowSelection()
        xt, wt = Tensor(convert(x), requires_grad=True), Tensor(convert(w), requires_grad=True)
        y = op(xt, wt, 8, keep=selection)
        selection.set(convert(np.array([4, 1])))
        y.backward(convert(gy))
        grads.append((to_np(xt.grad), to_np(wt.grad)))
    assert_close(grads[0][0], grads[1][0], f"{be.name}.ternary_linear RowSelection dX")
    assert_close(grads[0][1], grads[1][1], f"{be.name}.ternary_linear RowSelection dW")
    assert not grads[0][0][[0, 2, 3, 5]].any(), "rows outside the selection must get zero dX"


@check("pack_ternary")
def _check_pack_ternary(be, rng):
    for shape in [(1, 4), (3, 8), (5, 36), (2, 0)]:
        q = rng.integers(-1, 2, shape).astype(np.int8)
        assert_exact(be.to_numpy(be.pack_ternary(be.asarray(q))), reference.OPS["pack_ternary"](q), f"{be.name}.pack_ternary {shape}")


@check("unpack_ternary")
def _check_unpack_ternary(be, rng):
    every_byte = np.arange(256, dtype=np.uint8).reshape(4, 64)  # includes every invalid code 10
    for p in [every_byte, rng.integers(0, 256, (3, 9)).astype(np.uint8), np.zeros((1, 1), np.uint8)]:
        assert_exact(be.to_numpy(be.unpack_ternary(be.asarray(p))), reference.OPS["unpack_ternary"](p), f"{be.name}.unpack_ternary {p.shape}")


def _packed_case(rng, m, k, g):
    """Packed weights (random bytes: invalid code 10 included) and fp16-representable scales."""
    packed = rng.integers(0, 256, (m, k // 4)).astype(np.uint8)
    scales = rng.uniform(0.001, 0.2, (m, k // g)).astype(np.float16).astype(np.float32)
    if m > 1:
        scales[1, 0] = 0.0
    return packed, scales


def _extreme_acts(rng, n, k):
    """int8 activations including -128, -127 and 127 and an all-zero row."""
    xq = rng.integers(-128, 128, (n, k)).astype(np.int8)
    xq[0, : min(k, 3)] = np.array([-128, 127, -127], np.int8)[: min(k, 3)]
    if n > 1:
        xq[1] = 0
    if n > 2:
        xq[2] = 127
    if n > 3:
        xq[3] = -128
    return xq


@check("prepare_packed", "packed_gemv", "packed_gemm")
def _check_packed(be, rng):
    # (600, 256, 64) and (70, 2112, 64): cupy's GEMV loops over more rows than its grid holds;
    # K = 2112 gives 33 chunks of 64 trits for 32 lanes.
    for m, k, g in [(1, 8, 8), (5, 12, 4), (37, 256, 64), (3, 128, 128), (16, 512, 256), (7, 20, 20),
                    (600, 256, 64), (70, 2112, 64)]:
        packed, scales = _packed_case(rng, m, k, g)
        handle = be.prepare_packed(be.asarray(packed), be.asarray(scales), g)
        handle_ref = reference.OPS["prepare_packed"](packed, scales, g)
        xq = _extreme_acts(rng, 5, k)
        xs = rng.uniform(0.001, 0.1, 5).astype(np.float32)
        xs[1] = 0.0
        got = be.to_numpy(be.packed_gemm(handle, be.asarray(xq), be.asarray(xs)))
        assert got.dtype == np.float32
        assert_close(got, reference.OPS["packed_gemm"](handle_ref, xq, xs), f"{be.name}.packed_gemm {(m, k, g)}")
        for row in range(xq.shape[0]):
            got = be.to_numpy(be.packed_gemv(handle, be.asarray(xq[row]), xs[row]))
            want = reference.OPS["packed_gemv"](handle_ref, xq[row], xs[row])
            assert got.dtype == np.float32
            assert_close(got, want, f"{be.name}.packed_gemv {(m, k, g)} row {row}")


@check("packed_linear")
def _check_packed_linear(be, rng):
    # Float rows quantized per row, then the packed product: one row (decode), several rows,
    # an all-zero row, a K that is a single group, no rows, rows enough to quantize on threads.
    for m, k, g, n in [(37, 256, 64, 1), (600, 256, 64, 5), (16, 512, 256, 3), (7, 20, 20, 2), (70, 2112, 64, 1),
                       (9, 64, 64, 0), (33, 1024, 128, 160)]:
        packed, scales = _packed_case(rng, m, k, g)
        handle = be.prepare_packed(be.asarray(packed), be.asarray(scales), g)
        handle_ref = reference.OPS["prepare_packed"](packed, scales, g)
        x = rng.standard_normal((n, k)).astype(np.float32)
        if n > 1:
            x[1] = 0.0
        got = be.to_numpy(be.packed_linear(handle, be.asarray(x)))
        assert got.dtype == np.float32 and got.shape == (n, m)
        assert_close(got, reference.OPS["packed_linear"](handle_ref, x), f"{be.name}.packed_linear {(m, k, g, n)}")
    with pytest.raises(ValueError, match="packed_linear"):
        be.packed_linear(handle, be.asarray(np.zeros((1, k + 4), np.float32)))


@check("int8_linear")
def _check_int8_linear(be, rng):
    # Exact integer sums: the result must equal the reference's bit for bit (extreme codes
    # included: -128 rows, +127 rows, zero scales, K = 1, empty N).
    for n, m, k in [(1, 1, 1), (5, 37, 64), (3, 300, 768), (0, 4, 8), (2, 9, 1000)]:
        xq = _extreme_acts(rng, n, k) if n else np.zeros((0, k), np.int8)
        wq = _extreme_acts(rng, m, k)
        xs = rng.uniform(0.001, 0.1, n).astype(np.float32)
        ws = rng.uniform(0.001, 0.1, m).astype(np.float32)
        if n > 1:
            xs[1] = 0.0
        got = be.to_numpy(be.int8_linear(be.asarray(xq), be.asarray(xs), be.asarray(wq), be.asarray(ws)))
        assert got.dtype == np.float32 and got.shape == (n, m)
        assert_exact(got, reference.OPS["int8_linear"](xq, xs, wq, ws), f"{be.name}.int8_linear {(n, m, k)}")


@check("dense_linear")
def _check_dense_linear(be, rng):
    # Small, odd, empty, and large enough that the numba backend splits each product over its
    # threads (gemm.PARALLEL_MIN_MACS: 8M multiply-adds) with ragged blocks; keep and dW only.
    cases = [((5, 7), 3, None), ((0, 4), 3, None), ((300, 129), 301, None), ((257, 160), 515, None),
             ((300, 129), 301, np.array([0, 5, 17, 299])), ((9, 8), 4, np.array([], dtype=np.int64))]
    for (n, k), m, keep in cases:
        x = rng.standard_normal((n, k)).astype(np.float32)
        w = (rng.standard_normal((m, k)) * 0.1).astype(np.float32)
        options = {} if keep is None else {"keep": keep}
        compare(be, "dense_linear", [x, w], options=options, label=f" {(n, k)}x{m} keep={keep is not None}")
    x, w = rng.standard_normal((6, 16)).astype(np.float32), rng.standard_normal((5, 16)).astype(np.float32)
    compare(be, "dense_linear", [x, w], wrt=[1], label=" dW only")


@check("linear_rows")
def _check_linear_rows(be, rng):
    # One row (decode), a K that is no multiple of 8, empty N and K, more rows than the row
    # kernel takes (BLAS then), a non-contiguous weight.
    for n, m, k in [(1, 4096, 256), (3, 37, 13), (0, 5, 8), (2, 5, 0), (12, 33, 40)]:
        x = rng.standard_normal((n, k)).astype(np.float32)
        w = rng.standard_normal((m, k)).astype(np.float32)
        got = be.to_numpy(be.linear_rows(be.asarray(x), be.asarray(w)))
        assert got.dtype == np.float32 and got.shape == (n, m)
        assert_close(got, x.astype(np.float64) @ w.astype(np.float64).T, f"{be.name}.linear_rows {(n, m, k)}")
    w = rng.standard_normal((16, 24)).astype(np.float32)[:, ::2]
    x = rng.standard_normal((1, 12)).astype(np.float32)
    assert_close(be.to_numpy(be.linear_rows(be.asarray(x), be.asarray(w))), x.astype(np.float64) @ w.T.astype(np.float64),
                 f"{be.name}.linear_rows strided w")


@check("cached_attention")
def _check_cached_attention(be, rng):
    # (T, start, Hq, Hkv, hd, dv, capacity): a decode step at position 0, decode deep in a
    # cache with GQA, a chunk continuing a sequence with hd/2 odd, a prefill large enough to
    # split its rows over threads, one query head per kv head, and one decode row over a long
    # cache (one thread: a decode row is never split).
    for t, start, n_q, n_kv, hd, dv, cap in [(1, 0, 4, 4, 8, 8, 4), (1, 37, 6, 2, 16, 16, 40),
                                             (5, 3, 4, 2, 6, 6, 9), (64, 0, 8, 4, 64, 64, 64), (3, 10, 2, 2, 4, 5, 32),
                                             (1, 3000, 8, 4, 64, 64, 3001)]:
        q = rng.standard_normal((1, t, n_q, hd)).astype(np.float32)
        k = rng.standard_normal((1, t, n_kv, hd)).astype(np.float32)
        v = rng.standard_normal((1, t, n_kv, dv)).astype(np.float32)
        cos, sin = (a.astype(np.float32) for a in reference.OPS["rope_tables"](np.arange(start, start + t), hd, 10000.0, np.float64))
        kc = rng.standard_normal((1, cap, n_kv, hd)).astype(np.float32)
        vc = rng.standard_normal((1, cap, n_kv, dv)).astype(np.float32)
        kc_ref, vc_ref = kc.copy(), vc.copy()
        kc_be, vc_be = be.asarray(kc), be.asarray(vc)
        got = be.to_numpy(be.cached_attention(be.asarray(q), be.asarray(k), be.asarray(v), kc_be, vc_be, start,
                                              be.asarray(cos), be.asarray(sin)))
        want = reference.OPS["cached_attention"](q, k, v, kc_ref, vc_ref, start, cos, sin)
        what = f"{be.name}.cached_attention T={t} start={start} heads {n_q}/{n_kv} hd={hd}"
        assert got.dtype == np.float32 and got.shape == (1, t, n_q, dv)
        assert_close(got, want, what)
        # The cache holds the float32 RoPE results exactly, and nothing outside the written rows changed.
        assert_exact(be.to_numpy(kc_be), kc_ref, what + " k cache")
        assert_exact(be.to_numpy(vc_be), vc_ref, what + " v cache")
    with pytest.raises(ValueError, match="capacity"):
        be.cached_attention(be.asarray(q), be.asarray(k), be.asarray(v), kc_be, vc_be, cap, be.asarray(cos), be.asarray(sin))



def _decode_layers(be, rng, dim, heads, kv_heads, hd, hidden, g, sub, glu):
    """The same random dense block as a ``DecodeLayer`` for ``be`` and for the reference."""
    from reference.decode import DecodeLayer

    shapes = [((heads + 2 * kv_heads) * hd, dim), (dim, heads * hd), (2 * hidden, dim), (dim, hidden)]
    cases = [_packed_case(rng, m, k, g) for m, k in shapes]
    norms = [rng.uniform(0.5, 1.5, n).astype(np.float32) for n in (dim, heads * hd, dim, hidden)]
    layers = []
    for prepare, asarray in ((be.prepare_packed, be.asarray), (reference.OPS["prepare_packed"], np.asarray)):
        qkv, wo, gate_up, w_down = (prepare(asarray(p), asarray(s), g) for p, s in cases)
        attn_norm, attn_sub, ffn_norm, ffn_sub = (asarray(n) for n in norms)
        layers.append(DecodeLayer(1e-6, attn_norm, qkv, heads, kv_heads, hd, attn_sub if sub else None, wo, ffn_norm,
                                  gate_up, hidden, glu, ffn_sub if sub else None, w_down))
    return layers


@check("decode_layer")
def _check_decode_layer(be, rng):
    # (dim, heads, kv heads, head_dim, hidden, group, SubLN, glu, tokens, position, capacity):
    # GQA deep in a cache, position 0, no SubLN with ReLU2-GLU, a group size that is no multiple
    # of 32 (the numba backend's plain packed path), the last cache rows, several tokens (a
    # verify, a prompt chunk), and products large enough to split over threads (gate|up: 8M
    # multiply-adds at one token; a 96-token chunk quantizes and attends on threads too).
    for dim, heads, kv_heads, hd, hidden, g, sub, glu, t, start, cap in [
            (128, 4, 2, 32, 256, 64, True, "swiglu", 1, 37, 40), (64, 2, 2, 32, 128, 32, True, "swiglu", 1, 0, 4),
            (96, 3, 1, 32, 192, 32, False, "relu2_glu", 1, 5, 9), (40, 2, 1, 20, 80, 20, True, "swiglu", 2, 3, 8),
            (64, 4, 4, 16, 64, 64, True, "relu2_glu", 3, 13, 16), (1024, 8, 4, 128, 4096, 256, True, "swiglu", 1, 20, 32),
            (128, 4, 2, 32, 256, 64, True, "swiglu", 4, 10, 20), (256, 4, 4, 64, 512, 128, True, "swiglu", 96, 4, 100)]:
        layer, layer_ref = _decode_layers(be, rng, dim, heads, kv_heads, hd, hidden, g, sub, glu)
        x = rng.standard_normal((t, dim)).astype(np.float32)
        cos, sin = reference.OPS["rope_tables"](np.arange(start, start + t), hd, 10000.0, np.float32)
        kc = rng.standard_normal((1, cap, kv_heads, hd)).astype(np.float32)
        vc = rng.standard_normal((1, cap, kv_heads, hd)).astype(np.float32)
        kc_ref, vc_ref = kc.copy(), vc.copy()
        kc_be, vc_be = be.asarray(kc), be.asarray(vc)
        got = be.to_numpy(be.decode_layer(be.asarray(x), layer, kc_be, vc_be, start, be.asarray(cos), be.asarray(sin)))
        want = reference.OPS["decode_layer"](x, layer_ref, kc_ref, vc_ref, start, cos, sin)
        what = f"{be.name}.decode_layer dim={dim} heads {heads}/{kv_heads} G={g} {glu} sub={sub} start={start}"
        assert got.dtype == np.float32 and got.shape == (t, dim)
        assert_close(got, want, what)
        # the projections agree to float32 rounding (the normed rows feed the quantizer)
        assert_close(be.to_numpy(kc_be), kc_ref, what + " k cache")
        assert_close(be.to_numpy(vc_be), vc_ref, what + " v cache")
    with pytest.raises(ValueError, match="outside the cache"):
        be.decode_layer(be.asarray(x), layer, kc_be, vc_be, cap - t + 1, be.asarray(cos), be.asarray(sin))
    with pytest.raises(ValueError, match="one sequence"):
        be.decode_layer(be.asarray(np.zeros((2, dim + 1), np.float32)), layer, kc_be, vc_be, 0, be.asarray(cos), be.asarray(sin))


# --- nn ops -----------------------------------------------------------------------------------


@check("rmsnorm")
def _check_rmsnorm(be, rng):
    # With D = 1 the x-gradient is eps / (x^2 + eps)^1.5 * w: well conditioned only near sqrt(eps).
    for shape, scale in [((1, 1), 1e-3), ((1, 2), 1.0), ((3, 5, 7), 1.0), ((4, 64), 1e3), ((2, 33), 1e-3)]:
        x = rng.standard_normal(shape) * scale
        w = rng.standard_normal(shape[-1:])
        compare(be, "rmsnorm", [x, w], label=f" {shape}")
    compare(be, "rmsnorm", [np.zeros((3, 16)), rng.standard_normal(16)], options={"eps": 1e-5}, label=" zeros")
    compare(be, "rmsnorm", [rng.standard_normal((5, 24)), rng.standard_normal(24)], wrt=[0], label=" dx only")
    compare(be, "rmsnorm", [rng.standard_normal((5, 24)), rng.standard_normal(24)], wrt=[1], label=" dw only")
    # Plain arrays (the engine's calls): the same values as through the autograd node.
    x, w = rng.standard_normal((1, 3, 40)).astype(np.float32), rng.standard_normal(40).astype(np.float32)
    with no_grad():
        plain = be.to_numpy(data_of(be.rmsnorm(be.asarray(x), be.asarray(w), eps=1e-5)))
    tracked = be.rmsnorm(Tensor(be.asarray(x), requires_grad=True), Tensor(be.asarray(w), requires_grad=True), eps=1e-5)
    assert_exact(plain, be.to_numpy(tracked.data), f"{be.name}.rmsnorm plain arrays")
    assert_close(plain, reference.OPS["rmsnorm"](x.astype(np.float64), w.astype(np.float64), eps=1e-5).data,
                 f"{be.name}.rmsnorm plain arrays vs reference")


def _check_glu(name):
    def run(be, rng):
        for shape in [(1, 1), (3, 17), (2, 3, 40)]:
            gate = rng.standard_normal(shape) * 4
            gate.reshape(-1)[0] = 0.0
            if gate.size > 2:
                gate.reshape(-1)[1:3] = [35.0, -35.0]  # saturated sigmoid
            compare(be, name, [gate, rng.standard_normal(shape)], label=f" {shape}")
        gate, up = rng.standard_normal((4, 9)), rng.standard_normal((4, 9))
        compare(be, name, [gate, up], wrt=[0], label=" d gate only")
        compare(be, name, [gate, up], wrt=[1], label=" d up only")

    return run


check("swiglu")(_check_glu("swiglu"))
check("relu2_glu")(_check_glu("relu2_glu"))


@check("rope")
def _check_rope(be, rng):
    compare(be, "rope", [rng.standard_normal((2, 5, 3, 8)), np.arange(5)])
    compare(be, "rope", [rng.standard_normal((2, 5, 3, 8)), rng.integers(0, 4096, (2, 5))], label=" [B, T] positions")
    compare(be, "rope", [rng.standard_normal((7, 1, 2)), np.arange(3, 10)], options={"theta": 500.0}, label=" [T, H, 2]")
    compare(be, "rope", [rng.standard_normal((1, 1, 4, 64)), np.array([12345])], label=" one position")
    # More (head, pair) lanes than a 256-thread block, positions up to 2^20 (angles of ~1e6 rad
    # need more than float32 to reduce), and hd/2 > 256 pairs in one row's table.
    compare(be, "rope", [rng.standard_normal((2, 3, 9, 64)), rng.integers(0, 1 << 20, (2, 3))], label=" large positions")
    compare(be, "rope", [rng.standard_normal((2, 1, 600)), np.array([7, 999_999])], label=" hd 600")


@check("rope_rotate")
def _check_rope_rotate(be, rng):
    """The plain-array rotation by given tables (what the engine calls with cached tables)."""
    for x_shape, positions in [((2, 5, 3, 8), np.arange(5)), ((1, 1, 4, 64), np.array([12345])),
                               ((2, 3, 9, 64), rng.integers(0, 1 << 20, (2, 3))), ((7, 1, 2), np.arange(3, 10))]:
        x = rng.standard_normal(x_shape).astype(np.float32)
        cos, sin = reference.OPS["rope_tables"](positions, x_shape[-1], dtype=np.float32)
        for inverse in (False, True):
            got = be.to_numpy(be.rope_rotate(be.asarray(x), be.asarray(cos), be.asarray(sin), inverse=inverse))
            want = reference.OPS["rope_rotate"](x.astype(np.float64), cos.astype(np.float64), sin.astype(np.float64),
                                                inverse=inverse)
            assert got.dtype == np.float32, f"{be.name}.rope_rotate dtype {got.dtype}"
            assert_close(got, want, f"{be.name}.rope_rotate {x_shape} inverse={inverse}")


@check("softmax")
def _check_softmax(be, rng):
    for shape, scale in [((1, 1), 1.0), ((4, 33), 1.0), ((2, 3, 7), 30.0)]:
        compare(be, "softmax", [rng.standard_normal(shape) * scale], label=f" {shape}")
    x = rng.standard_normal((3, 10)) * 5
    x[0, 3] = -np.inf  # a masked entry
    x[1] = 80.0  # all equal
    compare(be, "softmax", [x], label=" masked")
    compare(be, "softmax", [rng.standard_normal((4, 5))], options={"axis": 0}, label=" axis 0")
    compare(be, "softmax", [rng.standard_normal((2, 6, 3))], options={"axis": 1}, label=" axis 1 of 3")
    # Rows longer than a block, with a masked prefix longer than a block (threads that see only
    # -inf), a NaN row and an all-masked row (both NaN in the reference).
    x = rng.standard_normal((5, 1000)) * 10
    x[0, :600] = -np.inf
    x[1, 3] = np.nan  # the first entry its thread sees
    x[2] = -np.inf
    x[3, 999] = 200.0
    with np.errstate(invalid="ignore"):  # the reference's exp(-inf - -inf) on the masked row
        compare(be, "softmax", [x], label=" long rows")


@check("attention")
def _check_attention(be, rng):
    cases = [  # B, T, S, Hq, Hkv, hd, dv, options
        (2, 5, 5, 4, 2, 8, 8, {}),  # GQA, causal
        (1, 1, 7, 3, 1, 4, 6, {"scale": 0.3}),  # one query at the end of a KV cache, dv != hd
        (2, 6, 9, 2, 2, 8, 4, {"causal": False}),
        (1, 4, 6, 1, 1, 2, 2, {}),  # causal with S > T: queries are the last T positions
        (1, 3, 3, 2, 2, 16, 16, {"scale": 4.0}),  # sharp softmax
        # Past one 16 x 16 tile of the cupy kernels in both directions, with tails:
        (2, 37, 45, 4, 2, 24, 40, {}),  # causal, S > T, GQA
        (1, 33, 20, 2, 1, 128, 128, {"causal": False}),  # the largest head the kernels take
        (1, 17, 17, 3, 3, 5, 7, {"scale": 0.5}),
        (1, 3, 3, 1, 1, 130, 4, {}),  # a head too large for the cupy kernels: the reference
    ]
    for b, t, s, hq, hkv, hd, dv, options in cases:
        q = rng.standard_normal((b, t, hq, hd))
        k = rng.standard_normal((b, s, hkv, hd))
        v = rng.standard_normal((b, s, hkv, dv))
        compare(be, "attention", [q, k, v], options=options, label=f" q {q.shape} k {k.shape} v {v.shape} {options}")
    q, k, v = (rng.standard_normal((1, 4, 2, 8)) for _ in range(3))
    compare(be, "attention", [q, k, v], wrt=[1], label=" dk only")
    compare(be, "attention", [q, k, v], wrt=[0, 2], label=" dq, dv only")


def _ce_case(rng, n, v, scale=3.0):
    logits = rng.standard_normal((n, v)) * scale
    targets = rng.integers(0, v, n)
    if n > 2:
        targets[2] = -100
        targets[0] = v - 1
    return logits, targets


@check("cross_entropy")
def check_cross_entropy(be, rng):
    for n, v, scale in [(1, 1, 1.0), (9, 37, 3.0), (16, 300, 20.0)]:
        logits, targets = _ce_case(rng, n, v, scale)
        weights = rng.uniform(0, 2, n)
        for reduction in ("mean", "sum", "none"):
            label = f" [{n}, {v}] {reduction}"
            compare(be, "cross_entropy", [logits, targets], options={"reduction": reduction}, label=label)
            compare(be, "cross_entropy", [logits, targets, weights], options={"reduction": reduction}, label=label + " weighted")
    logits, targets = _ce_case(rng, 6, 11)
    compare(be, "cross_entropy", [logits, targets, rng.uniform(0, 2, 6)], wrt=[0], label=" d logits only")
    compare(be, "cross_entropy", [logits, np.full(6, 7)], options={"ignore_index": 7}, label=" all ignored")
    compare(be, "cross_entropy", [logits, targets, np.zeros(6)], label=" zero weights")
    compare(be, "cross_entropy", [logits, np.where(targets < 0, 3, targets)], options={"ignore_index": 3}, label=" ignore_index 3")


@check("cross_entropy_per_token")
def _check_cross_entropy_per_token(be, rng):
    for n, v, ignore in [(1, 1, -100), (9, 37, -100), (20, 513, 5)]:
        logits, targets = _ce_case(rng, n, v)
        targets[targets == -100] = ignore
        logits32 = logits.astype(np.float32)
        got = be.to_numpy(be.cross_entropy_per_token(be.asarray(logits32), be.asarray(targets), ignore_index=ignore))
        want = reference.OPS["cross_entropy_per_token"](logits32.astype(np.float64), targets, ignore_index=ignore)
        assert got.dtype == np.float32
        assert_close(got, want, f"{be.name}.cross_entropy_per_token [{n}, {v}]")
        assert not got[targets == ignore].any(), "ignored rows must have zero loss"


# --- mHC --------------------------------------------------------------------------------------


def compare_multi(be, name, inputs, *, options=None, ref_dtype=np.float64, tol=TOL, label=""):
    """``compare`` for an op with a tuple of outputs: every output, then the gradient of every
    float input under the loss ``sum_i <out_i, G_i>`` with fixed random ``G_i``."""
    options = options or {}
    what = f"{be.name}.{name}{label}"
    floats = [i for i, a in enumerate(inputs) if _is_float(a)]
    results = []
    for op, convert, dtype in ((be.op(name), be.asarray, np.float32), (reference.OPS[name], np.asarray, ref_dtype)):
        tensors = [Tensor(convert(a.astype(dtype)), requires_grad=True) if i in floats else a for i, a in enumerate(inputs)]
        outs = op(*tensors, **options)
        gys = [np.random.default_rng(k + o.size).standard_normal(o.shape) for k, o in enumerate(outs)]
        loss = None
        for o, gy in zip(outs, gys):
            term = (o * Tensor(convert(gy.astype(dtype)))).sum()
            loss = term if loss is None else loss + term
        loss.backward()
        results.append(([_to_numpy(be, o) for o in outs], [_to_numpy(be, tensors[i].grad) for i in floats]))
    (outs, grads), (outs_ref, grads_ref) = results
    for k, (got, want) in enumerate(zip(outs, outs_ref)):
        assert got.dtype == np.float32, f"{what}: output {k} dtype {got.dtype}, expected float32"
        assert_close(got, want, f"{what} output {k}", tol)
    for i, got, want in zip(floats, grads, grads_ref):
        assert got.dtype == np.float32, f"{what}: gradient {i} dtype {got.dtype}, expected float32"
        assert_close(got, want, f"{what} gradient of input {i}", tol)


def _mhc_coeff_logits(rng, n, per_token_lead=None):
    """Random static logits (residual, pre, pre bias, post, post bias) for n streams."""
    lead = tuple(per_token_lead or ())
    return [rng.standard_normal(lead + (size,)) for size in (ref_mhc.RES_SIZE[n], n, n, n, n)]


@check("mhc_pre")
def _check_mhc_pre(be, rng):
    cases = [  # X shape, per-token coefficients
        ((5, 4, 7), False), ((5, 4, 7), True), ((2, 3, 2, 33), False), ((2, 3, 2, 33), True),
        ((1, 2, 1), False), ((1, 2, 1), True), ((6, 1, 9), False), ((4, 3), False), ((300, 4, 64), False),
        ((3, 4, 700), True), ((5, 2, 300), False), ((4, 3, 33), True), ((6, 8, 40), True), ((2, 6, 70), False),
    ]
    for shape, per_token in cases:
        x = rng.standard_normal(shape)
        h = rng.uniform(0, 1, shape[:-1] if per_token else shape[-2:-1])
        compare(be, "mhc_pre", [x, h], label=f" X {shape} h {h.shape}")
    x, h = rng.standard_normal((3, 4, 16)), rng.uniform(0, 1, 4)
    compare(be, "mhc_pre", [x, h], wrt=[0], label=" dX only")
    compare(be, "mhc_pre", [x, h], wrt=[1], label=" dh only")


@check("mhc_post")
def _check_mhc_post(be, rng):
    cases = [  # X shape, per-token H_res, per-token h_post
        ((5, 4, 7), False, False), ((5, 4, 7), True, True), ((5, 2, 7), True, False), ((5, 2, 7), False, True),
        ((2, 3, 4, 33), True, True), ((2, 3, 2, 10), False, False), ((1, 4, 1), False, False),
        ((1, 4, 1), True, True), ((7, 1, 5), False, False), ((3, 5), False, False), ((256, 4, 64), True, False),
        # columns past one block, n = 3, and n = 5..8 (the cupy kernels' second register bound)
        ((4, 4, 600), False, True), ((3, 2, 257), True, False), ((4, 3, 70), True, True),
        ((6, 8, 40), True, True), ((3, 5, 33), False, False),
    ]
    for shape, res_per_token, post_per_token in cases:
        n, lead = shape[-2], shape[:-2]
        x, y = rng.standard_normal(shape), rng.standard_normal(lead + shape[-1:])
        h_res = rng.uniform(0, 1, (lead if res_per_token else ()) + (n, n))
        h_post = rng.uniform(0, 2, (lead if post_per_token else ()) + (n,))
        compare(be, "mhc_post", [x, y, h_res, h_post], label=f" X {shape} H {h_res.shape} h_post {h_post.shape}")
    x, y = rng.standard_normal((3, 4, 16)), rng.standard_normal((3, 16))
    h_res, h_post = rng.uniform(0, 1, (4, 4)), rng.uniform(0, 2, (3, 4))
    for wrt in ([0], [1], [2], [3], [1, 3]):
        compare(be, "mhc_post", [x, y, h_res, h_post], wrt=wrt, label=f" gradients {wrt} only")


@check("mhc_dynamic_coeffs")
def _check_mhc_dynamic_coeffs(be, rng):
    for lead, n, c, gate, scale in [((5,), 2, 7, 0.7, 1.0), ((2, 3), 4, 5, 0.5, 3.0), ((1,), 4, 1, 1.0, 1.0),
                                    ((9,), 2, 1, 0.01, 1e-3), ((130,), 4, 24, 2.0, 1.0)]:
        x = rng.standard_normal(lead + (n, c)) * scale
        weight = rng.standard_normal((ref_mhc.n_logits(n), n * c)) / np.sqrt(n * c)
        inputs = [x, weight, np.array([gate])] + _mhc_coeff_logits(rng, n)
        compare_multi(be, "mhc_dynamic_coeffs", inputs, label=f" X {x.shape} gate {gate}")
    # A zero token (rstd = 1/sqrt(eps)) and a larger eps.
    x = rng.standard_normal((4, 4, 6))
    x[2] = 0.0
    inputs = [x, rng.standard_normal((32, 24)) * 0.2, np.array([0.3])] + _mhc_coeff_logits(rng, 4)
    compare_multi(be, "mhc_dynamic_coeffs", inputs, options={"eps": 1e-3}, label=" zero token, eps 1e-3")


# --- optimizers ---------------------------------------------------------------------------------
#
# The update kernels are defined in the input's dtype (8-bit Muon requantizes what float32
# arithmetic gives), so the reference runs on the same float32 arrays. In-place results are
# compared after the step: the parameter and every state array.


def _run_inplace(be, name, arrays, options):
    """Run kernel ``name`` on the backend and on the reference over copies of ``arrays``; returns
    (backend arrays after the step, reference arrays after, backend result, reference result)."""
    mine = [be.asarray(a.copy()) for a in arrays]
    theirs = [a.copy() for a in arrays]
    out = be.op(name)(*mine, **options)
    out_ref = reference.OPS[name](*theirs, **options)
    return [be.to_numpy(a) for a in mine], theirs, out, out_ref


def _optimizer_tensors(rng, shape):
    """Parameter-like, gradient-like and momentum-like float32 arrays: parameters small enough
    that one step moves them visibly. The first entry is zero in all three (Lion then takes
    sign(0) = 0), the second parameter is -0.0, and the gradient has a spike (50) and an entry
    whose square underflows (1e-30)."""
    p = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    m = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    for a in (p, g, m):
        a.reshape(-1)[0] = 0.0
    if p.size > 3:
        p.reshape(-1)[1] = -0.0
        g.reshape(-1)[2:4] = [50.0, 1e-30]
    return p, g, m


@check("adamw_update")
def _check_adamw_update(be, rng):
    for shape, step, wd in [((1,), 1, 0.0), ((7, 13), 1, 0.1), ((1000,), 50, 0.0), ((33, 65), 3, 0.01)]:
        p, g, m = _optimizer_tensors(rng, shape)
        v = (m * m * 10) if step > 1 else np.zeros(shape, np.float32)
        m = m if step > 1 else np.zeros(shape, np.float32)
        options = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": wd, "step": step}
        got, want, _, _ = _run_inplace(be, "adamw_update", [p, g, m, v], options)
        for k, label in ((0, "p"), (2, "m"), (3, "v")):
            assert_close(got[k], want[k], f"{be.name}.adamw_update {label} {shape} step {step}")
        assert np.array_equal(got[1], g), "adamw_update must not modify the gradient"


@check("lion_update")
def _check_lion_update(be, rng):
    for shape, wd in [((1,), 0.0), ((7, 13), 0.1), ((1000,), 0.0), ((33, 65), 0.01)]:
        p, g, m = _optimizer_tensors(rng, shape)
        options = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "weight_decay": wd}
        got, want, _, _ = _run_inplace(be, "lion_update", [p, g, m], options)
        for k, label in ((0, "p"), (2, "m")):
            assert_close(got[k], want[k], f"{be.name}.lion_update {label} {shape}")


@check("muon_momentum")
def _check_muon_momentum(be, rng):
    for shape in [(1, 1), (7, 13), (64, 48)]:
        _, g, buf = _optimizer_tensors(rng, shape)
        for nesterov in (True, False):
            got, want, u, u_ref = _run_inplace(be, "muon_momentum", [buf, g], {"beta": 0.95, "nesterov": nesterov})
            what = f"{be.name}.muon_momentum {shape} nesterov={nesterov}"
            assert_close(got[0], want[0], f"{what} buf")
            assert be.to_numpy(u).dtype == np.float32, f"{what}: u dtype"
            assert_close(be.to_numpy(u), u_ref, f"{what} u")


def _muon8_state(rng, n, scale=0.01):
    """Int8 buffer and scales as a previous step leaves them (an all-zero block with scale 0 when
    there are at least two blocks)."""
    blocks = -(-n // 256)
    q = rng.integers(-127, 128, n).astype(np.int8)
    s = rng.uniform(0.2, 1.0, blocks).astype(np.float32) * np.float32(scale / 127)
    if blocks > 1:
        q[256:512] = 0
        s[1] = 0.0
    return q, s


@check("muon8_momentum")
def _check_muon8_momentum(be, rng):
    cases = []  # (label, qbuf, scales, g, beta)
    for shape in [(1,), (255,), (256,), (257,), (37, 29), (3, 700)]:
        n = int(np.prod(shape))
        q, s = _muon8_state(rng, n)
        g = (rng.standard_normal(shape) * 0.01).astype(np.float32)
        if n > 512:
            g.reshape(-1)[256:512] = 0.0  # with its zero state: a zero block -> scale 0, q 0
        cases.append((f" {shape}", q, s, g, 0.95))
    # Rounding ties: from a zero state with beta = 0 the buffer is g itself; absmax 127 gives
    # scale 1 (ties at k + 0.5), absmax 63.5 gives scale 0.5 (ties at odd quarters).
    ties = np.array([127.0, 0.5, -0.5, 1.5, -1.5, 2.5, -126.5, 126.5, 0.49999997, -0.49999997], np.float32)
    g = np.zeros(600, np.float32)
    g[: ties.size] = ties
    g[256: 256 + ties.size] = ties / 2
    g[512:522] = [63.5, 0.25, -0.25, 0.75, -0.75, 31.75, -31.75, 0.0, 1e-30, -1e-30]
    cases.append((" ties", np.zeros(600, np.int8), np.zeros(3, np.float32), g, 0.0))
    for label, q, s, g, beta in cases:
        for nesterov in (True, False):
            what = f"{be.name}.muon8_momentum{label} nesterov={nesterov}"
            got, want, u, u_ref = _run_inplace(be, "muon8_momentum", [q, s, g], {"beta": beta, "nesterov": nesterov})
            assert_exact(got[0], want[0], f"{what} int8 buffer")
            if beta == 0.0:  # exactly representable arithmetic: scales are exact on any backend
                assert_exact(got[1], want[1], f"{what} scales")
            else:
                assert_close(got[1], want[1], f"{what} scales")
            assert be.to_numpy(u).dtype == np.float32, f"{what}: u dtype"
            assert_close(be.to_numpy(u), u_ref, f"{what} u")


@check("newton_schulz")
def _check_newton_schulz(be, rng):
    polar = ref_optim.POLAR_EXPRESS_COEFFICIENTS
    cases = [  # shape, steps, coefficients
        ((1, 1), 5, None), ((1, 6), 5, None), ((6, 1), 5, None), ((3, 4), 5, None), ((40, 24), 5, None),
        ((24, 40), 5, None), ((64, 64), 5, None), ((48, 80), 0, None), ((80, 48), 3, None),
        ((32, 96), 10, polar), ((96, 32), 2, polar[:1]),
    ]
    for shape, steps, coefficients in cases:
        u = rng.standard_normal(shape)
        options = {"steps": steps, "coefficients": coefficients}
        got = be.to_numpy(be.newton_schulz(be.asarray(u.astype(np.float32)), **options))
        want = reference.OPS["newton_schulz"](u.astype(np.float32).astype(np.float64), **options)
        assert got.dtype == np.float32, f"{be.name}.newton_schulz: dtype {got.dtype}"
        assert_close(got, want, f"{be.name}.newton_schulz {shape} steps {steps}")
    zero = be.to_numpy(be.newton_schulz(be.asarray(np.zeros((4, 6), np.float32))))
    assert np.array_equal(zero, np.zeros((4, 6), np.float32)), "newton_schulz of a zero matrix must be zero"


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint32) if a.dtype == np.float32 else a


def test_numba_optimizer_steps_are_bit_exact():
    """The numba optimizer kernels repeat the reference's float32 arithmetic operation by
    operation: several chained steps leave bit-identical parameters and state (int8 buffers and
    scales included), on sizes around the 256-element blocks and the parallel threshold."""
    be = backends.get_backend("numba")  # numba is a hard dependency: unavailable is a failure
    rng = np.random.default_rng(11)
    for shape in [(1,), (255,), (257,), (37, 29), (300_000,)]:
        p, g0, m = _optimizer_tensors(rng, shape)
        states = {
            "adamw_update": [p, m.copy(), np.abs(m) * 0.1],
            "lion_update": [p, m.copy()],
            "muon_momentum": [m.copy()],
            "muon8_momentum": list(_muon8_state(rng, p.size)),
        }
        for step in range(1, 4):
            g = g0 * np.float32(step) if step < 3 else np.zeros_like(g0)  # a zero gradient last
            options = {
                "adamw_update": {"lr": 1e-2, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "step": step},
                "lion_update": {"lr": 1e-2, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1 * (step - 1)},
                "muon_momentum": {"beta": 0.95, "nesterov": step != 2},
                "muon8_momentum": {"beta": 0.95, "nesterov": step != 2},
            }
            for name, state in states.items():
                g_at = 1 if name in ("adamw_update", "lion_update") else len(state)
                args = state[:g_at] + [g] + state[g_at:]
                mine = [a.copy() for a in args]
                out = be.op(name)(*mine, **options[name])
                out_ref = reference.OPS[name](*args, **options[name])
                what = f"numba.{name} {shape} step {step}"
                for k, (got, want) in enumerate(zip(mine, args)):
                    assert np.array_equal(_bits(got), _bits(want)), f"{what}: argument {k} differs from the reference"
                if out_ref is not None:
                    assert np.array_equal(_bits(out), _bits(out_ref)), f"{what}: the returned update differs"
                if name == "muon_momentum" and not options[name]["nesterov"]:
                    assert out is mine[0], "muon_momentum without Nesterov returns the buffer itself"
                states[name] = mine[:g_at] + mine[g_at + 1:]
    # Other dtypes take the reference path unchanged.
    p, g, m = (a.astype(np.float64) for a in _optimizer_tensors(rng, (5, 7)))
    mine, theirs = [p.copy(), m.copy()], [p.copy(), m.copy()]
    be.lion_update(mine[0], g, mine[1], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    reference.OPS["lion_update"](theirs[0], g, theirs[1], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    assert all(np.array_equal(a, b) for a, b in zip(mine, theirs))


# --- the tests ----------------------------------------------------------------------------------


def test_every_overridden_op_is_checked(backend):
    missing = backend.overridden - set(CHECKS)
    assert not missing, f"backend {backend.name!r} overrides ops with no Triangle check: {sorted(missing)}"


def test_checks_name_reference_ops():
    unknown = set(CHECKS) - set(reference.OPS)
    assert not unknown, f"checks for ops the reference does not define: {sorted(unknown)}"


@pytest.mark.parametrize("op_name", sorted(CHECKS))
def test_op_matches_reference(backend, op_name):
    if op_name not in backend.overridden:
        pytest.skip(f"backend {backend.name!r} runs the reference {op_name}")
    CHECKS[op_name](backend, np.random.default_rng(zlib.crc32(op_name.encode())))
