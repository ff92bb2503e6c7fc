// Phi-3's MLP activation on the fused gate_up output [rows, 2i]: y = up * silu(gate), with silu's
// result rounded to T as PyTorch stores it. Backward writes the gradient of gate_up:
//   d_up = g * silu(gate),   d_gate = g * up * sigma(gate) * (1 + gate * (1 - sigma(gate)))
// One thread per output element, grid-stride.
#include "common.cuh"

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ gu, T* __restrict__ y, int64_t n, int i) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = e / i, j = e % i;
        const float gate = to_f32(gu[row * 2 * i + j]);
        const float up = to_f32(gu[row * 2 * i + i + j]);
        y[e] = from_f32<T>(up * round_to<T>(gate * sigmoid(gate)));
    }
}

template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ gu, const T* __restrict__ g, T* __restrict__ dgu, int64_t n, int i) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = e / i, j = e % i;
        const float gate = to_f32(gu[row * 2 * i + j]);
        const float up = to_f32(gu[row * 2 * i + i + j]);
        const float gy = to_f32(g[e]);
        const float s = sigmoid(gate);
        dgu[row * 2 * i + j] = from_f32<T>(gy * up * s * (1.0f + gate * (1.0f - s)));
        dgu[row * 2 * i + i + j] = from_f32<T>(gy * gate * s);
    }
}

#define INSTANTIATE(T, NAME)                                                                         \
    extern "C" __global__ void swiglu_fwd_##NAME(const T* gu, T* y, int64_t n, int i) {             \
        swiglu_fwd<T>(gu, y, n, i);                                                                  \
    }                                                                                                \
    extern "C" __global__ void swiglu_bwd_##NAME(const T* gu, const T* g, T* dgu, int64_t n, int i) { \
        swiglu_bwd<T>(gu, g, dgu, n, i);                                                             \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
