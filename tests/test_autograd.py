"""autograd-lite: tape mechanics and gradchecks of the basic ops."""
import numpy as np
import pytest

from reference import Tensor, gradcheck, no_grad, ops

pytestmark = pytest.mark.reference

R = np.random.default_rng(7)
A = R.standard_normal((3, 4))
B = R.standard_normal((4, 5))
V = R.standard_normal((5,))
P = R.standard_normal((1, 4)) + 3.0

CASES = {
    "add_broadcast": (lambda a, v: a @ Tensor(B) + v, [A, V]),
    "sub": (lambda a, p: a - p, [A, P]),
    "mul_broadcast": (lambda a, p: a * p, [A, P]),
    "div": (lambda a, p: a / p, [A, P]),
    "neg": (lambda a: -a, [A]),
    "matmul": (lambda a, b: a @ b, [A, B]),
    "matmul_batched": (lambda a, b: a @ b, [R.standard_normal((2, 3, 4)), R.standard_normal((2, 4, 2))]),
    "matvec": (lambda a, v: a @ v, [R.standard_normal((3, 5)), V]),
    "reshape_transpose": (lambda a: a.reshape(2, 6).T * 2.0, [A]),
    "transpose_axes": (lambda a: ops.transpose(a, (2, 0, 1)), [R.standard_normal((2, 3, 4))]),
    "getitem_slice": (lambda a: a[1:, ::2], [A]),
    "getitem_fancy_repeat": (lambda a: a[np.array([0, 2, 2])], [A]),
    "concat_split": (lambda a: ops.concat(list(ops.split(a, [1, 3], axis=1))[::-1], axis=1), [A]),
    "split_one_used": (lambda a: ops.split(a, [2, 1], axis=0)[1], [A]),
    "gather": (lambda t: ops.gather(t, np.array([[0, 2], [2, 2]])), [A]),
    "sum_all": (lambda a: a.sum(), [A]),
    "sum_axis_keep": (lambda a: a.sum(axis=0, keepdims=True), [A]),
    "mean_axis": (lambda a: a.mean(axis=-1), [A]),
    "max_axis": (lambda a: a.max(axis=1), [A]),
    "exp_log": (lambda a: (a.exp() + 1.0).log(), [A]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck_basic_ops(name):
    fn, inputs = CASES[name]
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_preserved(dtype):
    a = Tensor(A.astype(dtype), requires_grad=True)
    b = Tensor(B.astype(dtype), requires_grad=True)
    loss = ((a @ b).exp().sum(axis=1).log()).mean()
    loss.backward()
    assert loss.dtype == dtype and a.grad.dtype == dtype and b.grad.dtype == dtype


def test_gradient_accumulates_over_reuse():
    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * x + x).sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 5.0])
    (x * 2.0).sum().backward()  # a second backward adds to .grad
    np.testing.assert_allclose(x.grad, [5.0, 7.0])


def test_no_grad_records_nothing():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = x * 2.0
    assert not y.requires_grad and y.is_leaf


def test_retain_grad_on_intermediate():
    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    h = (x * 3.0).retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad, 2 * h.data)
    np.testing.assert_allclose(x.grad, 18 * x.data)


def test_gradcheck_catches_a_wrong_backward():
    from reference.autograd import Function

    class Bad(Function):
        @staticmethod
        def forward(ctx, a):
            return a * a

        @staticmethod
        def backward(ctx, g):
            return (g,)

    with pytest.raises(AssertionError, match="finite differences"):
        gradcheck(lambda a: Bad.apply(a), [A])


def test_matmul_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(5,\)|\(3, 4\) and \(3, 4\)"):
        ops.matmul(Tensor(A), Tensor(A))
