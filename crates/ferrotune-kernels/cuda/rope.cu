// Rotary embedding on x [b, heads, t, d] with cos/sin [b, t, d] (in x's type), as transformers
// computes it in x's type: y = round(round(x * cos) + round(rotate_half(x) * sin)), where
// rotate_half(x)_j = -x_{j+d/2} for j < d/2 and x_{j-d/2} otherwise. Backward (the adjoint):
//   dx_k = g_k * cos_k + (k < d/2 ? g_{k+d/2} * sin_{k+d/2} : -g_{k-d/2} * sin_{k-d/2})
// One thread per element, grid-stride.
#include "common.cuh"

template <typename T>
__device__ void rope_fwd(const T* __restrict__ x, const T* __restrict__ cos, const T* __restrict__ sin,
                         T* __restrict__ y, int64_t n, int heads, int t, int d) {
    const int half = d / 2;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int j = e % d;
        const int64_t pos = (e / d) % t, b = e / ((int64_t)d * t * heads);
        const int64_t cs = (b * t + pos) * d + j;
        const float rot = j < half ? -to_f32(x[e + half]) : to_f32(x[e - half]);
        y[e] = from_f32<T>(round_to<T>(to_f32(x[e]) * to_f32(cos[cs])) + round_to<T>(rot * to_f32(sin[cs])));
    }
}

template <typename T>
__device__ void rope_bwd(const T* __restrict__ g, const T* __restrict__ cos, const T* __restrict__ sin,
                         T* __restrict__ dx, int64_t n, int heads, int t, int d) {
    const int half = d / 2;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int j = e % d;
        const int64_t pos = (e / d) % t, b = e / ((int64_t)d * t * heads);
        const int64_t cs = (b * t + pos) * d;
        const float other = j < half ? to_f32(g[e + half]) * to_f32(sin[cs + j + half])
                                     : -to_f32(g[e - half]) * to_f32(sin[cs + j - half]);
        dx[e] = from_f32<T>(to_f32(g[e]) * to_f32(cos[cs + j]) + other);
    }
}

#define INSTANTIATE(T, NAME)                                                                          \
    extern "C" __global__ void rope_fwd_##NAME(const T* x, const T* c, const T* s, T* y, int64_t n,   \
                                               int heads, int t, int d) {                             \
        rope_fwd<T>(x, c, s, y, n, heads, t, d);                                                      \
    }                                                                                                 \
    extern "C" __global__ void rope_bwd_##NAME(const T* g, const T* c, const T* s, T* dx, int64_t n,  \
                                               int heads, int t, int d) {                             \
        rope_bwd<T>(g, c, s, dx, n, heads, t, d);                                                     \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
