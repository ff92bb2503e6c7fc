// Attention for a few new queries against the KV cache, in one kernel: for query i of head h,
//   out = sum_j softmax_j(scale * q.k_j + bias_j) * v_j
// over the T cached keys, read where they lie in the cache's buffers (a row stride of d, any batch
// and head strides), kv head h / (heads / kv_heads) for grouped-query attention. Online softmax in
// f32, nothing the size of the scores is stored. Output [b, tq, heads, d]: the layout o_proj reads.
// One block per (b, h, i), each warp a strided subset of the keys (lanes split d, a warp-shuffle dot
// product), the warps' (max, sum, accumulator) merged through shared memory at the end.
// d <= 32 * MAX_PER_LANE.
#include "common.cuh"

#define MAX_PER_LANE 8
#define WARPS 8

template <typename T>
__device__ void decode_attention(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                 const float* __restrict__ bias, T* __restrict__ out,
                                 int heads, int kv_heads, int tq, int t, int d,
                                 int64_t k_batch, int64_t k_head, int64_t v_batch, int64_t v_head,
                                 int bias_batched, float scale) {
    const int i = blockIdx.x % tq, h = (blockIdx.x / tq) % heads;
    const int64_t b = blockIdx.x / ((int64_t)tq * heads);
    const int kh = h / (heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int per_lane = (d + 31) / 32;
    const T* qr = q + ((b * heads + h) * tq + i) * (int64_t)d;
    const T* kb = k + b * k_batch + kh * k_head;
    const T* vb = v + b * v_batch + kh * v_head;
    const float* br = bias + ((bias_batched ? b * tq : 0) + i) * (int64_t)t;

    float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
#pragma unroll
    for (int c = 0; c < MAX_PER_LANE; ++c) {
        const int j = lane + 32 * c;
        qv[c] = c < per_lane && j < d ? to_f32(qr[j]) : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -FLT_MAX, z = 0.0f;
    for (int key = warp; key < t; key += WARPS) {
        const T* kr = kb + (int64_t)key * d;
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < MAX_PER_LANE; ++c) {
            const int j = lane + 32 * c;
            if (c < per_lane && j < d) dot += qv[c] * to_f32(kr[j]);
        }
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        const float x = dot * scale + br[key];
        const float mm = fmaxf(m, x), corr = expf(m - mm), p = expf(x - mm);
        z = z * corr + p;
        const T* vr = vb + (int64_t)key * d;
#pragma unroll
        for (int c = 0; c < MAX_PER_LANE; ++c) {
            const int j = lane + 32 * c;
            if (c < per_lane && j < d) acc[c] = acc[c] * corr + p * to_f32(vr[j]);
        }
        m = mm;
    }

    __shared__ float sm[WARPS], sz[WARPS];
    __shared__ float sacc[WARPS][32 * MAX_PER_LANE];
    if (lane == 0) { sm[warp] = m; sz[warp] = z; }
#pragma unroll
    for (int c = 0; c < MAX_PER_LANE; ++c) {
        if (c < per_lane) sacc[warp][lane + 32 * c] = acc[c];
    }
    __syncthreads();
    float big = -FLT_MAX;
    for (int w = 0; w < WARPS; ++w) big = fmaxf(big, sm[w]);
    float total = 0.0f;
    for (int w = 0; w < WARPS; ++w) total += sz[w] * expf(sm[w] - big);
    T* orow = out + ((b * tq + i) * heads + h) * (int64_t)d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float y = 0.0f;
        for (int w = 0; w < WARPS; ++w) y += sacc[w][j] * expf(sm[w] - big);
        orow[j] = from_f32<T>(y / total);
    }
}

#define INSTANTIATE(T, NAME)                                                                             \
    extern "C" __global__ void decode_attention_##NAME(                                                   \
        const T* q, const T* k, const T* v, const float* bias, T* out, int heads, int kv_heads, int tq,  \
        int t, int d, int64_t k_batch, int64_t k_head, int64_t v_batch, int64_t v_head, int bias_batched, \
        float scale) {                                                                                    \
        decode_attention<T>(q, k, v, bias, out, heads, kv_heads, tq, t, d, k_batch, k_head, v_batch,      \
                            v_head, bias_batched, scale);                                                 \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
