"""MoE routing: top-k selection, load-balancing loss, load statistics, dispatch and combine."""
import numpy as np
import pytest

from reference import Tensor, gradcheck, ops
from reference.moe import expert_load, load_balance_loss, moe_combine, moe_routes, topk_route

pytestmark = pytest.mark.reference

R = np.random.default_rng(11)


def test_topk_picks_the_largest_logits_and_weights_sum_to_one():
    logits = R.standard_normal((9, 8))
    weights, indices = topk_route(logits, 3)
    assert indices.shape == (9, 3) and indices.dtype == np.int64
    expected = np.argsort(-logits, axis=1)[:, :3]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(weights.data.sum(axis=1), 1.0, rtol=1e-12)
    selected = np.take_along_axis(logits, indices, axis=1)
    manual = np.exp(selected) / np.exp(selected).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights.data, manual, rtol=1e-12)
    assert np.all(np.diff(weights.data, axis=1) <= 0)  # ordered by descending logit


def test_topk_ties_go_to_the_lower_index():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.0, 5.0, 0.0, 5.0]])
    for _ in range(3):  # deterministic across calls
        _, indices = topk_route(logits, 2)
        np.testing.assert_array_equal(indices, [[1, 2], [0, 1], [1, 3]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_topk_dtype_follows_the_logits(dtype):
    weights, _ = topk_route(R.standard_normal((4, 5)).astype(dtype), 2)
    assert weights.dtype == dtype


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_gradcheck(k):
    logits = R.standard_normal((6, 4))
    assert gradcheck(lambda l: topk_route(l, k)[0], [logits])


def test_topk_gradient_only_reaches_selected_logits():
    logits = Tensor(R.standard_normal((5, 6)), requires_grad=True)
    weights, indices = topk_route(logits, 2)
    (weights * Tensor(R.standard_normal((5, 2)))).sum().backward()
    mask = np.zeros((5, 6), dtype=bool)
    np.put_along_axis(mask, indices, True, axis=1)
    assert np.all(logits.grad[~mask] == 0) and np.any(logits.grad[mask] != 0)


def test_uniform_balanced_routing_gives_loss_one():
    n_experts, k = 4, 2
    logits = np.zeros((8, n_experts))
    indices = np.array([[t % 4, (t + 1) % 4] for t in range(8)])  # each expert gets 4 slots
    loss = load_balance_loss(Tensor(logits, requires_grad=True), indices, n_experts)
    assert loss.shape == () and loss.item() == pytest.approx(1.0, abs=1e-12)


def test_load_balance_loss_matches_the_formula_and_rewards_balance():
    logits = R.standard_normal((10, 5))
    _, indices = topk_route(logits, 2)
    f = np.bincount(indices.ravel(), minlength=5) / indices.size
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = 5 * np.sum(f * p.mean(axis=0))
    assert load_balance_loss(logits, indices, 5).item() == pytest.approx(expected, rel=1e-12)
    collapsed = np.tile([[8.0, 0.0, 0.0, 0.0, 0.0]], (10, 1))
    _, collapsed_idx = topk_route(collapsed, 1)
    assert load_balance_loss(collapsed, collapsed_idx, 5).item() > 4.0  # everything on one expert


def test_load_balance_loss_gradcheck():
    logits = R.standard_normal((7, 4))
    _, indices = topk_route(logits, 2)
    assert gradcheck(lambda l: load_balance_loss(l, indices, 4), [logits])


def test_expert_load_counts_token_slots():
    indices = np.array([[0, 2], [2, 1], [2, 0]])
    counts = expert_load(indices, 4)
    np.testing.assert_array_equal(counts, [2, 1, 3, 0])
    assert counts.dtype == np.int64 and counts.sum() == indices.size


def _dense_moe(x, expert_ws, weights, indices):
    y = np.zeros((x.shape[0], expert_ws[0].shape[1]))
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            y[t] += weights[t, j] * (x[t] @ expert_ws[indices[t, j]])
    return y


def test_routes_and_combine_match_a_dense_loop():
    x = R.standard_normal((11, 3))
    logits = R.standard_normal((11, 4))
    expert_ws = [R.standard_normal((3, 5)) for _ in range(4)]
    weights, indices = topk_route(logits, 2)
    routes = moe_routes(indices, 4)
    assert sorted(int(t) for tokens, _ in routes for t in tokens) == sorted(list(range(11)) * 2)
    for e, (tokens, slots) in enumerate(routes):
        np.testing.assert_array_equal(indices[tokens, slots], e)
        assert np.all(np.diff(tokens) > 0)
    outs = [x[tokens] @ w for (tokens, _), w in zip(routes, expert_ws)]
    y = moe_combine(weights, outs, routes)
    np.testing.assert_allclose(y.data, _dense_moe(x, expert_ws, weights.data, indices), rtol=1e-12)


def test_full_moe_pipeline_gradcheck():
    logits_w = R.standard_normal((3, 4))
    expert_ws = [R.standard_normal((3, 2)) for _ in range(4)]
    x = R.standard_normal((6, 3))
    _, indices = topk_route(x @ logits_w, 2)  # fixed routing: the finite differences must not flip it
    routes = moe_routes(indices, 4)

    def moe(x, wr, *ws):
        logits = x @ wr
        weights = topk_route(logits, 2)[0]
        outs = [ops.getitem(x, tokens) @ w for (tokens, _), w in zip(routes, ws)]
        return moe_combine(weights, outs, routes) + load_balance_loss(logits, indices, 4)

    assert gradcheck(moe, [x, logits_w, *expert_ws])


def test_combine_handles_an_expert_with_no_tokens():
    indices = np.array([[0, 1], [1, 0]])
    routes = moe_routes(indices, 3)
    assert len(routes[2][0]) == 0
    weights = Tensor(np.full((2, 2), 0.5), requires_grad=True)
    outs = [Tensor(np.ones((2, 4)), requires_grad=True), Tensor(np.ones((2, 4)), requires_grad=True),
            Tensor(np.zeros((0, 4)), requires_grad=True)]
    y = moe_combine(weights, outs, routes)
    np.testing.assert_allclose(y.data, 1.0)
    y.sum().backward()
    assert outs[2].grad.shape == (0, 4)
    np.testing.assert_allclose(weights.grad, 4.0)


@pytest.mark.parametrize("call, message", [
    (lambda: topk_route(np.zeros((3, 4)), 5), "k must be"),
    (lambda: topk_route(np.zeros((3, 4)), 0), "k must be"),
    (lambda: topk_route(np.zeros(4), 1), "2-D"),
    (lambda: load_balance_loss(np.zeros((3, 4)), np.zeros((2, 2), dtype=np.int64), 4), "cover 2 tokens"),
    (lambda: load_balance_loss(np.zeros((3, 4)), np.zeros((3, 2), dtype=np.int64), 5), "n_experts is 5"),
    (lambda: load_balance_loss(np.zeros((3, 4)), np.full((3, 2), 4), 4), r"\[0, 4\)"),
    (lambda: expert_load(np.zeros((3, 2)), 4), "integer"),
    (lambda: moe_combine(np.ones((2, 2)), [np.ones((1, 3))], moe_routes(np.array([[0, 1], [1, 0]]), 2)),
     "expert outputs for 2 routes"),
    (lambda: moe_combine(np.ones((2, 2)), [np.ones((1, 3)), np.ones((2, 3))],
                         moe_routes(np.array([[0, 1], [1, 0]]), 2)), "returned 1 rows"),
])
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
