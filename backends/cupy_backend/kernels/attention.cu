// Causal grouped-query attention without the [T, S] score matrix (flash-attention style),
// float32 on CUDA cores, forward and backward (SPEC section 5, reference.nn.Attention).
//
// Layouts are the model's own: q [B, T, Hq, hd], k [B, S, Hkv, hd], v [B, S, Hkv, dv],
// o [B, T, Hq, dv]; per-row statistics lse, D [B, Hq, T]. Query head h reads kv head
// h / (Hq / Hkv). With `causal`, query i sits at position S - T + i and sees keys 0 .. S - T + i.
//
// Every kernel works on a 16 x 16 tile of (query, key) pairs with 128 threads: the tile's
// scores go through shared memory, and each thread then owns one row (query or key) and the
// dimensions sub, sub + 8, ... of it (sub = thread % 8), so no warp shuffles are needed.
// The forward keeps a running max and sum per query row (online softmax) and stores
// lse = max + log(sum); the backward recomputes probabilities from lse, in two kernels (dQ by
// query tiles, dK/dV by key tiles) so every gradient is a plain sum in a fixed order: no
// atomics, the same bits on every run. Rows are padded to 129 floats so that threads reading
// 16 different rows at one column hit 16 different banks. hd, dv <= 128.
#define FA_BQ 16
#define FA_BK 16
#define FA_MAXD 128
#define FA_LD (FA_MAXD + 1)
#define FA_SLD (FA_BK + 1)
#define FA_THREADS 128
#define FA_NEG_INF __int_as_float(0xff800000)

// Rows [row0, row0 + rows) of a [*, heads, dim] tensor at head `head` -> tile[r * FA_LD + d]
// (zero past `limit`).
__device__ __forceinline__ void fa_load_rows(float* tile, const float* __restrict__ src, size_t batch_row0,
                                             int row0, int rows, int limit, int heads, int head, int dim) {
    for (int e = threadIdx.x; e < rows * dim; e += FA_THREADS) {
        int r = e / dim, d = e - r * dim, i = row0 + r;
        tile[r * FA_LD + d] = i < limit ? src[((batch_row0 + i) * heads + head) * dim + d] : 0.0f;
    }
}

__device__ __forceinline__ float fa_dot(const float* a, const float* b, int dim) {
    float s = 0.0f;
    for (int d = 0; d < dim; ++d) s += a[d] * b[d];
    return s;
}

__device__ __forceinline__ bool fa_visible(int i, int j, int T, int S, int causal) {
    return i < T && j < S && (!causal || j <= S - T + i);
}

// Keys that any of the query rows [q0, q0 + FA_BQ) can see.
__device__ __forceinline__ int fa_keys_for(int q0, int T, int S, int causal) {
    int last = min(q0 + FA_BQ, T) - 1;
    return causal ? min(S, S - T + last + 1) : S;
}

extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_fwd(
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
        float* __restrict__ o, float* __restrict__ lse,
        int T, int S, int Hq, int Hkv, int hd, int dv, float scale, int causal) {
    __shared__ float Qs[FA_BQ * FA_LD];
    __shared__ float Ks[FA_BK * FA_LD];
    __shared__ float Vs[FA_BK * FA_LD];
    __shared__ float Ss[FA_BQ * FA_SLD];
    const int b = blockIdx.y / Hq, h = blockIdx.y % Hq, kvh = h / (Hq / Hkv);
    const int q0 = blockIdx.x * FA_BQ, row = threadIdx.x >> 3, sub = threadIdx.x & 7, i = q0 + row;
    fa_load_rows(Qs, q, (size_t)b * T, q0, FA_BQ, T, Hq, h, hd);
    float m = FA_NEG_INF, l = 0.0f, acc[FA_MAXD / 8];
#pragma unroll
    for (int c = 0; c < FA_MAXD / 8; ++c) acc[c] = 0.0f;
    const int n_keys = fa_keys_for(q0, T, S, causal);
    for (int k0 = 0; k0 < n_keys; k0 += FA_BK) {
        __syncthreads();  // the previous tile is used up (and Qs is loaded)
        fa_load_rows(Ks, k, (size_t)b * S, k0, FA_BK, S, Hkv, kvh, hd);
        fa_load_rows(Vs, v, (size_t)b * S, k0, FA_BK, S, Hkv, kvh, dv);
        __syncthreads();
        for (int e = threadIdx.x; e < FA_BQ * FA_BK; e += FA_THREADS) {
            int r = e / FA_BK, j = e - r * FA_BK;
            Ss[r * FA_SLD + j] = fa_visible(q0 + r, k0 + j, T, S, causal)
                                     ? fa_dot(Qs + r * FA_LD, Ks + j * FA_LD, hd) * scale : FA_NEG_INF;
        }
        __syncthreads();
        const float* srow = Ss + row * FA_SLD;
        float mt = m;
        for (int j = 0; j < FA_BK; ++j) mt = fmaxf(mt, srow[j]);
        if (i < T && mt != FA_NEG_INF) {
            const float corr = expf(m - mt);  // 0 while nothing was visible (m = -inf)
            l *= corr;
#pragma unroll
            for (int c = 0; c < FA_MAXD / 8; ++c) acc[c] *= corr;
            for (int j = 0; j < FA_BK; ++j) {
                const float p = expf(srow[j] - mt);  // masked: exp(-inf) = 0
                l += p;
#pragma unroll
                for (int c = 0; c < FA_MAXD / 8; ++c) {
                    int d = sub + 8 * c;
                    if (d < dv) acc[c] += p * Vs[j * FA_LD + d];
                }
            }
            m = mt;
        }
    }
    if (i < T) {
        float* orow = o + (((size_t)b * T + i) * Hq + h) * dv;
        const float inv = 1.0f / l;
#pragma unroll
        for (int c = 0; c < FA_MAXD / 8; ++c) {
            int d = sub + 8 * c;
            if (d < dv) orow[d] = acc[c] * inv;
        }
        if (sub == 0) lse[((size_t)b * Hq + h) * T + i] = m + logf(l);
    }
}

// D[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] (the softmax backward's row term); a warp per row.
extern "C" __global__ void attention_bwd_rowdot(const float* __restrict__ dout, const float* __restrict__ out,
                                                float* __restrict__ D, int rows, int T, int Hq, int dv) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (row >= rows) return;  // whole warps leave together
    const int i = row % T, bh = row / T, b = bh / Hq, h = bh % Hq;
    const size_t base = (((size_t)b * T + i) * Hq + h) * dv;
    float s = 0.0f;
    for (int d = lane; d < dv; d += 32) s += dout[base + d] * out[base + d];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) D[row] = s;
}

// dS for one (query row r, key j) of a tile: P (dO.V - D), with P recomputed from lse.
__device__ __forceinline__ void fa_prob_and_dscore(const float* Qr, const float* dOr, const float* Kj, const float* Vj,
                                                   int hd, int dv, float scale, float lse_i, float D_i,
                                                   float& p, float& ds) {
    p = expf(fa_dot(Qr, Kj, hd) * scale - lse_i);
    ds = p * (fa_dot(dOr, Vj, dv) - D_i);
}

extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_bwd_dq(
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
        const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ D,
        float* __restrict__ dq, int T, int S, int Hq, int Hkv, int hd, int dv, float scale, int causal) {
    __shared__ float Qs[FA_BQ * FA_LD];
    __shared__ float dOs[FA_BQ * FA_LD];
    __shared__ float Ks[FA_BK * FA_LD];
    __shared__ float Vs[FA_BK * FA_LD];
    __shared__ float dSs[FA_BQ * FA_SLD];
    const int b = blockIdx.y / Hq, h = blockIdx.y % Hq, kvh = h / (Hq / Hkv);
    const int q0 = blockIdx.x * FA_BQ, row = threadIdx.x >> 3, sub = threadIdx.x & 7, i = q0 + row;
    const float* lse_bh = lse + ((size_t)b * Hq + h) * T;
    const float* D_bh = D + ((size_t)b * Hq + h) * T;
    fa_load_rows(Qs, q, (size_t)b * T, q0, FA_BQ, T, Hq, h, hd);
    fa_load_rows(dOs, dout, (size_t)b * T, q0, FA_BQ, T, Hq, h, dv);
    float acc[FA_MAXD / 8];
#pragma unroll
    for (int c = 0; c < FA_MAXD / 8; ++c) acc[c] = 0.0f;
    const int n_keys = fa_keys_for(q0, T, S, causal);
    for (int k0 = 0; k0 < n_keys; k0 += FA_BK) {
        __syncthreads();
        fa_load_rows(Ks, k, (size_t)b * S, k0, FA_BK, S, Hkv, kvh, hd);
        fa_load_rows(Vs, v, (size_t)b * S, k0, FA_BK, S, Hkv, kvh, dv);
        __syncthreads();
        for (int e = threadIdx.x; e < FA_BQ * FA_BK; e += FA_THREADS) {
            int r = e / FA_BK, j = e - r * FA_BK;
            float p = 0.0f, ds = 0.0f;
            if (fa_visible(q0 + r, k0 + j, T, S, causal))
                fa_prob_and_dscore(Qs + r * FA_LD, dOs + r * FA_LD, Ks + j * FA_LD, Vs + j * FA_LD, hd, dv, scale,
                                   lse_bh[q0 + r], D_bh[q0 + r], p, ds);
            dSs[r * FA_SLD + j] = ds;
        }
        __syncthreads();
        for (int j = 0; j < FA_BK; ++j) {
            const float ds = dSs[row * FA_SLD + j];
#pragma unroll
            for (int c = 0; c < FA_MAXD / 8; ++c) {
                int d = sub + 8 * c;
                if (d < hd) acc[c] += ds * Ks[j * FA_LD + d];
            }
        }
    }
    if (i < T) {
        float* grow = dq + (((size_t)b * T + i) * Hq + h) * hd;
#pragma unroll
        for (int c = 0; c < FA_MAXD / 8; ++c) {
            int d = sub + 8 * c;
            if (d < hd) grow[d] = acc[c] * scale;
        }
    }
}

// dK, dV for 16 keys of one kv head: sums over every query row of every query head in the
// group that sees them.
extern "C" __global__ void __launch_bounds__(FA_THREADS) attention_bwd_dkdv(
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
        const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ D,
        float* __restrict__ dk, float* __restrict__ dv_out,
        int T, int S, int Hq, int Hkv, int hd, int dv, float scale, int causal) {
    __shared__ float Ks[FA_BK * FA_LD];
    __shared__ float Vs[FA_BK * FA_LD];
    __shared__ float Qs[FA_BQ * FA_LD];
    __shared__ float dOs[FA_BQ * FA_LD];
    __shared__ float Ps[FA_BQ * FA_SLD];
    __shared__ float dSs[FA_BQ * FA_SLD];
    __shared__ float Ls[FA_BQ], Ds[FA_BQ];
    const int b = blockIdx.y / Hkv, kvh = blockIdx.y % Hkv, group = Hq / Hkv;
    const int k0 = blockIdx.x * FA_BK, key = threadIdx.x >> 3, sub = threadIdx.x & 7, j = k0 + key;
    fa_load_rows(Ks, k, (size_t)b * S, k0, FA_BK, S, Hkv, kvh, hd);
    fa_load_rows(Vs, v, (size_t)b * S, k0, FA_BK, S, Hkv, kvh, dv);
    float acc_k[FA_MAXD / 8], acc_v[FA_MAXD / 8];
#pragma unroll
    for (int c = 0; c < FA_MAXD / 8; ++c) acc_k[c] = acc_v[c] = 0.0f;
    // The first query row that sees key k0 (causal), rounded down to a tile.
    const int first = causal ? max(0, k0 - (S - T)) / FA_BQ * FA_BQ : 0;
    for (int g = 0; g < group; ++g) {
        const int h = kvh * group + g;
        const float* lse_bh = lse + ((size_t)b * Hq + h) * T;
        const float* D_bh = D + ((size_t)b * Hq + h) * T;
        for (int q0 = first; q0 < T; q0 += FA_BQ) {
            __syncthreads();  // the previous tile is used up (and Ks, Vs are loaded)
            fa_load_rows(Qs, q, (size_t)b * T, q0, FA_BQ, T, Hq, h, hd);
            fa_load_rows(dOs, dout, (size_t)b * T, q0, FA_BQ, T, Hq, h, dv);
            if (threadIdx.x < FA_BQ) {
                int i = q0 + threadIdx.x;
                Ls[threadIdx.x] = i < T ? lse_bh[i] : 0.0f;
                Ds[threadIdx.x] = i < T ? D_bh[i] : 0.0f;
            }
            __syncthreads();
            for (int e = threadIdx.x; e < FA_BQ * FA_BK; e += FA_THREADS) {
                int r = e / FA_BK, jj = e - r * FA_BK;
                float p = 0.0f, ds = 0.0f;
                if (fa_visible(q0 + r, k0 + jj, T, S, causal))
                    fa_prob_and_dscore(Qs + r * FA_LD, dOs + r * FA_LD, Ks + jj * FA_LD, Vs + jj * FA_LD, hd, dv,
                                       scale, Ls[r], Ds[r], p, ds);
                Ps[r * FA_SLD + jj] = p;
                dSs[r * FA_SLD + jj] = ds;
            }
            __syncthreads();
            for (int r = 0; r < FA_BQ; ++r) {
                const float p = Ps[r * FA_SLD + key], ds = dSs[r * FA_SLD + key];
#pragma unroll
                for (int c = 0; c < FA_MAXD / 8; ++c) {
                    int d = sub + 8 * c;
                    if (d < dv) acc_v[c] += p * dOs[r * FA_LD + d];
                    if (d < hd) acc_k[c] += ds * Qs[r * FA_LD + d];
                }
            }
        }
    }
    if (j < S) {
        float* krow = dk + (((size_t)b * S + j) * Hkv + kvh) * hd;
        float* vrow = dv_out + (((size_t)b * S + j) * Hkv + kvh) * dv;
#pragma unroll
        for (int c = 0; c < FA_MAXD / 8; ++c) {
            int d = sub + 8 * c;
            if (d < hd) krow[d] = acc_k[c] * scale;
            if (d < dv) vrow[d] = acc_v[c];
        }
    }
}
