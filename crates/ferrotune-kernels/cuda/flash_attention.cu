// Causal attention for training without the score matrix (flash-attention-2's algorithm) on the
// tensor cores (mma.sync m16n8k16, bf16 or f16 in, f32 accumulation; sm_80 and later):
//   forward:  out = softmax(scale * q.k^T + bias) v, and lse (each row's log-sum-exp);
//   backward: dq, dk, dv from q, k, v, bias, out, lse and dout, recomputing the probabilities
//             tile by tile from lse.
// Query i may attend key j where j <= i and bias[i][j] > MASKED (the model's bias holds 0 or
// f32::MIN); a row with no such key gets out 0 and lse +inf, so its probabilities are all 0.
// Layouts: q, k, v [b, h, t, d]; out and dout [b, t, h, d] (o_proj's input, so no transposing copy
// on either side); bias [b or 1, 1, t, t] f32; lse and delta [b, h, t] f32; dq_acc [b, h, t, d] f32
// (zeroed by the caller, summed into with atomics); dk, dv [b, h, t, d].
// Head dims up to D (a template: 32, 64, 96, 128); columns d..D are zero padding.
// kinds [b or 1, blocks, blocks] (flash_attention_tile_kinds, 64 x 64 tiles of the bias): a tile
// whose causally visible entries are all masked is skipped outright (sliding windows, other
// documents of a packed row), one whose allowed entries all have bias 0 is computed without
// reading the bias (plain causal rows), only the rest reads it.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16/.f16): with g = lane / 4 and c = lane % 4,
//   A (16x16, row): reg 0 = (g, 2c..2c+1), 1 = (g+8, 2c..), 2 = (g, 2c+8..), 3 = (g+8, 2c+8..);
//   B (16x8, col):  reg 0 = (k 2c..2c+1, n g), reg 1 = (k 2c+8..2c+9, n g);
//   C (16x8, f32):  0, 1 = (g, 2c), (g, 2c+1); 2, 3 = (g+8, 2c), (g+8, 2c+1).
// So the C tiles of a score block are, two 8-key tiles at a time, the A operand of the next
// product, and no score ever leaves the registers except dS for dq, through shared memory.
// `emulator/` runs this file on the CPU (one thread per CUDA thread, mma.sync emulated from the
// ISA's fragment tables): scripts/test.sh checks it there against a float64 reference.
// Shared tiles are row-major with a pitch of D + 8 (or 72 / 40) elements: both the contiguous pair
// loads (along a row) and the strided ones (down a column) then hit 32 distinct banks.
#include "common.cuh"

#define MASKED (-1e30f)
#define BQ 64   // forward: queries per block, 16 per warp
#define BK 64   // keys per forward tile, and per backward block (16 per warp)
#define BQB 32  // backward: queries per tile
#define WARPS 4
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define TILE_SKIP 0
#define TILE_PLAIN 1
#define TILE_BIAS 2

// The 16 bits of a bf16 or f16 (the intrinsics for it are sm_80+ only in CUDA 11's bf16 header).
template <typename T> __device__ __forceinline__ uint16_t bits_of(T x) { return *reinterpret_cast<const uint16_t*>(&x); }

__device__ __forceinline__ uint32_t pair(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

// Two floats rounded to T, packed as one mma operand register (the first in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    return pair(bits_of(from_f32<T>(lo)), bits_of(from_f32<T>(hi)));
}

// c += a b for one 16x8x16 tile.
template <typename T> __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2]);
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(FERROTUNE_EMULATED_MMA)
    emulated_mma<__nv_bfloat16>(c, a, b);
#elif __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
template <> __device__ __forceinline__ void mma<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(FERROTUNE_EMULATED_MMA)
    emulated_mma<__half>(c, a, b);
#elif __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Elements (row, col) and (row, col + 1) of a row-major [rows][d] global matrix, zero outside it.
__device__ __forceinline__ uint32_t global_pair(const uint16_t* m, int rows, int d, int row, int col) {
    if (row >= rows) return 0u;
    const uint16_t* r = m + (int64_t)row * d;
    return pair(col < d ? r[col] : 0, col + 1 < d ? r[col + 1] : 0);
}

// The A fragments (16 rows from `row0`, all D columns) of a row-major [rows][d] global matrix.
template <int D>
__device__ __forceinline__ void a_fragments(uint32_t a[D / 16][4], const uint16_t* m, int rows, int d, int row0) {
    const int g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        const int col = kk * 16 + 2 * c;
        a[kk][0] = global_pair(m, rows, d, row0 + g, col);
        a[kk][1] = global_pair(m, rows, d, row0 + g + 8, col);
        a[kk][2] = global_pair(m, rows, d, row0 + g, col + 8);
        a[kk][3] = global_pair(m, rows, d, row0 + g + 8, col + 8);
    }
}

// Copies rows row0.. of a global matrix (rows of d elements, `stride` apart) into an [n][P]
// shared tile, zero padded past `rows` and past `d`. 16-byte loads and stores where every row
// start is 16-byte aligned (d and the stride multiples of 8, an aligned base: Phi-3's d = 96).
template <int D, int P>
__device__ __forceinline__ void load_tile(uint16_t* s, int n, const uint16_t* m, int rows, int d, int row0,
                                          int64_t stride) {
    if (d % 8 == 0 && stride % 8 == 0 && (reinterpret_cast<uintptr_t>(m) & 15) == 0) {
        constexpr int CHUNKS = D / 8;
        for (int i = threadIdx.x; i < n * CHUNKS; i += WARPS * 32) {
            const int r = i / CHUNKS, col = (i - r * CHUNKS) * 8, row = row0 + r;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (row < rows && col < d) v = *reinterpret_cast<const uint4*>(m + row * stride + col);
            *reinterpret_cast<uint4*>(s + r * P + col) = v;
        }
        return;
    }
    for (int i = threadIdx.x; i < n * D; i += WARPS * 32) {
        const int r = i / D, col = i - r * D, row = row0 + r;
        s[r * P + col] = row < rows && col < d ? m[row * stride + col] : 0;
    }
}

// ldmatrix.x4 (sm_75+): lane l gives the address of row l % 8 of 8x8 matrix l / 8 (16-byte rows);
// register m of lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix m, or with
// .trans column l / 4, rows 2 (l % 4) and 2 (l % 4) + 1: one instruction for four fragment registers.
__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const uint16_t* row) {
#if defined(FERROTUNE_EMULATED_MMA)
    emulated_ldmatrix_x4(r, row, false);
#elif __CUDA_ARCH__ >= 800
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], const uint16_t* row) {
#if defined(FERROTUNE_EMULATED_MMA)
    emulated_ldmatrix_x4(r, row, true);
#elif __CUDA_ARCH__ >= 800
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#endif
}

// B fragments of two k-steps (k0.. and k0+16..) for the 8 columns n0.. of B, from a row-major
// shared [n][k] tile (B's transpose: the K tile for q.k^T): b[0..1] the first, b[2..3] the second.
__device__ __forceinline__ void b_along_rows(uint32_t b[4], const uint16_t* s, int pitch, int k0, int n0) {
    const int l = threadIdx.x & 31;
    ldsm_x4(b, s + (n0 + (l & 7)) * pitch + k0 + 8 * (l >> 3));
}

// B fragments of the k-step k0.. for two 8-column tiles (n0.. and n0+8..) of B, from a row-major
// shared [k][n] tile (the V tile for p.v): b[0..1] the first, b[2..3] the second.
__device__ __forceinline__ void b_down_columns(uint32_t b[4], const uint16_t* s, int pitch, int k0, int n0) {
    const int l = threadIdx.x & 31, m = l >> 3;
    ldsm_x4_trans(b, s + (k0 + 8 * (m & 1) + (l & 7)) * pitch + n0 + 8 * (m >> 1));
}

// The A fragment of rows m0.. and columns k0.. of a row-major shared [m][k] tile.
__device__ __forceinline__ void a_from_shared(uint32_t a[4], const uint16_t* s, int pitch, int m0, int k0) {
    const int l = threadIdx.x & 31, m = l >> 3;
    ldsm_x4(a, s + (m0 + 8 * (m & 1) + (l & 7)) * pitch + k0 + 8 * (m >> 1));
}

// acc = A B for one 16 x 8 output tile: A the warp's 16 rows of D columns (fragments in
// registers), B the transpose of rows n0..n0+7 of a row-major shared [rows][D] tile (q.k^T's
// keys, or dout rows for V.dout^T).
template <typename T, int D>
__device__ __forceinline__ void rows_times_tile(float acc[4], const uint32_t a[D / 16][4], const uint16_t* s, int n0) {
    acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk += 2) {
        uint32_t bf[4];
        b_along_rows(bf, s, D + 8, kk * 16, n0);
        mma<T>(acc, a[kk], bf);
        mma<T>(acc, a[kk + 1], bf + 2);
    }
}

// acc += A B over all D columns: A a 16 x 16 fragment (16 rows of the scores, 16 positions from
// k0), B rows k0..k0+15 of a row-major shared [positions][D] tile (p.v, P^T dout, dS^T q).
template <typename T, int D>
__device__ __forceinline__ void accumulate_tile(float acc[D / 8][4], const uint32_t a[4], const uint16_t* s, int k0) {
#pragma unroll
    for (int j = 0; j < D / 8; j += 2) {
        uint32_t bf[4];
        b_down_columns(bf, s, D + 8, k0, j * 8);
        mma<T>(acc[j], a, bf);
        mma<T>(acc[j + 1], a, bf + 2);
    }
}

// The A fragment of 16 positions (two 8-column C tiles, 2 kc and 2 kc + 1) of a score block held
// in C fragments: the C layout of two neighbouring tiles is the A layout of their 16 x 16 block.
template <typename T> __device__ __forceinline__ void scores_as_a(uint32_t a[4], const float c[][4], int kc) {
    a[0] = pack<T>(c[2 * kc][0], c[2 * kc][1]);
    a[1] = pack<T>(c[2 * kc][2], c[2 * kc][3]);
    a[2] = pack<T>(c[2 * kc + 1][0], c[2 * kc + 1][1]);
    a[3] = pack<T>(c[2 * kc + 1][2], c[2 * kc + 1][3]);
}

// Whether query i may attend key j (i, j < t), and the bias added to its score; in a TILE_PLAIN
// tile every causally visible entry is allowed with bias 0.
__device__ __forceinline__ bool allowed(const float* bias_bt, int kind, int t, int i, int j, float& bias) {
    if (j > i || i >= t || j >= t) return false;
    if (kind == TILE_PLAIN) {
        bias = 0.0f;
        return true;
    }
    bias = bias_bt[(int64_t)i * t + j];
    return bias > MASKED;
}

// kinds[row][qb][kb] for the 64 x 64 tile (qb, kb) of bias row `row` (see the top of the file).
// One block per tile.
__device__ void tile_kinds(const float* __restrict__ bias, uint8_t* __restrict__ kinds, int t) {
    __shared__ int any_allowed, any_biased;
    const int kb = blockIdx.x, qb = blockIdx.y, blocks = gridDim.x;
    const int64_t row = blockIdx.z;
    if (threadIdx.x == 0) any_allowed = any_biased = 0;
    __syncthreads();
    int allowed_here = 0, biased_here = 0;
    for (int e = threadIdx.x; e < BQ * BK; e += blockDim.x) {
        const int i = qb * BQ + e / BK, j = kb * BK + e % BK;
        if (i < t && j <= i) {
            const float v = bias[(row * t + i) * (int64_t)t + j];
            if (v > MASKED) {
                allowed_here = 1;
                if (v != 0.0f) biased_here = 1;
            }
        }
    }
    if (allowed_here) atomicOr(&any_allowed, 1);
    if (biased_here) atomicOr(&any_biased, 1);
    __syncthreads();
    if (threadIdx.x == 0)
        kinds[(row * blocks + qb) * blocks + kb] = !any_allowed ? TILE_SKIP : any_biased ? TILE_BIAS : TILE_PLAIN;
}

template <typename T, int D>
__device__ void flash_fwd(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                          const uint16_t* __restrict__ v, const float* __restrict__ bias,
                          const uint8_t* __restrict__ kinds, T* __restrict__ out, float* __restrict__ lse,
                          int heads, int t, int d, int bias_batched, float scale) {
#if __CUDA_ARCH__ >= 800
    constexpr int P = D + 8;
    __shared__ __align__(16) uint16_t ks[BK * P];
    __shared__ __align__(16) uint16_t vs[BK * P];
    // Blocks start in order of their linear index (x fastest): every head's longest rows first,
    // so the last blocks to start are the shortest.
    const int qb = gridDim.y - 1 - blockIdx.y;
    const int64_t bh = blockIdx.x, b = bh / heads, h = bh - b * heads;
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
    const int64_t head = bh * (int64_t)t * d;
    const float* bias_bt = bias + (bias_batched ? b : 0) * (int64_t)t * t;
    const uint8_t* tile_kind = kinds + ((bias_batched ? b : 0) * gridDim.y + qb) * gridDim.y;
    const int q0 = qb * BQ + warp * 16, r0 = q0 + g, r1 = r0 + 8;
    const float scale2 = scale * LOG2E;

    uint32_t qa[D / 16][4];
    a_fragments<D>(qa, q + head, t, d, q0);
    float o[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    // Row maxima (over the quad: equal in its 4 lanes) and this lane's part of the row sums.
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;

    const int keys = min(t, (qb + 1) * BQ);
    for (int k0 = 0; k0 < keys; k0 += BK) {
        const int kind = tile_kind[k0 / BK];
        if (kind == TILE_SKIP) continue;  // block-uniform: every thread skips the same tiles
        __syncthreads();
        load_tile<D, P>(ks, BK, k + head, t, d, k0, d);
        load_tile<D, P>(vs, BK, v + head, t, d, k0, d);
        __syncthreads();
        if (k0 > q0 + 15) continue;  // every key of the tile is after this warp's queries

        float s[BK / 8][4];
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) rows_times_tile<T, D>(s[j], qa, ks, j * 8);
        // Scores in log2 units (exp2 is the hardware's exponential). A plain tile wholly below
        // this warp's diagonal needs no mask at all.
        const bool open = kind == TILE_PLAIN && k0 + BK - 1 <= q0 && q0 + 15 < t;
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e < 2 ? r0 : r1, key = k0 + j * 8 + 2 * c + (e & 1);
                float bv, x = -INFINITY;
                if (open) x = s[j][e] * scale2;
                else if (allowed(bias_bt, kind, t, row, key, bv)) x = s[j][e] * scale2 + bv * LOG2E;
                s[j][e] = x;
                if (e < 2) mx0 = fmaxf(mx0, x); else mx1 = fmaxf(mx1, x);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        // While a row has seen no allowed key its maximum is -inf; exponents are then taken
        // against 0 so they stay exp(-inf) = 0 rather than NaN.
        const float base0 = n0 == -INFINITY ? 0.0f : n0, base1 = n1 == -INFINITY ? 0.0f : n1;
        const float a0 = exp2f(m0 - base0), a1 = exp2f(m1 - base1);
        m0 = n0;
        m1 = n1;
        l0 *= a0;
        l1 *= a1;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            o[j][0] *= a0;
            o[j][1] *= a0;
            o[j][2] *= a1;
            o[j][3] *= a1;
        }
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) {
            s[j][0] = exp2f(s[j][0] - base0);
            s[j][1] = exp2f(s[j][1] - base0);
            s[j][2] = exp2f(s[j][2] - base1);
            s[j][3] = exp2f(s[j][3] - base1);
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }
#pragma unroll
        for (int kc = 0; kc < BK / 16; ++kc) {
            uint32_t pa[4];
            scores_as_a<T>(pa, s, kc);
            accumulate_tile<T, D>(o, pa, vs, kc * 16);
        }
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = e < 2 ? r0 : r1, col = j * 8 + 2 * c + (e & 1);
            if (row < t && col < d)
                out[((b * t + row) * heads + h) * d + col] = from_f32<T>(o[j][e] * (e < 2 ? inv0 : inv1));
        }
    }
    if (c == 0) {
        // Back to natural-log units for the caller.
        if (r0 < t) lse[bh * t + r0] = l0 > 0.0f ? (m0 + log2f(l0)) * LN2 : INFINITY;
        if (r1 < t) lse[bh * t + r1] = l1 > 0.0f ? (m1 + log2f(l1)) * LN2 : INFINITY;
    }
#endif
}

// delta[b, h, i] = dout[b, i, h, :] . out[b, i, h, :] in f32: the backward's row term
// (sum_j P_ij dP_ij = dout_i . out_i). One warp per row.
template <typename T>
__device__ void flash_bwd_delta(const T* __restrict__ out, const T* __restrict__ dout, float* __restrict__ delta,
                                int heads, int t, int d, int64_t rows) {
    const int lane = threadIdx.x & 31;
    for (int64_t r = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5; r < rows;
         r += ((int64_t)gridDim.x * blockDim.x) >> 5) {
        // r runs over [b, t, heads] (the rows' layout); delta is [b, heads, t].
        const int64_t h = r % heads, i = (r / heads) % t, b = r / ((int64_t)heads * t);
        const T* o = out + r * d;
        const T* g = dout + r * d;
        float s = 0.0f;
        for (int col = lane; col < d; col += 32) s += to_f32(o[col]) * to_f32(g[col]);
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) delta[(b * heads + h) * t + i] = s;
    }
}

// One block per (b·h, 64 keys); warp w owns keys 16w..16w+15 of the block and walks the query
// tiles from the block's diagonal down, accumulating its dk and dv rows in registers; dq is
// summed into dq_acc with atomics, from dS (through shared memory) and the block's keys.
template <typename T, int D>
__device__ void flash_bwd(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k,
                          const uint16_t* __restrict__ v, const float* __restrict__ bias,
                          const uint8_t* __restrict__ kinds, const uint16_t* __restrict__ dout,
                          const float* __restrict__ lse,
                          const float* __restrict__ delta, float* __restrict__ dq_acc, T* __restrict__ dk,
                          T* __restrict__ dv, int heads, int t, int d, int bias_batched, float scale) {
#if __CUDA_ARCH__ >= 800
    constexpr int P = D + 8, PS = BK + 8;
    __shared__ __align__(16) uint16_t qs[BQB * P];
    __shared__ __align__(16) uint16_t dos[BQB * P];
    __shared__ __align__(16) uint16_t ks[BK * P];
    __shared__ __align__(16) uint16_t dss[BQB * PS];  // dS [query][key]
    __shared__ float lse_s[BQB], delta_s[BQB];
    // Every head's first key block (the one most query tiles see) starts first.
    const int kb = blockIdx.y, k0 = kb * BK;
    const int64_t bh = blockIdx.x, b = bh / heads, h = bh - b * heads;
    const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2, c = threadIdx.x & 3;
    const int64_t head = bh * (int64_t)t * d;
    const float* bias_bt = bias + (bias_batched ? b : 0) * (int64_t)t * t;
    const uint8_t* kinds_b = kinds + (bias_batched ? b : 0) * (int64_t)gridDim.y * gridDim.y;
    const int kw = k0 + warp * 16, kr0 = kw + g, kr1 = kr0 + 8;
    const float scale2 = scale * LOG2E;
    // dout rows of this head: [b, t, heads, d], a row stride of heads * d.
    const uint16_t* dout_bh = dout + (b * t * heads + h) * (int64_t)d;

    load_tile<D, P>(ks, BK, k + head, t, d, k0, d);
    uint32_t ka[D / 16][4], va[D / 16][4];
    a_fragments<D>(ka, k + head, t, d, kw);
    a_fragments<D>(va, v + head, t, d, kw);
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        dka[j][0] = dka[j][1] = dka[j][2] = dka[j][3] = 0.0f;
        dva[j][0] = dva[j][1] = dva[j][2] = dva[j][3] = 0.0f;
    }

    for (int qt0 = k0; qt0 < t; qt0 += BQB) {
        const int kind = kinds_b[(qt0 / BQ) * gridDim.y + kb];
        if (kind == TILE_SKIP) continue;  // block-uniform
        __syncthreads();
        load_tile<D, P>(qs, BQB, q + head, t, d, qt0, d);
        load_tile<D, P>(dos, BQB, dout_bh, t, d, qt0, (int64_t)heads * d);
        if (threadIdx.x < BQB) {
            const int row = qt0 + threadIdx.x;
            lse_s[threadIdx.x] = row < t ? lse[bh * t + row] * LOG2E : INFINITY;  // log2 units
            delta_s[threadIdx.x] = row < t ? delta[bh * t + row] : 0.0f;
        }
        __syncthreads();

        // S^T (this warp's 16 keys x 32 queries), then P^T from lse; a plain tile whose queries
        // all come after this warp's keys needs no mask.
        const bool open = kind == TILE_PLAIN && kw + 15 <= qt0 && qt0 + BQB - 1 < t;
        float pt[BQB / 8][4];
#pragma unroll
        for (int j = 0; j < BQB / 8; ++j) {
            rows_times_tile<T, D>(pt[j], ka, qs, j * 8);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = e < 2 ? kr0 : kr1, qi = j * 8 + 2 * c + (e & 1);
                float bv, p = 0.0f;
                if (open) p = exp2f(pt[j][e] * scale2 - lse_s[qi]);
                else if (allowed(bias_bt, kind, t, qt0 + qi, key, bv))
                    p = exp2f(pt[j][e] * scale2 + bv * LOG2E - lse_s[qi]);
                pt[j][e] = p;
            }
        }
        // dV += P^T dout; dP^T = V dout^T.
        float dpt[BQB / 8][4];
#pragma unroll
        for (int kc = 0; kc < BQB / 16; ++kc) {
            uint32_t pa[4];
            scores_as_a<T>(pa, pt, kc);
            accumulate_tile<T, D>(dva, pa, dos, kc * 16);
        }
#pragma unroll
        for (int j = 0; j < BQB / 8; ++j) {
            rows_times_tile<T, D>(dpt[j], va, dos, j * 8);
            // dS^T = P^T (dP^T - delta) * scale: the scores' gradient (scale folded in).
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qi = j * 8 + 2 * c + (e & 1);
                const float ds = pt[j][e] * (dpt[j][e] - delta_s[qi]) * scale;
                dpt[j][e] = ds;
                dss[qi * PS + warp * 16 + g + (e < 2 ? 0 : 8)] = bits_of(from_f32<T>(ds));
            }
        }
        // dK += dS^T q.
#pragma unroll
        for (int kc = 0; kc < BQB / 16; ++kc) {
            uint32_t pa[4];
            scores_as_a<T>(pa, dpt, kc);
            accumulate_tile<T, D>(dka, pa, qs, kc * 16);
        }
        __syncthreads();
        // dq (32 queries x D) += dS k over the block's 64 keys: warp w takes queries
        // 16 (w % 2).. and every other pair of 8-column tiles from pair w / 2.
        {
            const int mq = (warp & 1) * 16;
            uint32_t sa[BK / 16][4];
#pragma unroll
            for (int kc = 0; kc < BK / 16; ++kc) a_from_shared(sa[kc], dss, PS, mq, kc * 16);
#pragma unroll
            for (int j = 2 * (warp >> 1); j < D / 8; j += 4) {
                float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
                for (int kc = 0; kc < BK / 16; ++kc) {
                    uint32_t bf[4];
                    b_down_columns(bf, ks, P, kc * 16, j * 8);
                    mma<T>(acc[0], sa[kc], bf);
                    mma<T>(acc[1], sa[kc], bf + 2);
                }
#pragma unroll
                for (int n = 0; n < 2; ++n) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = qt0 + mq + g + (e < 2 ? 0 : 8), col = (j + n) * 8 + 2 * c + (e & 1);
                        if (row < t && col < d) atomicAdd(dq_acc + head + (int64_t)row * d + col, acc[n][e]);
                    }
                }
            }
        }
    }

#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = e < 2 ? kr0 : kr1, col = j * 8 + 2 * c + (e & 1);
            if (key < t && col < d) {
                dk[head + (int64_t)key * d + col] = from_f32<T>(dka[j][e]);
                dv[head + (int64_t)key * d + col] = from_f32<T>(dva[j][e]);
            }
        }
    }
#endif
}

#define INSTANTIATE_D(T, NAME, D)                                                                               \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                                   \
        flash_attention_fwd_d##D##_##NAME(const T* q, const T* k, const T* v, const float* bias,               \
                                          const uint8_t* kinds, T* out, float* lse, int heads, int t, int d,     \
                                          int bias_batched, float scale) {                                       \
        flash_fwd<T, D>(reinterpret_cast<const uint16_t*>(q), reinterpret_cast<const uint16_t*>(k),            \
                        reinterpret_cast<const uint16_t*>(v), bias, kinds, out, lse, heads, t, d, bias_batched, \
                        scale);                                                                                \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) flash_attention_bwd_d##D##_##NAME(                 \
        const T* q, const T* k, const T* v, const float* bias, const uint8_t* kinds, const T* dout,            \
        const float* lse, const float* delta, float* dq_acc, T* dk, T* dv, int heads, int t, int d,            \
        int bias_batched, float scale) {                                                                       \
        flash_bwd<T, D>(reinterpret_cast<const uint16_t*>(q), reinterpret_cast<const uint16_t*>(k),            \
                        reinterpret_cast<const uint16_t*>(v), bias, kinds,                                     \
                        reinterpret_cast<const uint16_t*>(dout), lse, delta, dq_acc, dk, dv, heads, t, d,      \
                        bias_batched, scale);                                                                  \
    }

#define INSTANTIATE(T, NAME)                                                                           \
    INSTANTIATE_D(T, NAME, 32)                                                                         \
    INSTANTIATE_D(T, NAME, 64)                                                                         \
    INSTANTIATE_D(T, NAME, 96)                                                                         \
    INSTANTIATE_D(T, NAME, 128)                                                                        \
    extern "C" __global__ void flash_attention_bwd_delta_##NAME(const T* out, const T* dout, float* delta, \
                                                                int heads, int t, int d, int64_t rows) { \
        flash_bwd_delta<T>(out, dout, delta, heads, t, d, rows);                                       \
    }

INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)

extern "C" __global__ void flash_attention_tile_kinds(const float* bias, uint8_t* kinds, int t) {
    tile_kinds(bias, kinds, t);
}
