// Token cross-entropy over the vocabulary for logits [N, V] (row-major, contiguous) and one target
// per row (0xFFFFFFFF: the row is not trained):
//   nll   loss_r = log(sum_j exp(x_rj)) - x_r,target          (f32 out; 0 for untrained rows)
//   grad  d_rj   = softmax(x_r)_j - [j == target]              (in the logits' type; 0 rows untrained)
// f32 arithmetic; one block per row, the row's (max, sum) found in one online pass.
#include "common.cuh"

#define NO_TARGET 0xFFFFFFFFu

template <typename T>
__device__ void row_stats(const T* __restrict__ xr, int v, float& m, float& z) {
    m = -FLT_MAX;
    z = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float x = to_f32(xr[j]);
        if (x > m) { z = z * expf(m - x) + 1.0f; m = x; } else { z += expf(x - m); }
    }
    block_max_sum(m, z);
}

template <typename T>
__device__ void ce_nll(const T* __restrict__ x, const uint32_t* __restrict__ targets, float* __restrict__ nll, int v) {
    const int64_t row = blockIdx.x;
    const uint32_t t = targets[row];
    if (t == NO_TARGET) {  // uniform per block: every thread returns
        if (threadIdx.x == 0) nll[row] = 0.0f;
        return;
    }
    const T* xr = x + row * v;
    float m, z;
    row_stats(xr, v, m, z);
    if (threadIdx.x == 0) nll[row] = logf(z) + m - to_f32(xr[t]);
}

template <typename T>
__device__ void ce_grad(const T* __restrict__ x, const uint32_t* __restrict__ targets, T* __restrict__ d, int v) {
    const int64_t row = blockIdx.x;
    const uint32_t t = targets[row];
    T* dr = d + row * v;
    if (t == NO_TARGET) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) dr[j] = from_f32<T>(0.0f);
        return;
    }
    const T* xr = x + row * v;
    float m, z;
    row_stats(xr, v, m, z);
    const float inv = 1.0f / z;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float p = expf(to_f32(xr[j]) - m) * inv;
        dr[j] = from_f32<T>((uint32_t)j == t ? p - 1.0f : p);
    }
}

#define INSTANTIATE(T, NAME)                                                                         \
    extern "C" __global__ void cross_entropy_nll_##NAME(const T* x, const uint32_t* t, float* nll, int v) { \
        ce_nll<T>(x, t, nll, v);                                                                    \
    }                                                                                               \
    extern "C" __global__ void cross_entropy_grad_##NAME(const T* x, const uint32_t* t, T* d, int v) { \
        ce_grad<T>(x, t, d, v);                                                                     \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
