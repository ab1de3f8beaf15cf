// Fused optimizer updates (SPEC section 4), float32 parameters, in place.
// Compiled with --fmad=false and given one_minus_beta from the host, so the momentum kernels
// round exactly like the reference's float32 expressions (8-bit Muon's int8 values must match).

__device__ __forceinline__ float round_half_away(float v) {
    // floor(|v| + 0.5) rounds 0.49999997f up (the sum rounds to 1); compare the fraction instead.
    float a = fabsf(v);
    float r = floorf(a);
    if (a - r >= 0.5f) r += 1.0f;
    return v < 0.0f ? -r : r;
}

// AdamW with bias correction and decoupled weight decay. bc1 = 1 - beta1^t, bc2 = 1 - beta2^t.
extern "C" __global__ void adamw_update(float* __restrict__ p, const float* __restrict__ g,
                                        float* __restrict__ m, float* __restrict__ v, size_t n,
                                        float lr, float beta1, float beta2, float eps, float wd,
                                        float bc1, float bc2) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float denom = sqrtf(vi / bc2) + eps;
    p[i] = p[i] * (1.0f - lr * wd) - lr * (mi / bc1) / denom;
}

// Lion: update = sign(beta1*m + (1-beta1)*g); m = beta2*m + (1-beta2)*g.
extern "C" __global__ void lion_update(float* __restrict__ p, const float* __restrict__ g,
                                       float* __restrict__ m, size_t n, float lr, float beta1,
                                       float beta2, float wd) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i], mi = m[i];
    float c = beta1 * mi + (1.0f - beta1) * gi;
    float s = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
    p[i] = p[i] * (1.0f - lr * wd) - lr * s;
    m[i] = beta2 * mi + (1.0f - beta2) * gi;
}

// Muon momentum: buf = lerp(buf, g, 1 - beta); u = lerp(g, buf, beta) (Nesterov) or buf.
extern "C" __global__ void muon_momentum(float* __restrict__ buf, const float* __restrict__ g,
                                         float* __restrict__ u, size_t n, float beta, float one_minus_beta,
                                         int nesterov) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float b = buf[i] + one_minus_beta * (gi - buf[i]);
    buf[i] = b;
    u[i] = nesterov ? gi + beta * (b - gi) : b;
}

// 8-bit Muon momentum, one block of 256 threads per 256-element block: dequantize,
// update, requantize (scale = absmax / 127, round half away from zero) in one pass.
extern "C" __global__ void __launch_bounds__(256) muon8_momentum(
        signed char* __restrict__ qbuf, float* __restrict__ scales, const float* __restrict__ g,
        float* __restrict__ u, size_t n, float beta, float one_minus_beta, int nesterov) {
    __shared__ float red[8];
    size_t i = (size_t)blockIdx.x * 256 + threadIdx.x;
    bool live = i < n;
    float gi = live ? g[i] : 0.0f;
    float b_old = live ? (float)qbuf[i] * scales[blockIdx.x] : 0.0f;
    float b = b_old + one_minus_beta * (gi - b_old);
    if (live) u[i] = nesterov ? gi + beta * (b - gi) : b;
    float a = live ? fabsf(b) : 0.0f;
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = a;
    __syncthreads();
    float amax = red[0];
    for (int w = 1; w < 8; ++w) amax = fmaxf(amax, red[w]);
    float scale = amax / 127.0f;
    if (threadIdx.x == 0) scales[blockIdx.x] = scale;
    if (live) {
        float qv = scale > 0.0f ? round_half_away(b / scale) : 0.0f;
        qbuf[i] = (signed char)fminf(127.0f, fmaxf(-127.0f, qv));
    }
}
