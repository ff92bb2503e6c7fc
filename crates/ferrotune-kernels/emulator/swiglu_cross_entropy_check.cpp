// cuda/swiglu.cu and cuda/cross_entropy.cu on the CPU emulator against float64 references: SwiGLU
// on the fused gate_up rows and its backward (grid-stride over fewer blocks than elements), and the
// token cross-entropy's per-row loss and logits gradient with untrained rows.
#include "../cuda/cross_entropy.cu"
#undef INSTANTIATE  // each kernel file defines its own
#include "../cuda/swiglu.cu"
#include "check.h"

#include <string>

template <typename T>
bool swiglu_case(int rows, int i, const char* dtype, void (*fwd)(const T*, T*, int64_t, int),
                 void (*bwd)(const T*, const T*, T*, int64_t, int)) {
    std::mt19937 rng(9 + i);
    const int64_t n = (int64_t)rows * i;
    const std::vector<T> gu = random_values<T>(2 * n, rng, 2.0f), g = random_values<T>(n, rng);
    std::vector<T> y = unwritten<T>(n), dgu = unwritten<T>(2 * n);
    emu::launch({3, 1, 1}, {256, 1, 1}, [&] { fwd(gu.data(), y.data(), n, i); });
    emu::launch({3, 1, 1}, {256, 1, 1}, [&] { bwd(gu.data(), g.data(), dgu.data(), n, i); });
    std::vector<double> want(n), grad(2 * n);
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < i; ++j) {
            const double gate = value(gu[(size_t)r * 2 * i + j]), up = value(gu[(size_t)r * 2 * i + i + j]);
            const double s = 1.0 / (1.0 + std::exp(-gate)), gy = value(g[(size_t)r * i + j]);
            want[(size_t)r * i + j] = up * value(from_f32<T>((float)(gate * s)));
            grad[(size_t)r * 2 * i + j] = gy * up * s * (1.0 + gate * (1.0 - s));  // d(gate σ(gate))/d gate
            grad[(size_t)r * 2 * i + i + j] = gy * gate * s;
        }
    const std::string shape = "[" + std::to_string(rows) + "," + std::to_string(i) + "] " + dtype;
    bool ok = report(("swiglu forward " + shape).c_str(), max_relative(y, want), one_rounding<T>() + 1e-6);
    ok &= report(("swiglu backward " + shape).c_str(), max_relative(dgu, grad), one_rounding<T>() + 1e-6);
    return ok;
}

template <typename T>
bool cross_entropy_case(int rows, int v, const char* dtype, void (*nll)(const T*, const uint32_t*, float*, int),
                        void (*grad)(const T*, const uint32_t*, T*, int)) {
    std::mt19937 rng(13 + v);
    const std::vector<T> x = random_values<T>((size_t)rows * v, rng, 4.0f);
    std::vector<uint32_t> targets(rows);
    for (int r = 0; r < rows; ++r) targets[r] = r % 3 == 1 ? NO_TARGET : (uint32_t)((r * 7919) % v);
    std::vector<float> loss = unwritten<float>(rows);
    std::vector<T> d = unwritten<T>((size_t)rows * v);
    const unsigned threads = v >= 1024 ? 256 : 128;
    emu::launch({(unsigned)rows, 1, 1}, {threads, 1, 1}, [&] { nll(x.data(), targets.data(), loss.data(), v); });
    emu::launch({(unsigned)rows, 1, 1}, {threads, 1, 1}, [&] { grad(x.data(), targets.data(), d.data(), v); });
    std::vector<double> want_loss(rows, 0.0), want_d((size_t)rows * v, 0.0);
    for (int r = 0; r < rows; ++r) {
        if (targets[r] == NO_TARGET) continue;
        double m = -INFINITY, z = 0;
        for (int j = 0; j < v; ++j) m = std::max(m, value(x[(size_t)r * v + j]));
        for (int j = 0; j < v; ++j) z += std::exp(value(x[(size_t)r * v + j]) - m);
        want_loss[r] = std::log(z) + m - value(x[(size_t)r * v + targets[r]]);
        for (int j = 0; j < v; ++j)
            want_d[(size_t)r * v + j] = std::exp(value(x[(size_t)r * v + j]) - m) / z - (j == (int)targets[r] ? 1.0 : 0.0);
    }
    const std::string shape = "[" + std::to_string(rows) + "," + std::to_string(v) + "] " + dtype;
    bool ok = report(("cross_entropy loss " + shape).c_str(), max_relative(loss, want_loss), 1e-5);
    ok &= report(("cross_entropy gradient " + shape).c_str(), max_relative(d, want_d), one_rounding<T>() + 1e-6);
    return ok;
}

int main() {
    bool ok = true;
    ok &= swiglu_case<float>(5, 77, "f32", swiglu_fwd_f32, swiglu_bwd_f32);
    ok &= swiglu_case<__nv_bfloat16>(3, 300, "bf16", swiglu_fwd_bf16, swiglu_bwd_bf16);
    ok &= swiglu_case<__half>(2, 64, "f16", swiglu_fwd_f16, swiglu_bwd_f16);
    ok &= cross_entropy_case<float>(6, 1500, "f32", cross_entropy_nll_f32, cross_entropy_grad_f32);
    ok &= cross_entropy_case<__nv_bfloat16>(4, 333, "bf16", cross_entropy_nll_bf16, cross_entropy_grad_bf16);
    return ok ? 0 : 1;
}
