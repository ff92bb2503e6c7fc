// The CPU emulator's stand-in for CUDA's bf16 header: the storage type and its conversions
// (round to nearest even, as __float2bfloat16 does).
#pragma once
#include "cuda_emulation.h"

struct __nv_bfloat16 {
    uint16_t x;
};

inline float __bfloat162float(__nv_bfloat16 v) {
    uint32_t bits = (uint32_t)v.x << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((bits >> 16) | 0x40)};  // NaN stays NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return {(uint16_t)(bits >> 16)};
}

template <> inline float emulated_half<__nv_bfloat16>(uint16_t bits) { return __bfloat162float({bits}); }
