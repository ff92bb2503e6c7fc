// Inverted-dropout mask: element e is 0 with probability p, else keep = 1/(1-p). Its uniform is
// the e-th draw of SplitMix64 from `key` (mix(key + (e+1)·γ), top 24 bits), exactly what the CPU
// reference draws in sequence, so a key and shape give the same mask on every device.
#include "common.cuh"

__device__ __forceinline__ uint64_t splitmix_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T>
__device__ void dropout_mask(T* __restrict__ out, int64_t n, uint64_t key, float p, float keep) {
    const T zero = from_f32<T>(0.0f), kept = from_f32<T>(keep);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const uint64_t z = splitmix_mix(key + (uint64_t)(e + 1) * 0x9E3779B97F4A7C15ull);
        const float u = (float)(z >> 40) / 16777216.0f;
        out[e] = u < p ? zero : kept;
    }
}

#define INSTANTIATE(T, NAME)                                                                      \
    extern "C" __global__ void dropout_mask_##NAME(T* out, int64_t n, uint64_t key, float p, float keep) { \
        dropout_mask<T>(out, n, key, p, keep);                                                    \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
