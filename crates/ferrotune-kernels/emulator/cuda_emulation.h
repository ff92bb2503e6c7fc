// Runs CUDA kernels on the CPU for checking their index arithmetic: one std::thread per CUDA
// thread of a block, blocks one after another; __shared__ variables become function statics
// (shared by the block's threads, reused by the next block); __syncthreads, the warp shuffles
// and mma.sync meet at barriers. mma.sync m16n8k16 is rebuilt from each lane's registers with the
// fragment tables of the PTX ISA and computed in float.
#pragma once
#include <barrier>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(n)
#define FERROTUNE_EMULATED_MMA 1

struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
constexpr int MAX_WARPS = 32;
inline dim3 grid, block;
inline thread_local dim3 thread_idx, block_idx;
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::unique_ptr<std::barrier<>> warp_barrier[MAX_WARPS];
// Per-warp exchange slots: each lane's value or registers, read by the others between barriers.
inline float lane_float[MAX_WARPS][32];
inline uint32_t lane_a[MAX_WARPS][32][4], lane_b[MAX_WARPS][32][2];
inline const uint16_t* lane_row[MAX_WARPS][32];
inline std::mutex atomics;

inline int warp() { return thread_idx.x / 32; }
inline int lane() { return thread_idx.x % 32; }
inline void warp_sync() { warp_barrier[warp()]->arrive_and_wait(); }

// Runs `kernel` (a callable taking no arguments, reading threadIdx/blockIdx) on `grid` x `block`.
inline void launch(dim3 g, dim3 b, const std::function<void()>& kernel) {
    grid = g;
    block = b;
    const unsigned threads = b.x;
    for (unsigned by = 0; by < g.y; ++by) {
        for (unsigned bx = 0; bx < g.x; ++bx) {
            block_barrier = std::make_unique<std::barrier<>>(threads);
            for (unsigned w = 0; w < (threads + 31) / 32; ++w) warp_barrier[w] = std::make_unique<std::barrier<>>(32);
            std::vector<std::thread> pool;
            for (unsigned t = 0; t < threads; ++t) {
                pool.emplace_back([=, &kernel] {
                    thread_idx = {t, 0, 0};
                    block_idx = {bx, by, 0};
                    kernel();
                });
            }
            for (auto& th : pool) th.join();
        }
    }
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define gridDim (emu::grid)
#define blockDim (emu::block)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int mask) {
    const int w = emu::warp(), l = emu::lane();
    emu::lane_float[w][l] = v;
    emu::warp_sync();
    const float r = emu::lane_float[w][l ^ mask];
    emu::warp_sync();
    return r;
}

inline float atomicAdd(float* p, float v) {
    std::lock_guard<std::mutex> guard(emu::atomics);
    const float old = *p;
    *p = old + v;
    return old;
}

inline int atomicOr(int* p, int v) {
    std::lock_guard<std::mutex> guard(emu::atomics);
    const int old = *p;
    *p = old | v;
    return old;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline int min(int a, int b) { return a < b ? a : b; }

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the (16-byte aligned) address of
// row l % 8 of matrix l / 8; register m of lane l gets row l / 4, columns 2 (l % 4), 2 (l % 4) + 1
// of matrix m, or with .trans column l / 4, rows 2 (l % 4), 2 (l % 4) + 1 (low half first).
inline void emulated_ldmatrix_x4(uint32_t r[4], const uint16_t* row, bool trans) {
    if (reinterpret_cast<uintptr_t>(row) & 15) {
        std::fprintf(stderr, "ldmatrix: row address %p is not 16-byte aligned\n", (const void*)row);
        std::abort();
    }
    const int w = emu::warp(), l = emu::lane();
    emu::lane_row[w][l] = row;
    emu::warp_sync();
    for (int m = 0; m < 4; ++m) {
        uint16_t lo, hi;
        if (!trans) {
            const uint16_t* p = emu::lane_row[w][8 * m + l / 4];
            lo = p[2 * (l % 4)];
            hi = p[2 * (l % 4) + 1];
        } else {
            lo = emu::lane_row[w][8 * m + 2 * (l % 4)][l / 4];
            hi = emu::lane_row[w][8 * m + 2 * (l % 4) + 1][l / 4];
        }
        r[m] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    emu::warp_sync();
}

// The two 16-bit halves of a register as floats (low half first), for storage type T.
template <typename T> float emulated_half(uint16_t bits);

// c += a b for the warp's 16x8x16 tile, every lane supplying its registers (PTX ISA, mma.m16n8k16,
// .bf16/.f16): g = lane / 4, c = lane % 4;
//   A: reg 0 = (g, 2c..2c+1), 1 = (g+8, 2c..2c+1), 2 = (g, 2c+8..2c+9), 3 = (g+8, 2c+8..2c+9);
//   B: reg 0 = (k 2c..2c+1, n g), 1 = (k 2c+8..2c+9, n g);
//   C: 0 = (g, 2c), 1 = (g, 2c+1), 2 = (g+8, 2c), 3 = (g+8, 2c+1).
template <typename T> void emulated_mma(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    const int w = emu::warp(), l = emu::lane();
    for (int i = 0; i < 4; ++i) emu::lane_a[w][l][i] = a[i];
    for (int i = 0; i < 2; ++i) emu::lane_b[w][l][i] = b[i];
    emu::warp_sync();
    float A[16][16], B[16][8];
    for (int ln = 0; ln < 32; ++ln) {
        const int g = ln / 4, q = ln % 4;
        for (int r = 0; r < 4; ++r) {
            const uint32_t reg = emu::lane_a[w][ln][r];
            const int row = g + (r & 1) * 8, col = 2 * q + (r >> 1) * 8;
            A[row][col] = emulated_half<T>(reg & 0xffff);
            A[row][col + 1] = emulated_half<T>(reg >> 16);
        }
        for (int r = 0; r < 2; ++r) {
            const uint32_t reg = emu::lane_b[w][ln][r];
            B[2 * q + r * 8][g] = emulated_half<T>(reg & 0xffff);
            B[2 * q + r * 8 + 1][g] = emulated_half<T>(reg >> 16);
        }
    }
    emu::warp_sync();
    const int g = l / 4, q = l % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >> 1) * 8, col = 2 * q + (i & 1);
        float s = 0.0f;
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        c[i] += s;
    }
}
