// The fused projection's heads with RoPE, in one pass each way.
// Forward: qkv [b, t, (nh + 2 nkv) d] → one buffer holding q [b, nh, t, d] and k [b, nkv, t, d],
// both rotated exactly as rope_fwd rotates (products rounded to T, as transformers computes them
// in the model's dtype), then v [b, nkv, t, d] copied. cos/sin [b, t, d] in T.
// Adjoint: dq, dk, dv in those shapes → dqkv [b, t, (nh + 2 nkv) d], dq and dk through rope_bwd's
// transpose of the rotation (no intermediate rounding), dv copied.
// One thread per element of qkv (each reads and writes one row-contiguous element), grid-stride.
#include "common.cuh"

// Where element (b, pos, head, j) of qkv lives in the split buffer.
__device__ __forceinline__ int64_t split_index(int64_t b, int64_t pos, int head, int j, int64_t batch,
                                               int nh, int nkv, int t, int d) {
    if (head < nh) return ((b * nh + head) * t + pos) * d + j;
    const int64_t q_size = batch * nh * t * d, kv_size = batch * nkv * t * d;
    if (head < nh + nkv) return q_size + ((b * nkv + head - nh) * t + pos) * d + j;
    return q_size + kv_size + ((b * nkv + head - nh - nkv) * t + pos) * d + j;
}

template <typename T>
__device__ void rope_qkv_fwd(const T* __restrict__ qkv, const T* __restrict__ cos, const T* __restrict__ sin,
                             T* __restrict__ out, int64_t n, int nh, int nkv, int t, int d) {
    const int heads = nh + 2 * nkv, half = d / 2;
    const int64_t batch = n / ((int64_t)t * heads * d);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int j = e % d, head = (e / d) % heads;
        const int64_t pos = (e / ((int64_t)d * heads)) % t, b = e / ((int64_t)d * heads * t);
        float y = to_f32(qkv[e]);
        if (head < nh + nkv) {
            const int64_t cs = (b * t + pos) * d + j;
            const float rot = j < half ? -to_f32(qkv[e + half]) : to_f32(qkv[e - half]);
            y = round_to<T>(y * to_f32(cos[cs])) + round_to<T>(rot * to_f32(sin[cs]));
        }
        out[split_index(b, pos, head, j, batch, nh, nkv, t, d)] = from_f32<T>(y);
    }
}

template <typename T>
__device__ void rope_qkv_bwd(const T* __restrict__ dq, const T* __restrict__ dk, const T* __restrict__ dv,
                             const T* __restrict__ cos, const T* __restrict__ sin, T* __restrict__ dqkv,
                             int64_t n, int nh, int nkv, int t, int d) {
    const int heads = nh + 2 * nkv, half = d / 2;
    const int64_t batch = n / ((int64_t)t * heads * d);
    const int64_t q_size = batch * nh * t * d, kv_size = batch * nkv * t * d;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int j = e % d, head = (e / d) % heads;
        const int64_t pos = (e / ((int64_t)d * heads)) % t, b = e / ((int64_t)d * heads * t);
        const int64_t at = split_index(b, pos, head, j, batch, nh, nkv, t, d);
        const T* g = head < nh ? dq + at : head < nh + nkv ? dk + (at - q_size) : dv + (at - q_size - kv_size);
        float dx = to_f32(g[0]);
        if (head < nh + nkv) {
            const int64_t cs = (b * t + pos) * d;
            const float other = j < half ? to_f32(g[half]) * to_f32(sin[cs + j + half])
                                         : -to_f32(g[-half]) * to_f32(sin[cs + j - half]);
            dx = dx * to_f32(cos[cs + j]) + other;
        }
        dqkv[e] = from_f32<T>(dx);
    }
}

#define INSTANTIATE(T, NAME)                                                                            \
    extern "C" __global__ void rope_qkv_fwd_##NAME(const T* qkv, const T* c, const T* s, T* out,        \
                                                   int64_t n, int nh, int nkv, int t, int d) {          \
        rope_qkv_fwd<T>(qkv, c, s, out, n, nh, nkv, t, d);                                              \
    }                                                                                                   \
    extern "C" __global__ void rope_qkv_bwd_##NAME(const T* dq, const T* dk, const T* dv, const T* c,   \
                                                   const T* s, T* dqkv, int64_t n, int nh, int nkv,     \
                                                   int t, int d) {                                      \
        rope_qkv_bwd<T>(dq, dk, dv, c, s, dqkv, n, nh, nkv, t, d);                                      \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
