// cuda/decode_attention.cu on the CPU emulator against a float64 reference: keys and values read
// from strided cache views (a narrow of a longer buffer), grouped-query heads, a batched bias,
// head dims that are not multiples of 32, in f32, bf16 and f16.
#include "../cuda/decode_attention.cu"
#include "check.h"

#include <string>

template <typename T>
bool run_case(int b, int heads, int kv, int tq, int t, int d, const char* dtype,
              void (*kernel)(const T*, const T*, const T*, const float*, T*, int, int, int, int, int, int64_t,
                             int64_t, int64_t, int64_t, int, float)) {
    std::mt19937 rng(7 + t + d);
    const int cap = t + 5;  // the cache buffer is longer than what is filled
    const std::vector<T> q = random_values<T>((size_t)b * heads * tq * d, rng);
    const std::vector<T> kbuf = random_values<T>((size_t)b * kv * cap * d, rng);
    const std::vector<T> vbuf = random_values<T>((size_t)b * kv * cap * d, rng);
    std::vector<float> bias((size_t)b * tq * t);
    for (size_t i = 0; i < bias.size(); ++i) bias[i] = (i % 11 == 3) ? -FLT_MAX : 0.1f * (float)(i % 5);
    const float scale = 1.0f / std::sqrt((float)d);
    std::vector<T> out = unwritten<T>((size_t)b * tq * heads * d);
    const int64_t k_batch = (int64_t)kv * cap * d, k_head = (int64_t)cap * d;
    emu::launch({(unsigned)(b * heads * tq), 1, 1}, {256, 1, 1}, [&] {
        kernel(q.data(), kbuf.data(), vbuf.data(), bias.data(), out.data(), heads, kv, tq, t, d, k_batch, k_head,
               k_batch, k_head, 1, scale);
    });
    std::vector<double> want(out.size());
    for (int bi = 0; bi < b; ++bi)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < tq; ++i) {
                const int kh = h / (heads / kv);
                std::vector<double> x(t);
                double m = -INFINITY;
                for (int j = 0; j < t; ++j) {
                    double dot = 0;
                    for (int c = 0; c < d; ++c)
                        dot += value(q[(((size_t)bi * heads + h) * tq + i) * d + c]) *
                               value(kbuf[bi * k_batch + kh * k_head + (size_t)j * d + c]);
                    x[j] = dot * scale + bias[((size_t)bi * tq + i) * t + j];
                    m = std::max(m, x[j]);
                }
                double z = 0;
                for (int j = 0; j < t; ++j) z += std::exp(x[j] - m);
                for (int c = 0; c < d; ++c) {
                    double y = 0;
                    for (int j = 0; j < t; ++j)
                        y += std::exp(x[j] - m) / z * value(vbuf[bi * k_batch + kh * k_head + (size_t)j * d + c]);
                    want[(((size_t)bi * tq + i) * heads + h) * d + c] = y;
                }
            }
    const std::string what = "decode_attention [" + std::to_string(b) + "," + std::to_string(heads) + "/" +
                             std::to_string(kv) + "," + std::to_string(tq) + "," + std::to_string(t) + "," +
                             std::to_string(d) + "] " + dtype;
    return report(what.c_str(), max_relative(out, want), 2 * one_rounding<T>() + 1e-5);
}

int main() {
    bool ok = true;
    ok &= run_case<float>(1, 4, 4, 1, 70, 96, "f32", decode_attention_f32);
    ok &= run_case<float>(2, 6, 2, 3, 33, 40, "f32", decode_attention_f32);
    ok &= run_case<__nv_bfloat16>(2, 4, 1, 5, 100, 64, "bf16", decode_attention_bf16);
    ok &= run_case<__half>(1, 2, 2, 16, 20, 256, "f16", decode_attention_f16);
    return ok ? 0 : 1;
}
