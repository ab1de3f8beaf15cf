"""Ternary numerics of the reference (SPEC section 2): rounding, quantizers, ternary_linear
with its straight-through backward, 2-bit packing and packed GEMV/GEMM."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference import Tensor, gradcheck, ops
from reference import ternary as T

pytestmark = pytest.mark.reference

seeds = st.integers(0, 2**32 - 1)
group_sizes = st.sampled_from([64, 128, 256])
float_dtypes = st.sampled_from([np.float32, np.float64])


def normal(seed, shape, dtype=np.float64, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def is_fp16_representable(a):
    return np.array_equal(a.astype(np.float16).astype(a.dtype), a)


def explicit_forward(x, w, g):
    """SPEC's formula with integer inner sums (int64), groups summed in order, in float64."""
    k = w.shape[1]
    qx, sx = T.quantize_acts(x.reshape(-1, k))
    qw, sw = T.quantize_weights(w, g)
    acc = np.zeros((qx.shape[0], w.shape[0]))
    for j in range(k // g):
        cols = slice(j * g, (j + 1) * g)
        inner = qx[:, cols].astype(np.int64) @ qw[:, cols].astype(np.int64).T
        acc += sw[:, j].astype(np.float64) * inner
    y = sx.astype(np.float64)[:, None] * acc
    return y.astype(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def quantized_operands(x, w, g):
    """X_q = q_x * s_x and W_q = q_w * s in float64 (both exact)."""
    k = w.shape[1]
    qx, sx = T.quantize_acts(x.reshape(-1, k))
    qw, sw = T.quantize_weights(w, g)
    x_q = qx.astype(np.float64) * sx.astype(np.float64)[:, None]
    w_q = T.dequantize_weights(qw, sw.astype(np.float64), g)
    return x_q, w_q


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


# --- round_half_away ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_half_away_ties_differ_from_numpy_round(dtype):
    v = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5], dtype)
    np.testing.assert_array_equal(T.round_half_away(v), [1, -1, 2, -2, 3, -3])
    np.testing.assert_array_equal(np.round(v), [0, -0, 2, -2, 2, -2])  # half to even
    assert T.round_half_away(v).dtype == dtype


def test_round_half_away_is_exact_below_one_half():
    # floor(0.49999999999999994 + 0.5) is 1 in float arithmetic; the exact rounding is 0.
    below_half = np.nextafter(0.5, 0.0)
    assert np.floor(below_half + 0.5) == 1.0
    np.testing.assert_array_equal(T.round_half_away(np.array([below_half, -below_half])), [0.0, 0.0])
    big = np.array([2.0**52 + 1, -(2.0**53)])  # already integers: unchanged
    np.testing.assert_array_equal(T.round_half_away(big), big)


@given(seeds, float_dtypes)
def test_round_half_away_properties(seed, dtype):
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal(64) * 10).astype(dtype)
    v[:8] = (rng.integers(-20, 20, 8) + 0.5).astype(dtype)  # exact ties
    r = T.round_half_away(v)
    assert r.dtype == dtype
    np.testing.assert_array_equal(r, np.trunc(r))
    diff = v.astype(np.float64) - r
    assert np.all(np.abs(diff) <= 0.5)
    ties = np.abs(diff) == 0.5
    assert np.all(np.abs(r[ties]) > np.abs(v[ties]))  # ties go away from zero


# --- weight quantization --------------------------------------------------------------


@given(seeds, group_sizes, float_dtypes, st.integers(1, 3), st.integers(1, 3))
def test_quantize_weights_matches_the_definition(seed, g, dtype, m, groups):
    w = normal(seed, (m, g * groups), dtype, scale=np.exp(np.random.default_rng(seed).uniform(-8, 3)))
    q, s = T.quantize_weights(w, g)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert s.dtype == dtype and s.shape == (m, groups)
    assert is_fp16_representable(s)
    assert set(np.unique(q)) <= {-1, 0, 1}
    for r in range(m):
        for j in range(groups):
            block = w[r, j * g:(j + 1) * g]
            mean = np.abs(block).astype(np.float64).mean()
            expect_s = dtype(np.float16(mean))
            if mean < 1e-8 or expect_s == 0:
                assert s[r, j] == 0 and not q[r, j * g:(j + 1) * g].any()
                continue
            assert s[r, j] == expect_s
            expect_q = np.clip(T.round_half_away(block / expect_s), -1, 1)
            np.testing.assert_array_equal(q[r, j * g:(j + 1) * g], expect_q)


@given(seeds, group_sizes, float_dtypes)
def test_quantize_weights_idempotence(seed, g, dtype):
    w = normal(seed, (3, 2 * g), dtype)
    w[0, :g] = 0.0  # a zero group stays zero
    q, s = T.quantize_weights(w, g)
    q2, s2 = T.quantize_weights(T.dequantize_weights(q, s, g), g)
    np.testing.assert_array_equal(q2, q)
    # The new mean is s * (nonzeros / G): equal to s only for groups without zeros.
    nonzero = np.count_nonzero(q.reshape(3, 2, g), axis=-1)
    np.testing.assert_array_equal(s2, (s.astype(np.float64) * nonzero / g).astype(np.float16).astype(dtype))
    # A group of trits without zeros is a fixed point: q and s both come back exactly
    # (the zero group, s = 0, stays all zero).
    full = np.where(q == 0, 1, q).astype(np.int8)
    full[0, :g] = 0
    q3, s3 = T.quantize_weights(T.dequantize_weights(full, s, g), g)
    np.testing.assert_array_equal(q3, full)
    np.testing.assert_array_equal(s3, s)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_zero_groups_and_the_threshold(dtype):
    g = 64
    w = np.ones((1, 5 * g), dtype)
    w[0, 0:g] = 0.0  # all zero
    w[0, g:2 * g] = 5e-9  # mean below 1e-8
    w[0, 2 * g:3 * g] = 2e-8  # mean >= 1e-8 but rounds to 0 in float16
    w[0, 3 * g:4 * g] = 1e-7  # small but kept: a float16 subnormal scale
    q, s = T.quantize_weights(w, g)
    np.testing.assert_array_equal(s[0, :3], 0.0)
    assert not q[0, :3 * g].any()
    assert s[0, 3] == dtype(np.float16(1e-7)) and s[0, 3] > 0
    np.testing.assert_array_equal(q[0, 3 * g:], 1)
    assert s[0, 4] == 1.0


def test_nonfinite_weights_give_nan_scale_and_zero_trits():
    w = np.ones((2, 64))
    w[0, 3] = np.nan
    w[1, 0] = 1e7  # mean beyond the float16 range (65504)
    q, s = T.quantize_weights(w, 64)
    assert np.isnan(s).all() and not q.any()


# --- activation quantization ----------------------------------------------------------


@given(seeds, float_dtypes, st.integers(1, 70))
def test_quantize_acts_matches_the_definition(seed, dtype, k):
    x = normal(seed, (3, 2, k), dtype, scale=3.0)
    q, s = T.quantize_acts(x)
    assert q.dtype == np.int8 and q.shape == x.shape and s.dtype == dtype and s.shape == (3, 2)
    a = np.abs(x).max(axis=-1)
    np.testing.assert_array_equal(s, a / dtype(127))
    np.testing.assert_array_equal(q, np.clip(T.round_half_away(x / s[..., None]), -127, 127))
    assert np.all(np.abs(q).max(axis=-1) == 127)  # the absmax entry maps to +-127
    assert np.all(np.abs(x - q * s[..., None]) <= s[..., None] * (0.5 + 1e-5))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_zero_and_tiny_activation_rows(dtype):
    x = normal(0, (4, 16), dtype)
    x[1] = 0.0
    x[2] = 5e-9
    q, s = T.quantize_acts(x)
    np.testing.assert_array_equal(s[1:3], 0.0)
    assert not q[1:3].any()
    assert s[0] > 0 and s[3] > 0
    w = normal(1, (3, 16), dtype)
    y = T.ternary_linear(x, w, 16).data
    np.testing.assert_array_equal(y[1:3], 0.0)


def test_quantize_acts_ties_round_away():
    x = np.array([[127.0, 0.5, -0.5, 1.5, -2.5]])  # s = 1 exactly
    q, s = T.quantize_acts(x)
    assert s[0] == 1.0
    np.testing.assert_array_equal(q, [[127, 1, -1, 2, -3]])


def test_nonfinite_activation_token_turns_the_output_nan():
    x = normal(2, (3, 64))
    x[1, 5] = np.inf
    q, s = T.quantize_acts(x)
    assert np.isnan(s[1]) and not q[1].any() and np.isfinite(s[[0, 2]]).all()
    y = T.ternary_linear(x, normal(3, (4, 64)), 64).data
    assert np.isnan(y[1]).all() and np.isfinite(y[[0, 2]]).all()


# --- packing ------------------------------------------------------------------------


def test_byte_layout_of_a_hand_built_example():
    # byte 0: columns 0..3 = 0, +1, -1, 0 -> codes 00, 01, 11, 00 from the low bits up
    # byte 1: columns 4..7 = -1, -1, +1, 0 -> codes 11, 11, 01, 00
    q = np.array([[0, 1, -1, 0, -1, -1, 1, 0], [1, 1, 1, 1, 0, 0, 0, -1]], np.int8)
    expected = np.array(
        [[0b00_11_01_00, 0b00_01_11_11], [0b01_01_01_01, 0b11_00_00_00]], np.uint8
    )
    packed = T.pack_ternary(q)
    assert packed.dtype == np.uint8 and packed.shape == (2, 2)
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(T.unpack_ternary(expected), q)


def test_invalid_code_decodes_to_zero():
    p = np.array([[0b10_10_10_10, 0b01_10_11_10]], np.uint8)
    np.testing.assert_array_equal(T.unpack_ternary(p), [[0, 0, 0, 0, 0, -1, 0, 1]])


@given(seeds, st.integers(1, 5), st.integers(1, 40))
def test_pack_unpack_round_trip(seed, m, k4):
    q = np.random.default_rng(seed).integers(-1, 2, (m, 4 * k4)).astype(np.int8)
    packed = T.pack_ternary(q)
    assert packed.shape == (m, k4)
    unpacked = T.unpack_ternary(packed)
    assert unpacked.dtype == np.int8
    np.testing.assert_array_equal(unpacked, q)
    np.testing.assert_array_equal(T.pack_ternary(unpacked), packed)


# --- ternary_linear forward ---------------------------------------------------------


@given(seeds, group_sizes, float_dtypes, st.sampled_from([(1,), (3,), (2, 3)]), st.integers(1, 5), st.integers(1, 2))
def test_forward_is_the_exact_grouped_formula(seed, g, dtype, lead, m, groups):
    x = normal(seed, (*lead, g * groups), dtype)
    w = normal(seed + 1, (m, g * groups), dtype, scale=0.1)
    y = T.ternary_linear(x, w, g).data
    assert y.shape == (*lead, m) and y.dtype == dtype
    np.testing.assert_array_equal(y, explicit_forward(x, w, g))
    # ... and agrees with a float64 matmul of the dequantized operands to rounding.
    x_q, w_q = quantized_operands(x, w, g)
    direct = (x_q @ w_q.T).reshape(*lead, m)
    tol = 1e-13 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(y, direct, rtol=tol, atol=tol * np.abs(direct).max())


@pytest.mark.parametrize("m, n, g, k", [(1, 1, 64, 64), (1, 5, 128, 128), (7, 1, 256, 256), (3, 2, 64, 320)])
def test_forward_odd_shapes(m, n, g, k):
    x, w = normal(m, (n, k)), normal(k, (m, k))
    np.testing.assert_array_equal(T.ternary_linear(x, w, g).data, explicit_forward(x, w, g))
    y1 = T.ternary_linear(x[0], w, g).data  # a single token without a batch axis
    np.testing.assert_array_equal(y1, T.ternary_linear(x[:1], w, g).data[0])


# --- ternary_linear backward (straight-through estimator) ----------------------------
# The forward is piecewise constant in the trits and depends on x through s_x = max|x|/127,
# so finite differences of ternary_linear measure the quantizers' (near zero, or jumping)
# derivative, not the STE. The STE is a definition: dX = dY @ W_q and dW = dY^T @ X_q with the
# quantizers treated as the identity. It is therefore checked exactly against those formulas,
# and once against finite differences of the smooth surrogate whose gradient it is.


def ste_grads(x, w, g, seed=9, keep=None):
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    y = T.ternary_linear(xt, wt, g, keep=keep)
    gy = normal(seed, y.shape, x.dtype)
    y.backward(gy)
    return xt.grad, wt.grad, gy


@given(seeds, group_sizes, float_dtypes, st.sampled_from([(4,), (2, 3)]))
def test_ste_backward_formulas_exactly(seed, g, dtype, lead):
    m = 3
    x, w = normal(seed, (*lead, 2 * g), dtype), normal(seed + 1, (m, 2 * g), dtype)
    gx, gw, gy = ste_grads(x, w, g, seed + 2)
    x_q, w_q = quantized_operands(x, w, g)
    gy2 = gy.reshape(-1, m).astype(np.float64)
    assert gx.dtype == dtype and gw.dtype == dtype and gx.shape == x.shape and gw.shape == w.shape
    np.testing.assert_array_equal(gx, (gy2 @ w_q).astype(dtype).reshape(x.shape))
    np.testing.assert_array_equal(gw, (gy2.T @ x_q).astype(dtype))


@given(seeds, float_dtypes, st.integers(0, 6))
def test_keep_restricts_the_backward_to_kept_rows(seed, dtype, n_keep):
    g, lead, m = 64, (2, 3), 4
    x, w = normal(seed, (*lead, g), dtype), normal(seed + 1, (m, g), dtype)
    keep = np.sort(np.random.default_rng(seed).choice(6, n_keep, replace=False))
    gx, gw, gy = ste_grads(x, w, g, seed + 2, keep=keep)
    x_q, w_q = quantized_operands(x, w, g)
    gy2 = gy.reshape(-1, m).astype(np.float64)
    np.testing.assert_array_equal(gw, (gy2[keep].T @ x_q[keep]).astype(dtype))
    gx2 = gx.reshape(-1, g)
    dropped = np.setdiff1d(np.arange(6), keep)
    np.testing.assert_array_equal(gx2[dropped], 0.0)
    np.testing.assert_array_equal(gx2[keep], (gy2[keep] @ w_q).astype(dtype))


def test_keep_all_rows_equals_keep_none_exactly():
    x, w = normal(3, (2, 5, 128), np.float32), normal(4, (6, 128), np.float32)
    gx_all, gw_all, _ = ste_grads(x, w, 64, keep=np.arange(10))
    gx_none, gw_none, _ = ste_grads(x, w, 64)
    np.testing.assert_array_equal(gx_all, gx_none)
    np.testing.assert_array_equal(gw_all, gw_none)


def test_keep_does_not_change_the_forward():
    x, w = normal(5, (6, 64)), normal(6, (2, 64))
    np.testing.assert_array_equal(T.ternary_linear(x, w, 64, keep=np.array([1, 4])).data, T.ternary_linear(x, w, 64).data)


def test_only_requested_gradients_are_computed():
    x, w = normal(7, (3, 64)), normal(8, (2, 64))
    wt = Tensor(w, requires_grad=True)
    T.ternary_linear(x, wt, 64).sum().backward()  # x is a plain array: only dW
    _, w_q = quantized_operands(x, w, 64)
    assert wt.grad.shape == w.shape
    xt = Tensor(x, requires_grad=True)
    T.ternary_linear(xt, w, 64).sum().backward()
    np.testing.assert_array_equal(xt.grad, np.ones((3, 2)) @ w_q)


def test_ste_is_the_gradient_of_its_smooth_surrogate():
    # L(X, W) = <dY, X @ W_q^T> + <dY, X_q @ W^T> with X_q, W_q frozen at the current point has
    # exactly the STE gradients; gradcheck confirms the surrogate's gradient by finite differences.
    g = 64
    x, w = normal(11, (3, g)), normal(12, (2, g))
    x_q, w_q = quantized_operands(x, w, g)

    def surrogate(xt, wt):
        return ops.matmul(xt, Tensor(w_q.T)) + ops.matmul(Tensor(x_q), ops.transpose(wt))

    assert gradcheck(surrogate, [x, w])
    xs, ws = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    gy = normal(13, (3, 2))
    surrogate(xs, ws).backward(gy)
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    T.ternary_linear(xt, wt, g).backward(gy)
    np.testing.assert_allclose(xt.grad, xs.grad, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(wt.grad, ws.grad, rtol=1e-14, atol=1e-14)


# --- packed GEMV / GEMM -------------------------------------------------------------


@given(seeds, group_sizes, float_dtypes, st.integers(1, 4), st.integers(1, 5), st.integers(1, 2))
def test_packed_gemm_and_gemv_equal_the_training_forward(seed, g, dtype, n, m, groups):
    k = g * groups
    x, w = normal(seed, (n, k), dtype), normal(seed + 1, (m, k), dtype, scale=0.05)
    q, s = T.quantize_weights(w, g)
    handle = T.prepare_packed(T.pack_ternary(q), s, g)
    assert isinstance(handle, T.PackedTernary)
    assert handle.shape == (m, k) and handle.group_size == g and handle.scales.dtype == np.float32
    np.testing.assert_array_equal(handle.q, q)
    xq, xs = T.quantize_acts(x)
    expected = T.ternary_linear(x, w, g).data
    y = T.packed_gemm(handle, xq, xs.astype(np.float32))
    assert y.dtype == np.float32 and y.shape == (n, m)
    assert rel_err(y, expected) <= 1e-6
    for t in range(n):
        yv = T.packed_gemv(handle, xq[t], np.float32(xs[t]))
        assert yv.dtype == np.float32 and yv.shape == (m,)
        np.testing.assert_array_equal(yv, y[t])


def test_packed_ops_accept_float16_scales():
    # A GGUF TQ2_0 block stores an fp16 scale; the reference scales are fp16 values, so no loss.
    w = normal(21, (4, 256))
    q, s = T.quantize_weights(w, 256)
    a = T.prepare_packed(T.pack_ternary(q), s.astype(np.float16), 256)
    b = T.prepare_packed(T.pack_ternary(q), s, 256)
    np.testing.assert_array_equal(a.scales, b.scales)


# --- bad input ----------------------------------------------------------------------

W = normal(30, (4, 128))
Q = T.quantize_weights(W, 64)[0]
HANDLE = T.prepare_packed(T.pack_ternary(Q), T.quantize_weights(W, 64)[1], 64)

BAD = {
    "w_not_2d": (lambda: T.quantize_weights(np.ones(128), 64), "2-D"),
    "k_not_divisible": (lambda: T.quantize_weights(np.ones((2, 100)), 64), "not divisible"),
    "bad_group_size": (lambda: T.quantize_weights(W, 0), "positive integer"),
    "int_weights": (lambda: T.quantize_weights(np.ones((2, 64), np.int32), 64), "floating-point"),
    "int_acts": (lambda: T.quantize_acts(np.ones((2, 64), np.int8)), "floating-point"),
    "linear_k_mismatch": (lambda: T.ternary_linear(np.ones((3, 64)), W, 64), r"\(3, 64\).*\(4, 128\)"),
    "linear_dtype_mismatch": (lambda: T.ternary_linear(np.ones((3, 128), np.float32), W, 64), "same dtype"),
    "linear_w_not_2d": (lambda: T.ternary_linear(np.ones((3, 128)), W[None], 64), "2-D"),
    "linear_k_not_divisible": (lambda: T.ternary_linear(np.ones((3, 128)), W, 96), "not divisible"),
    "keep_out_of_range": (lambda: T.ternary_linear(np.ones((3, 128)), W, 64, keep=np.array([3])), "outside"),
    "keep_repeated": (lambda: T.ternary_linear(np.ones((3, 128)), W, 64, keep=np.array([1, 1])), "repeated"),
    "keep_float": (lambda: T.ternary_linear(np.ones((3, 128)), W, 64, keep=np.array([1.0])), "integer"),
    "dequantize_scale_shape": (lambda: T.dequantize_weights(Q, np.ones((4, 3)), 64), r"\(4, 3\)"),
    "pack_not_int8": (lambda: T.pack_ternary(Q.astype(np.int32)), "int8"),
    "pack_k_not_multiple_of_4": (lambda: T.pack_ternary(np.zeros((2, 6), np.int8)), "multiple of 4"),
    "pack_not_a_trit": (lambda: T.pack_ternary(np.full((1, 4), 2, np.int8)), "outside"),
    "unpack_not_uint8": (lambda: T.unpack_ternary(np.zeros((2, 4), np.int8)), "uint8"),
    "prepare_scale_shape": (lambda: T.prepare_packed(T.pack_ternary(Q), np.ones((4, 1)), 64), r"\(4, 1\)"),
    "prepare_k_not_divisible": (lambda: T.prepare_packed(T.pack_ternary(Q), np.ones((4, 1)), 256), "not divisible"),
    "gemv_float_acts": (lambda: T.packed_gemv(HANDLE, np.ones(128, np.float32), 1.0), "int8"),
    "gemv_wrong_k": (lambda: T.packed_gemv(HANDLE, np.ones(64, np.int8), 1.0), r"\(64,\)"),
    "gemv_vector_scale": (lambda: T.packed_gemv(HANDLE, np.ones(128, np.int8), np.ones(2)), "scalar"),
    "gemm_float_acts": (lambda: T.packed_gemm(HANDLE, np.ones((2, 128)), np.ones(2, np.float32)), "int8"),
    "gemm_wrong_k": (lambda: T.packed_gemm(HANDLE, np.ones((2, 120), np.int8), np.ones(2, np.float32)), r"\(2, 120\)"),
    "gemm_scale_shape": (lambda: T.packed_gemm(HANDLE, np.ones((2, 128), np.int8), np.ones(3, np.float32)), r"\(2,\)"),
    "gemm_foreign_handle": (lambda: T.packed_gemm(object(), np.ones((2, 128), np.int8), np.ones(2, np.float32)), "PackedTernary"),
    "linear_int_acts": (lambda: T.packed_linear(HANDLE, np.ones((2, 128), np.int8)), "float"),
    "linear_wrong_k": (lambda: T.packed_linear(HANDLE, np.ones((2, 120), np.float32)), r"\(2, 120\)"),
    "linear_one_axis": (lambda: T.packed_linear(HANDLE, np.ones(128, np.float32)), r"\[N, 128\]"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_a_clear_value_error(name):
    call, pattern = BAD[name]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_ops_table_lists_every_ternary_op():
    assert set(T.OPS) == {
        "round_half_away", "quantize_weights", "quantize_acts", "dequantize_weights", "ternary_linear", "dense_linear",
        "pack_ternary", "unpack_ternary", "prepare_packed", "packed_gemv", "packed_gemm", "packed_linear", "int8_linear",
    }


# --- dense_linear (the LM head's linear, with ternary_linear's keep contract) ------------------


def test_dense_linear_gradients_match_finite_differences():
    x, w = normal(20, (5, 7)), normal(21, (3, 7))
    assert gradcheck(lambda a, b: T.dense_linear(a, b), [x, w])
    np.testing.assert_allclose(T.dense_linear(x, w).data, x @ w.T, rtol=1e-12)


@given(seeds, st.integers(0, 6))
def test_dense_linear_keep_uses_only_kept_rows(seed, n_keep):
    x, w = normal(seed, (6, 9)), normal(seed + 1, (4, 9))
    gy = normal(seed + 2, (6, 4))
    keep = np.sort(np.random.default_rng(seed).choice(6, n_keep, replace=False))
    xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
    T.dense_linear(xt, wt, keep=T.RowSelection(keep)).backward(gy)
    dropped = np.setdiff1d(np.arange(6), keep)
    np.testing.assert_array_equal(xt.grad[dropped], 0.0)
    np.testing.assert_allclose(xt.grad[keep], gy[keep] @ w, rtol=1e-12)
    np.testing.assert_allclose(wt.grad, gy[keep].T @ x[keep], rtol=1e-12, atol=1e-12)


def test_dense_linear_keep_is_exact_when_dropped_rows_have_zero_gradient():
    """The Collider case: filtered tokens' loss weights are zero, so skipping their rows gives
    the dense gradients."""
    x, w, gy = normal(30, (8, 16)), normal(31, (5, 16)), normal(32, (8, 5))
    keep = np.array([0, 3, 4, 7])
    gy[np.setdiff1d(np.arange(8), keep)] = 0.0
    grads = []
    for k in (None, keep):
        xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
        T.dense_linear(xt, wt, keep=k).backward(gy)
        grads.append((xt.grad, wt.grad))
    np.testing.assert_allclose(grads[1][0], grads[0][0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grads[1][1], grads[0][1], rtol=1e-12, atol=1e-15)


def test_dense_linear_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="dense_linear: expected x"):
        T.dense_linear(normal(1, (3, 4)), normal(2, (2, 5)))


@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
def test_training_forward_uses_the_export_quantizer_exactly(backend_name):
    """The weights the training forward multiplies by (seen through the STE gradient of x with
    dY = I) are bit for bit the reference quantizer's q * s, which export writes: one weight
    quantizer per backend, so no group (fp16 rounding ties, wide dynamic range, dead groups) can
    get a different scale in training than at export."""
    import backends
    from reference.autograd import Tensor

    be = backends.get_backend(backend_name)
    rng = np.random.default_rng(11)
    g, m = 64, 12
    w = rng.standard_normal((m, 4 * g)).astype(np.float32)
    tie = (1000.0 + 1000.5) / 2  # an fp16 rounding tie for the group mean
    w[0, :g] = np.float32(tie)
    w[0, 0] = np.float32(tie + 2 ** -13)
    w[1, :g] = 2.0 ** rng.integers(-40, 10, g) * rng.choice([-1, 1], g)  # wide dynamic range
    w[2, g:2 * g] = 1e-12  # a dead group (mean below the zero threshold)
    w[3] *= 1e4
    x = Tensor(rng.standard_normal((m, 4 * g)).astype(np.float32), requires_grad=True)
    y = be.ternary_linear(x, Tensor(w), g)
    y.backward(np.eye(m, dtype=np.float32))
    q, s = T.quantize_weights(w, g)
    want = T.dequantize_weights(q, s, g).astype(np.float32)
    assert np.array_equal(be.to_numpy(x.grad), want)
