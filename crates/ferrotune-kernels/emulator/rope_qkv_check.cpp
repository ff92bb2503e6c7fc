// cuda/rope_qkv.cu on the CPU emulator: the split of the fused projection into rotated q and k
// and a copied v (with the products rounded to T as transformers rounds them), and the adjoint,
// against a reference written from the rotation's definition, for MHA and GQA shapes.
#include "../cuda/rope_qkv.cu"
#include "check.h"

#include <string>

template <typename T>
bool run_case(int b, int t, int nh, int nkv, int d, const char* dtype,
              void (*fwd)(const T*, const T*, const T*, T*, int64_t, int, int, int, int),
              void (*bwd)(const T*, const T*, const T*, const T*, const T*, T*, int64_t, int, int, int, int)) {
    std::mt19937 rng(11 + t + d);
    const int heads = nh + 2 * nkv, half = d / 2;
    const int64_t n = (int64_t)b * t * heads * d;
    const std::vector<T> qkv = random_values<T>(n, rng);
    const std::vector<T> cos = random_values<T>((size_t)b * t * d, rng), sin = random_values<T>((size_t)b * t * d, rng);
    std::vector<T> split = unwritten<T>(n);
    const unsigned blocks = (unsigned)std::min<int64_t>((n + 255) / 256, 4);  // grid-stride: few blocks
    emu::launch({blocks, 1, 1}, {256, 1, 1}, [&] { fwd(qkv.data(), cos.data(), sin.data(), split.data(), n, nh, nkv, t, d); });
    auto round = [](double x) { return value(from_f32<T>((float)x)); };
    // Reference: for head hd of kind (q: hd < nh, k, v) at position p, element j.
    std::vector<double> want(n);
    const int64_t q_size = (int64_t)b * nh * t * d, kv_size = (int64_t)b * nkv * t * d;
    auto split_at = [&](int bi, int hd, int p, int j) -> int64_t {
        if (hd < nh) return (((int64_t)bi * nh + hd) * t + p) * d + j;
        if (hd < nh + nkv) return q_size + (((int64_t)bi * nkv + hd - nh) * t + p) * d + j;
        return q_size + kv_size + (((int64_t)bi * nkv + hd - nh - nkv) * t + p) * d + j;
    };
    for (int bi = 0; bi < b; ++bi)
        for (int p = 0; p < t; ++p)
            for (int hd = 0; hd < heads; ++hd)
                for (int j = 0; j < d; ++j) {
                    const T* row = &qkv[(((int64_t)bi * t + p) * heads + hd) * d];
                    double y = value(row[j]);
                    if (hd < nh + nkv) {
                        const double c = value(cos[((size_t)bi * t + p) * d + j]), s = value(sin[((size_t)bi * t + p) * d + j]);
                        const double rot = j < half ? -value(row[j + half]) : value(row[j - half]);
                        y = round(y * c) + round(rot * s);
                    }
                    want[split_at(bi, hd, p, j)] = round(y);
                }
    const std::string shape = "[" + std::to_string(b) + "," + std::to_string(t) + "," + std::to_string(nh) + "/" +
                              std::to_string(nkv) + "," + std::to_string(d) + "] " + dtype;
    bool ok = report(("rope_qkv forward " + shape).c_str(), max_relative(split, want), 1e-6);

    // Adjoint: dy in the split layout; dx_i = dy_i c_i + (i < half ? dy_{i+half} s_{i+half} : -dy_{i-half} s_{i-half}),
    // accumulated here from the rotation's partial derivatives, term by term.
    const std::vector<T> dy = random_values<T>(n, rng);
    std::vector<T> dx = unwritten<T>(n);
    emu::launch({blocks, 1, 1}, {256, 1, 1}, [&] {
        bwd(dy.data(), dy.data() + q_size, dy.data() + q_size + kv_size, cos.data(), sin.data(), dx.data(), n, nh, nkv, t, d);
    });
    std::vector<double> grad(n, 0.0);
    for (int bi = 0; bi < b; ++bi)
        for (int p = 0; p < t; ++p)
            for (int hd = 0; hd < heads; ++hd) {
                const int64_t base = (((int64_t)bi * t + p) * heads + hd) * d;
                for (int j = 0; j < d; ++j) {
                    const double g = value(dy[split_at(bi, hd, p, j)]);
                    if (hd >= nh + nkv) {
                        grad[base + j] += g;
                        continue;
                    }
                    const double c = value(cos[((size_t)bi * t + p) * d + j]), s = value(sin[((size_t)bi * t + p) * d + j]);
                    grad[base + j] += g * c;  // y_j = x_j c_j + rot_j s_j
                    if (j < half) grad[base + j + half] -= g * s;  // rot_j = -x_{j+half}
                    else grad[base + j - half] += g * s;           // rot_j = x_{j-half}
                }
            }
    ok &= report(("rope_qkv adjoint " + shape).c_str(), max_relative(dx, grad), one_rounding<T>() + 1e-6);
    return ok;
}

// rope_qkv_cache: the same values as the split forward, q in its own buffer and k, v written into
// longer cache buffers at columns start.. (the other columns untouched).
template <typename T>
bool cache_case(int b, int t, int nh, int nkv, int d, int cap, int start, const char* dtype,
                void (*fwd)(const T*, const T*, const T*, T*, int64_t, int, int, int, int),
                void (*cache)(const T*, const T*, const T*, T*, T*, T*, int64_t, int, int, int, int, int, int)) {
    std::mt19937 rng(17 + t + d);
    const int heads = nh + 2 * nkv;
    const int64_t n = (int64_t)b * t * heads * d;
    const std::vector<T> qkv = random_values<T>(n, rng);
    const std::vector<T> cos = random_values<T>((size_t)b * t * d, rng), sin = random_values<T>((size_t)b * t * d, rng);
    std::vector<T> split = unwritten<T>(n), q = unwritten<T>((size_t)b * nh * t * d);
    std::vector<T> kc = random_values<T>((size_t)b * nkv * cap * d, rng), vc = random_values<T>((size_t)b * nkv * cap * d, rng);
    const std::vector<T> kc0 = kc, vc0 = vc;
    emu::launch({2, 1, 1}, {256, 1, 1}, [&] { fwd(qkv.data(), cos.data(), sin.data(), split.data(), n, nh, nkv, t, d); });
    emu::launch({2, 1, 1}, {256, 1, 1}, [&] {
        cache(qkv.data(), cos.data(), sin.data(), q.data(), kc.data(), vc.data(), n, nh, nkv, t, d, cap, start);
    });
    // Expected: q = the split's first part; the caches = their old contents with the split's k
    // and v in columns start..start + t.
    const int64_t q_size = (int64_t)b * nh * t * d, kv_size = (int64_t)b * nkv * t * d;
    std::vector<double> want_q(q.size()), want_k(kc.size()), want_v(vc.size());
    for (size_t i = 0; i < q.size(); ++i) want_q[i] = value(split[i]);
    for (size_t i = 0; i < kc.size(); ++i) {
        want_k[i] = value(kc0[i]);
        want_v[i] = value(vc0[i]);
    }
    for (int bi = 0; bi < b; ++bi)
        for (int h = 0; h < nkv; ++h)
            for (int p = 0; p < t; ++p)
                for (int j = 0; j < d; ++j) {
                    const int64_t from = (((int64_t)bi * nkv + h) * t + p) * d + j;
                    const int64_t to = (((int64_t)bi * nkv + h) * cap + start + p) * d + j;
                    want_k[to] = value(split[q_size + from]);
                    want_v[to] = value(split[q_size + kv_size + from]);
                }
    const std::string shape = "[" + std::to_string(b) + "," + std::to_string(t) + "," + std::to_string(nh) + "/" +
                              std::to_string(nkv) + "," + std::to_string(d) + "] into " + std::to_string(cap) +
                              " columns at " + std::to_string(start) + " " + dtype;
    bool ok = report(("rope_qkv_cache q " + shape).c_str(), max_relative(q, want_q), 0.0);
    ok &= report(("rope_qkv_cache keys " + shape).c_str(), max_relative(kc, want_k), 0.0);
    ok &= report(("rope_qkv_cache values " + shape).c_str(), max_relative(vc, want_v), 0.0);
    return ok;
}

int main() {
    bool ok = true;
    ok &= run_case<float>(2, 5, 4, 4, 16, "f32", rope_qkv_fwd_f32, rope_qkv_bwd_f32);
    ok &= run_case<__nv_bfloat16>(1, 7, 6, 2, 24, "bf16", rope_qkv_fwd_bf16, rope_qkv_bwd_bf16);
    ok &= run_case<__half>(3, 3, 2, 1, 8, "f16", rope_qkv_fwd_f16, rope_qkv_bwd_f16);
    ok &= cache_case<float>(2, 1, 4, 2, 16, 9, 5, "f32", rope_qkv_fwd_f32, rope_qkv_cache_f32);
    ok &= cache_case<__nv_bfloat16>(3, 3, 6, 6, 24, 40, 37, "bf16", rope_qkv_fwd_bf16, rope_qkv_cache_bf16);
    return ok ? 0 : 1;
}
