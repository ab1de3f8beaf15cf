// mHC residual-stream mixing (SPEC section 3), float32, forward and backward:
//   mhc_pre:  u[t]    = sum_s h_pre[s] X[t, s]
//   mhc_post: X'[t]   = H_res (X[t] + h_post (outer) y[t])
// X is [T, n, C] (contiguous), y and u are [T, C]. A coefficient array is either shared
// ([n] / [n, n], stride 0) or per token ([T, n] / [T, n, n], stride n / n*n): the kernels take
// the stride, so static and dynamic (mHC-lite) coefficients run through the same code.
//
// Forwards are elementwise over (t, c) and read the n streams of one column. Backwards use
// one block per token: the stream gradients are elementwise, the coefficient gradients are
// dot products over C, reduced in the block and written per token; for shared coefficients
// the caller sums those rows over tokens (a deterministic order, no atomics).
//
// The streams a thread keeps live in registers sized by the template bound MAXN (n <= MAXN);
// kernels are instantiated for MAXN = 4 (n = 1, 2, 3, 4, the SPEC's streams) and 8.

__device__ __forceinline__ float mhc_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sums acc[q] over the block for every q with used(q) and writes the totals to out[q].
// scratch holds 32 * MAXK floats. One warp reduction per value and a single barrier for all
// of them (a block_sum per value would cost three barriers each). `used` is uniform across
// the block, so the shuffles inside it are too.
template <int MAXK, class Used>
__device__ void mhc_block_sum_to(const float (&acc)[MAXK], Used used, float* scratch, float* out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int q = 0; q < MAXK; ++q) {
        if (used(q)) {
            float v = mhc_warp_sum(acc[q]);
            if (lane == 0) scratch[q * 32 + warp] = v;
        }
    }
    __syncthreads();
    for (int q = threadIdx.x; q < MAXK; q += blockDim.x) {
        if (!used(q)) continue;
        float s = 0.0f;
        for (int w = 0; w < warps; ++w) s += scratch[q * 32 + w];
        out[q] = s;
    }
}

// ------------------------------------------------------------------------------- pre
// u[t, c] = sum_s h[t, s] x[t, s, c]; one thread per (t, c).
extern "C" __global__ void mhc_pre_fwd(const float* __restrict__ x, const float* __restrict__ h,
                                       float* __restrict__ u, int T, int n, int C, int h_stride) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * C) return;
    size_t t = i / C, c = i - t * C;
    const float* ht = h + t * h_stride;
    const float* xt = x + t * n * C + c;
    float acc = 0.0f;
    for (int s = 0; s < n; ++s) acc += ht[s] * xt[(size_t)s * C];
    u[i] = acc;
}

// dx[t, s, c] = h[t, s] g[t, c]; dh_rows[t, s] = <x[t, s], g[t]>. One block per token.
template <int MAXN>
__device__ void mhc_pre_bwd_impl(const float* __restrict__ x, const float* __restrict__ h,
                                 const float* __restrict__ g, float* __restrict__ dx,
                                 float* __restrict__ dh_rows, int n, int C, int h_stride) {
    __shared__ float scratch[32 * MAXN];
    const size_t t = blockIdx.x;
    const float* ht = h + t * h_stride;
    float hs[MAXN], acc[MAXN];
#pragma unroll
    for (int s = 0; s < MAXN; ++s) {
        hs[s] = s < n ? ht[s] : 0.0f;
        acc[s] = 0.0f;
    }
    const float* xt = x + t * n * C;
    float* dxt = dx + t * n * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float gc = g[t * C + c];
#pragma unroll
        for (int s = 0; s < MAXN; ++s) {
            if (s < n) {
                dxt[(size_t)s * C + c] = hs[s] * gc;
                acc[s] += xt[(size_t)s * C + c] * gc;
            }
        }
    }
    mhc_block_sum_to(acc, [n](int q) { return q < n; }, scratch, dh_rows + t * n);
}

extern "C" __global__ void mhc_pre_bwd4(const float* __restrict__ x, const float* __restrict__ h,
                                        const float* __restrict__ g, float* __restrict__ dx,
                                        float* __restrict__ dh_rows, int n, int C, int h_stride) {
    mhc_pre_bwd_impl<4>(x, h, g, dx, dh_rows, n, C, h_stride);
}

extern "C" __global__ void mhc_pre_bwd8(const float* __restrict__ x, const float* __restrict__ h,
                                        const float* __restrict__ g, float* __restrict__ dx,
                                        float* __restrict__ dh_rows, int n, int C, int h_stride) {
    mhc_pre_bwd_impl<8>(x, h, g, dx, dh_rows, n, C, h_stride);
}

// ------------------------------------------------------------------------------ post
// out[t, i, c] = sum_j H[t, i, j] (x[t, j, c] + hp[t, j] y[t, c]); one thread per (t, c),
// the n mixed values z_j stay in registers.
template <int MAXN>
__device__ void mhc_post_fwd_impl(const float* __restrict__ x, const float* __restrict__ y,
                                  const float* __restrict__ hres, const float* __restrict__ hpost,
                                  float* __restrict__ out, int T, int n, int C, int res_stride, int post_stride) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * C) return;
    size_t t = i / C, c = i - t * C;
    const float* H = hres + t * res_stride;
    const float* hp = hpost + t * post_stride;
    const float yc = y[i];
    const float* xt = x + t * n * C + c;
    float z[MAXN];
#pragma unroll
    for (int j = 0; j < MAXN; ++j) z[j] = j < n ? xt[(size_t)j * C] + hp[j] * yc : 0.0f;
    float* ot = out + t * n * C + c;
    for (int r = 0; r < n; ++r) {
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < MAXN; ++j)
            if (j < n) acc += H[r * n + j] * z[j];
        ot[(size_t)r * C] = acc;
    }
}

extern "C" __global__ void mhc_post_fwd4(const float* __restrict__ x, const float* __restrict__ y,
                                         const float* __restrict__ hres, const float* __restrict__ hpost,
                                         float* __restrict__ out, int T, int n, int C, int res_stride, int post_stride) {
    mhc_post_fwd_impl<4>(x, y, hres, hpost, out, T, n, C, res_stride, post_stride);
}

extern "C" __global__ void mhc_post_fwd8(const float* __restrict__ x, const float* __restrict__ y,
                                         const float* __restrict__ hres, const float* __restrict__ hpost,
                                         float* __restrict__ out, int T, int n, int C, int res_stride, int post_stride) {
    mhc_post_fwd_impl<8>(x, y, hres, hpost, out, T, n, C, res_stride, post_stride);
}

// With z = x + hp (outer) y and g = d out:
//   dz[t, j]         = sum_i H[i, j] g[t, i]      (the gradient of X)
//   dy[t]            = sum_j hp[j] dz[t, j]
//   dres_rows[t,i,j] = <g[t, i], z[t, j]>          (z recomputed, never stored)
//   dpost_rows[t, j] = <dz[t, j], y[t]>
// One block per token, one pass over its columns.
template <int MAXN>
__device__ void mhc_post_bwd_impl(const float* __restrict__ x, const float* __restrict__ y,
                                  const float* __restrict__ hres, const float* __restrict__ hpost,
                                  const float* __restrict__ g, float* __restrict__ dx, float* __restrict__ dy,
                                  float* __restrict__ dres_rows, float* __restrict__ dpost_rows,
                                  int n, int C, int res_stride, int post_stride) {
    constexpr int MAXK = MAXN * MAXN + MAXN;
    __shared__ float scratch[32 * MAXK];
    __shared__ float totals[MAXK];
    const size_t t = blockIdx.x;
    const float* H = hres + t * res_stride;
    const float* hp = hpost + t * post_stride;
    float hps[MAXN], Hs[MAXN * MAXN], acc[MAXK];
#pragma unroll
    for (int j = 0; j < MAXN; ++j) hps[j] = j < n ? hp[j] : 0.0f;
#pragma unroll
    for (int q = 0; q < MAXN * MAXN; ++q) Hs[q] = (q / MAXN < n && q % MAXN < n) ? H[(q / MAXN) * n + q % MAXN] : 0.0f;
#pragma unroll
    for (int q = 0; q < MAXK; ++q) acc[q] = 0.0f;
    const float* xt = x + t * n * C;
    const float* gt = g + t * n * C;
    float* dxt = dx + t * n * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        const float yc = y[t * C + c];
        float gi[MAXN], z[MAXN];
#pragma unroll
        for (int j = 0; j < MAXN; ++j) {
            gi[j] = j < n ? gt[(size_t)j * C + c] : 0.0f;
            z[j] = j < n ? xt[(size_t)j * C + c] + hps[j] * yc : 0.0f;
        }
        float dyc = 0.0f;
#pragma unroll
        for (int j = 0; j < MAXN; ++j) {
            if (j < n) {
                float dz = 0.0f;
#pragma unroll
                for (int i = 0; i < MAXN; ++i) dz += Hs[i * MAXN + j] * gi[i];
                dxt[(size_t)j * C + c] = dz;
                dyc += hps[j] * dz;
                acc[MAXN * MAXN + j] += dz * yc;
#pragma unroll
                for (int i = 0; i < MAXN; ++i) acc[i * MAXN + j] += gi[i] * z[j];
            }
        }
        dy[t * C + c] = dyc;
    }
    // acc[i * MAXN + j] holds dres (i, j < n), acc[MAXN * MAXN + j] holds dpost (j < n).
    mhc_block_sum_to(acc, [n](int q) { return q < MAXN * MAXN ? (q / MAXN < n && q % MAXN < n) : q - MAXN * MAXN < n; },
                     scratch, totals);
    __syncthreads();
    for (int q = threadIdx.x; q < n * n; q += blockDim.x)
        dres_rows[t * n * n + q] = totals[(q / n) * MAXN + q % n];
    for (int j = threadIdx.x; j < n; j += blockDim.x) dpost_rows[t * n + j] = totals[MAXN * MAXN + j];
}

extern "C" __global__ void mhc_post_bwd4(const float* __restrict__ x, const float* __restrict__ y,
                                         const float* __restrict__ hres, const float* __restrict__ hpost,
                                         const float* __restrict__ g, float* __restrict__ dx, float* __restrict__ dy,
                                         float* __restrict__ dres_rows, float* __restrict__ dpost_rows,
                                         int n, int C, int res_stride, int post_stride) {
    mhc_post_bwd_impl<4>(x, y, hres, hpost, g, dx, dy, dres_rows, dpost_rows, n, C, res_stride, post_stride);
}

extern "C" __global__ void mhc_post_bwd8(const float* __restrict__ x, const float* __restrict__ y,
                                         const float* __restrict__ hres, const float* __restrict__ hpost,
                                         const float* __restrict__ g, float* __restrict__ dx, float* __restrict__ dy,
                                         float* __restrict__ dres_rows, float* __restrict__ dpost_rows,
                                         int n, int C, int res_stride, int post_stride) {
    mhc_post_bwd_impl<8>(x, y, hres, hpost, g, dx, dy, dres_rows, dpost_rows, n, C, res_stride, post_stride);
}
