// cuda/rope.cu and cuda/dropout.cu on the CPU emulator: the rotary embedding on [b, heads, t, d]
// and its adjoint against float64 references written from the rotation's definition, and the
// dropout mask against SplitMix64 drawn in sequence on the host (the CPU reference's stream), over
// fewer blocks than elements (grid-stride).
#include "../cuda/rope.cu"
#undef INSTANTIATE  // each kernel file defines its own
#include "../cuda/dropout.cu"
#include "check.h"

#include <string>

template <typename T>
bool rope_case(int b, int heads, int t, int d, const char* dtype,
               void (*fwd)(const T*, const T*, const T*, T*, int64_t, int, int, int),
               void (*bwd)(const T*, const T*, const T*, T*, int64_t, int, int, int)) {
    std::mt19937 rng(21 + t + d);
    const int64_t n = (int64_t)b * heads * t * d;
    const int half = d / 2;
    const std::vector<T> x = random_values<T>(n, rng), g = random_values<T>(n, rng);
    const std::vector<T> cos = random_values<T>((size_t)b * t * d, rng), sin = random_values<T>((size_t)b * t * d, rng);
    std::vector<T> y = unwritten<T>(n), dx = unwritten<T>(n);
    emu::launch({3, 1, 1}, {256, 1, 1}, [&] { fwd(x.data(), cos.data(), sin.data(), y.data(), n, heads, t, d); });
    emu::launch({3, 1, 1}, {256, 1, 1}, [&] { bwd(g.data(), cos.data(), sin.data(), dx.data(), n, heads, t, d); });
    auto round = [](double v) { return value(from_f32<T>((float)v)); };
    std::vector<double> want(n), grad(n, 0.0);
    for (int bi = 0; bi < b; ++bi)
        for (int h = 0; h < heads; ++h)
            for (int p = 0; p < t; ++p) {
                const int64_t row = (((int64_t)bi * heads + h) * t + p) * d;
                const size_t cs = ((size_t)bi * t + p) * d;
                for (int j = 0; j < d; ++j) {
                    const double rot = j < half ? -value(x[row + j + half]) : value(x[row + j - half]);
                    want[row + j] = round(round(value(x[row + j]) * value(cos[cs + j])) + round(rot * value(sin[cs + j])));
                    const double gj = value(g[row + j]);
                    grad[row + j] += gj * value(cos[cs + j]);
                    if (j < half) grad[row + j + half] -= gj * value(sin[cs + j]);
                    else grad[row + j - half] += gj * value(sin[cs + j]);
                }
            }
    const std::string shape = "[" + std::to_string(b) + "," + std::to_string(heads) + "," + std::to_string(t) + "," +
                              std::to_string(d) + "] " + dtype;
    bool ok = report(("rope forward " + shape).c_str(), max_relative(y, want), 1e-6);
    ok &= report(("rope adjoint " + shape).c_str(), max_relative(dx, grad), one_rounding<T>() + 1e-6);
    return ok;
}

template <typename T>
bool dropout_case(int64_t n, uint64_t key, float p, const char* dtype, void (*mask)(T*, int64_t, uint64_t, float, float)) {
    std::vector<T> out = unwritten<T>(n);
    const float keep = 1.0f / (1.0f - p);
    emu::launch({2, 1, 1}, {256, 1, 1}, [&] { mask(out.data(), n, key, p, keep); });
    uint64_t state = key;
    std::vector<double> want(n);
    int64_t dropped = 0;
    for (int64_t e = 0; e < n; ++e) {
        state += 0x9E3779B97F4A7C15ull;
        const float u = (float)(splitmix_mix(state) >> 40) / 16777216.0f;
        want[e] = u < p ? 0.0 : value(from_f32<T>(keep));
        dropped += u < p;
    }
    const std::string what = "dropout mask [" + std::to_string(n) + "] p " + std::to_string(p) + " " + dtype +
                             " (dropped " + std::to_string(dropped) + ")";
    return report(what.c_str(), max_relative(out, want), 0.0);
}

int main() {
    bool ok = true;
    ok &= rope_case<float>(2, 3, 5, 16, "f32", rope_fwd_f32, rope_bwd_f32);
    ok &= rope_case<__nv_bfloat16>(1, 4, 7, 96, "bf16", rope_fwd_bf16, rope_bwd_bf16);
    ok &= rope_case<__half>(3, 1, 2, 8, "f16", rope_fwd_f16, rope_bwd_f16);
    ok &= dropout_case<float>(5001, 0xDEADBEEFull, 0.3f, "f32", dropout_mask_f32);
    ok &= dropout_case<__nv_bfloat16>(777, 42, 0.05f, "bf16", dropout_mask_bf16);
    return ok ? 0 : 1;
}
