// RMSNorm, gated activations and softmax cross-entropy (SPEC section 5), float32.
// One block per row for the row-wise ops; block sizes are multiples of 32.

#define CUDART_INF_F_ __int_as_float(0x7f800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Reduce over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    v = warp_sum(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = threadIdx.x < (blockDim.x + 31) / 32 ? scratch[threadIdx.x] : 0.0f;
    if (threadIdx.x < 32) {
        t = warp_sum(t);
        if (threadIdx.x == 0) scratch[0] = t;
    }
    __syncthreads();
    return scratch[0];
}

__device__ float block_max(float v, float* scratch) {
    v = warp_max(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = threadIdx.x < (blockDim.x + 31) / 32 ? scratch[threadIdx.x] : -CUDART_INF_F_;
    if (threadIdx.x < 32) {
        t = warp_max(t);
        if (threadIdx.x == 0) scratch[0] = t;
    }
    __syncthreads();
    return scratch[0];
}

// y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps); saves rstd per row.
extern "C" __global__ void rmsnorm_fwd(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ y, float* __restrict__ rstd, int C, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * C;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) ss += xr[c] * xr[c];
    float r = rsqrtf(block_sum(ss, scratch) / (float)C + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    float* yr = y + (size_t)blockIdx.x * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) yr[c] = xr[c] * r * w[c];
}

// gx = rstd * (gy*w - xhat * mean(gy*w*xhat)); per-row partial gw (summed over rows by the caller).
extern "C" __global__ void rmsnorm_bwd(const float* __restrict__ x, const float* __restrict__ w,
                                       const float* __restrict__ rstd, const float* __restrict__ gy,
                                       float* __restrict__ gx, float* __restrict__ gw_rows, int C) {
    __shared__ float scratch[32];
    size_t off = (size_t)blockIdx.x * C;
    float r = rstd[blockIdx.x];
    float dot = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) dot += gy[off + c] * w[c] * x[off + c] * r;
    float mean_dot = block_sum(dot, scratch) / (float)C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float xhat = x[off + c] * r;
        gx[off + c] = r * (gy[off + c] * w[c] - xhat * mean_dot);
        gw_rows[off + c] = gy[off + c] * xhat;
    }
}

__device__ __forceinline__ float sigmoidf_(float v) { return 1.0f / (1.0f + expf(-v)); }

// mode 0: silu(gate) * up (SwiGLU); mode 1: relu(gate)^2 * up.
extern "C" __global__ void glu_fwd(const float* __restrict__ gate, const float* __restrict__ up,
                                   float* __restrict__ out, size_t n, int mode) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate[i];
    float a = mode == 0 ? g * sigmoidf_(g) : (g > 0.0f ? g * g : 0.0f);
    out[i] = a * up[i];
}

extern "C" __global__ void glu_bwd(const float* __restrict__ gate, const float* __restrict__ up,
                                   const float* __restrict__ gout, float* __restrict__ ggate,
                                   float* __restrict__ gup, size_t n, int mode) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = gate[i], go = gout[i];
    float a, da;
    if (mode == 0) {
        float sg = sigmoidf_(g);
        a = g * sg;
        da = sg * (1.0f + g * (1.0f - sg));
    } else {
        a = g > 0.0f ? g * g : 0.0f;
        da = g > 0.0f ? 2.0f * g : 0.0f;
    }
    ggate[i] = go * up[i] * da;
    gup[i] = go * a;
}

// Per-row softmax cross-entropy: loss[n] = logsumexp(logits[n]) - logits[n, t]; ignored rows get 0.
extern "C" __global__ void cross_entropy_fwd(const float* __restrict__ logits, const long long* __restrict__ targets,
                                             float* __restrict__ loss, float* __restrict__ lse, int V,
                                             long long ignore_index) {
    __shared__ float scratch[32];
    const float* row = logits + (size_t)blockIdx.x * V;
    float m = -CUDART_INF_F_;
    for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, row[v]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) s += expf(row[v] - m);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        float l = m + logf(s);
        lse[blockIdx.x] = l;
        long long t = targets[blockIdx.x];
        // An out-of-range target gives a NaN loss (the trainer's non-finite guard reports it)
        // instead of a read outside the row; checking on the host would cost a device sync.
        float bad = __int_as_float(0x7fffffff);
        loss[blockIdx.x] = t == ignore_index ? 0.0f : ((t < 0 || t >= V) ? bad : l - row[t]);
    }
}

// glogits[n, v] = coef[n] * (softmax(logits[n])[v] - [v == t]); coef already holds weight/normaliser.
extern "C" __global__ void cross_entropy_bwd(const float* __restrict__ logits, const long long* __restrict__ targets,
                                             const float* __restrict__ lse, const float* __restrict__ coef,
                                             float* __restrict__ glogits, int V, long long ignore_index) {
    size_t off = (size_t)blockIdx.x * V;
    long long t = targets[blockIdx.x];
    float c = t == ignore_index ? 0.0f : coef[blockIdx.x];
    float l = lse[blockIdx.x];
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float p = expf(logits[off + v] - l);
        glogits[off + v] = c * (p - (v == t ? 1.0f : 0.0f));
    }
}

// ----------------------------------------------------------------------------- RoPE
// NeoX half-split rotation of x [rows, H, hd] by per-row positions; sign = -1 rotates backwards
// (the backward: a rotation's transpose is its inverse). One block per row: the row's hd/2
// (cos, sin) pairs go to shared memory once and serve every head.
//
// Accuracy: the reference forms angle = p * theta^(-2i/hd) in float64. In float32 the angle
// of a large position loses its fraction (p = 12345 keeps ~1e-3 rad), so the angle and its
// reduction modulo 2*pi are done in float64 (three double ops per pair, once per row) and only
// the reduced angle in [-pi, pi] goes through float32 sinf/cosf.
extern "C" __global__ void rope_rotate(const float* __restrict__ x, const long long* __restrict__ pos,
                                       float* __restrict__ y, int H, int hd, double theta, float sign) {
    extern __shared__ float rope_cs[];  // [0, half): cos, [half, hd): sign * sin
    const int half = hd / 2;
    const double two_pi = 6.283185307179586;
    const double p = (double)pos[blockIdx.x];
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double ang = p * pow(theta, -2.0 * (double)i / (double)hd);
        double r = ang - rint(ang * (1.0 / two_pi)) * two_pi;
        float rf = (float)r;
        rope_cs[i] = cosf(rf);
        rope_cs[half + i] = sign * sinf(rf);
    }
    __syncthreads();
    size_t base = (size_t)blockIdx.x * H * hd;
    for (int k = threadIdx.x; k < H * half; k += blockDim.x) {
        int h = k / half, i = k - h * half;
        size_t o = base + (size_t)h * hd + i;
        float c = rope_cs[i], s = rope_cs[half + i];
        float x1 = x[o], x2 = x[o + half];
        y[o] = x1 * c - x2 * s;
        y[o + half] = x2 * c + x1 * s;
    }
}

// ---------------------------------------------------------------------------- softmax
// Row-wise softmax over the last axis. One read pass keeps a running (max, sum) per thread
// (online softmax), the block combines them, a second pass writes. Entries equal to -inf
// (masks) are skipped so that a thread which has only seen -inf keeps sum 0 instead of
// forming exp(-inf - -inf) = NaN; an all -inf row still gives NaN, as in the reference.
extern "C" __global__ void softmax_fwd(const float* __restrict__ x, float* __restrict__ y, int V) {
    __shared__ float scratch[32];
    size_t off = (size_t)blockIdx.x * V;
    float m = -CUDART_INF_F_, s = 0.0f;
    bool nan_seen = false;  // fmaxf drops NaNs; the reference's max does not, so remember them
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        float xv = x[off + v];
        nan_seen |= xv != xv;
        float mn = fmaxf(m, xv);
        if (mn == -CUDART_INF_F_) continue;
        s = s * expf(m - mn) + expf(xv - mn);
        m = mn;
    }
    float row_max = block_max(m, scratch);
    float part = m == -CUDART_INF_F_ ? 0.0f : s * expf(m - row_max);
    float row_sum = block_sum(nan_seen ? __int_as_float(0x7fffffff) : part, scratch);  // NaN row -> all NaN
    float inv = 1.0f / row_sum;
    for (int v = threadIdx.x; v < V; v += blockDim.x) y[off + v] = expf(x[off + v] - row_max) * inv;
}

// gx = y * (gy - sum(gy * y)) per row.
extern "C" __global__ void softmax_bwd(const float* __restrict__ y, const float* __restrict__ gy,
                                       float* __restrict__ gx, int V) {
    __shared__ float scratch[32];
    size_t off = (size_t)blockIdx.x * V;
    float dot = 0.0f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) dot += gy[off + v] * y[off + v];
    dot = block_sum(dot, scratch);
    for (int v = threadIdx.x; v < V; v += blockDim.x) gx[off + v] = y[off + v] * (gy[off + v] - dot);
}

// ---------------------------------------------------------------------- Newton-Schulz
// out = alpha * a + beta * b, elementwise (out may alias b): the two combinations of one
// Newton-Schulz step (B = b A + c AA, X' = a X + B X) in one pass each instead of three.
extern "C" __global__ void scale_add(const float* __restrict__ a, const float* b, float* out,
                                     size_t n, float alpha, float beta) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = alpha * a[i] + beta * b[i];
}
