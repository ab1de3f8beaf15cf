// Ternary quantization, packing, and int8 x ternary GEMM/GEMV kernels (SPEC section 2).
//
// All kernels are plain `extern "C"` so cupy.RawModule can look them up by name. The
// integer inner sums are exact (int32 accumulation of int8 x {-1,0,1} products); group
// scales are applied once per group in float32.

// Round half away from zero, the project's one rounding rule (not rintf's half-to-even).
__device__ __forceinline__ float round_half_away(float v) {
    // floor(|v| + 0.5) rounds 0.49999997f up (the sum rounds to 1); compare the fraction instead.
    float a = fabsf(v);
    float r = floorf(a);
    if (a - r >= 0.5f) r += 1.0f;
    return v < 0.0f ? -r : r;
}

// max that propagates NaN (fmaxf drops it): a token holding NaN/Inf must get a NaN scale.
__device__ __forceinline__ float nan_max(float a, float b) {
    return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Per-token activation quantization, one block per row: s = max|x| / 127,
// q = clip(round_half_away(x / s), -127, 127); rows with max|x| < 1e-8 get q = 0, s = 0.
extern "C" __global__ void quantize_acts_rows(const float* __restrict__ x, signed char* __restrict__ q,
                                              float* __restrict__ s, int K) {
    __shared__ float partial[32];
    const float* row = x + (size_t)blockIdx.x * K;
    float m = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float v = row[k];
        m = nan_max(m, isfinite(v) ? fabsf(v) : __int_as_float(0x7fffffff));
    }
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x + 31) / 32 ? partial[threadIdx.x] : 0.0f;
        v = warp_max(v);
        if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    float a = partial[0];
    float scale = a < 1e-8f ? 0.0f : a / 127.0f;  // NaN stays NaN
    if (threadIdx.x == 0) s[blockIdx.x] = scale;
    signed char* qrow = q + (size_t)blockIdx.x * K;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        float v = (scale == 0.0f || scale != scale) ? 0.0f : round_half_away(row[k] / scale);
        qrow[k] = (signed char)fminf(127.0f, fmaxf(-127.0f, v));
    }
}

// Mean of |w| per (row, group), accumulated in double; one warp per group.
extern "C" __global__ void group_abs_mean(const float* __restrict__ w, double* __restrict__ mean,
                                          int M, int K, int G) {
    int groups = K / G;
    int gid = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (gid >= M * groups) return;
    int r = gid / groups, g = gid % groups;
    const float* p = w + (size_t)r * K + (size_t)g * G;
    double acc = 0.0;
    for (int k = lane; k < G; k += 32) acc += (double)fabsf(p[k]);
    acc = warp_sum_d(acc);
    if (lane == 0) mean[gid] = acc / (double)G;
}

// q = clip(round_half_away(w / s), -1, 1) with s already fp16-rounded; s == 0 -> q = 0.
extern "C" __global__ void quantize_weights_apply(const float* __restrict__ w, const float* __restrict__ s,
                                                  signed char* __restrict__ q, int M, int K, int G) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)M * K) return;
    size_t r = i / K, k = i % K;
    float sc = s[r * (K / G) + k / G];
    float v = (sc == 0.0f || sc != sc) ? 0.0f : round_half_away(w[i] / sc);  // NaN scale: q = 0
    q[i] = (signed char)fminf(1.0f, fmaxf(-1.0f, v));
}

// Canonical 2-bit packing: 0 -> 00, +1 -> 01, -1 -> 11; column 4j+i in bits 2i..2i+1 of byte j.
extern "C" __global__ void pack_ternary(const signed char* __restrict__ q, unsigned char* __restrict__ out,
                                        size_t n_bytes) {
    size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_bytes) return;
    const signed char* p = q + 4 * j;
    unsigned int b = 0;
    for (int i = 0; i < 4; ++i) b |= ((unsigned int)p[i] & 3u) << (2 * i);  // -1 & 3 == 3
    out[j] = (unsigned char)b;
}

__device__ __forceinline__ int decode_trit(unsigned int code) {
    // 00 -> 0, 01 -> +1, 11 -> -1, 10 (invalid) -> 0
    int low = code & 1u;
    return low - 2 * (low & (code >> 1));
}

extern "C" __global__ void unpack_ternary(const unsigned char* __restrict__ packed, signed char* __restrict__ q,
                                          size_t n_bytes) {
    size_t j = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n_bytes) return;
    unsigned int b = packed[j];
    for (int i = 0; i < 4; ++i) q[4 * j + i] = (signed char)decode_trit((b >> (2 * i)) & 3u);
}

// y[n, m] = xs[n] * sum_g ws[m, g] * sum_{k in g} xq[n, k] * wq[m, k]
// int8 operands, dp4a with int32 accumulation per group. 256 threads, a 64 x 64 output tile,
// 4 x 4 outputs per thread. Needs K % 32 == 0, G % 32 == 0, 4-byte aligned rows.
#define TG_BM 64
#define TG_BN 64
#define TG_BK 32
extern "C" __global__ void __launch_bounds__(256) ternary_gemm_dp4a(
        const signed char* __restrict__ xq, const float* __restrict__ xs,
        const signed char* __restrict__ wq, const float* __restrict__ ws,
        float* __restrict__ y, int N, int M, int K, int G) {
    __shared__ int sx[TG_BM][TG_BK / 4 + 1];
    __shared__ int sw[TG_BN][TG_BK / 4 + 1];
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int n0 = blockIdx.y * TG_BM, m0 = blockIdx.x * TG_BN;
    const int groups = K / G;
    float accf[4][4];
    int acci[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) { accf[i][j] = 0.0f; acci[i][j] = 0; }

    for (int k0 = 0; k0 < K; k0 += TG_BK) {
        for (int i = threadIdx.x; i < TG_BM * (TG_BK / 4); i += 256) {
            int r = i / (TG_BK / 4), c = i % (TG_BK / 4);
            int n = n0 + r, m = m0 + r;
            sx[r][c] = n < N ? *reinterpret_cast<const int*>(xq + (size_t)n * K + k0 + 4 * c) : 0;
            sw[r][c] = m < M ? *reinterpret_cast<const int*>(wq + (size_t)m * K + k0 + 4 * c) : 0;
        }
        __syncthreads();
#pragma unroll
        for (int c = 0; c < TG_BK / 4; ++c) {
            int a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) { a[i] = sx[ty + 16 * i][c]; b[i] = sw[tx + 16 * i][c]; }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acci[i][j] = __dp4a(a[i], b[j], acci[i][j]);
        }
        __syncthreads();
        if ((k0 + TG_BK) % G == 0) {  // end of a group: apply its weight scale
            int g = (k0 + TG_BK) / G - 1;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                int m = m0 + tx + 16 * j;
                float sc = m < M ? ws[(size_t)m * groups + g] : 0.0f;
#pragma unroll
                for (int i = 0; i < 4; ++i) { accf[i][j] += sc * (float)acci[i][j]; acci[i][j] = 0; }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int n = n0 + ty + 16 * i;
        if (n >= N) continue;
        float sx_n = xs[n];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            int m = m0 + tx + 16 * j;
            if (m < M) y[(size_t)n * M + m] = sx_n * accf[i][j];
        }
    }
}

// Packed GEMV for decode: y[m] = xs[0] * sum_g ws[m, g] * sum_{k in g} xq[k] * trit(m, k).
// Each lane reads 16 packed bytes (64 trits) per step with one coalesced 16-byte load.
// Decoding without a table: in a packed word (16 trits) L = the low bit of every code and
// N = codes 11; for bit plane p (the trits at columns 4j + p), (L >> 2p) & 0x01010101 holds
// one 0/1 byte per trit, so sum x * trit = dp4a(x_p, L_p) - 2 dp4a(x_p, N_p) with x_p the
// activations regrouped per plane in shared memory (invalid code 10 counts as 0, like the
// reference). A row of S = K / 64 chunks (rounded up to a power of two, at most 32) takes
// S lanes, so a warp works on 32 / S rows at once when K is small.
// Needs K % 64 == 0 (true since G in {64, 128, 256} divides K) and 16-byte aligned rows.
extern "C" __global__ void ternary_gemv_packed(const unsigned char* __restrict__ packed,
                                               const float* __restrict__ ws,
                                               const signed char* __restrict__ xq,
                                               const float* __restrict__ xs,
                                               float* __restrict__ y, int M, int K, int G, int lanes_per_row) {
    extern __shared__ uint4 xplanes[];  // K / 16 entries: planes 0..3 of 16 activations
    const int words = K / 16;
    for (int w = threadIdx.x; w < words; w += blockDim.x) {
        const unsigned* src = reinterpret_cast<const unsigned*>(xq) + 4 * w;  // 16 activations
        unsigned a0 = src[0], a1 = src[1], a2 = src[2], a3 = src[3];
        unsigned p[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) {  // plane b gathers byte b of each of the four words
            p[b] = ((a0 >> (8 * b)) & 0xffu) | (((a1 >> (8 * b)) & 0xffu) << 8) |
                   (((a2 >> (8 * b)) & 0xffu) << 16) | (((a3 >> (8 * b)) & 0xffu) << 24);
        }
        xplanes[w] = make_uint4(p[0], p[1], p[2], p[3]);
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int rows_per_warp = 32 / lanes_per_row, sub = lane / lanes_per_row, part = lane % lanes_per_row;
    const int row_bytes = K / 4, chunks = row_bytes / 16, groups = K / G;
    const int row_step = gridDim.x * warps * rows_per_warp;
    for (int m0 = (blockIdx.x * warps + warp) * rows_per_warp; m0 < M; m0 += row_step) {
        const int m = m0 + sub;
        float f = 0.0f;
        if (m < M) {
            const uint4* rowp = reinterpret_cast<const uint4*>(packed + (size_t)m * row_bytes);
            for (int c = part; c < chunks; c += lanes_per_row) {
                uint4 v = rowp[c];
                unsigned wd[4] = {v.x, v.y, v.z, v.w};
                int pos = 0, neg = 0;
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const uint4 xp = xplanes[4 * c + q];
                    const unsigned low = wd[q] & 0x55555555u, both = low & (wd[q] >> 1);
                    const unsigned planes[4] = {xp.x, xp.y, xp.z, xp.w};
#pragma unroll
                    for (int b = 0; b < 4; ++b) {
                        pos = __dp4a((int)planes[b], (int)((low >> (2 * b)) & 0x01010101u), pos);
                        neg = __dp4a((int)planes[b], (int)((both >> (2 * b)) & 0x01010101u), neg);
                    }
                }
                f += ws[(size_t)m * groups + (c * 64) / G] * (float)(pos - 2 * neg);
            }
        }
        for (int o = lanes_per_row / 2; o > 0; o >>= 1) f += __shfl_xor_sync(0xffffffffu, f, o);
        if (part == 0 && m < M) y[m] = f * xs[0];
    }
}

// ---------------------------------------------------------------------------------------
// Tensor-core int8 x ternary GEMM (sm_80+): mma.sync m16n8k32 s8 x s8 -> s32, exact integer
// sums per group, the group's weight scale applied when the group's last K-tile is done.
// Block tile: 128 tokens x 128 weight rows x 64 bytes of K, two shared-memory stages filled
// with cp.async while the previous stage is multiplied. 8 warps as 2 (tokens) x 4 (weight
// rows), each warp a 64 x 32 tile = 4 x 4 mma tiles. Needs K % 64 == 0, G % 64 == 0 and
// 16-byte aligned operands. Rows are padded to 80 bytes so the fragment loads of a warp
// (8 rows x 4 words) hit 32 different banks.
#define TC_BN 128
#define TC_BM 128
#define TC_BK 64
#define TC_LD (TC_BK + 16)

__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src, int src_bytes) {
#ifdef CUDA_EMULATOR
    emu_cp_async_16(shared_dst, global_src, src_bytes);
#else
    unsigned dst = (unsigned)__cvta_generic_to_shared(shared_dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src), "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef CUDA_EMULATOR
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int pending>
__device__ __forceinline__ void cp_async_wait() {
#ifndef CUDA_EMULATOR
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
#endif
}

// d += a (16 x 32, row-major fragment) x b (32 x 8, column-major fragment), int32.
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
#ifdef CUDA_EMULATOR
    emu_mma_m16n8k32_s8(d, a, b, d);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Copy one K-tile of `rows` rows (64 bytes each) into a padded shared stage; rows past
// `limit` are zero-filled (src-size 0 reads nothing).
__device__ __forceinline__ void tc_load_tile(signed char* stage, const signed char* src, int row0, int limit,
                                             int K, int k0) {
#pragma unroll
    for (int i = 0; i < (TC_BN * TC_BK / 16) / 256; ++i) {
        int chunk = threadIdx.x + 256 * i;
        int r = chunk >> 2, c = chunk & 3;
        bool ok = row0 + r < limit;
        const signed char* p = ok ? src + (size_t)(row0 + r) * K + k0 + 16 * c : src;
        cp_async_16(stage + r * TC_LD + 16 * c, p, ok ? 16 : 0);
    }
}

extern "C" __global__ void __launch_bounds__(256) ternary_gemm_mma(
        const signed char* __restrict__ xq, const float* __restrict__ xs,
        const signed char* __restrict__ wq, const float* __restrict__ ws,
        float* __restrict__ y, int N, int M, int K, int G) {
    __shared__ __align__(16) signed char sx[2][TC_BN * TC_LD];
    __shared__ __align__(16) signed char sw[2][TC_BM * TC_LD];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int warp_n = warp >> 2, warp_m = warp & 3;  // 2 x 4 warps
    const int n0 = blockIdx.y * TC_BN, m0 = blockIdx.x * TC_BM;
    const int groups = K / G, tiles = K / TC_BK;

    int acc[4][4][4];
    float out[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int r = 0; r < 4; ++r) { acc[i][j][r] = 0; out[i][j][r] = 0.0f; }

    tc_load_tile(sx[0], xq, n0, N, K, 0);
    tc_load_tile(sw[0], wq, m0, M, K, 0);
    cp_async_commit();
    for (int kt = 0; kt < tiles; ++kt) {
        const int st = kt & 1;
        if (kt + 1 < tiles) {  // prefetch the next tile into the other stage
            tc_load_tile(sx[st ^ 1], xq, n0, N, K, (kt + 1) * TC_BK);
            tc_load_tile(sw[st ^ 1], wq, m0, M, K, (kt + 1) * TC_BK);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int ks = 0; ks < TC_BK; ks += 32) {
            unsigned a[4][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const signed char* base = sx[st] + (warp_n * 64 + i * 16 + g) * TC_LD + ks + 4 * t;
                a[i][0] = *reinterpret_cast<const unsigned*>(base);
                a[i][1] = *reinterpret_cast<const unsigned*>(base + 8 * TC_LD);
                a[i][2] = *reinterpret_cast<const unsigned*>(base + 16);
                a[i][3] = *reinterpret_cast<const unsigned*>(base + 8 * TC_LD + 16);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const signed char* base = sw[st] + (warp_m * 32 + j * 8 + g) * TC_LD + ks + 4 * t;
                b[j][0] = *reinterpret_cast<const unsigned*>(base);
                b[j][1] = *reinterpret_cast<const unsigned*>(base + 16);
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_s8_16832(acc[i][j], a[i], b[j]);
        }
        __syncthreads();  // everyone is done with this stage before it is refilled
        if (((kt + 1) * TC_BK) % G == 0) {  // a group ends here: fold in its weight scales
            const int gi = (kt + 1) * TC_BK / G - 1;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int m = m0 + warp_m * 32 + j * 8 + 2 * t;
                const float s0 = m < M ? ws[(size_t)m * groups + gi] : 0.0f;
                const float s1 = m + 1 < M ? ws[(size_t)(m + 1) * groups + gi] : 0.0f;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    out[i][j][0] += s0 * (float)acc[i][j][0];
                    out[i][j][1] += s1 * (float)acc[i][j][1];
                    out[i][j][2] += s0 * (float)acc[i][j][2];
                    out[i][j][3] += s1 * (float)acc[i][j][3];
                    acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0;
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int n = n0 + warp_n * 64 + i * 16 + g + 8 * half;
            if (n >= N) continue;
            const float sn = xs[n];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int m = m0 + warp_m * 32 + j * 8 + 2 * t;
                if (m < M) y[(size_t)n * M + m] = sn * out[i][j][2 * half];
                if (m + 1 < M) y[(size_t)n * M + m + 1] = sn * out[i][j][2 * half + 1];
            }
        }
    }
}
