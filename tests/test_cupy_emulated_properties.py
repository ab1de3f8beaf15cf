"""Property tests of the cupy GEMM/GEMV kernels on the CPU emulator: random shapes around
the kernels' tile edges (16-byte chunks, 64 x 64 dp4a and 128 x 128 tensor-core tiles, the
17-token switch, lanes per GEMV row), compared with the reference."""
import numpy as np
import pytest

from backends.cupy_backend import emulator as cuda_emulator
import reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

pytestmark = cuda_emulator.skip_without_compiler()


def rel_err(got, want):
    want = np.asarray(want, np.float64)
    scale = np.linalg.norm(want)
    err = np.linalg.norm(np.asarray(got, np.float64) - want)
    return err / scale if scale > 0 else err


def packed_case(seed, m, k, g):
    rng = np.random.default_rng(seed)
    q = rng.integers(-1, 2, (m, k)).astype(np.int8)
    scales = rng.uniform(0.001, 0.2, (m, k // g)).astype(np.float16).astype(np.float32)
    return rng, reference.OPS["pack_ternary"](q), scales


shapes = st.tuples(
    st.sampled_from([32, 64, 128, 256]),   # group size
    st.integers(1, 4),                     # groups
    st.integers(1, 140),                   # M (weight rows)
    st.integers(1, 150),                   # N (tokens)
    st.integers(0, 2**31 - 1),             # seed
)


@settings(max_examples=150)
@given(shapes)
def test_packed_gemm_matches_reference_on_random_shapes(case):
    g, groups, m, n, seed = case
    k = g * groups
    be = cuda_emulator.emulated_cupy_backend()
    rng, packed, scales = packed_case(seed, m, k, g)
    xq = rng.integers(-128, 128, (n, k)).astype(np.int8)
    xs = rng.uniform(0.001, 0.1, n).astype(np.float32)
    got = be.packed_gemm(be.prepare_packed(packed, scales, g), xq, xs)
    want = reference.OPS["packed_gemm"](reference.OPS["prepare_packed"](packed, scales, g), xq, xs)
    assert rel_err(got, want) <= 1e-5, (cuda_emulator.emulated_ops().gemm_kernel_for(n, g), case)


@settings(max_examples=150)
@given(shapes)
def test_packed_gemv_matches_reference_on_random_shapes(case):
    g, groups, m, _, seed = case
    k = g * groups * (1 + seed % 5)  # up to 5120 columns: 1 to 32 lanes per row, chunk loops
    be = cuda_emulator.emulated_cupy_backend()
    rng, packed, scales = packed_case(seed, m * 3, k, g)
    xq = rng.integers(-128, 128, k).astype(np.int8)
    got = be.packed_gemv(be.prepare_packed(packed, scales, g), xq, np.float32(0.03))
    want = reference.OPS["packed_gemv"](reference.OPS["prepare_packed"](packed, scales, g), xq, np.float32(0.03))
    assert rel_err(got, want) <= 1e-5, case
