// Attention probabilities in one pass each way, for scores [B, H, Tq, Tk] (row-major, contiguous)
// and an additive f32 mask bias [Bb, 1, Tq, Tk] with Bb = 1 or B (broadcast over heads):
//   forward   y = softmax(scale * s + bias)            (f32 arithmetic, stored in the scores' type)
//   backward  dx = scale * y * (g - sum_k g_k * y_k)    (the gradient of s)
// One block per row; per-thread online (max, sum) pairs merged across the block, so a row is read
// twice forward (reduce, write) and twice backward.
#include "common.cuh"

template <typename T>
__device__ void softmax_fwd(const T* __restrict__ s, const float* __restrict__ bias, T* __restrict__ y,
                            int heads, int tq, int tk, int bias_batched, float scale) {
    const int64_t row = blockIdx.x;
    const int64_t q = row % tq;
    const int64_t b = row / ((int64_t)tq * heads);
    const T* sr = s + row * tk;
    const float* br = bias + ((bias_batched ? b * tq : 0) + q) * tk;
    T* yr = y + row * tk;
    float m = -FLT_MAX, z = 0.0f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        float x = to_f32(sr[j]) * scale + br[j];
        if (x > m) { z = z * expf(m - x) + 1.0f; m = x; } else { z += expf(x - m); }
    }
    block_max_sum(m, z);
    const float inv = 1.0f / z;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        float x = to_f32(sr[j]) * scale + br[j];
        yr[j] = from_f32<T>(expf(x - m) * inv);
    }
}

template <typename T>
__device__ void softmax_bwd(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ dx, int tk, float scale) {
    const int64_t row = blockIdx.x;
    const T* yr = y + row * tk;
    const T* gr = g + row * tk;
    T* dr = dx + row * tk;
    float dot = 0.0f;
    for (int j = threadIdx.x; j < tk; j += blockDim.x) dot += to_f32(gr[j]) * to_f32(yr[j]);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < tk; j += blockDim.x) {
        dr[j] = from_f32<T>(scale * to_f32(yr[j]) * (to_f32(gr[j]) - dot));
    }
}

#define INSTANTIATE(T, NAME)                                                                          \
    extern "C" __global__ void attention_softmax_fwd_##NAME(const T* s, const float* bias, T* y,      \
        int heads, int tq, int tk, int bias_batched, float scale) {                                  \
        softmax_fwd<T>(s, bias, y, heads, tq, tk, bias_batched, scale);                              \
    }                                                                                                 \
    extern "C" __global__ void attention_softmax_bwd_##NAME(const T* y, const T* g, T* dx, int tk,    \
        float scale) {                                                                                \
        softmax_bwd<T>(y, g, dx, tk, scale);                                                          \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
