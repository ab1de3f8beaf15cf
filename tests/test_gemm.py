"""The numba backend's threaded float product (backends/numba_backend/gemm.py)."""
from __future__ import annotations

import numba
import numpy as np
import pytest

from backends.numba_backend import gemm


@pytest.fixture
def split_everything(monkeypatch):
    """Every product large enough to split, on three threads where numba has them."""
    if not gemm.AVAILABLE:
        pytest.skip("numpy's BLAS has no cblas_?gemm64_ here: every product is np.matmul")
    monkeypatch.setattr(gemm, "PARALLEL_MIN_MACS", 0)
    monkeypatch.setattr(gemm, "ALIGN", 4)
    before = numba.get_num_threads()
    numba.set_num_threads(min(3, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() < 2:
        pytest.skip("numba runs one thread here: nothing is split")
    plans = []
    real = gemm._plan

    def counting(*args):
        plan = real(*args)
        plans.append(plan)
        return plan

    monkeypatch.setattr(gemm, "_plan", counting)
    yield plans
    numba.set_num_threads(before)


SHAPES = [  # a, b (transposed views, ragged sizes, batch smaller/larger than the threads)
    ((13, 7), (7, 5)),
    ((5, 7), (7, 130)),  # wide: split by columns
    ((2, 3), (3, 2)),  # fewer rows than threads
    ((1, 9), (9, 1)),  # one output element: not split
    ((3, 17, 6), (3, 6, 11)),
    ((2, 40, 6), (2, 6, 9)),  # batch below the thread count: split rows inside each matrix
    ((0, 4), (4, 3)),
    ((64, 6), (6, 64)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_products_equal_numpy(split_everything, dtype):
    rng = np.random.default_rng(0)
    for sa, sb in SHAPES:
        a = rng.standard_normal(sa).astype(dtype)
        b = rng.standard_normal(sb).astype(dtype)
        want = np.matmul(a, b)
        got = gemm.matmul(a, b)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-6)
        # transposed operands (F-ordered views) and an out= buffer
        out = np.full(want.shape[:-2] + (want.shape[-1], want.shape[-2]), np.nan, dtype)
        bt, at = np.swapaxes(b, -1, -2), np.swapaxes(a, -1, -2)
        assert gemm.matmul(bt, at, out=out) is out
        np.testing.assert_allclose(out, np.swapaxes(want, -1, -2), rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-6)
    assert any(p is not None and len(p[0]) > 1 for p in split_everything), "no product was split"
    # a view without a unit stride is not one BLAS reads in place: numpy's matmul takes it
    a = rng.standard_normal((40, 30)).astype(dtype)[:, ::3]
    b = rng.standard_normal((10, 20)).astype(dtype)
    np.testing.assert_allclose(gemm.matmul(a, b), a @ b, rtol=1e-6, atol=1e-6)


def test_out_overlapping_an_input_is_numpys_business(split_everything):
    a = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    want = a @ a
    got = gemm.matmul(a, a, out=a)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_training_shapes_are_bit_identical_to_one_product(monkeypatch):
    """At the shapes training uses, row/column/batch blocks reproduce the whole product exactly
    (one thread; the same gemm driver blocks K by K alone): the thread count does not change
    the numbers."""
    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() < 2:
        pytest.skip("numba runs one thread here: nothing is split")
    try:
        from threadpoolctl import threadpool_limits

        rng = np.random.default_rng(1)
        with threadpool_limits(limits=1):
            for sa, sb in [((2048, 768), (768, 256)), ((256, 2048), (2048, 768)), ((32, 256, 64), (32, 64, 256))]:
                a = rng.standard_normal(sa).astype(np.float32)
                b = rng.standard_normal(sb).astype(np.float32)
                assert np.array_equal(gemm.matmul(a, b), np.matmul(a, b))
            # numpy's syrk against two syrks and a gemm: OpenBLAS's syrk and gemm drivers block
            # K the same way on the machines measured (bit-identical there), but that is the
            # library's choice per CPU, so only float32 agreement is asserted here.
            for x in (rng.standard_normal((256, 768)).astype(np.float32), rng.standard_normal((768, 256)).astype(np.float32)):
                np.testing.assert_allclose(gemm.matmul(x, x.T), np.matmul(x, x.T), rtol=1e-5, atol=1e-4)
                np.testing.assert_allclose(gemm.matmul(x.T, x), np.matmul(x.T, x), rtol=1e-5, atol=1e-4)
    finally:
        numba.set_num_threads(before)


def test_mismatched_operands_get_numpys_error(split_everything):
    with pytest.raises(ValueError):
        gemm.matmul(np.ones((3, 4), np.float32), np.ones((5, 2), np.float32))
    with pytest.raises(ValueError):
        gemm.matmul(np.ones((40, 8), np.float32), np.ones((8, 8), np.float32), out=np.empty((40, 3), np.float32))
    # mixed dtypes and integer arrays are numpy's business
    got = gemm.matmul(np.ones((3, 4), np.float32), np.ones((4, 2), np.float64))
    assert got.dtype == np.float64 and np.all(got == 4)
    assert np.array_equal(gemm.matmul(np.ones((3, 4), np.int64), np.ones((4, 2), np.int64)), np.full((3, 2), 4))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_matrix_times_its_transpose_is_numpys_syrk_exactly(split_everything, dtype, monkeypatch):
    """numpy runs ``x @ x.T`` as syrk plus a mirrored triangle; the split (two diagonal
    syrks, one off-diagonal gemm) gives a symmetric result equal to numpy's."""
    grams = []
    real = gemm._gram
    monkeypatch.setattr(gemm, "_gram", lambda *args: grams.append(real(*args)) or grams[-1])
    rng = np.random.default_rng(2)
    for shape in [(256, 768), (768, 256), (200, 300), (7, 5), (1, 9), (65, 64)]:
        x = (rng.standard_normal(shape) / 30).astype(dtype)
        for a, b in ((x, x.T), (x.T, x)):
            got = gemm.matmul(a, b, out=np.empty((a.shape[0], a.shape[0]), dtype))
            assert np.array_equal(got, got.T)
            np.testing.assert_allclose(got, np.matmul(a, b), rtol=1e-6 if dtype == np.float32 else 1e-13, atol=1e-7)
    assert len(grams) == 12 and all(g is not None for g in grams)


def test_without_numpys_cblas_products_are_numpys_and_blas_keeps_its_threads(monkeypatch):
    """Another BLAS under numpy: no split products, and the thread policy gives BLAS the threads."""
    from backends import threads

    monkeypatch.setattr(gemm, "AVAILABLE", False)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(gemm.matmul(a, a.T), a @ a.T)
    assert threads.blas_threads(2) == 2
    monkeypatch.setattr(gemm, "AVAILABLE", True)
    assert threads.blas_threads(2) == 1
