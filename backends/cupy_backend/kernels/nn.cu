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
