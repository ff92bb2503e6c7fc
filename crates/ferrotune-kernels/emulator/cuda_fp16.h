// The CPU emulator's stand-in for CUDA's fp16 header, on the compiler's _Float16.
#pragma once
#include "cuda_emulation.h"

struct __half {
    uint16_t x;
};

inline float __half2float(__half v) {
    _Float16 h;
    std::memcpy(&h, &v.x, 2);
    return (float)h;
}

inline __half __float2half(float f) {
    _Float16 h = (_Float16)f;
    __half out;
    std::memcpy(&out.x, &h, 2);
    return out;
}

template <> inline float emulated_half<__half>(uint16_t bits) { return __half2float({bits}); }
