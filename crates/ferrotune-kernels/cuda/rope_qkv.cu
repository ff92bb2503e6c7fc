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

// Element e = (b, pos, head, j) of qkv after the rotation (query and key heads) or as it is
// (value heads).
template <typename T>
__device__ __forceinline__ T rotated(const T* __restrict__ qkv, const T* __restrict__ cos,
                                     const T* __restrict__ sin, int64_t e, int64_t b, int64_t pos, int head,
                                     int j, int nh, int nkv, int t, int d) {
    const int half = d / 2;
    float y = to_f32(qkv[e]);
    if (head < nh + nkv) {
        const int64_t cs = (b * t + pos) * d + j;
        const float rot = j < half ? -to_f32(qkv[e + half]) : to_f32(qkv[e - half]);
        y = round_to<T>(y * to_f32(cos[cs])) + round_to<T>(rot * to_f32(sin[cs]));
    }
    return from_f32<T>(y);
}

template <typename T>
__device__ void rope_qkv_fwd(const T* __restrict__ qkv, const T* __restrict__ cos, const T* __restrict__ sin,
                             T* __restrict__ out, int64_t n, int nh, int nkv, int t, int d) {
    const int heads = nh + 2 * nkv;
    const int64_t batch = n / ((int64_t)t * heads * d);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int j = e % d, head = (e / d) % heads;
        const int64_t pos = (e / ((int64_t)d * heads)) % t, b = e / ((int64_t)d * heads * t);
        out[split_index(b, pos, head, j, batch, nh, nkv, t, d)] = rotated(qkv, cos, sin, e, b, pos, head, j, nh, nkv, t, d);
    }
}

// Decoding's form: q to its own buffer [b, nh, t, d], k and v straight into the KV cache's
// buffers [b, nkv, cap, d] at columns start..start + t (no separate k, v and no copies into the
// cache after them).
template <typename T>
__device__ void rope_qkv_cache(const T* __restrict__ qkv, const T* __restrict__ cos, const T* __restrict__ sin,
                               T* __restrict__ q, T* __restrict__ k_cache, T* __restrict__ v_cache, int64_t n,
                               int nh, int nkv, int t, int d, int cap, int start) {
    const int heads = nh + 2 * nkv;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const int j = e % d, head = (e / d) % heads;
        const int64_t pos = (e / ((int64_t)d * heads)) % t, b = e / ((int64_t)d * heads * t);
        const T y = rotated(qkv, cos, sin, e, b, pos, head, j, nh, nkv, t, d);
        if (head < nh) {
            q[((b * nh + head) * t + pos) * d + j] = y;
        } else {
            const bool key = head < nh + nkv;
            const int64_t kv = key ? head - nh : head - nh - nkv;
            (key ? k_cache : v_cache)[((b * nkv + kv) * cap + start + pos) * d + j] = y;
        }
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
    extern "C" __global__ void rope_qkv_cache_##NAME(const T* qkv, const T* c, const T* s, T* q, T* kc, T* vc, \
                                                     int64_t n, int nh, int nkv, int t, int d, int cap,  \
                                                     int start) {                                        \
        rope_qkv_cache<T>(qkv, c, s, q, kc, vc, n, nh, nkv, t, d, cap, start);                          \
    }                                                                                                   \
    extern "C" __global__ void rope_qkv_bwd_##NAME(const T* dq, const T* dk, const T* dv, const T* c,   \
                                                   const T* s, T* dqkv, int64_t n, int nh, int nkv,     \
                                                   int t, int d) {                                      \
        rope_qkv_bwd<T>(dq, dk, dv, c, s, dqkv, n, nh, nkv, t, d);                                      \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
