// cuda/rms_norm.cu on the CPU emulator against float64 references: the norm, the residual join
// fused into it ([x + y | norm(x + y)]), and the input gradient with and without the other
// branch's gradient added, with block-wide sums over rows longer and shorter than a block.
#include "../cuda/rms_norm.cu"
#include "check.h"

#include <string>

template <typename T> struct Norms {
    void (*fwd)(const T*, const T*, T*, int, float);
    void (*bwd)(const T*, const T*, const T*, T*, int, float);
    void (*bwd_add)(const T*, const T*, const T*, const T*, T*, int, float);
    void (*add_fwd)(const T*, const T*, const T*, T*, int, float);
};

template <typename T> bool run_case(int rows, int h, const char* dtype, const Norms<T>& k) {
    std::mt19937 rng(5 + h);
    const float eps = 1e-5f;
    const size_t n = (size_t)rows * h;
    const std::vector<T> x = random_values<T>(n, rng, 2.0f), y = random_values<T>(n, rng), g = random_values<T>(n, rng);
    const std::vector<T> res = random_values<T>(n, rng);
    std::vector<T> w = random_values<T>(h, rng, 0.2f);
    for (auto& v : w) v = from_f32<T>(to_f32(v) + 1.0f);
    const unsigned threads = h >= 1024 ? 256 : 128;  // launch::per_row
    auto round = [](double v) { return value(from_f32<T>((float)v)); };
    auto inv_rms = [&](const std::vector<double>& row) {
        double ss = 0;
        for (double v : row) ss += v * v;
        return 1.0 / std::sqrt(ss / h + eps);
    };
    const std::string shape = "[" + std::to_string(rows) + "," + std::to_string(h) + "] " + dtype;
    bool ok = true;
    const double tol = 2 * one_rounding<T>() + 1e-5;

    std::vector<T> out = unwritten<T>(n);
    emu::launch({(unsigned)rows, 1, 1}, {threads, 1, 1}, [&] { k.fwd(x.data(), w.data(), out.data(), h, eps); });
    std::vector<double> want(n);
    for (int r = 0; r < rows; ++r) {
        std::vector<double> row(h);
        for (int j = 0; j < h; ++j) row[j] = value(x[(size_t)r * h + j]);
        const double inv = inv_rms(row);
        for (int j = 0; j < h; ++j) want[(size_t)r * h + j] = value(w[j]) * round(row[j] * inv);
    }
    ok &= report(("rms_norm forward " + shape).c_str(), max_relative(out, want), tol);

    // Joined: [s | norm(s)] with s = x + y rounded to T.
    std::vector<T> joined = unwritten<T>(2 * n);
    emu::launch({(unsigned)rows, 1, 1}, {threads, 1, 1}, [&] { k.add_fwd(x.data(), y.data(), w.data(), joined.data(), h, eps); });
    std::vector<double> want_joined(2 * n);
    for (int r = 0; r < rows; ++r) {
        std::vector<double> row(h);
        for (int j = 0; j < h; ++j) row[j] = round(value(x[(size_t)r * h + j]) + value(y[(size_t)r * h + j]));
        const double inv = inv_rms(row);
        for (int j = 0; j < h; ++j) {
            want_joined[(size_t)r * h + j] = row[j];
            want_joined[n + (size_t)r * h + j] = value(w[j]) * round(row[j] * inv);
        }
    }
    ok &= report(("rms_norm joined with the residual add " + shape).c_str(), max_relative(joined, want_joined), tol);

    // Gradient: d/dx of sum_j g_j w_j x_j r(x), r = (mean(x^2) + eps)^-1/2, with and without res added.
    std::vector<T> dx = unwritten<T>(n), dx_add = unwritten<T>(n);
    emu::launch({(unsigned)rows, 1, 1}, {threads, 1, 1}, [&] { k.bwd(x.data(), g.data(), w.data(), dx.data(), h, eps); });
    emu::launch({(unsigned)rows, 1, 1}, {threads, 1, 1},
                [&] { k.bwd_add(x.data(), g.data(), w.data(), res.data(), dx_add.data(), h, eps); });
    std::vector<double> grad(n), grad_add(n);
    for (int r = 0; r < rows; ++r) {
        std::vector<double> row(h);
        for (int j = 0; j < h; ++j) row[j] = value(x[(size_t)r * h + j]);
        const double inv = inv_rms(row);
        double dot = 0;  // sum_j g_j w_j x_j
        for (int j = 0; j < h; ++j) dot += value(g[(size_t)r * h + j]) * value(w[j]) * row[j];
        for (int j = 0; j < h; ++j) {
            // d r / d x_i = -r^3 x_i / h
            const double d = value(g[(size_t)r * h + j]) * value(w[j]) * inv - dot * inv * inv * inv * row[j] / h;
            grad[(size_t)r * h + j] = d;
            grad_add[(size_t)r * h + j] = round(d) + value(res[(size_t)r * h + j]);
        }
    }
    ok &= report(("rms_norm gradient " + shape).c_str(), max_relative(dx, grad), tol);
    ok &= report(("rms_norm gradient + residual " + shape).c_str(), max_relative(dx_add, grad_add), tol);
    return ok;
}

int main() {
    bool ok = true;
    ok &= run_case<float>(3, 37, "f32", {rms_norm_fwd_f32, rms_norm_bwd_f32, rms_norm_bwd_add_f32, rms_norm_add_fwd_f32});
    ok &= run_case<__nv_bfloat16>(2, 1100, "bf16",
                                  {rms_norm_fwd_bf16, rms_norm_bwd_bf16, rms_norm_bwd_add_bf16, rms_norm_add_fwd_bf16});
    ok &= run_case<__half>(4, 96, "f16", {rms_norm_fwd_f16, rms_norm_bwd_f16, rms_norm_bwd_add_f16, rms_norm_add_fwd_f16});
    return ok ? 0 : 1;
}
