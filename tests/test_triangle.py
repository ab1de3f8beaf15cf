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
import reference
from reference.autograd import Tensor
from reference.ternary import RowSelection

pytestmark = pytest.mark.triangle

BACKENDS = ["numba", "cupy"]
TOL = 1e-5


@pytest.fixture(params=BACKENDS)
def backend(request):
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
    for m, k, g in [(1, 8, 8), (5, 12, 4), (37, 256, 64), (3, 128, 128), (16, 512, 256), (7, 20, 20)]:
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


@check("softmax")
def _check_softmax(be, rng):
    for shape, scale in [((1, 1), 1.0), ((4, 33), 1.0), ((2, 3, 7), 30.0)]:
        compare(be, "softmax", [rng.standard_normal(shape) * scale], label=f" {shape}")
    x = rng.standard_normal((3, 10)) * 5
    x[0, 3] = -np.inf  # a masked entry
    x[1] = 80.0  # all equal
    compare(be, "softmax", [x], label=" masked")
    compare(be, "softmax", [rng.standard_normal((4, 5))], options={"axis": 0}, label=" axis 0")


@check("attention")
def _check_attention(be, rng):
    cases = [  # B, T, S, Hq, Hkv, hd, dv, options
        (2, 5, 5, 4, 2, 8, 8, {}),  # GQA, causal
        (1, 1, 7, 3, 1, 4, 6, {"scale": 0.3}),  # one query at the end of a KV cache, dv != hd
        (2, 6, 9, 2, 2, 8, 4, {"causal": False}),
        (1, 4, 6, 1, 1, 2, 2, {}),  # causal with S > T: queries are the last T positions
        (1, 3, 3, 2, 2, 16, 16, {"scale": 4.0}),  # sharp softmax
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
def _check_cross_entropy(be, rng):
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
