"""mHC residual streams (SPEC section 3): coefficient ops, stream ops, init, and the .mhc file."""
import itertools
import os
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import reference
from reference import Function, Tensor, gradcheck, mhc
from nanochat.io import mhc as mhc_io
from reference.mhc import (
    DYNAMIC_PARAM_NAMES,
    STATIC_PARAM_NAMES,
    composite_gain,
    mhc_collapse,
    mhc_dynamic_coeffs,
    mhc_expand,
    mhc_init_params,
    mhc_post,
    mhc_pre,
    mhc_static_coeffs,
    n_logits,
)

pytestmark = pytest.mark.reference

R = np.random.default_rng(20240611)


def random_logits(rng, n, scale=1.5, lead=()):
    res = rng.standard_normal(lead + ((1,) if n == 2 else (24,))) * scale
    return [res] + [rng.standard_normal(lead + (n,)) * scale for _ in range(4)]


def dynamic_inputs(rng, n, C, lead=(3,), gate=0.7):
    x = rng.standard_normal(lead + (n, C))
    w = rng.standard_normal((n_logits(n), n * C)) / np.sqrt(n * C)
    return [x, w, np.array([gate])] + random_logits(rng, n)


# --- gradchecks --------------------------------------------------------------------------
def _stream_case(lead, n, C, per_token):
    x = R.standard_normal(lead + (n, C))
    coeff_lead = lead if per_token else ()
    return x, R.random(coeff_lead + (n,)) + 0.1, R.random(coeff_lead + (n, n)), R.standard_normal(lead + (C,))


X2, HPRE_SHARED, HRES_SHARED, Y2 = _stream_case((4,), 2, 5, per_token=False)
X4, HPRE_TOKEN, HRES_TOKEN, Y4 = _stream_case((2, 3), 4, 3, per_token=True)

GRAD_CASES = {
    "static_n2": (mhc_static_coeffs, random_logits(R, 2)),
    "static_n4": (mhc_static_coeffs, random_logits(R, 4)),
    "dynamic_n2": (mhc_dynamic_coeffs, dynamic_inputs(R, 2, 5)),
    "dynamic_n4": (mhc_dynamic_coeffs, dynamic_inputs(R, 4, 3)),
    "dynamic_n4_batch_dims": (mhc_dynamic_coeffs, dynamic_inputs(R, 4, 2, lead=(2, 3))),
    "pre_shared": (mhc_pre, [X2, HPRE_SHARED]),
    "pre_per_token": (mhc_pre, [X4, HPRE_TOKEN]),
    "post_shared": (mhc_post, [X2, Y2, HRES_SHARED, HPRE_SHARED]),
    "post_per_token": (mhc_post, [X4, Y4, HRES_TOKEN, HPRE_TOKEN]),
    "post_mixed": (mhc_post, [X4, Y4, R.random((4, 4)), HPRE_TOKEN]),
    "expand": (lambda x: mhc_expand(x, 4), [R.standard_normal((2, 3, 5))]),
    "collapse": (mhc_collapse, [X4]),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradcheck(name):
    fn, inputs = GRAD_CASES[name]
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("n", [2, 4])
def test_gradcheck_dynamic_sublayer_chain(n):
    """X feeds the coefficients, mhc_pre and mhc_post at once: the tape must add all three."""
    C = 3
    a = R.standard_normal((C, C))

    def chain(x, w, gate, *static):
        h_res, h_pre, h_post = mhc_dynamic_coeffs(x, w, gate, *static)
        y = mhc_pre(x, h_pre) @ Tensor(a)
        return mhc_post(x, y, h_res, h_post)

    assert gradcheck(chain, dynamic_inputs(R, n, C, lead=(2,)))


# --- forward semantics -------------------------------------------------------------------
def test_static_coefficients_follow_the_spec_formulas():
    res, pre_l, pre_b, post_l, post_b = random_logits(R, 4)
    h_res, h_pre, h_post = mhc_static_coeffs(res, pre_l, pre_b, post_l, post_b)
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    weights = np.exp(res - res.max()) / np.exp(res - res.max()).sum()
    expected = np.zeros((4, 4))
    for k, perm in enumerate(itertools.permutations(range(4))):
        expected[np.arange(4), perm] += weights[k]
    np.testing.assert_allclose(h_res.data, expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(h_pre.data, sig(pre_l + pre_b), rtol=1e-13)
    np.testing.assert_allclose(h_post.data, 4 * sig(post_l + post_b), rtol=1e-13)

    alpha = np.array([0.3])
    h2, _, _ = mhc_static_coeffs(alpha, *random_logits(R, 2)[1:])
    a = sig(0.3)
    np.testing.assert_allclose(h2.data, [[a, 1 - a], [1 - a, a]], rtol=1e-14)


def test_pre_post_expand_collapse_follow_the_spec_formulas():
    x, y = X4, Y4
    u = mhc_pre(x, HPRE_TOKEN).data
    np.testing.assert_allclose(u, np.einsum("bts,btsc->btc", HPRE_TOKEN, x), rtol=1e-13)
    out = mhc_post(x, y, HRES_TOKEN, HPRE_TOKEN).data
    z = x + HPRE_TOKEN[..., None] * y[..., None, :]
    np.testing.assert_allclose(out, np.einsum("btij,btjc->btic", HRES_TOKEN, z), rtol=1e-13)
    e = mhc_expand(y, 4).data
    assert e.shape == (2, 3, 4, 3) and all(np.array_equal(e[..., s, :], y) for s in range(4))
    np.testing.assert_allclose(mhc_collapse(x).data, x.mean(axis=-2), rtol=1e-15)


def test_single_stream_with_unit_coefficients_is_a_plain_residual():
    x, y = R.standard_normal((5, 7)), R.standard_normal((5, 7))
    xs = mhc_expand(x, 1)
    assert mhc_pre(xs, np.ones(1)).data.tolist() == x.tolist()
    out = mhc_collapse(mhc_post(xs, y, np.ones((1, 1)), np.ones(1))).data
    assert np.array_equal(out, x + y)
    assert mhc_init_params(1, 0, "dynamic", 7, np.random.default_rng(0)) == {}


@pytest.mark.parametrize("n", [2, 4])
def test_dynamic_with_zero_gate_equals_static(n):
    params = mhc_init_params(n, 3, "dynamic", 6, np.random.default_rng(1), np.float64)
    for name in STATIC_PARAM_NAMES[n]:  # move away from the init so the check is not special
        params[name] = params[name] + R.standard_normal(params[name].shape)
    params["dyn_gate"] = np.zeros(1)
    x = R.standard_normal((2, 3, n, 6))
    static = mhc_static_coeffs(*[params[k] for k in STATIC_PARAM_NAMES[n]])
    dynamic = mhc_dynamic_coeffs(x, *[params[k] for k in ("dyn_weight", "dyn_gate") + STATIC_PARAM_NAMES[n]])
    for s, d in zip(static, dynamic):
        assert d.shape == (2, 3) + s.shape
        np.testing.assert_allclose(d.data, np.broadcast_to(s.data, d.shape), rtol=0, atol=1e-15)
    params["dyn_gate"] = np.full(1, 0.5)  # and a live gate makes the coefficients per-token
    h_res = mhc_dynamic_coeffs(x, *[params[k] for k in ("dyn_weight", "dyn_gate") + STATIC_PARAM_NAMES[n]])[0]
    assert not np.allclose(h_res.data[0, 0], h_res.data[1, 2])


@pytest.mark.parametrize("n", [2, 4])
def test_float32_matches_float64_and_keeps_its_dtype(n):
    inputs = dynamic_inputs(R, n, 4)
    ref = mhc_dynamic_coeffs(*inputs)
    t32 = [Tensor(a.astype(np.float32), requires_grad=True) for a in inputs]
    out = mhc_dynamic_coeffs(*t32)
    for r, o in zip(ref, out):
        assert o.dtype == np.float32
        np.testing.assert_allclose(o.data, r.data, rtol=2e-5, atol=2e-6)
    sum(o.sum() for o in out).backward()
    assert all(t.grad is not None and t.grad.dtype == np.float32 for t in t32)


def test_ops_are_registered_and_file_io_is_not():
    for name in ("mhc_static_coeffs", "mhc_dynamic_coeffs", "mhc_pre", "mhc_post", "mhc_expand",
                 "mhc_collapse", "composite_gain"):
        assert reference.OPS[name] is mhc.OPS[name]
    assert not any(v in (mhc_io.read_mhc, mhc_io.write_mhc) for v in reference.OPS.values())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: mhc_static_coeffs(np.zeros(2), *[np.zeros(2)] * 4), r"residual logits have shape \(2,\)"),
        (lambda: mhc_static_coeffs(np.zeros(24), *[np.zeros(3)] * 4), "n_streams = 2 or 4"),
        (lambda: mhc_dynamic_coeffs(np.zeros((3, 2, 4)), np.zeros((5, 7)), np.zeros(1), np.zeros(1),
                                    *[np.zeros(2)] * 4), r"dyn_weight has shape \(5, 7\), expected \(5, 8\)"),
        (lambda: mhc_pre(np.zeros((3, 2, 4)), np.zeros(3)), r"h_pre has shape \(3,\), expected \(2,\) or \(3, 2\)"),
        (lambda: mhc_post(np.zeros((3, 2, 4)), np.zeros((3, 4)), np.zeros((3, 3)), np.zeros(2)), "H_res has shape"),
        (lambda: mhc_post(np.zeros((3, 2, 4)), np.zeros((3, 5)), np.zeros((2, 2)), np.zeros(2)), "y"),
        (lambda: mhc_init_params(3, 0, "static", 4, None), "n_streams must be 1, 2 or 4"),
        (lambda: mhc_init_params(2, 0, "hyper", 4, None), "mode must be"),
        (lambda: composite_gain([]), "empty"),
    ],
)
def test_bad_shapes_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# --- invariants (hypothesis) -------------------------------------------------------------
def assert_coefficients_valid(h_res, h_pre, h_post, n, dtype):
    tol = 1e-12 if dtype == np.float64 else 1e-6
    h = np.asarray(h_res, dtype=np.float64)
    assert h_res.dtype == dtype and h.shape[-2:] == (n, n)
    assert np.all(h >= 0)
    assert np.max(np.abs(h.sum(axis=-1) - 1)) <= tol
    assert np.max(np.abs(h.sum(axis=-2) - 1)) <= tol
    assert np.all(h_pre >= 0) and np.all(h_pre <= 1)
    assert np.all(h_post >= 0) and np.all(h_post <= n)


@given(n=st.sampled_from([2, 4]), dtype=st.sampled_from([np.float32, np.float64]), data=st.data())
def test_static_coefficients_are_doubly_stochastic(n, dtype, data):
    logits = st.floats(-40, 40, allow_nan=False, width=32)
    res = data.draw(hnp.arrays(dtype, (1 if n == 2 else 24,), elements=logits))
    others = [data.draw(hnp.arrays(dtype, (n,), elements=logits)) for _ in range(4)]
    h_res, h_pre, h_post = mhc_static_coeffs(res, *others)
    assert_coefficients_valid(h_res.data, h_pre.data, h_post.data, n, dtype)


@given(n=st.sampled_from([2, 4]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1), gate=st.floats(-5, 5), scale=st.floats(0.01, 20))
def test_dynamic_coefficients_are_doubly_stochastic_per_token(n, dtype, seed, gate, scale):
    rng = np.random.default_rng(seed)
    inputs = dynamic_inputs(rng, n, 4, lead=(2, 5), gate=gate)
    inputs = [inputs[0] * scale] + [a.astype(dtype) for a in inputs[1:]]
    inputs[0] = inputs[0].astype(dtype)
    h_res, h_pre, h_post = mhc_dynamic_coeffs(*inputs)
    assert h_res.shape == (2, 5, n, n) and h_pre.shape == (2, 5, n)
    assert_coefficients_valid(h_res.data, h_pre.data, h_post.data, n, dtype)


@given(n=st.sampled_from([2, 4]), dtype=st.sampled_from([np.float32, np.float64]),
       seed=st.integers(0, 2**32 - 1), scale=st.floats(0.1, 10))
def test_composite_gain_of_256_layers_stays_at_one(n, dtype, seed, scale):
    rng = np.random.default_rng(seed)
    layers = [mhc_static_coeffs(*[a.astype(dtype) for a in random_logits(rng, n, scale)])[0] for _ in range(256)]
    gain = composite_gain(layers)
    assert gain <= 1 + 1e-5
    assert gain >= 1 - 1e-5  # doubly stochastic products keep unit row sums


def test_composite_gain_measures_rows_and_columns():
    assert composite_gain([np.array([[2.0, 0.0], [0.0, 1.0]])]) == 2.0
    assert composite_gain([np.array([[0.5, 0.5], [0.5, 0.5]]), np.array([[1.0, 0.0], [3.0, 0.0]])]) == 3.0
    assert composite_gain([np.array([[1.0, -1.0], [0.0, 0.5]])]) == 2.0
    per_token = np.stack([np.eye(2), 3 * np.eye(2)])
    assert composite_gain([per_token, per_token]) == 9.0


# --- stream symmetry ---------------------------------------------------------------------
class _Tanh(Function):
    @staticmethod
    def forward(ctx, x):
        y = np.tanh(x)
        ctx.save(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved
        return (g * (1 - y * y),)


def _toy_forward(x0, mats, params, n, mode):
    """expand -> [pre -> tanh(u @ A_l) -> post] per sub-layer -> (collapse, final streams)."""
    x = mhc_expand(x0, n)
    for a, p in zip(mats, params):
        static = [p[k] for k in STATIC_PARAM_NAMES[n]]
        if mode == "static":
            h_res, h_pre, h_post = mhc_static_coeffs(*static)
        else:
            h_res, h_pre, h_post = mhc_dynamic_coeffs(x, p["dyn_weight"], p["dyn_gate"], *static)
        y = _Tanh.apply(mhc_pre(x, h_pre) @ a)
        x = mhc_post(x, y, h_res, h_post)
    return mhc_collapse(x), x


def _toy_problem(n, mode, params=None, T=6, C=8, seed=5):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((T, C))
    target = rng.standard_normal((T, C))
    mats = [Tensor(rng.standard_normal((C, C)) / np.sqrt(C), requires_grad=True) for _ in range(2)]
    if params is None:
        params = [mhc_init_params(n, l, mode, C, rng, np.float64) for l in range(2)]
    params = [{k: Tensor(v, requires_grad=True) for k, v in p.items()} for p in params]
    return x0, target, mats, params


def _stream_spread(x):
    """Largest difference between any two streams of ``X [T, n, C]``."""
    return float(np.max(np.ptp(x.data, axis=-2)))


def _is_dead_by_construction(layer, name, n, n_layers=2):
    """The last sub-layer's H_res mixes right before the mean over streams, which every doubly
    stochastic matrix preserves: its logits (and the dyn_weight rows producing them) cannot
    change the output, whatever the init."""
    return layer == n_layers - 1 and name in (mhc.RES_NAME[n], "dyn_weight")


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("n", [2, 4])
def test_init_breaks_stream_symmetry(n, mode):
    x0, target, mats, params = _toy_problem(n, mode)
    out, streams = _toy_forward(x0, mats, params, n, mode)
    assert _stream_spread(streams) > 1e-2
    loss = ((out - target) * (out - target)).mean()
    loss.backward()
    names = DYNAMIC_PARAM_NAMES[n] if mode == "dynamic" else STATIC_PARAM_NAMES[n]
    res_rows = mhc.RES_SIZE[n]
    for l, p in enumerate(params):
        assert sorted(p) == sorted(names)
        for name, t in p.items():
            g = t.grad
            assert g is not None and g.shape == t.shape, (l, name)
            if _is_dead_by_construction(l, name, n):
                dead, live = (g[:res_rows], g[res_rows:]) if name == "dyn_weight" else (g, g[:0])
                assert np.all(np.abs(dead) < 1e-13), f"sub-layer {l} {name}: {dead}"
                g = live
            if name == "dyn_weight":  # every row (one logit each) learns; single entries may be tiny
                g = np.linalg.norm(g, axis=1)
            assert np.all(np.abs(g) > 1e-9), f"sub-layer {l} {name}: zero gradient entries {g}"
    before = {(l, k): t.data.copy() for l, p in enumerate(params) for k, t in p.items()}
    for t in mats + [t for p in params for t in p.values()]:  # one plain SGD step
        t.data = t.data - 0.1 * t.grad
        t.grad = None
    changed = {key: not np.array_equal(params[key[0]][key[1]].data, v) for key, v in before.items()}
    assert all(c for (l, k), c in changed.items() if not (l == 1 and k == mhc.RES_NAME[n]))
    out2, streams2 = _toy_forward(x0, mats, params, n, mode)
    assert _stream_spread(streams2) > 1e-2
    assert float(((out2 - target) * (out2 - target)).mean().data) < float(loss.data)


@pytest.mark.parametrize("n", [2, 4])
def test_symmetric_init_shows_the_collapse_the_init_avoids(n):
    """The all-streams-alike init: streams stay identical and H_res gets no gradient."""
    res = np.array([5.0]) if n == 2 else np.r_[10.0, np.zeros(23)]
    sym = {mhc.RES_NAME[n]: res, "pre_logits": np.zeros(n), "pre_bias": np.full(n, 0.5),
           "post_logits": np.zeros(n), "post_bias": np.full(n, 0.5)}
    x0, target, mats, params = _toy_problem(n, "static", params=[sym, sym])
    out, streams = _toy_forward(x0, mats, params, n, "static")
    assert _stream_spread(streams) < 1e-13  # equal up to the rounding of H_res row sums
    ((out - target) * (out - target)).mean().backward()
    assert np.all(np.abs(params[0][mhc.RES_NAME[n]].grad) < 1e-14)  # the first H_res is dead too


def test_init_targets_stream_layer_mod_n():
    for n in (2, 4):
        for layer in range(6):
            p = mhc_init_params(n, layer, "static", 8, None, np.float64)
            h_res, h_pre, h_post = (t.data for t in mhc_static_coeffs(*[p[k] for k in STATIC_PARAM_NAMES[n]]))
            assert int(np.argmax(h_pre)) == layer % n and h_pre.max() > 0.9
            assert int(np.argmax(h_post)) == layer % n
            np.testing.assert_allclose(h_post.sum(), n, rtol=1e-12)  # the stream mean sees a plain residual
            assert np.all(np.diag(h_res) > 0.95)
    p = mhc_init_params(4, 0, "dynamic", 8, np.random.default_rng(0))
    assert p["dyn_weight"].shape == (32, 32) and p["dyn_weight"].dtype == np.float32
    assert p["dyn_gate"].tolist() == [pytest.approx(0.01)]


# --- the .mhc file ----------------------------------------------------------------------
def _random_records(rng, n, count):
    return [dict(zip(STATIC_PARAM_NAMES[n], (a.astype(np.float32) for a in random_logits(rng, n, 3.0))))
            for _ in range(count)]


@pytest.mark.parametrize("n", [2, 4])
def test_mhc_round_trip(tmp_path, n):
    records = _random_records(R, n, 5) + [
        {k: v for k, v in mhc_init_params(n, 5, "static", 8, None).items()}
    ]
    path = tmp_path / "model.mhc"
    mhc_io.write_mhc(path, records, n)
    raw = path.read_bytes()
    assert raw[:4] == bytes([0x21, 0x43, 0x48, 0x6D])
    assert struct.unpack("<4I", raw[:16]) == (0x6D484321, 2, 6, n)
    assert len(raw) == 16 + 6 * (36 if n == 2 else 160)
    got_n, got = mhc_io.read_mhc(path)
    assert got_n == n and len(got) == 6
    for want, have in zip(records, got):
        assert list(have) == list(STATIC_PARAM_NAMES[n])
        for k in want:
            assert have[k].dtype == np.float32 and np.array_equal(have[k], np.asarray(want[k]).reshape(-1))
    assert os.listdir(tmp_path) == ["model.mhc"]  # no temporary left behind


def test_mhc_record_byte_order_matches_the_spec(tmp_path):
    rec = {"alpha_logit": [1.0], "pre_logits": [2.0, 3.0], "pre_bias": [4.0, 5.0],
           "post_logits": [6.0, 7.0], "post_bias": [8.0, 9.0]}
    path = tmp_path / "a.mhc"
    mhc_io.write_mhc(path, [rec], 2)
    assert struct.unpack("<9f", path.read_bytes()[16:]) == tuple(float(v) for v in range(1, 10))


def test_mhc_reads_version_1_files(tmp_path):
    path = tmp_path / "v1.mhc"
    records = _random_records(R, 4, 2)
    mhc_io.write_mhc(path, records, 4)
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack("<I", 1)
    path.write_bytes(bytes(raw))
    n, got = mhc_io.read_mhc(path)
    assert n == 4 and np.array_equal(got[1]["res_logits"], records[1]["res_logits"])


def test_mhc_write_replaces_an_existing_file(tmp_path):
    path = tmp_path / "m.mhc"
    mhc_io.write_mhc(path, _random_records(R, 2, 3), 2)
    mhc_io.write_mhc(path, _random_records(R, 2, 1), 2)
    assert len(mhc_io.read_mhc(path)[1]) == 1 and os.listdir(tmp_path) == ["m.mhc"]


def _valid_bytes(n=2, count=3):
    table = np.arange(count * (9 if n == 2 else 40), dtype="<f4") * 0.25
    return struct.pack("<4I", 0x6D484321, 2, count, n) + table.tobytes()


def _patched(offset, fmt, value):
    raw = bytearray(_valid_bytes())
    struct.pack_into(fmt, raw, offset, value)
    return bytes(raw)


@pytest.mark.parametrize(
    "content, message",
    [
        (_patched(0, "<I", 0xDEADBEEF), "magic is 0xdeadbeef"),
        (_valid_bytes()[:10], r"header is truncated \(10 of 16 bytes\)"),
        (b"", "header is truncated"),
        (_valid_bytes()[:-1], "records are truncated"),
        (_valid_bytes()[:16], "records are truncated"),
        (_valid_bytes() + b"\x00", "1 trailing bytes"),
        (_patched(16 + 4 * 14, "<f", float("nan")), r"record 1 field post_logits\[0\] holds a non-finite"),
        (_patched(16, "<f", float("-inf")), "record 0 field alpha_logit holds a non-finite"),
        (_patched(12, "<I", 3), "n_streams is 3, must be 2 or 4"),
        (_patched(4, "<I", 3), "version 3 is not supported"),
        (_patched(4, "<I", 0), "version 0 is not supported"),
        (_patched(8, "<I", 10001), "n_sublayers is 10001"),
        (_patched(8, "<I", 2**32 - 1), "n_sublayers is 4294967295"),
        (_patched(8, "<I", 9999), "records are truncated"),
    ],
)
def test_mhc_reader_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.mhc"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        mhc_io.read_mhc(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "records, n, message",
    [
        ([], 3, "n_streams must be 2 or 4"),
        ([{"alpha_logit": [0.0]}], 2, "record 0 has fields"),
        ([dict.fromkeys(STATIC_PARAM_NAMES[2], [0.0, 0.0])], 2, "field alpha_logit has 2 values, expected 1"),
        ([{**dict.fromkeys(STATIC_PARAM_NAMES[2], [0.0, 0.0]), "alpha_logit": [1e39]}], 2, "not finite in float32"),
        ([{**dict.fromkeys(STATIC_PARAM_NAMES[2], [0.0, 0.0]), "alpha_logit": [0.0], "dyn_gate": [0.0]}], 2,
         "record 0 has fields"),
    ],
)
def test_mhc_writer_rejects_bad_records(tmp_path, records, n, message):
    path = tmp_path / "out.mhc"
    with pytest.raises(ValueError, match=message):
        mhc_io.write_mhc(path, records, n)
    assert os.listdir(tmp_path) == []


def test_mhc_writer_limits_sublayers(tmp_path):
    rec = {"alpha_logit": [0.0], **dict.fromkeys(STATIC_PARAM_NAMES[2][1:], [0.0, 0.0])}
    with pytest.raises(ValueError, match="10001 sub-layers exceed"):
        mhc_io.write_mhc(tmp_path / "x.mhc", [rec] * 10001, 2)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory):
    return tmp_path_factory.mktemp("mhc_fuzz") / "fuzz.mhc"


def _read_or_value_error(path, content):
    path.write_bytes(content)
    try:
        n, records = mhc_io.read_mhc(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert n in (2, 4) and len(content) == 16 + len(records) * (36 if n == 2 else 160)


@given(content=st.binary(max_size=200))
def test_mhc_reader_fuzz_random_bytes(fuzz_path, content):
    _read_or_value_error(fuzz_path, content)


@given(n=st.sampled_from([2, 4]), count=st.integers(0, 3), data=st.data())
def test_mhc_reader_fuzz_mutated_files(fuzz_path, n, count, data):
    raw = bytearray(_valid_bytes(n, count))
    for _ in range(data.draw(st.integers(1, 4))):
        if raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw) + 8))
    _read_or_value_error(fuzz_path, bytes(raw[:cut]) + b"\x7f" * max(0, cut - len(raw)))
