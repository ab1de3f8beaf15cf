"""Numba packed-ternary kernels and quantizers against the reference (SPEC section 2).

Every kernel path this CPU can run is checked; the others are skipped with the reason. The
``vnni`` path's instruction is additionally checked to lower to ``vpdpbusd`` for VNNI CPUs (a
compile-only check in a subprocess), and ``vnni_emulated`` runs the rest of that kernel here.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from backends.numba_backend import cpu_features, packed, packed_x86, quant
from reference import ternary as ref

pytestmark = pytest.mark.triangle

REPO = Path(__file__).resolve().parents[1]
GEMM_BLOCK = packed_x86.GEMM_ROWS * packed_x86.GEMM_TOKENS


def path_param(path):
    reason = cpu_features.unavailable_reason(path)
    marks = [pytest.mark.skip(reason=f"kernel path {path!r} cannot run here: {reason}")] if reason else []
    return pytest.param(path, marks=marks, id=path)


PATHS = [path_param(p) for p in cpu_features.PATHS]


def random_case(seed, m, k, g, n):
    """Packed weights (random bytes, so the invalid code 10 appears), scales, activations."""
    rng = np.random.default_rng(seed)
    packed_w = rng.integers(0, 256, (m, k // 4), dtype=np.uint8)
    scales = rng.uniform(0.01, 2.0, (m, k // g)).astype(np.float16).astype(np.float32)
    xq = rng.integers(-127, 128, (n, k), dtype=np.int8)
    xs = rng.uniform(0.001, 0.1, n)
    return packed_w, scales, xq, xs


def integer_sums(packed_w, xq, g):
    """``isum[t, r, g]`` in int64 from the reference's unpacking."""
    q = ref.unpack_ternary(packed_w).astype(np.int64)
    m, k = q.shape
    return np.einsum("tgk,rgk->trg", xq.astype(np.int64).reshape(-1, k // g, g), q.reshape(m, k // g, g))


def check_against_reference(path, packed_w, scales, xq, xs, g):
    handle = packed.prepare_packed(packed_w, scales, g, kernel=path)
    expect = ref.prepare_packed(packed_w, scales, g)
    y = packed.packed_gemm(handle, xq, xs)
    y_ref = ref.packed_gemm(expect, xq, xs)
    assert y.dtype == np.float32 and y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6 * float(np.abs(y_ref).max(initial=0.0)))
    for t in range(min(xq.shape[0], 3)):
        v = packed.packed_gemv(handle, xq[t], xs[t])
        v_ref = ref.packed_gemv(expect, xq[t], xs[t])
        assert v.dtype == np.float32 and v.shape == v_ref.shape
        np.testing.assert_allclose(v, v_ref, rtol=1e-6, atol=1e-6 * float(np.abs(v_ref).max(initial=0.0)))
    # Unit scales: the output is the exact integer sum (all well below 2**24).
    ones = packed.prepare_packed(packed_w, np.ones_like(scales), g, kernel=path)
    exact = integer_sums(packed_w, xq, g).sum(-1)
    np.testing.assert_array_equal(packed.packed_gemm(ones, xq, np.ones(xq.shape[0])), exact)
    np.testing.assert_array_equal(packed.packed_gemv(ones, xq[0], 1.0), exact[0])


SHAPES = [  # (M, K, G, N): tails in every dimension, groups smaller and larger than 128 columns
    (1, 64, 64, 1),
    (7, 64, 64, 2),
    (33, 192, 64, 3),
    (5, 128, 128, 5),
    (9, 384, 128, 4),
    (8, 512, 256, 7),
    (6, 256, 128, 15),  # 2 blocks of 6 tokens, a pair and a single
    (3, 96, 32, 2),
    (4, 192, 96, 3),  # G not a multiple of 128: chunk loop
    (2, 12, 4, 2),  # G not a multiple of 32: plain kernel on every path
    (3, 2048, 2048, 3),  # several int16 spans per group on avx2
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("m,k,g,n", SHAPES)
def test_packed_matches_reference(path, m, k, g, n):
    packed_w, scales, xq, xs = random_case(m * 1000 + k + g + n, m, k, g, n)
    check_against_reference(path, packed_w, scales, xq, xs, g)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("value", [127, -127, -128])
@pytest.mark.parametrize("trit", [1, -1])
def test_extreme_activations_are_exact(path, value, trit):
    """Largest |sums| per int16 lane on avx2: code 2 (w = +1) times -128 gives -512 per pair,
    so a 4096-column group (128 chunks) would overflow int16 without the periodic widening."""
    m, k, g = 9, 4096, 4096
    q = np.full((m, k), trit, np.int8)
    packed_w = ref.pack_ternary(q)
    xq = np.full((3, k), value, np.int8)
    check_against_reference(path, packed_w, np.ones((m, 1), np.float32), xq, np.ones(3), g)
    handle = packed.prepare_packed(packed_w, np.ones((m, 1), np.float32), g, kernel=path)
    np.testing.assert_array_equal(packed.packed_gemv(handle, xq[0], 1.0), np.full(m, trit * value * k, np.float32))


@pytest.mark.parametrize("path", PATHS)
def test_zero_groups_zero_activations_and_invalid_codes(path):
    m, k, g = 6, 256, 64
    rng = np.random.default_rng(7)
    q = rng.integers(-1, 2, (m, k)).astype(np.int8)
    packed_w = ref.pack_ternary(q)
    packed_w[0, :] = 0b10101010  # every code invalid: decodes to 0
    packed_w[1, 16:32] = 0  # one all-zero group
    scales = rng.uniform(0.1, 1.0, (m, k // g)).astype(np.float32)
    scales[2, 1] = 0.0  # one zero scale
    xq = rng.integers(-127, 128, (4, k), dtype=np.int8)
    xq[1] = 0  # an all-zero token
    xs = np.array([0.5, 0.25, 0.0, 1.0])  # one zero token scale
    check_against_reference(path, packed_w, scales, xq, xs, g)
    y = packed.packed_gemm(packed.prepare_packed(packed_w, scales, g, kernel=path), xq, xs)
    assert not y[:, 0].any() and not y[1].any() and not y[2].any()


@pytest.mark.parametrize("path", PATHS)
def test_non_finite_scales_propagate(path):
    packed_w, scales, xq, xs = random_case(3, 4, 128, 64, 2)
    scales[1, 0] = np.nan
    handle = packed.prepare_packed(packed_w, scales, 64, kernel=path)
    y = packed.packed_gemm(handle, xq, xs)
    y_ref = ref.packed_gemm(ref.prepare_packed(packed_w, scales, 64), xq, xs)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(y_ref))
    assert np.isnan(y[:, 1]).all()


@pytest.mark.parametrize("path", PATHS)
def test_thread_pool_matches_calling_thread(path, monkeypatch):
    """Products above PARALLEL_MIN_MACS split rows over the thread pool: same bits."""
    packed_w, scales, xq, xs = random_case(17, 37, 384, 128, 5)
    handle = packed.prepare_packed(packed_w, scales, 128, kernel=path)
    serial = packed.packed_gemm(handle, xq, xs), packed.packed_gemv(handle, xq[0], xs[0])
    monkeypatch.setattr(packed, "PARALLEL_MIN_MACS", 0)
    with_pool = packed.packed_gemm(handle, xq, xs), packed.packed_gemv(handle, xq[0], xs[0])
    for a, b in zip(serial, with_pool):
        np.testing.assert_array_equal(a, b)
    check_against_reference(path, packed_w, scales, xq, xs, 128)


def test_kernel_layout_holds_offset_codes():
    rng = np.random.default_rng(11)
    q = rng.integers(-1, 2, (3, 320)).astype(np.int8)
    p = ref.pack_ternary(q)
    p[0, :8] = 0b10101010  # invalid codes decode to 0
    q[0, :32] = 0
    layout = packed.kernel_layout(p)
    assert layout.shape == (8, 384 // 4) and layout.dtype == np.uint8
    cols = np.arange(384)
    codes = (layout[:, 32 * (cols // 128) + cols % 32] >> (2 * ((cols % 128) // 32))) & 3
    np.testing.assert_array_equal(codes[:3, :320].astype(np.int8) - 1, q)
    assert (codes[3:] == 1).all() and (codes[:, 320:] == 1).all()  # padding: weight 0


def test_group_size_not_a_multiple_of_32_runs_plain():
    packed_w, scales, _, _ = random_case(1, 2, 16, 4, 1)
    assert packed.prepare_packed(packed_w, scales, 4).kernel == "plain"


def test_empty_shapes():
    handle = packed.prepare_packed(np.zeros((0, 16), np.uint8), np.zeros((0, 1), np.float32), 64)
    assert packed.packed_gemv(handle, np.zeros(64, np.int8), 1.0).shape == (0,)
    handle = packed.prepare_packed(np.zeros((3, 16), np.uint8), np.ones((3, 1), np.float32), 64)
    assert packed.packed_gemm(handle, np.zeros((0, 64), np.int8), np.zeros(0)).shape == (0, 3)


def test_packed_bad_input_raises():
    packed_w, scales, xq, xs = random_case(5, 4, 128, 64, 2)
    handle = packed.prepare_packed(packed_w, scales, 64)
    with pytest.raises(ValueError, match="int8"):
        packed.packed_gemv(handle, xq[0].astype(np.int16), 1.0)
    with pytest.raises(ValueError, match="expected"):
        packed.packed_gemv(handle, xq[0, :64], 1.0)
    with pytest.raises(ValueError, match="xs"):
        packed.packed_gemm(handle, xq, xs[:1])
    with pytest.raises(ValueError, match="PackedHandle"):
        packed.packed_gemv(ref.prepare_packed(packed_w, scales, 64), xq[0], 1.0)
    with pytest.raises(ValueError, match="scales"):
        packed.prepare_packed(packed_w, scales[:, :1], 64)
    with pytest.raises(ValueError, match="divisible"):
        packed.prepare_packed(packed_w, scales, 48)
    with pytest.raises(ValueError, match="kernel"):
        packed.prepare_packed(packed_w, scales, 64, kernel="sse")


# --- CPU features and the VNNI instruction -----------------------------------------------


def test_path_selection():
    assert cpu_features.runnable_paths(set()) == ("plain",)
    assert cpu_features.default_path({"avx2"}) == "avx2"
    assert cpu_features.default_path({"avx2", "avxvnni"}) == "vnni"
    assert cpu_features.default_path({"avx2", "avx512vnni"}) == "avx2"  # VNNI needs VL for 256 bits
    assert cpu_features.default_path({"avx2", "avx512vnni", "avx512vl"}) == "vnni"
    assert packed.DEFAULT_PATH in cpu_features.runnable_paths()


def test_features_follow_numba_compile_target(monkeypatch):
    from numba.core import config

    monkeypatch.setattr(config, "CPU_FEATURES", "")  # what NUMBA_CPU_NAME=generic sets
    assert cpu_features.runnable_paths() == ("plain",)
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx2,-avx512vnni,+avxvnni")
    assert cpu_features.host_features() == {"avx2", "avxvnni"}


def test_forced_path_from_environment(monkeypatch):
    monkeypatch.setenv(cpu_features.KERNEL_ENV, "plain")
    assert cpu_features.default_path({"avx2", "avxvnni"}) == "plain"
    monkeypatch.setenv(cpu_features.KERNEL_ENV, "vnni")
    with pytest.raises(ValueError, match="cannot run here"):
        cpu_features.default_path({"avx2"})
    monkeypatch.setenv(cpu_features.KERNEL_ENV, "neon")
    with pytest.raises(ValueError, match="not a kernel path"):
        cpu_features.default_path({"avx2"})


def test_vnni_kernel_lowers_to_vpdpbusd():
    """Compiles (never runs) the vnni GEMM block kernel for an AVX-512 VNNI CPU in a subprocess
    (the CPU Numba compiles for is fixed per process)."""
    script = textwrap.dedent(
        """
        from numba import njit, types
        from backends.numba_backend import packed_x86 as px
        @njit
        def block(path, layout, xq, cpg, scales_t, xsums, xs, m, out):
            px._block_gemm(path, layout, 0, xq, 0, cpg, scales_t, xsums, xs, m, out)
        f32, i32 = types.Array(types.float32, 2, "C"), types.Array(types.int32, 2, "C")
        block.compile((px.SimdPathType("vnni"), types.Array(types.uint8, 2, "C"), types.Array(types.int8, 2, "C"),
                       types.int64, f32, i32, types.Array(types.float64, 1, "C"), types.int64, f32))
        print(block.inspect_asm(block.signatures[0]).count("vpdpbusd"))
        """
    )
    env = dict(os.environ, NUMBA_CPU_NAME="icelake-server", NUMBA_CPU_FEATURES="+avx512vnni,+avx512vl")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) >= 2 * GEMM_BLOCK  # the unit loop and the chunk loop


def test_vnni_intrinsic_has_a_vex_form_for_avx_vnni():
    """The same LLVM intrinsic becomes the VEX-encoded instruction on AVX-VNNI CPUs."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly(
        """
        declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, <8 x i32>, <8 x i32>)
        define <8 x i32> @f(<8 x i32> %a, <8 x i32> %b, <8 x i32> %c) {
          %r = call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> %a, <8 x i32> %b, <8 x i32> %c)
          ret <8 x i32> %r
        }
        """
    )
    target = llvm.Target.from_triple(llvm.get_process_triple())
    asm = target.create_target_machine(cpu="alderlake", features="+avxvnni").emit_assembly(module)
    assert "{vex}\tvpdpbusd" in asm


# --- quantizers and packing: bit for bit ----------------------------------------------------


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(f"u{a.dtype.itemsize}"), b.view(f"u{b.dtype.itemsize}"))


def weight_cases(dtype):
    rng = np.random.default_rng(21)
    yield rng.standard_normal((5, 256)).astype(dtype), 64
    yield (rng.standard_normal((3, 512)) * np.exp(rng.uniform(-25, 25, (3, 512)))).astype(dtype), 128
    w = rng.standard_normal((4, 128)).astype(dtype)
    w[0, :64] = 0  # all-zero group
    w[1, :64] *= 1e-9  # mean below 1e-8
    w[2, :64] = 2e-8  # mean above 1e-8 that rounds to 0 in float16
    w[3, 64:] = 7e4  # mean above float16's range: NaN scale
    yield w, 64
    w = rng.standard_normal((3, 128)).astype(dtype)
    w[0, 3], w[1, 70] = np.nan, np.inf
    yield w, 64
    # Exact ties w / s = 0.5: group of [1, 1, 1, 0.5 * k ...] built around a dyadic mean.
    w = np.tile(np.array([1.0, 0.5, -0.5, 1.0, 0.5, -1.0, 0.25, 1.25], dtype), (2, 4))
    yield w, 32
    yield rng.standard_normal((2, 8192 * 2 + 64 * 3)).astype(dtype), 8192 * 2 + 64 * 3  # beyond NumPy's buffer


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_weights_bit_for_bit(dtype):
    for w, g in weight_cases(dtype):
        q, s = quant.quantize_weights(w, g)
        q_ref, s_ref = ref.quantize_weights(w, g)
        np.testing.assert_array_equal(q, q_ref)
        assert_same_bits(s, s_ref)


def test_quantize_weights_matches_numpy_fp16_rounding():
    """Means right at float16 rounding boundaries (ties to even, subnormals, the top)."""
    h = np.arange(1, 0x7BFF, 7, dtype=np.uint16).view(np.float16).astype(np.float64)
    nxt = np.nextafter(h.astype(np.float16), np.float16(np.inf)).astype(np.float64)
    means = np.concatenate([(h + nxt) / 2, np.nextafter((h + nxt) / 2, 0), np.nextafter((h + nxt) / 2, 1e9), [65519.0, 65520.0, 2.9e-8, 3e-8]])
    w = np.repeat(means, 32).reshape(-1, 32)
    q, s = quant.quantize_weights(w, 32)
    q_ref, s_ref = ref.quantize_weights(w, 32)
    assert_same_bits(s, s_ref)
    np.testing.assert_array_equal(q, q_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_acts_bit_for_bit(dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 96)).astype(dtype)
    x[0, 0] = 0.0  # zero token
    x[0, 1, :] = np.float32(1e-8)  # the 1e-8 test happens in x's dtype
    x[0, 2, 5] = np.nan
    x[1, 0, 7] = -np.inf
    x[1, 1] = np.arange(96) - 47.5  # max 48: x / s hits exact .5 ties
    x[1, 2] = np.linspace(-127, 127, 96) * 3.0
    cases = [x, x[2, 0], x.reshape(-1, 96)[:, :0], (rng.standard_normal((2, 50)) * 1e30).astype(dtype)]
    for xi in cases:
        q, s = quant.quantize_acts(xi)
        q_ref, s_ref = ref.quantize_acts(xi)
        np.testing.assert_array_equal(q, q_ref)
        assert_same_bits(np.asarray(s), np.asarray(s_ref))


def test_pack_unpack_match_reference():
    rng = np.random.default_rng(9)
    q = rng.integers(-1, 2, (7, 36)).astype(np.int8)
    p = quant.pack_ternary(q)
    np.testing.assert_array_equal(p, ref.pack_ternary(q))
    np.testing.assert_array_equal(quant.unpack_ternary(p), q)
    raw = rng.integers(0, 256, (5, 9), dtype=np.uint8)  # includes the invalid code 10
    np.testing.assert_array_equal(quant.unpack_ternary(raw), ref.unpack_ternary(raw))
    assert quant.unpack_ternary(np.full((1, 1), 0b10101010, np.uint8)).tolist() == [[0, 0, 0, 0]]


def test_quantizers_on_the_thread_pool_match_reference(monkeypatch):
    monkeypatch.setattr(quant, "PARALLEL_MIN_ELEMENTS", 0)
    rng = np.random.default_rng(13)
    w = rng.standard_normal((37, 256)).astype(np.float32)
    q, s = quant.quantize_weights(w, 64)
    q_ref, s_ref = ref.quantize_weights(w, 64)
    np.testing.assert_array_equal(q, q_ref)
    assert_same_bits(s, s_ref)
    xq, xs = quant.quantize_acts(w)
    xq_ref, xs_ref = ref.quantize_acts(w)
    np.testing.assert_array_equal(xq, xq_ref)
    assert_same_bits(xs, xs_ref)
    p = quant.pack_ternary(q)
    np.testing.assert_array_equal(p, ref.pack_ternary(q))
    np.testing.assert_array_equal(quant.unpack_ternary(p), q)
    with pytest.raises(ValueError, match="outside"):
        quant.pack_ternary(np.full((5, 8), 3, np.int8))


def test_quant_bad_input_raises():
    with pytest.raises(ValueError, match="outside"):
        quant.pack_ternary(np.array([[0, 1, 2, 0]], np.int8))
    with pytest.raises(ValueError, match="multiple of 4"):
        quant.pack_ternary(np.zeros((2, 6), np.int8))
    with pytest.raises(ValueError, match="uint8"):
        quant.unpack_ternary(np.zeros((2, 3), np.int8))
    with pytest.raises(ValueError, match="divisible"):
        quant.quantize_weights(np.zeros((2, 100), np.float32), 64)
    with pytest.raises(ValueError, match="floating-point"):
        quant.quantize_acts(np.zeros((2, 8), np.int32))
