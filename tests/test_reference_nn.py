"""Reference neural-network ops: gradchecks, float32 vs float64, properties, bad input."""
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import reference
from reference import Tensor, gradcheck, no_grad
from reference import nn

pytestmark = pytest.mark.reference

R = np.random.default_rng(11)


def randn(*shape):
    return R.standard_normal(shape)


def naive_attention(q, k, v, causal=True, scale=None):
    """Loop-per-head attention straight from the definition (absolute positions, GQA by h // G)."""
    b, t, n_q, hd = q.shape
    s_len, n_kv = k.shape[1], k.shape[2]
    scale = 1.0 / np.sqrt(hd) if scale is None else scale
    out = np.zeros((b, t, n_q, v.shape[3]))
    for bi in range(b):
        for h in range(n_q):
            kv = h // (n_q // n_kv)
            for i in range(t):
                scores = k[bi, :, kv] @ q[bi, i, h] * scale
                if causal:
                    scores[np.arange(s_len) > s_len - t + i] = -np.inf
                p = np.exp(scores - scores.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, :, kv]
    return out


# --- gradchecks (float64) -----------------------------------------------------------------

TARGETS = np.array([3, 0, 6, 2, 6, 1, 4])
TARGETS_IGNORED = np.array([3, -100, 6, 2, -100, 1, 4])
CE_WEIGHTS = np.array([1.0, 0.0, 0.5, 2.0, 1.0, 0.0, 1.5])
POSITIONS = np.array([0, 1, 2, 7, 30])

GRAD_CASES = {
    "softmax_last": (lambda x: nn.softmax(x), [randn(3, 7)]),
    "softmax_axis0": (lambda x: nn.softmax(x, axis=0), [randn(5, 3)]),
    "log_softmax": (lambda x: nn.log_softmax(x), [randn(2, 3, 7)]),
    "log_softmax_axis1": (lambda x: nn.log_softmax(x, axis=1), [randn(2, 5, 3)]),
    "sigmoid": (nn.sigmoid, [randn(4, 5) * 3]),
    "softplus": (nn.softplus, [randn(4, 5) * 3]),
    "silu": (nn.silu, [randn(4, 5) * 3]),
    "relu2": (nn.relu2, [randn(4, 5)]),
    "swiglu": (nn.swiglu, [randn(3, 7), randn(3, 7)]),
    "relu2_glu": (nn.relu2_glu, [randn(3, 7), randn(3, 7)]),
    "rmsnorm": (nn.rmsnorm, [randn(2, 3, 7), randn(7)]),
    "rmsnorm_tiny_rows": (lambda x, w: nn.rmsnorm(x, w, eps=1e-3), [randn(4, 5) * 1e-2, randn(5)]),
    "rope": (lambda x: nn.rope(x, POSITIONS), [randn(2, 5, 3, 6)]),
    "rope_batched_positions": (lambda x: nn.rope(x, np.array([[0, 1, 2], [5, 6, 7]]), theta=500.0),
                               [randn(2, 3, 1, 4)]),
    "attention_mha_causal": (nn.attention, [randn(2, 5, 3, 4), randn(2, 5, 3, 4), randn(2, 5, 3, 4)]),
    "attention_gqa_4_2": (nn.attention, [randn(1, 5, 4, 3), randn(1, 5, 2, 3), randn(1, 5, 2, 3)]),
    "attention_mqa_4_1": (nn.attention, [randn(2, 3, 4, 3), randn(2, 3, 1, 3), randn(2, 3, 1, 3)]),
    "attention_s_gt_t": (nn.attention, [randn(1, 3, 4, 5), randn(1, 7, 2, 5), randn(1, 7, 2, 2)]),
    "attention_decode_t1": (nn.attention, [randn(2, 1, 2, 4), randn(2, 6, 1, 4), randn(2, 6, 1, 4)]),
    "attention_noncausal_scale": (lambda q, k, v: nn.attention(q, k, v, causal=False, scale=0.7),
                                  [randn(1, 4, 2, 3), randn(1, 6, 1, 3), randn(1, 6, 1, 3)]),
    "ce_mean": (lambda x: nn.cross_entropy(x, TARGETS), [randn(7, 9)]),
    "ce_sum": (lambda x: nn.cross_entropy(x, TARGETS, reduction="sum"), [randn(7, 9)]),
    "ce_none": (lambda x: nn.cross_entropy(x, TARGETS, reduction="none"), [randn(7, 9)]),
    "ce_ignore_index": (lambda x: nn.cross_entropy(x, TARGETS_IGNORED), [randn(7, 9)]),
    "ce_custom_ignore_index": (lambda x: nn.cross_entropy(x, np.where(TARGETS_IGNORED < 0, 8, TARGETS_IGNORED),
                                                           ignore_index=8), [randn(7, 9)]),
    "ce_weights_fixed": (lambda x: nn.cross_entropy(x, TARGETS_IGNORED, weights=CE_WEIGHTS), [randn(7, 9)]),
    "ce_weights_mean_grad": (lambda x, w: nn.cross_entropy(x, TARGETS_IGNORED, weights=w),
                             [randn(7, 9), CE_WEIGHTS + 0.3]),
    "ce_weights_sum_grad": (lambda x, w: nn.cross_entropy(x, TARGETS_IGNORED, w, reduction="sum"),
                            [randn(7, 9), CE_WEIGHTS]),
    "ce_weights_none_grad": (lambda x, w: nn.cross_entropy(x, TARGETS_IGNORED, w, reduction="none"),
                             [randn(7, 9), CE_WEIGHTS]),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradcheck(name):
    fn, inputs = GRAD_CASES[name]
    assert gradcheck(fn, inputs)


def test_every_op_is_registered():
    for name in ["softmax", "log_softmax", "sigmoid", "softplus", "silu", "relu2", "swiglu", "relu2_glu",
                 "rmsnorm", "rope", "rope_tables", "rope_rotate", "attention", "cross_entropy",
                 "cross_entropy_per_token"]:
        assert reference.OPS[name] is nn.OPS[name]


# --- float32 agrees with float64 and keeps its dtype --------------------------------------

F32_CASES = {
    "softmax": (nn.softmax, [randn(3, 7)]),
    "log_softmax": (nn.log_softmax, [randn(3, 7) * 5]),
    "sigmoid": (nn.sigmoid, [randn(4, 5) * 3]),
    "softplus": (nn.softplus, [randn(4, 5) * 3]),
    "silu": (nn.silu, [randn(4, 5) * 3]),
    "relu2": (nn.relu2, [randn(4, 5)]),
    "swiglu": (nn.swiglu, [randn(3, 7), randn(3, 7)]),
    "relu2_glu": (nn.relu2_glu, [randn(3, 7), randn(3, 7)]),
    "rmsnorm": (nn.rmsnorm, [randn(2, 3, 8), randn(8)]),
    "rope": (lambda x: nn.rope(x, np.arange(5) * 100), [randn(2, 5, 3, 8)]),
    "attention": (nn.attention, [randn(2, 3, 4, 8), randn(2, 6, 2, 8), randn(2, 6, 2, 8)]),
    "cross_entropy": (lambda x, w: nn.cross_entropy(x, TARGETS_IGNORED, w), [randn(7, 9) * 3, CE_WEIGHTS + 0.1]),
    "cross_entropy_none": (lambda x: nn.cross_entropy(x, TARGETS, reduction="none"), [randn(7, 9) * 3]),
}


def _forward_backward(fn, arrays, dtype):
    tensors = [Tensor(a.astype(dtype), requires_grad=True) for a in arrays]
    out = fn(*tensors)
    upstream = np.random.default_rng(5).standard_normal(out.shape).astype(dtype)
    out.backward(upstream)
    return out, [t.grad for t in tensors]


def _assert_close_relative(got, want, rel=1e-5):
    scale = max(float(np.max(np.abs(want))), 1e-30)
    np.testing.assert_allclose(got, want, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize("name", sorted(F32_CASES))
def test_float32_keeps_dtype_and_agrees_with_float64(name):
    fn, arrays = F32_CASES[name]
    out32, grads32 = _forward_backward(fn, arrays, np.float32)
    out64, grads64 = _forward_backward(fn, arrays, np.float64)
    assert out32.dtype == np.float32 and out64.dtype == np.float64
    _assert_close_relative(out32.data, out64.data)
    for g32, g64 in zip(grads32, grads64):
        assert g32.dtype == np.float32
        _assert_close_relative(g32, g64)


def test_rope_tables_follow_the_requested_dtype():
    cos, sin = nn.rope_tables(np.arange(4), 6, dtype=np.float32)
    assert cos.shape == sin.shape == (4, 3) and cos.dtype == sin.dtype == np.float32


# --- softmax family and activations -------------------------------------------------------


@given(st.lists(st.floats(-50, 50), min_size=1, max_size=12), st.floats(-1e4, 1e4))
def test_softmax_rows_sum_to_one_and_shift_invariant(values, shift):
    x = np.array([values, values[::-1]])
    y = nn.softmax(x).data
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-12)
    assert np.all(y >= 0)
    np.testing.assert_allclose(nn.softmax(x + shift).data, y, atol=1e-9)
    np.testing.assert_allclose(np.exp(nn.log_softmax(x).data), y, atol=1e-12)


def test_log_softmax_is_stable_for_huge_logits():
    x = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = nn.log_softmax(Tensor(x, requires_grad=True))
        y.backward(np.ones_like(x))
    np.testing.assert_allclose(y.data[0], [0.0, -1e4, -2e4])
    np.testing.assert_allclose(y.data[1], -np.log(3.0))
    assert np.all(np.isfinite(nn.softmax(x * 10).data))
    y32 = nn.log_softmax(x.astype(np.float32)).data
    assert y32.dtype == np.float32 and np.all(np.isfinite(y32))


def test_sigmoid_softplus_silu_stable_and_exact_for_large_inputs():
    x = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s, sp, si = nn.sigmoid(x).data, nn.softplus(x).data, nn.silu(x).data
        sp32 = nn.softplus(x.astype(np.float32)).data
    np.testing.assert_allclose(s, [0.0, np.exp(-40.0), 0.5, 1.0, 1.0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(sp, [0.0, np.log1p(np.exp(-40.0)), np.log(2.0), 40.0, 1000.0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(sp32, sp, rtol=1e-6)
    np.testing.assert_allclose(si, x * s, rtol=1e-12)


def test_activations_match_their_definitions():
    x = randn(50) * 4
    np.testing.assert_allclose(nn.sigmoid(x).data, 1 / (1 + np.exp(-x)), rtol=1e-12)
    np.testing.assert_allclose(nn.softplus(x).data, np.log1p(np.exp(x)), rtol=1e-12)
    np.testing.assert_allclose(nn.relu2(x).data, np.maximum(x, 0) ** 2)
    gate, up = randn(3, 4), randn(3, 4)
    np.testing.assert_allclose(nn.swiglu(gate, up).data, nn.silu(gate).data * up, rtol=1e-14)
    np.testing.assert_allclose(nn.relu2_glu(gate, up).data, np.maximum(gate, 0) ** 2 * up, rtol=1e-14)


def test_swiglu_gives_both_inputs_a_gradient():
    gate, up = Tensor(randn(2, 3), requires_grad=True), Tensor(randn(2, 3), requires_grad=True)
    nn.swiglu(gate, up).sum().backward()
    assert gate.grad is not None and up.grad is not None
    np.testing.assert_allclose(up.grad, nn.silu(gate.data).data)


# --- RMSNorm -------------------------------------------------------------------------------


def test_rmsnorm_matches_formula_and_unit_rms():
    x, w = randn(3, 4, 16) * 5, randn(16)
    want = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(nn.rmsnorm(x, w).data, want, rtol=1e-12)
    unit = nn.rmsnorm(x, np.ones(16)).data
    np.testing.assert_allclose(np.sqrt(np.mean(unit ** 2, axis=-1)), 1.0, rtol=1e-6)


# --- RoPE ----------------------------------------------------------------------------------


def test_rope_matches_pairwise_rotation_definition():
    x, pos, hd = randn(1, 3, 2, 8), np.array([0, 4, 9]), 8
    y = nn.rope(x, pos, theta=100.0).data
    for t, p in enumerate(pos):
        for i in range(hd // 2):
            a = p * 100.0 ** (-2 * i / hd)
            x1, x2 = x[0, t, :, i], x[0, t, :, i + hd // 2]
            np.testing.assert_allclose(y[0, t, :, i], x1 * np.cos(a) - x2 * np.sin(a), rtol=1e-12)
            np.testing.assert_allclose(y[0, t, :, i + hd // 2], x2 * np.cos(a) + x1 * np.sin(a), rtol=1e-12)


def test_rope_preserves_norms_and_is_identity_at_position_zero():
    x = randn(2, 6, 3, 10)
    pos = np.array([0, 1, 5, 17, 1000, 65535])
    y = nn.rope(x, pos).data
    half = 5
    np.testing.assert_allclose(np.hypot(y[..., :half], y[..., half:]), np.hypot(x[..., :half], x[..., half:]),
                               rtol=1e-12)
    np.testing.assert_array_equal(nn.rope(x, np.zeros(6, dtype=np.int64)).data, x)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])


def test_rope_dot_products_depend_only_on_relative_position():
    q, k = randn(1, 1, 1, 8), randn(1, 1, 1, 8)
    dots = [float(np.sum(nn.rope(q, np.array([m + 3])).data * nn.rope(k, np.array([m])).data)) for m in (0, 7, 200)]
    np.testing.assert_allclose(dots, dots[0], rtol=1e-10)


def test_rope_backward_is_the_inverse_rotation():
    x, pos = Tensor(randn(2, 4, 3, 6), requires_grad=True), np.array([3, 1, 4, 15])
    g = randn(2, 4, 3, 6)
    nn.rope(x, pos).backward(g)
    np.testing.assert_allclose(x.grad, nn.rope(g, -pos).data, rtol=1e-12)
    np.testing.assert_allclose(nn.rope(nn.rope(g, pos).data, -pos).data, g, atol=1e-12)


def test_rope_rotate_with_tables_equals_rope():
    x, pos = randn(2, 4, 3, 6), np.array([2, 3, 4, 5])
    cos, sin = nn.rope_tables(pos, 6, 10000.0, np.float64)
    np.testing.assert_array_equal(nn.rope_rotate(x, cos, sin), nn.rope(x, pos).data)


# --- attention -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    ((2, 5, 4, 3), (2, 5, 2, 3)),  # GQA 4 -> 2
    ((1, 3, 4, 4), (1, 7, 1, 4)),  # MQA, S > T
    ((1, 4, 3, 5), (1, 4, 3, 5)),  # plain multi-head, odd sizes
])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_naive_definition(shape, causal):
    (qs, ks) = shape
    q, k, v = randn(*qs), randn(*ks), randn(*ks)
    np.testing.assert_allclose(nn.attention(q, k, v, causal=causal).data, naive_attention(q, k, v, causal),
                               rtol=1e-10, atol=1e-12)


def test_attention_with_s_greater_than_t_equals_last_rows_of_full_attention():
    b, s_len, t, n_q, n_kv, hd = 2, 9, 3, 4, 2, 5
    q_full, k, v = randn(b, s_len, n_q, hd), randn(b, s_len, n_kv, hd), randn(b, s_len, n_kv, hd)
    full = nn.attention(q_full, k, v).data
    tail = nn.attention(q_full[:, -t:], k, v).data
    np.testing.assert_allclose(tail, full[:, -t:], rtol=1e-12, atol=1e-14)
    one = nn.attention(q_full[:, -1:], k, v).data  # single-token decode step
    np.testing.assert_allclose(one, full[:, -1:], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n_kv", [2, 1])
def test_gqa_equals_attention_with_repeated_kv_heads_including_grads(n_kv):
    n_q = 4
    q = Tensor(randn(2, 5, n_q, 3), requires_grad=True)
    k = Tensor(randn(2, 6, n_kv, 3), requires_grad=True)
    v = Tensor(randn(2, 6, n_kv, 3), requires_grad=True)
    g = randn(2, 5, n_q, 3)
    nn.attention(q, k, v).backward(g)
    group = n_q // n_kv
    q_r = Tensor(q.data, requires_grad=True)
    k_r = Tensor(np.repeat(k.data, group, axis=2), requires_grad=True)
    v_r = Tensor(np.repeat(v.data, group, axis=2), requires_grad=True)
    out_r = nn.attention(q_r, k_r, v_r)
    out_r.backward(g)
    with no_grad():
        np.testing.assert_allclose(nn.attention(q, k, v).data, out_r.data, rtol=1e-12)
    np.testing.assert_allclose(q.grad, q_r.grad, rtol=1e-10)
    np.testing.assert_allclose(k.grad, k_r.grad.reshape(2, 6, n_kv, group, 3).sum(axis=3), rtol=1e-10)
    np.testing.assert_allclose(v.grad, v_r.grad.reshape(2, 6, n_kv, group, 3).sum(axis=3), rtol=1e-10)


def test_causal_attention_ignores_future_keys():
    q, k, v = randn(1, 4, 2, 3), randn(1, 4, 2, 3), randn(1, 4, 2, 3)
    k2, v2 = k.copy(), v.copy()
    k2[:, 3], v2[:, 3] = 100.0, -100.0  # only the last query may see position 3
    a, b = nn.attention(q, k, v).data, nn.attention(q, k2, v2).data
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert not np.allclose(a[:, 3], b[:, 3])


# --- cross-entropy -------------------------------------------------------------------------


def _naive_token_losses(logits, targets):
    return np.array([np.log(np.sum(np.exp(row))) - row[t] for row, t in zip(logits, targets)])


def test_cross_entropy_reductions_match_definition():
    x = randn(7, 9)
    per = _naive_token_losses(x, TARGETS)
    np.testing.assert_allclose(nn.cross_entropy(x, TARGETS).data, per.mean(), rtol=1e-12)
    np.testing.assert_allclose(nn.cross_entropy(x, TARGETS, reduction="sum").data, per.sum(), rtol=1e-12)
    np.testing.assert_allclose(nn.cross_entropy(x, TARGETS, reduction="none").data, per, rtol=1e-12)
    np.testing.assert_allclose(nn.cross_entropy_per_token(x, TARGETS), per, rtol=1e-12)


def test_cross_entropy_weights_and_ignore_index():
    x = randn(7, 9)
    valid = TARGETS_IGNORED != -100
    per = np.where(valid, _naive_token_losses(x, np.where(valid, TARGETS_IGNORED, 0)), 0.0)
    np.testing.assert_allclose(nn.cross_entropy_per_token(x, TARGETS_IGNORED), per, rtol=1e-12)
    np.testing.assert_allclose(nn.cross_entropy(x, TARGETS_IGNORED).data, per[valid].mean(), rtol=1e-12)
    w = CE_WEIGHTS
    want = np.sum(w * per) / np.sum(w[valid])
    np.testing.assert_allclose(nn.cross_entropy(x, TARGETS_IGNORED, w).data, want, rtol=1e-12)
    np.testing.assert_allclose(nn.cross_entropy(x, TARGETS_IGNORED, w, reduction="none").data, w * per, rtol=1e-12)
    np.testing.assert_allclose(nn.cross_entropy(x, TARGETS_IGNORED, w, reduction="sum").data, np.sum(w * per),
                               rtol=1e-12)
    logits = Tensor(x, requires_grad=True)
    nn.cross_entropy(logits, TARGETS_IGNORED, w).backward()
    zero_rows = ~valid | (w == 0)
    assert np.all(logits.grad[zero_rows] == 0) and np.all(np.abs(logits.grad[~zero_rows]).sum(axis=1) > 0)
    np.testing.assert_allclose(logits.grad.sum(axis=1), 0.0, atol=1e-15)  # softmax - onehot rows sum to 0


@pytest.mark.parametrize("case", ["all_ignored", "all_weights_zero"])
def test_cross_entropy_mean_with_zero_weight_sum_is_zero_with_zero_grads(case):
    x = Tensor(randn(4, 5), requires_grad=True)
    targets = np.full(4, -100) if case == "all_ignored" else np.array([0, 1, 2, 3])
    w = Tensor(np.zeros(4) if case == "all_weights_zero" else np.ones(4), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = nn.cross_entropy(x, targets, w)
        loss.backward()
    assert float(loss.data) == 0.0 and loss.shape == ()
    assert np.all(x.grad == 0) and np.all(w.grad == 0)


def test_cross_entropy_is_finite_for_huge_logits_and_keeps_float32():
    x = (randn(6, 11) * 1e4).astype(np.float32)
    t = np.array([0, 3, 10, 5, 5, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = nn.cross_entropy(Tensor(x, requires_grad=True), t)
    assert loss.dtype == np.float32 and np.isfinite(loss.data)
    assert nn.cross_entropy_per_token(x, t).dtype == np.float32


def test_cross_entropy_per_token_accepts_tensors_and_records_nothing():
    x = Tensor(randn(3, 4), requires_grad=True)
    per = nn.cross_entropy_per_token(x, Tensor(np.array([0, 1, 3])))
    assert isinstance(per, np.ndarray) and per.shape == (3,)


def test_cached_attention_steps_agree_with_attention_over_the_whole_sequence():
    # Token by token through the cache == one causal attention over all RoPE'd positions.
    q, k, v = (randn(1, 7, n, 8).astype(np.float32) for n in (4, 2, 2))
    cos, sin = nn.rope_tables(np.arange(7), 8)
    kc, vc = np.zeros((1, 7, 2, 8), np.float32), np.zeros((1, 7, 2, 8), np.float32)
    steps = np.concatenate([nn.cached_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], kc, vc, t,
                                                cos[t:t + 1], sin[t:t + 1]) for t in range(7)], axis=1)
    whole = nn.attention(nn.rope_rotate(q, cos, sin).astype(np.float64), nn.rope_rotate(k, cos, sin).astype(np.float64),
                         v.astype(np.float64), causal=True).data
    assert steps.dtype == np.float32
    np.testing.assert_allclose(steps, whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(vc, v)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("call, pattern", [
    (lambda: nn.attention(randn(1, 4, 3, 8), randn(1, 4, 2, 8), randn(1, 4, 2, 8)),
     r"query heads \(3\) must be a multiple of kv heads \(2\).*\(1, 4, 3, 8\)"),
    (lambda: nn.attention(randn(1, 4, 4, 8), randn(1, 4, 2, 8), randn(1, 5, 2, 8)),
     r"k and v.*\(1, 4, 2, 8\).*\(1, 5, 2, 8\)"),
    (lambda: nn.attention(randn(1, 4, 4, 8), randn(1, 4, 2, 6), randn(1, 4, 2, 6)), r"head_dim.*\(1, 4, 2, 6\)"),
    (lambda: nn.attention(randn(2, 4, 4, 8), randn(1, 4, 2, 8), randn(1, 4, 2, 8)), r"batch.*\(2, 4, 4, 8\)"),
    (lambda: nn.attention(randn(1, 5, 4, 8), randn(1, 3, 2, 8), randn(1, 3, 2, 8)), r"S=3 < T=5"),
    (lambda: nn.attention(randn(4, 4, 8), randn(4, 2, 8), randn(4, 2, 8)), r"4-D.*\(4, 4, 8\)"),
    (lambda: nn.cached_attention(randn(1, 1, 4, 8), randn(1, 1, 2, 8), randn(1, 1, 2, 8), np.zeros((1, 4, 2, 8)),
                                 np.zeros((1, 4, 2, 8)), 4, *nn.rope_tables(np.arange(1), 8)), r"capacity 4"),
    (lambda: nn.cached_attention(randn(1, 2, 4, 8), randn(1, 2, 2, 8), randn(1, 2, 2, 8), np.zeros((1, 4, 2, 8)),
                                 np.zeros((1, 4, 2, 8)), 0, *nn.rope_tables(np.arange(1), 8)), r"cos and sin must be \[T, hd/2\]"),
    (lambda: nn.cached_attention(randn(2, 1, 4, 8), randn(2, 1, 2, 8), randn(2, 1, 2, 8), np.zeros((1, 4, 2, 8)),
                                 np.zeros((1, 4, 2, 8)), 0, *nn.rope_tables(np.arange(1), 8)), r"one sequence"),
    (lambda: nn.cached_attention(randn(1, 1, 4, 8), randn(1, 1, 2, 8), randn(1, 1, 2, 8), np.zeros((1, 4, 3, 8)),
                                 np.zeros((1, 4, 3, 8)), 0, *nn.rope_tables(np.arange(1), 8)), r"caches must be"),
    (lambda: nn.rope(randn(1, 4, 2, 7), np.arange(4)), r"head_dim 7"),
    (lambda: nn.rope(randn(1, 4, 2, 8), np.arange(5)), r"positions shape \(5,\).*\(1, 4, 2, 8\)"),
    (lambda: nn.rope(randn(1, 4, 2, 8), np.arange(4.0)), r"integers"),
    (lambda: nn.rmsnorm(randn(3, 8), randn(7)), r"weight shape \(7,\).*\(3, 8\)"),
    (lambda: nn.rmsnorm(randn(3, 8), randn(8).astype(np.float32)), r"different float dtypes"),
    (lambda: nn.swiglu(randn(3, 8), randn(3, 7)), r"\(3, 8\).*\(3, 7\)"),
    (lambda: nn.relu2_glu(randn(3, 8), randn(8)), r"\(3, 8\).*\(8,\)"),
    (lambda: nn.cross_entropy(randn(2, 3, 5), np.zeros(6, dtype=int)), r"logits shape \(2, 3, 5\)"),
    (lambda: nn.cross_entropy(randn(6, 5), np.zeros(5, dtype=int)), r"targets shape \(5,\).*\(6, 5\)"),
    (lambda: nn.cross_entropy(randn(6, 5), np.zeros(6)), r"integers"),
    (lambda: nn.cross_entropy(randn(3, 5), np.array([0, 5, 1])), r"\[0, 5\)"),
    (lambda: nn.cross_entropy(randn(3, 5), np.array([0, -1, 1])), r"\[0, 5\)"),
    (lambda: nn.cross_entropy(randn(3, 5), np.array([0, 1, 1]), np.ones(4)), r"weights shape \(4,\)"),
    (lambda: nn.cross_entropy(randn(3, 5), np.array([0, 1, 1]), reduction="avg"), r"reduction 'avg'"),
])
def test_bad_input_raises_value_error_naming_the_problem(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
