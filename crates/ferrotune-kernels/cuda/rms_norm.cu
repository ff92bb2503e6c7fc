// RMSNorm as transformers' Phi3RMSNorm: n = x * rsqrt(mean(x^2) + eps) in f32, rounded to T, then
// y = weight * n (rounded to T). The weight is frozen: the backward gives only the input gradient
//   dx = r * g * w - x * r^3 * mean(g * w * x),   r = rsqrt(mean(x^2) + eps)
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
__device__ void rms_norm_bwd(const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ w,
                             T* __restrict__ dx, int h, float eps) {
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
        dx[off + j] = from_f32<T>(r * to_f32(g[off + j]) * to_f32(w[j]) - to_f32(x[off + j]) * c);
    }
}

#define INSTANTIATE(T, NAME)                                                                           \
    extern "C" __global__ void rms_norm_fwd_##NAME(const T* x, const T* w, T* y, int h, float eps) {  \
        rms_norm_fwd<T>(x, w, y, h, eps);                                                              \
    }                                                                                                  \
    extern "C" __global__ void rms_norm_bwd_##NAME(const T* x, const T* g, const T* w, T* dx, int h,   \
                                                   float eps) {                                        \
        rms_norm_bwd<T>(x, g, w, dx, h, eps);                                                          \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
