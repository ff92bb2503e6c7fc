// RMSNorm as transformers' Phi3RMSNorm: n = x * rsqrt(mean(x^2) + eps) in f32, rounded to T, then
// y = weight * n (rounded to T). The weight is frozen: the backward gives only the input gradient
//   dx = r * g * w - x * r^3 * mean(g * w * x),   r = rsqrt(mean(x^2) + eps)
// The residual join before a norm can run in the same pass: rms_norm_add_fwd writes s = x + y
// (rounded to T, as the separate add stores it) and the norm of s, one buffer [s | norm(s)];
// rms_norm_bwd_add adds the other branch's gradient to dx (dx rounded to T first, as when the
// two are added separately), so the fused results equal the separate ops' bit for bit.
// One block per row of h elements.
#include "common.cuh"

template <typename T>
__device__ void rms_norm_fwd(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int h, float eps) {
    const T* xr = x + (int64_t)blockIdx.x * h;
    T* yr = y + (int64_t)blockIdx.x * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) { float v = to_f32(xr[j]); ss += v * v; }
    const float r = rsqrtf(block_sum(ss) / h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        yr[j] = from_f32<T>(to_f32(w[j]) * round_to<T>(to_f32(xr[j]) * r));
    }
}

template <typename T>
__device__ void rms_norm_add_fwd(const T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ w,
                                 T* __restrict__ out, int h, float eps) {
    const int64_t off = (int64_t)blockIdx.x * h, normed = (int64_t)gridDim.x * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        const T s = from_f32<T>(to_f32(x[off + j]) + to_f32(y[off + j]));
        out[off + j] = s;
        const float v = to_f32(s);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss) / h + eps);
    // Each thread reads back only the elements it wrote.
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        out[normed + off + j] = from_f32<T>(to_f32(w[j]) * round_to<T>(to_f32(out[off + j]) * r));
    }
}

template <typename T>
__device__ void rms_norm_bwd(const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ w,
                             const T* __restrict__ res, T* __restrict__ dx, int h, float eps) {
    const int64_t off = (int64_t)blockIdx.x * h;
    float ss = 0.0f, dot = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float v = to_f32(x[off + j]);
        ss += v * v;
        dot += to_f32(g[off + j]) * to_f32(w[j]) * v;
    }
    ss = block_sum(ss);
    dot = block_sum(dot);
    const float r = rsqrtf(ss / h + eps);
    const float c = r * r * r * dot / h;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        const float d = r * to_f32(g[off + j]) * to_f32(w[j]) - to_f32(x[off + j]) * c;
        dx[off + j] = res ? from_f32<T>(round_to<T>(d) + to_f32(res[off + j])) : from_f32<T>(d);
    }
}

#define INSTANTIATE(T, NAME)                                                                           \
    extern "C" __global__ void rms_norm_fwd_##NAME(const T* x, const T* w, T* y, int h, float eps) {  \
        rms_norm_fwd<T>(x, w, y, h, eps);                                                              \
    }                                                                                                  \
    extern "C" __global__ void rms_norm_bwd_##NAME(const T* x, const T* g, const T* w, T* dx, int h,   \
                                                   float eps) {                                        \
        rms_norm_bwd<T>(x, g, w, nullptr, dx, h, eps);                                                 \
    }                                                                                                  \
    extern "C" __global__ void rms_norm_bwd_add_##NAME(const T* x, const T* g, const T* w, const T* res, \
                                                       T* dx, int h, float eps) {                      \
        rms_norm_bwd<T>(x, g, w, res, dx, h, eps);                                                     \
    }                                                                                                  \
    extern "C" __global__ void rms_norm_add_fwd_##NAME(const T* x, const T* y, const T* w, T* out, int h, \
                                                       float eps) {                                    \
        rms_norm_add_fwd<T>(x, y, w, out, h, eps);                                                     \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
