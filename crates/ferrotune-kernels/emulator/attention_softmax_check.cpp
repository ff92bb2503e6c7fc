// cuda/attention_softmax.cu on the CPU emulator against float64 references: the scaled, biased
// softmax over score rows (batched and shared bias, masked entries, rows longer than a block) and
// its backward.
#include "../cuda/attention_softmax.cu"
#include "check.h"

#include <string>

template <typename T>
bool run_case(int b, int heads, int tq, int tk, const char* dtype, void (*fwd)(const T*, const float*, T*, int, int, int, int, float),
              void (*bwd)(const T*, const T*, T*, int, float)) {
    std::mt19937 rng(3 + tk);
    const size_t rows = (size_t)b * heads * tq, n = rows * tk;
    const std::vector<T> s = random_values<T>(n, rng, 3.0f), g = random_values<T>(n, rng);
    std::vector<float> bias((size_t)b * tq * tk);
    for (size_t i = 0; i < bias.size(); ++i) bias[i] = (i % 7 == 2) ? -FLT_MAX : 0.05f * (float)(i % 3);
    const float scale = 0.3f;
    std::vector<T> y = unwritten<T>(n), dx = unwritten<T>(n);
    const unsigned threads = tk >= 1024 ? 256 : 128;
    emu::launch({(unsigned)rows, 1, 1}, {threads, 1, 1}, [&] { fwd(s.data(), bias.data(), y.data(), heads, tq, tk, 1, scale); });
    emu::launch({(unsigned)rows, 1, 1}, {threads, 1, 1}, [&] { bwd(y.data(), g.data(), dx.data(), tk, scale); });
    std::vector<double> want(n), grad(n);
    for (size_t r = 0; r < rows; ++r) {
        const size_t q = r % tq, bi = r / ((size_t)tq * heads);
        double m = -INFINITY;
        std::vector<double> x(tk);
        for (int j = 0; j < tk; ++j) {
            x[j] = value(s[r * tk + j]) * scale + bias[(bi * tq + q) * tk + j];
            m = std::max(m, x[j]);
        }
        double z = 0;
        for (int j = 0; j < tk; ++j) z += std::exp(x[j] - m);
        double dot = 0;  // the backward reads the stored (rounded) probabilities
        for (int j = 0; j < tk; ++j) {
            want[r * tk + j] = std::exp(x[j] - m) / z;
            dot += value(g[r * tk + j]) * value(y[r * tk + j]);
        }
        for (int j = 0; j < tk; ++j) grad[r * tk + j] = scale * value(y[r * tk + j]) * (value(g[r * tk + j]) - dot);
    }
    const std::string shape = "[" + std::to_string(b) + "," + std::to_string(heads) + "," + std::to_string(tq) + "," +
                              std::to_string(tk) + "] " + dtype;
    bool ok = report(("attention_softmax forward " + shape).c_str(), max_relative(y, want), one_rounding<T>() + 1e-6);
    ok &= report(("attention_softmax backward " + shape).c_str(), max_relative(dx, grad), 2 * one_rounding<T>() + 1e-5);
    return ok;
}

int main() {
    bool ok = true;
    ok &= run_case<float>(2, 3, 5, 37, "f32", attention_softmax_fwd_f32, attention_softmax_bwd_f32);
    ok &= run_case<__nv_bfloat16>(1, 2, 3, 1100, "bf16", attention_softmax_fwd_bf16, attention_softmax_bwd_bf16);
    ok &= run_case<__half>(1, 1, 4, 129, "f16", attention_softmax_fwd_f16, attention_softmax_bwd_f16);
    return ok ? 0 : 1;
}
