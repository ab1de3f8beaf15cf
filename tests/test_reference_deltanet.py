"""Gated DeltaNet: recurrence vs chunkwise form vs single steps, gradchecks, gates, bad input."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from reference import Tensor, gradcheck
from reference.deltanet import (
    deltanet_beta,
    deltanet_gates,
    gated_delta_chunkwise,
    gated_delta_recurrent,
    gated_delta_step,
    l2_normalize,
)

pytestmark = pytest.mark.reference


def make_inputs(seed, B, T, H, dk, dv, dtype=np.float64):
    """Realistic inputs: unit-norm q and k, beta in (0, 1), g = log alpha <= 0, a nonzero state."""
    r = np.random.default_rng(seed)
    q = r.standard_normal((B, T, H, dk))
    k = r.standard_normal((B, T, H, dk))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = r.standard_normal((B, T, H, dv))
    beta = 1.0 / (1.0 + np.exp(-r.standard_normal((B, T, H))))
    g = -np.exp(r.standard_normal((B, T, H)) - 1.0)
    s0 = r.standard_normal((B, H, dk, dv))
    return [a.astype(dtype) for a in (q, k, v, beta, g, s0)]


def naive_recurrence(q, k, v, beta, g, s0):
    """The SPEC formula, written out literally per (batch, head, token)."""
    B, T, H, _ = q.shape
    o = np.zeros(v.shape)
    S = s0.copy()
    for b in range(B):
        for h in range(H):
            s = S[b, h]
            for t in range(T):
                kt, vt = k[b, t, h], v[b, t, h]
                s = np.exp(g[b, t, h]) * (s - beta[b, t, h] * np.outer(kt, kt @ s)) + beta[b, t, h] * np.outer(kt, vt)
                o[b, t, h] = s.T @ q[b, t, h]
            S[b, h] = s
    return o, S


def run_with_grads(fn, arrays, seed=5):
    """Forward plus the gradients of a fixed random projection of both outputs."""
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    o, s = fn(*tensors)
    r = np.random.default_rng(seed)
    wo = Tensor(r.standard_normal(o.shape).astype(o.dtype))
    ws = Tensor(r.standard_normal(s.shape).astype(s.dtype))
    ((o * wo).sum() + (s * ws).sum()).backward()
    return [o.data, s.data], [t.grad for t in tensors]


def recurrent(*a):
    return gated_delta_recurrent(*a[:5], initial_state=a[5])


def chunked(chunk):
    return lambda *a: gated_delta_chunkwise(*a[:5], chunk_size=chunk, initial_state=a[5])


def test_recurrent_matches_the_literal_formula():
    x = make_inputs(0, 2, 9, 2, 3, 4)
    o, s = recurrent(*x)
    o_ref, s_ref = naive_recurrence(*x)
    np.testing.assert_allclose(o.data, o_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.data, s_ref, rtol=1e-12, atol=1e-12)


def test_recurrent_gradcheck():
    assert gradcheck(recurrent, make_inputs(1, 2, 6, 2, 3, 4))


def test_recurrent_gradcheck_without_initial_state():
    x = make_inputs(2, 1, 5, 1, 3, 2)[:5]
    assert gradcheck(lambda *a: gated_delta_recurrent(*a), x)


@pytest.mark.parametrize("T, chunk", [(5, 16), (16, 16), (37, 16), (19, 8), (11, 64)])
def test_chunkwise_gradcheck(T, chunk):
    assert gradcheck(chunked(chunk), make_inputs(T, 1, T, 2, 3, 2))


@pytest.mark.parametrize("T, chunk", [(1, 16), (15, 16), (33, 16), (64, 64), (100, 64), (150, 64)])
def test_chunkwise_equals_recurrent_float64(T, chunk):
    x = make_inputs(T, 2, T, 2, 6, 5)
    outs_r, grads_r = run_with_grads(recurrent, x)
    outs_c, grads_c = run_with_grads(chunked(chunk), x)
    for a, b in zip(outs_r + grads_r, outs_c + grads_c):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T, chunk", [(20, 16), (130, 64)])
def test_chunkwise_equals_recurrent_float32(T, chunk):
    x = make_inputs(T + 1, 2, T, 2, 16, 8, dtype=np.float32)
    outs_r, grads_r = run_with_grads(recurrent, x)
    outs_c, grads_c = run_with_grads(chunked(chunk), x)
    for a, b in zip(outs_r + grads_r, outs_c + grads_c):
        assert a.dtype == b.dtype == np.float32
        scale = np.abs(a).max()
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * scale)


@given(B=st.integers(1, 2), T=st.integers(1, 70), H=st.integers(1, 2), dk=st.integers(2, 8),
       dv=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_chunkwise_equals_recurrent_property(B, T, H, dk, dv, seed):
    x = make_inputs(seed, B, T, H, dk, dv)
    outs_r, grads_r = run_with_grads(recurrent, x)
    outs_c, grads_c = run_with_grads(chunked(16), x)
    for a, b in zip(outs_r + grads_r, outs_c + grads_c):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10)


def test_chunkwise_handles_strong_decay_without_overflow():
    x = make_inputs(3, 1, 70, 1, 4, 4)
    x[4] = np.full_like(x[4], -30.0)  # alpha ~ 1e-13: unmasked exp(gamma_i - gamma_t) would reach e^1890
    with np.errstate(over="raise", invalid="raise"):
        outs_c, grads_c = run_with_grads(chunked(64), x)
    outs_r, grads_r = run_with_grads(recurrent, x)
    for a, b in zip(outs_r + grads_r, outs_c + grads_c):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [recurrent, chunked(16)])
def test_zero_length_sequence_returns_the_initial_state(fn):
    x = make_inputs(4, 2, 0, 2, 3, 4)
    o, s = fn(*x)
    assert o.shape == (2, 0, 2, 4)
    np.testing.assert_array_equal(s.data, x[5])


def test_steps_reproduce_the_recurrence():
    q, k, v, beta, g, s0 = make_inputs(6, 2, 12, 3, 4, 5)
    o_ref, s_ref = gated_delta_recurrent(q, k, v, beta, g, initial_state=s0)
    S = s0
    for t in range(q.shape[1]):
        o_t, S = gated_delta_step(q[:, t], k[:, t], v[:, t], beta[:, t], g[:, t], S)
        np.testing.assert_allclose(o_t, o_ref.data[:, t], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(S, s_ref.data, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [recurrent, chunked(16)])
def test_no_write_and_no_decay_keeps_the_state(fn):
    q, k, v, beta, g, s0 = make_inputs(7, 2, 21, 2, 3, 4)
    o, s = fn(q, k, v, np.zeros_like(beta), np.zeros_like(g), s0)
    np.testing.assert_allclose(s.data, s0, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(o.data, np.einsum("bhkv,bthk->bthv", s0, q), rtol=1e-12, atol=1e-12)


def test_full_write_with_unit_key_stores_the_value():
    # beta = 1, alpha = 1: the delta rule replaces what k_t reads with v_t exactly
    q, k, v, beta, g, s0 = make_inputs(8, 1, 3, 1, 4, 3)
    _, s = gated_delta_recurrent(q, k, v, np.ones_like(beta), np.zeros_like(g), initial_state=s0)
    np.testing.assert_allclose(k[0, -1, 0] @ s.data[0, 0], v[0, -1, 0], rtol=1e-12, atol=1e-12)


def test_l2_normalize_values_and_gradcheck():
    x = np.random.default_rng(9).standard_normal((3, 4, 5))
    y = l2_normalize(x, eps=0.0).data
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-12)
    assert gradcheck(lambda a: l2_normalize(a), [x])
    assert l2_normalize(np.zeros((2, 3), dtype=np.float32)).dtype == np.float32  # eps keeps zeros finite


def test_gates_values_and_gradcheck():
    r = np.random.default_rng(10)
    a_proj = r.standard_normal((2, 5, 3)) * 3
    dt_bias = r.standard_normal(3)
    A_log = r.standard_normal(3)
    g = deltanet_gates(a_proj, dt_bias, A_log).data
    np.testing.assert_allclose(g, -np.exp(A_log) * np.log1p(np.exp(a_proj + dt_bias)), rtol=1e-12)
    assert np.all(g <= 0)
    assert gradcheck(deltanet_gates, [a_proj, dt_bias, A_log])
    big = deltanet_gates(np.array([[[800.0]]]), np.zeros(1), np.zeros(1)).data
    assert big[0, 0, 0] == -800.0  # softplus stays finite for large inputs


def test_beta_values_and_gradcheck():
    z = np.random.default_rng(12).standard_normal((2, 4, 3)) * 4
    np.testing.assert_allclose(deltanet_beta(z).data, 1 / (1 + np.exp(-z)), rtol=1e-12)
    assert gradcheck(deltanet_beta, [z])
    assert deltanet_beta(np.array([-800.0, 800.0])).data.tolist() == [0.0, 1.0]


def test_layer_pipeline_gradcheck():
    """Gates, beta and normalisation composed with the chunked kernel, as a layer uses them."""
    r = np.random.default_rng(13)
    B, T, H, d = 1, 10, 2, 3
    raw_q, raw_k, v = (r.standard_normal((B, T, H, d)) for _ in range(3))
    a_proj, b_proj = r.standard_normal((B, T, H)), r.standard_normal((B, T, H))
    dt_bias, A_log = r.standard_normal(H), r.standard_normal(H)

    def layer(raw_q, raw_k, v, a_proj, b_proj, dt_bias, A_log):
        g = deltanet_gates(a_proj, dt_bias, A_log)
        return gated_delta_chunkwise(l2_normalize(raw_q), l2_normalize(raw_k), v, deltanet_beta(b_proj), g,
                                     chunk_size=4)

    assert gradcheck(layer, [raw_q, raw_k, v, a_proj, b_proj, dt_bias, A_log])


@pytest.mark.parametrize("fn", [gated_delta_recurrent, gated_delta_chunkwise])
@pytest.mark.parametrize("change, message", [
    (lambda x: x.__setitem__(1, x[1][..., :2]), "q and k"),
    (lambda x: x.__setitem__(2, x[2][:, :3]), "v must be"),
    (lambda x: x.__setitem__(3, x[3][..., None]), "beta must be"),
    (lambda x: x.__setitem__(4, x[4][:, :2]), "g must be"),
    (lambda x: x.__setitem__(5, x[5][:, :, :2]), "initial_state must be"),
    (lambda x: x.__setitem__(2, x[2].astype(np.float32)), "one float dtype"),
])
def test_bad_input_raises_value_error(fn, change, message):
    x = make_inputs(14, 2, 5, 2, 3, 4)
    change(x)
    with pytest.raises(ValueError, match=message):
        fn(*x[:5], initial_state=x[5])


def test_bad_chunk_size_and_step_shapes_raise_value_error():
    q, k, v, beta, g, s0 = make_inputs(15, 1, 4, 1, 3, 2)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_chunkwise(q, k, v, beta, g, chunk_size=0)
    with pytest.raises(ValueError, match="state must be"):
        gated_delta_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0], s0[..., :1])
    with pytest.raises(ValueError, match="beta_t and g_t"):
        gated_delta_step(q[:, 0], k[:, 0], v[:, 0], beta[:, :2], g[:, 0], s0)
