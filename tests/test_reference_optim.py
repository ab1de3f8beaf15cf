"""Optimizers, schedule and clipping of the NumPy reference (SPEC section 4)."""
import math
import types

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

import backends
from reference import OPS, Tensor
from reference.optim import (
    POLAR_EXPRESS_COEFFICIENTS, AdamW, GaLore, Lion, Muon, clip_by_global_norm, galore_project,
    galore_project_back, galore_projector, global_grad_norm, muon8_momentum, newton_schulz,
)
from reference.schedule import wsd_lr

pytestmark = pytest.mark.reference


def params_like(*arrays):
    return [Tensor(a.copy()) for a in arrays]


def run(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.copy()
        opt.step()


def ns5_longhand(u):
    """Quintic Newton-Schulz written out independently of the implementation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = u / (math.sqrt(float((u * u).sum())) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(5):
        gram = x @ x.T
        x = a * x + b * (gram @ x) + c * (gram @ (gram @ x))
    return x.T if tall else x


# ----------------------------------------------------------------------------- Muon

@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_muon_two_steps_match_longhand_float64(nesterov, adjust_lr):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((6, 4))  # tall: exercises the transpose
    g1, g2 = rng.standard_normal((2, 6, 4))
    lr, wd, beta = 0.05, 0.1, 0.95
    adjust = math.sqrt(6 / 4) if adjust_lr == "original" else 0.2 * math.sqrt(6)

    w, buf = w0.copy(), np.zeros((6, 4))
    for g in (g1, g2):
        buf = buf + (1 - beta) * (g - buf)
        u = g + beta * (buf - g) if nesterov else buf
        w = w * (1 - lr * wd) - lr * adjust * ns5_longhand(u)

    [p] = params_like(w0)
    opt = Muon([p], lr=lr, momentum=beta, nesterov=nesterov, weight_decay=wd, adjust_lr=adjust_lr)
    run(opt, [p], [[g1], [g2]])
    np.testing.assert_allclose(p.data, w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(opt.state[0]["buf"], buf, rtol=0, atol=1e-15)
    assert int(opt.state[0]["step"]) == 2


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (96, 200)])
def test_newton_schulz_output_is_nearly_orthogonal(shape):
    # Gaussian matrices this rectangular have condition numbers below ~4, which 5 steps lift
    # into the known band of these coefficients (about 0.68 to 1.13; they do not converge to 1).
    u = np.random.default_rng(1).standard_normal(shape)
    s = np.linalg.svd(newton_schulz(u), compute_uv=False)
    assert 0.65 <= s.min() and s.max() <= 1.2
    s_pe = np.linalg.svd(newton_schulz(u, coefficients=POLAR_EXPRESS_COEFFICIENTS), compute_uv=False)
    assert 0.8 <= s_pe.min() and s_pe.max() <= 1.15  # Polar Express: tighter after 5 steps
    np.testing.assert_allclose(newton_schulz(u.T), newton_schulz(u).T, rtol=0, atol=1e-12)


def test_newton_schulz_keeps_float32_and_handles_zero():
    u = np.random.default_rng(2).standard_normal((8, 12)).astype(np.float32)
    x = newton_schulz(u)
    assert x.dtype == np.float32 and x.shape == (8, 12)
    np.testing.assert_allclose(x, ns5_longhand(u.astype(np.float64)), atol=2e-5)
    assert not newton_schulz(np.zeros((3, 5))).any()


def test_user_coefficients_drive_the_iteration_and_the_last_repeats():
    # The classic cubic (1.5, -0.5, 0) converges to the exact polar factor U V^T.
    u = np.random.default_rng(3).standard_normal((10, 30))
    uu, _, vt = np.linalg.svd(u, full_matrices=False)
    x = newton_schulz(u, steps=40, coefficients=[(1.5, -0.5, 0.0)])
    np.testing.assert_allclose(x, uu @ vt, atol=1e-10)
    assert POLAR_EXPRESS_COEFFICIENTS[-1] == (1.875, -1.25, 0.375)
    assert POLAR_EXPRESS_COEFFICIENTS[0][0] == pytest.approx(8.28721201814563 / 1.01, rel=1e-15)
    assert len(POLAR_EXPRESS_COEFFICIENTS) == 8


def test_eightbit_muon_tracks_float_muon_over_50_steps():
    # Tolerance 4% of the weights' total movement. int8 rounding errs by at most scale/2 =
    # absmax/254 per element; for Gaussian-like blocks of 256 (absmax ~ 2.8 sigma) that is an
    # RMS error of ~0.64% of the buffer, which the beta = 0.95 momentum carries for
    # ~sqrt(1 / (1 - beta^2)) ~ 3.2 steps: ~2% per update direction (NS is well-conditioned
    # here). Independent errors add like the random-gradient steps themselves, so the
    # relative difference of the displacement stays ~2% (measured 1.7%); 4% leaves a 2x margin.
    rng = np.random.default_rng(4)
    w0 = (0.02 * rng.standard_normal((64, 128))).astype(np.float32)
    grads = [[rng.standard_normal((64, 128)).astype(np.float32)] for _ in range(50)]
    [pf], [pq] = params_like(w0), params_like(w0)
    run(Muon([pf], lr=0.02), [pf], grads)
    opt8 = Muon([pq], lr=0.02, eightbit=True)
    run(opt8, [pq], grads)
    assert set(opt8.state[0]) == {"step", "qbuf", "scales"}
    rel = np.linalg.norm(pq.data - pf.data) / np.linalg.norm(pf.data - w0)
    assert 1e-4 < rel < 0.04


def test_eightbit_state_is_a_quarter_of_float_and_small_tensors_stay_float():
    w = np.zeros((1024, 1024), np.float32)
    g = np.ones((1024, 1024), np.float32)
    [pf], [pq] = params_like(w), params_like(w)
    full, eight = Muon([pf], lr=0.01), Muon([pq], lr=0.01, eightbit=True)
    run(full, [pf], [[g]])
    run(eight, [pq], [[g]])
    assert eight.state_nbytes() <= 0.27 * full.state_nbytes()
    assert eight.state[0]["qbuf"].nbytes == 1024 * 1024 and eight.state[0]["scales"].shape == (4096,)

    [small] = params_like(np.zeros((63, 64), np.float32))  # 4032 < 4096 elements
    opt = Muon([small], lr=0.01, eightbit=True)
    run(opt, [small], [[np.ones((63, 64), np.float32)]])
    assert set(opt.state[0]) == {"step", "buf"} and opt.state[0]["buf"].dtype == np.float32


def test_muon8_requantizes_with_round_half_away_from_zero():
    g = np.zeros(256, np.float32)
    g[:6] = [127.0, 2.5, -2.5, 0.5, -0.5, 3.5]  # absmax 127 -> scale exactly 1
    qbuf, scales = np.zeros(256, np.int8), np.zeros(1, np.float32)
    u = muon8_momentum(qbuf, scales, g, beta=0.0, nesterov=False)  # beta 0: buffer = g exactly
    assert scales[0] == 1.0
    assert qbuf[:6].tolist() == [127, 3, -3, 1, -1, 4]  # half-to-even would give 2, -2, 0, 0, 4
    np.testing.assert_array_equal(u, g)


def test_muon8_partial_last_block_and_zero_block():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((10, 30)).astype(np.float32)  # 300 elements: blocks of 256 and 44
    g[0, :] = 0.0
    qbuf, scales = np.zeros(300, np.int8), np.zeros(2, np.float32)
    beta = 0.9
    for _ in range(3):
        buf = qbuf.astype(np.float32) * np.repeat(scales, 256)[:300]
        buf = buf + (1 - beta) * (g.reshape(-1) - buf)
        u = muon8_momentum(qbuf, scales, g, beta=beta, nesterov=True)
        np.testing.assert_allclose(u.reshape(-1), g.reshape(-1) + beta * (buf - g.reshape(-1)), rtol=1e-6)
        for block, (lo, hi) in enumerate([(0, 256), (256, 300)]):
            scale = np.float32(np.abs(buf[lo:hi]).max() / 127)
            assert scales[block] == pytest.approx(scale, rel=1e-6)
            assert np.abs(qbuf[lo:hi].astype(np.float32) * scales[block] - buf[lo:hi]).max() <= 0.5001 * scale
            assert np.abs(qbuf[lo:hi]).max() == 127
    # A block whose values are all zero gets scale 0 and q 0.
    zq, zs = np.ones(300, np.int8), np.ones(2, np.float32)
    zero = np.zeros(300, np.float32)
    zero[:256] = 1.0
    muon8_momentum(zq, zs, zero, beta=0.0, nesterov=True)
    assert zs[1] == 0.0 and not zq[256:].any() and zs[0] == np.float32(1 / 127)


def test_muon8_rejects_mismatched_state():
    with pytest.raises(ValueError, match="scales must be float32 of shape \\(2,\\)"):
        muon8_momentum(np.zeros(300, np.int8), np.zeros(1, np.float32), np.zeros(300, np.float32), beta=0.9, nesterov=True)


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D matrices only; parameter 0 has shape \\(5,\\)"):
        Muon(params_like(np.zeros(5)), lr=0.1)
    with pytest.raises(ValueError, match="expects a 2-D matrix"):
        newton_schulz(np.zeros(5))


# ----------------------------------------------------------------------------- AdamW / Lion

def test_adamw_three_steps_match_hand_computation():
    rng = np.random.default_rng(6)
    w0 = rng.standard_normal((3, 5))
    grads = rng.standard_normal((3, 3, 5))
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.95, 1e-3, 0.1
    w, m, v = w0.copy(), np.zeros_like(w0), np.zeros_like(w0)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        w = w * (1 - lr * wd) - lr * m_hat / (np.sqrt(v_hat) + eps)
    [p] = params_like(w0)
    opt = AdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    run(opt, [p], [[g] for g in grads])
    np.testing.assert_allclose(p.data, w, rtol=0, atol=1e-13)
    np.testing.assert_allclose(opt.state[0]["v"], v, rtol=1e-14)


def test_lion_three_steps_match_hand_computation():
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal(7)
    grads = rng.standard_normal((3, 7))
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.5
    w, m = w0.copy(), np.zeros(7)
    for g in grads:
        w = w * (1 - lr * wd) - lr * np.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    [p] = params_like(w0)
    run(Lion([p], lr=lr, weight_decay=wd), [p], [[g] for g in grads])
    np.testing.assert_allclose(p.data, w, rtol=0, atol=1e-14)


def test_float32_parameters_keep_float32_state():
    w = np.random.default_rng(8).standard_normal((4, 6)).astype(np.float32)
    for make in (lambda ps: AdamW(ps, 1e-3), lambda ps: Lion(ps, 1e-3), lambda ps: Muon(ps, 1e-3)):
        params = params_like(w)
        opt = make(params)
        run(opt, params, [[w]])
        assert params[0].data.dtype == np.float32
        assert all(a.dtype == np.float32 for k, a in opt.state[0].items() if k != "step")


def test_missing_gradients_are_skipped_and_zero_grad_clears():
    params = params_like(np.ones((2, 2)), np.ones((2, 2)))
    opt = AdamW(params, lr=0.1)
    run(opt, params, [[np.ones((2, 2)), None]])
    assert opt.state[1] == {} and np.array_equal(params[1].data, np.ones((2, 2)))
    assert not np.array_equal(params[0].data, np.ones((2, 2)))
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    params[0].grad = np.ones((3, 2))
    with pytest.raises(ValueError, match="gradient shape \\(3, 2\\) != parameter shape \\(2, 2\\)"):
        opt.step()


# ----------------------------------------------------------------------------- GaLore

@pytest.mark.parametrize("inner", ["muon", "adamw"])
def test_galore_state_is_smaller_by_the_rank_factor(inner):
    rows, cols, r = 512, 256, 32
    rng = np.random.default_rng(9)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    g = rng.standard_normal((rows, cols)).astype(np.float32)
    [pg], [pf] = params_like(w), params_like(w)
    galore = GaLore([pg], lr=0.01, inner=inner, rank=r, min_dim=128)
    full = (Muon if inner == "muon" else AdamW)([pf], lr=0.01)
    run(galore, [pg], [[g]])
    run(full, [pf], [[g]])
    moments = 1 if inner == "muon" else 2
    # rows > cols: P is [cols, r] and the moments are [rows, r].
    assert galore.state[0]["P"].shape == (cols, r)
    assert galore.state_nbytes() == 4 * (cols * r + moments * rows * r) + 8
    ratio = galore.state_nbytes() / full.state_nbytes()
    assert ratio == pytest.approx((r / cols) * (1 + cols / (moments * rows)), rel=1e-3)
    assert ratio < 1.6 * r / cols


def test_galore_with_eightbit_muon_quantizes_the_projected_momentum():
    rng = np.random.default_rng(15)
    [p] = params_like(rng.standard_normal((512, 256)).astype(np.float32))
    opt = GaLore([p], lr=0.01, rank=32, min_dim=128, eightbit=True)
    run(opt, [p], [[rng.standard_normal((512, 256)).astype(np.float32)]])
    state = opt.state[0]
    assert set(state) == {"step", "P", "qbuf", "scales"}
    assert state["qbuf"].shape == (512 * 32,) and state["scales"].shape == (64,)
    assert opt.state_nbytes() == 4 * 256 * 32 + 512 * 32 + 4 * 64 + 8


def test_galore_refreshes_the_projector_every_update_freq_steps():
    rng = np.random.default_rng(10)
    [p] = params_like(rng.standard_normal((24, 40)))
    opt = GaLore([p], lr=0.01, rank=4, update_freq=3, min_dim=16)
    changed, previous = [], None
    for _ in range(8):
        p.grad = rng.standard_normal((24, 40))
        opt.step()
        projector = opt.state[0]["P"].copy()
        changed.append(previous is None or not np.array_equal(projector, previous))
        previous = projector
    assert [i for i, c in enumerate(changed) if c] == [0, 3, 6]
    assert previous.shape == (24, 4) and opt.state[0]["buf"].shape == (4, 40)


@pytest.mark.parametrize("shape,side", [((30, 50), "left"), ((50, 30), "right")])
def test_galore_projector_finds_the_dominant_subspace(shape, side):
    # A small gap after the top 4 (5 vs 4) and a fast drop after the 12 probes (rank 4 +
    # oversample 8): only the full range finder + small SVD resolves the top-4 subspace.
    rng = np.random.default_rng(11)
    spectrum = np.array([10, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5, 1.2, 1.0] + [0.01] * 18)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], 30)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], 30)))
    g = (u * spectrum) @ v.T
    P = galore_projector(g, 4, side, seed=(1, 2, 3))
    top = u[:, :4] if side == "left" else v[:, :4]
    np.testing.assert_allclose(P.T @ P, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(P @ (P.T @ top), top, atol=1e-3)
    low = galore_project(g, P, side)
    assert low.shape == ((4, shape[1]) if side == "left" else (shape[0], 4))
    kept = (u[:, :4] * spectrum[:4]) @ v[:, :4].T  # projecting back keeps the top-4 part
    np.testing.assert_allclose(galore_project_back(low, P, side), kept, atol=1e-2)
    np.testing.assert_array_equal(P, galore_projector(g, 4, side, seed=(1, 2, 3)))


@pytest.mark.parametrize("inner", ["muon", "adamw"])
def test_galore_at_full_rank_and_small_matrices_follow_the_inner_optimizer(inner):
    # At r = min(rows, cols) the projector is orthogonal and NS commutes with it, so
    # GaLore(Muon, scale 1) equals Muon; matrices under min_dim use the inner rule directly.
    rng = np.random.default_rng(12)
    big, small = rng.standard_normal((40, 24)), rng.standard_normal((8, 8))
    grads = [[rng.standard_normal((40, 24)), rng.standard_normal((8, 8))] for _ in range(3)]
    pg, pr = params_like(big, small), params_like(big, small)
    galore = GaLore(pg, lr=0.02, inner=inner, rank=24, scale=1.0, min_dim=16, weight_decay=0.1)
    plain = (Muon if inner == "muon" else AdamW)(pr, lr=0.02, weight_decay=0.1)
    run(galore, pg, grads)
    run(plain, pr, grads)
    assert "P" in galore.state[0] and "P" not in galore.state[1]
    np.testing.assert_array_equal(pg[1].data, pr[1].data)
    if inner == "muon":
        np.testing.assert_allclose(pg[0].data, pr[0].data, rtol=0, atol=1e-11)


# ----------------------------------------------------------------------------- state_dict

def _optimizer_cases():
    return {
        "adamw": lambda ps: AdamW(ps, lr=0.01, weight_decay=0.1),
        "lion": lambda ps: Lion(ps, lr=0.01, weight_decay=0.1),
        "muon": lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, polar_express=True),
        "muon8": lambda ps: Muon(ps, lr=0.02, eightbit=True, adjust_lr="match_rms_adamw"),
        "galore_muon8": lambda ps: GaLore(ps, lr=0.02, rank=8, update_freq=2, min_dim=16, eightbit=True),
        "galore_adamw": lambda ps: GaLore(ps, lr=0.02, inner="adamw", rank=8, update_freq=2, min_dim=16),
    }


@pytest.mark.parametrize("name", list(_optimizer_cases()))
def test_state_dict_round_trip_through_safetensors_is_bit_exact(name):
    make = _optimizer_cases()[name]
    rng = np.random.default_rng(13)
    shapes = [(96, 64), (4, 8)]  # 6144 elements: 8-bit state with a partial last block
    weights = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(6)]

    params = params_like(*weights)
    opt = make(params)
    run(opt, params, grads[:3])
    saved = st_load(st_save(opt.state_dict()))
    assert saved["0.step"].shape == () and int(saved["0.step"]) == 3
    resumed_params = [Tensor(p.data.copy()) for p in params]
    resumed = make(resumed_params)
    resumed.load_state_dict(saved)
    assert resumed.state_nbytes() == opt.state_nbytes()

    run(opt, params, grads[3:])
    run(resumed, resumed_params, grads[3:])
    for a, b in zip(params, resumed_params):
        np.testing.assert_array_equal(a.data, b.data)


def test_load_state_dict_rejects_mismatches():
    params = params_like(np.ones((4, 4), np.float32))
    opt = AdamW(params, lr=0.1)
    run(opt, params, [[np.ones((4, 4), np.float32)]])
    good = opt.state_dict()
    with pytest.raises(ValueError, match="expected float32 \\(4, 4\\), got float32 \\(4, 5\\)"):
        AdamW(params, lr=0.1).load_state_dict({**good, "0.m": np.zeros((4, 5), np.float32)})
    with pytest.raises(ValueError, match="expected float32 \\(4, 4\\), got float64"):
        AdamW(params, lr=0.1).load_state_dict({**good, "0.v": np.zeros((4, 4))})
    with pytest.raises(ValueError, match="0.m contains NaN or Inf"):
        AdamW(params, lr=0.1).load_state_dict({**good, "0.m": np.full((4, 4), np.nan, np.float32)})
    with pytest.raises(ValueError, match="does not name one of 1 parameters"):
        AdamW(params, lr=0.1).load_state_dict({**good, "1.m": np.zeros((4, 4), np.float32)})
    with pytest.raises(ValueError, match="has arrays \\['m', 'step'\\], expected \\['m', 'step', 'v'\\]"):
        AdamW(params, lr=0.1).load_state_dict({k: v for k, v in good.items() if k != "0.v"})


# ----------------------------------------------------------------------------- kernels namespace

def test_optimizers_call_kernels_through_the_namespace():
    calls = []

    def recording(name):
        def kernel(*args, **kwargs):
            calls.append(name)
            return OPS[name](*args, **kwargs)
        return kernel

    names = ["adamw_update", "muon_momentum", "newton_schulz", "galore_projector", "galore_project", "galore_project_back"]
    kernels = types.SimpleNamespace(**{n: recording(n) for n in names})
    rng = np.random.default_rng(14)
    params = params_like(rng.standard_normal((20, 20)), rng.standard_normal(3))
    run(AdamW(params, lr=0.1, kernels=kernels), params, [[np.ones((20, 20)), np.ones(3)]])
    assert calls == ["adamw_update", "adamw_update"]
    calls.clear()
    [p] = params_like(rng.standard_normal((20, 20)))
    run(GaLore([p], lr=0.1, rank=4, min_dim=16, kernels=kernels), [p], [[np.ones((20, 20))]])
    assert calls == ["galore_projector", "galore_project", "muon_momentum", "newton_schulz", "galore_project_back"]

    # A backend is a valid namespace: its overrides, else the reference.
    [q] = params_like(np.ones((4, 4), np.float32))
    run(Muon([q], lr=0.1, kernels=backends.get_backend("numpy")), [q], [[np.eye(4, dtype=np.float32)]])
    assert np.isfinite(q.data).all() and not np.array_equal(q.data, np.ones((4, 4)))


# ----------------------------------------------------------------------------- clipping

def test_global_norm_and_clipping():
    grads = [np.full((2, 2), 3.0, np.float32), None, np.array([4.0, 0.0], np.float32)]
    norm = global_grad_norm(grads)
    assert norm == pytest.approx(math.sqrt(4 * 9 + 16))
    before = [g.copy() for g in grads if g is not None]
    assert clip_by_global_norm(grads, 100.0) == pytest.approx(norm)
    for a, b in zip([g for g in grads if g is not None], before):
        np.testing.assert_array_equal(a, b)  # under the limit: untouched
    assert clip_by_global_norm(grads, 1.0) == pytest.approx(norm)
    assert global_grad_norm(grads) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(grads[2], before[1] / norm, rtol=1e-5)  # direction kept
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_by_global_norm(grads, 0.0)


def test_clipping_leaves_non_finite_gradients_alone():
    grads = [np.array([np.inf, 1.0])]
    assert math.isinf(clip_by_global_norm(grads, 1.0))
    assert grads[0][1] == 1.0


# ----------------------------------------------------------------------------- schedule

def test_wsd_endpoints_and_shape():
    kw = dict(total_steps=100, base_lr=1.0, warmup_steps=10, decay_frac=0.2, min_lr_ratio=0.1)
    lrs = [wsd_lr(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1)  # step 0 already warms up: 1/10
    assert lrs[9] == 1.0 and lrs[10] == 1.0 and lrs[79] == 1.0
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[80] < 1.0 and lrs[99] == pytest.approx(0.1)  # last step is exactly min
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))
    # cosine midpoint of the 20 decay steps: t = 10/20
    assert lrs[89] == pytest.approx(0.1 + 0.9 * 0.5)
    assert wsd_lr(150, **kw) == pytest.approx(0.1)
    linear = [wsd_lr(s, decay="linear", **kw) for s in range(80, 100)]
    np.testing.assert_allclose(linear, [0.1 + 0.9 * (1 - (k + 1) / 20) for k in range(20)])


def test_wsd_without_warmup_or_decay_and_overlap():
    assert wsd_lr(0, 10, 2.0, 0, 0.0, 0.0) == 2.0 and wsd_lr(9, 10, 2.0, 0, 0.0, 0.0) == 2.0
    # A run shorter than its warmup: the smaller factor wins, never an error.
    assert wsd_lr(4, 5, 1.0, 100, 0.2, 0.0) == pytest.approx(0.0)
    assert wsd_lr(3, 5, 1.0, 100, 0.2, 0.0) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="decay must be one of"):
        wsd_lr(0, 10, 1.0, 1, 0.1, 0.1, decay="step")
    with pytest.raises(ValueError, match="decay_frac must lie in \\[0, 1\\]"):
        wsd_lr(0, 10, 1.0, 1, 1.5, 0.1)


def test_galore_float16_projector_halves_projector_bytes_and_tracks_float32():
    from reference.autograd import Tensor
    from reference.optim import GaLore

    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((256, 512)).astype(np.float32) * 0.05
    runs = {}
    for dtype in (None, "float16"):
        p = Tensor(w0.copy(), requires_grad=True)
        opt = GaLore([p], 0.02, rank=32, min_dim=64, update_freq=5, projector_dtype=dtype)
        grads = np.random.default_rng(6)
        for _ in range(8):
            p.grad = grads.standard_normal(w0.shape).astype(np.float32)
            opt.step()
        runs[dtype] = (p.data.copy(), opt)
    p32, opt32 = runs[None]
    p16, opt16 = runs["float16"]
    assert opt16.state[0]["P"].dtype == np.float16 and opt32.state[0]["P"].dtype == np.float32
    assert opt32.state_nbytes() - opt16.state_nbytes() == opt32.state[0]["P"].nbytes // 2
    moved = np.linalg.norm(p32 - w0)
    assert np.linalg.norm(p16 - p32) < 0.01 * moved
