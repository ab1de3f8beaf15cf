"""The CPU emulator that runs the cupy backend's kernels without a GPU behaves like CUDA."""
import numpy as np
import pytest

from backends.cupy_backend import emulator as cuda_emulator

pytestmark = cuda_emulator.skip_without_compiler()

SOURCE = r"""
extern "C" __global__ void shuffles(const int* __restrict__ x, int* __restrict__ out, int n) {
    int i = threadIdx.x;
    int v = i < n ? x[i] : 0;
    out[4 * i + 0] = __shfl_xor_sync(0xffffffffu, v, 1);
    out[4 * i + 1] = __shfl_down_sync(0xffffffffu, v, 3);
    out[4 * i + 2] = __shfl_up_sync(0xffffffffu, v, 2);
    out[4 * i + 3] = __shfl_sync(0xffffffffu, v, 5);
}

// Sum of each block's slice through shared memory and a tree of __syncthreads.
extern "C" __global__ void block_sums(const float* __restrict__ x, float* __restrict__ out, int n) {
    extern __shared__ float partial[];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    partial[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

extern "C" __global__ void ballot(const int* __restrict__ x, unsigned* __restrict__ out) {
    unsigned b = __ballot_sync(0xffffffffu, x[threadIdx.x] > 0);
    if ((threadIdx.x & 31) == 0) out[threadIdx.x >> 5] = b;
}

// Half a warp shuffles while the other half waits at __syncthreads: a hang on a GPU.
extern "C" __global__ void divergent(float* __restrict__ out) {
    float v = 1.0f;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}

// Reads a neighbour's shared-memory slot with or without the barrier it needs.
extern "C" __global__ void neighbour(int* __restrict__ out, int with_barrier) {
    extern __shared__ int slots[];
    int t = threadIdx.x, n = blockDim.x;
    slots[t] = t;
    if (with_barrier) __syncthreads();
    out[t] = slots[(t + 1) % n];
}

// One m16n8k32 int8 MMA with the fragments loaded by the PTX ISA's layout.
extern "C" __global__ void mma_tile(const signed char* __restrict__ A, const signed char* __restrict__ B,
                                    int* __restrict__ D) {
    int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    unsigned a[4], b[2];
    const int* A4 = reinterpret_cast<const int*>(A);  // A: 16 x 32 row-major
    const int* B4 = reinterpret_cast<const int*>(B);  // B: 8 columns of 32, column-major
    a[0] = A4[g * 8 + t];
    a[1] = A4[(g + 8) * 8 + t];
    a[2] = A4[g * 8 + 4 + t];
    a[3] = A4[(g + 8) * 8 + 4 + t];
    b[0] = B4[g * 8 + t];
    b[1] = B4[g * 8 + 4 + t];
    int c[4] = {1, 2, 3, 4}, d[4];
    emu_mma_m16n8k32_s8(d, a, b, c);
    D[g * 8 + 2 * t] = d[0];
    D[g * 8 + 2 * t + 1] = d[1];
    D[(g + 8) * 8 + 2 * t] = d[2];
    D[(g + 8) * 8 + 2 * t + 1] = d[3];
}
"""


@pytest.fixture(scope="module")
def module():
    return cuda_emulator.RawModule(code=SOURCE)


def test_warp_shuffles_follow_cuda_semantics(module):
    n = 45  # a full warp and a partial one
    x = np.arange(100, 100 + n, dtype=np.int32)
    out = np.zeros((n, 4), np.int32)
    module.get_function("shuffles")((1,), (n,), (x, out, np.int32(n)))
    lane = np.arange(n)
    warp_base, width = (lane // 32) * 32, np.where(lane < 32, 32, n - 32)
    xor_src = lane ^ 1
    assert np.array_equal(out[:, 0], np.where(xor_src < n, x[np.minimum(xor_src, n - 1)], x))
    down = lane % 32 + 3
    assert np.array_equal(out[:, 1], np.where((down < 32) & (down < width), x[np.minimum(warp_base + down, n - 1)], x))
    up_ok = lane % 32 >= 2
    assert np.array_equal(out[:, 2], np.where(up_ok, x[np.maximum(lane - 2, 0)], x))
    assert np.array_equal(out[:, 3], x[warp_base + 5])


def test_block_barriers_and_dynamic_shared_memory(module):
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    out = np.zeros(8, np.float32)
    module.get_function("block_sums")((8,), (128,), (x, out, np.int32(1000)), shared_mem=128 * 4)
    want = np.add.reduceat(np.pad(x, (0, 24)), np.arange(0, 1024, 128))
    np.testing.assert_allclose(out, want, rtol=1e-5)


def test_ballot(module):
    x = np.random.default_rng(1).integers(-1, 2, 64).astype(np.int32)
    out = np.zeros(2, np.uint32)
    module.get_function("ballot")((1,), (64,), (x, out))
    want = [sum(1 << i for i in range(32) if x[32 * w + i] > 0) for w in range(2)]
    assert out.tolist() == want


def test_a_barrier_some_threads_never_reach_is_reported(module):
    with pytest.raises(RuntimeError, match="deadlock"):
        module.get_function("divergent")((1,), (32,), (np.zeros(32, np.float32),))


def test_mma_fragment_layout_multiplies_the_tiles(module):
    rng = np.random.default_rng(2)
    A = rng.integers(-128, 128, (16, 32)).astype(np.int8)
    Bt = rng.integers(-128, 128, (8, 32)).astype(np.int8)  # B's columns, each contiguous in K
    D = np.zeros((16, 8), np.int32)
    module.get_function("mma_tile")((1,), (32,), (A, Bt, D))
    assert np.array_equal(D, A.astype(np.int32) @ Bt.astype(np.int32).T + np.array([1, 2, 1, 2, 1, 2, 1, 2])
                          + np.array([0] * 8 + [2] * 8)[:, None])


def test_kernel_arguments_need_fixed_width_scalars(module):
    with pytest.raises(TypeError, match="numpy scalars"):
        module.get_function("block_sums")((1,), (32,), (np.zeros(4, np.float32), np.zeros(1, np.float32), 4))


def test_schedules_expose_a_missing_barrier(module, monkeypatch):
    n = 64
    want = (np.arange(n) + 1) % n
    results = {}
    for schedule in cuda_emulator.SCHEDULES:
        monkeypatch.setattr(cuda_emulator, "schedule", schedule)
        for barrier in (1, 0):
            out = np.zeros(n, np.int32)
            module.get_function("neighbour")((2,), (n,), (out, np.int32(barrier)), shared_mem=4 * n)
            results[schedule, barrier] = out
        assert np.array_equal(results[schedule, 1], want), schedule
    # Without the barrier every order reads some slot before its owner wrote it, and the
    # orders disagree on which.
    assert all(not np.array_equal(results[s, 0], want) for s in cuda_emulator.SCHEDULES)
    assert not np.array_equal(results["forward", 0], results["reverse", 0])
