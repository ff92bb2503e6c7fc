// cuda/flash_attention.cu run on the CPU emulator against a float64 reference: forward (output,
// log-sum-exp) and backward (dq, dk, dv) at head dims that need padding and lengths that are not
// multiples of the tiles, with causal, sliding-window, packed-document and left-padding masks.
// Exit status 1 when a case is out of tolerance. Built and run by scripts/emulate-kernels.sh.
#include "../cuda/flash_attention.cu"
#include "check.h"

#include <cstdio>
#include <random>
#include <string>

struct Case {
    int b, h, t, d;
    bool left_pad;
    // Causal only, bias 0 where allowed (every tile TILE_PLAIN); otherwise a sliding window, a
    // document boundary and small nonzero biases.
    bool plain = false;
};

template <typename T> struct Kernels {
    void (*fwd)(const T*, const T*, const T*, const float*, const uint8_t*, T*, float*, int, int, int, int, float);
    void (*bwd)(const T*, const T*, const T*, const float*, const uint8_t*, const T*, const float*, const float*,
                float*, T*, T*, int, int, int, int, float);
    void (*delta)(const T*, const T*, float*, int, int, int, int64_t);
};

static std::vector<float> bias_for(const Case& c) {
    std::vector<float> bias((size_t)c.b * c.t * c.t);
    for (int row = 0; row < c.b; ++row)
        for (int i = 0; i < c.t; ++i)
            for (int j = 0; j < c.t; ++j) {
                const bool window = c.plain || row != 0 || i - j < 50;
                const bool same_doc = c.plain || row == 0 || (i < 37) == (j < 37);
                const bool padded = c.left_pad && row == 1 && j < 3;
                const bool ok = j <= i && window && same_doc && !padded;
                const float value = c.plain ? 0.0f : 0.01f * ((i + 2 * j) % 7);
                bias[((size_t)row * c.t + i) * c.t + j] = ok ? value : -FLT_MAX;
            }
    return bias;
}

template <typename T> static double rel_l2(const std::vector<double>& want, const std::vector<float>& got) {
    double num = 0, den = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        if (std::isnan(got[i])) return INFINITY;
        num += (got[i] - want[i]) * (got[i] - want[i]);
        den += want[i] * want[i];
    }
    return std::sqrt(num / (den > 0 ? den : 1e-300));
}

template <typename T> static bool run_case(const Case& c, const Kernels<T>& k, double out_tol, double grad_tol,
                                           const char* dtype) {
    const int b = c.b, h = c.h, t = c.t, d = c.d;
    const size_t n = (size_t)b * h * t * d;
    std::mt19937 rng(1234 + t + d);
    std::normal_distribution<float> normal;
    auto randoms = [&](size_t count) {
        std::vector<T> v(count);
        for (auto& x : v) x = from_f32<T>(normal(rng));
        return v;
    };
    const std::vector<T> q = randoms(n), kk = randoms(n), v = randoms(n), dout = randoms(n);
    const std::vector<float> bias = bias_for(c);
    const float scale = 1.0f / std::sqrt((float)d);
    // Outputs start as NaN (dq_acc as the zeros the caller provides): an unwritten element shows.
    std::vector<T> out = unwritten<T>(n), dk = unwritten<T>(n), dv = unwritten<T>(n);
    std::vector<float> lse = unwritten<float>((size_t)b * h * t), delta = unwritten<float>((size_t)b * h * t);
    std::vector<float> dq(n, 0.0f);

    const int blocks = (t + 63) / 64;
    std::vector<uint8_t> kinds((size_t)b * blocks * blocks, 255);
    emu::launch({(unsigned)blocks, (unsigned)blocks, (unsigned)b}, {256, 1, 1},
                [&] { flash_attention_tile_kinds(bias.data(), kinds.data(), t); });
    int counts[3] = {0, 0, 0};
    for (int bi = 0; bi < b; ++bi)
        for (int qb = 0; qb < blocks; ++qb)
            for (int kb = 0; kb <= qb; ++kb) counts[kinds[((size_t)bi * blocks + qb) * blocks + kb]]++;
    emu::launch({(unsigned)(b * h), (unsigned)blocks, 1}, {128, 1, 1}, [&] {
        k.fwd(q.data(), kk.data(), v.data(), bias.data(), kinds.data(), out.data(), lse.data(), h, t, d, 1, scale);
    });
    const int64_t rows = (int64_t)b * t * h;
    emu::launch({(unsigned)((rows + 7) / 8), 1, 1}, {256, 1, 1},
                [&] { k.delta(out.data(), dout.data(), delta.data(), h, t, d, rows); });
    emu::launch({(unsigned)(b * h), (unsigned)blocks, 1}, {128, 1, 1}, [&] {
        k.bwd(q.data(), kk.data(), v.data(), bias.data(), kinds.data(), dout.data(), lse.data(), delta.data(),
              dq.data(), dk.data(), dv.data(), h, t, d, 1, scale);
    });

    // The float64 reference on the same (rounded) inputs.
    auto f = [](T x) { return (double)to_f32(x); };
    std::vector<double> r_out(n, 0.0), r_lse((size_t)b * h * t, INFINITY), r_dq(n, 0.0), r_dk(n, 0.0), r_dv(n, 0.0);
    for (int bi = 0; bi < b; ++bi)
        for (int hi = 0; hi < h; ++hi) {
            const size_t head = ((size_t)bi * h + hi) * t * d;
            for (int i = 0; i < t; ++i) {
                std::vector<double> x(t, -INFINITY);
                double m = -INFINITY;
                for (int j = 0; j <= i; ++j) {
                    const float bv = bias[((size_t)bi * t + i) * t + j];
                    if (bv <= -1e30f) continue;
                    double dot = 0;
                    for (int col = 0; col < d; ++col) dot += f(q[head + i * d + col]) * f(kk[head + j * d + col]);
                    x[j] = dot * scale + bv;
                    m = std::max(m, x[j]);
                }
                if (m == -INFINITY) continue;
                double z = 0;
                for (int j = 0; j < t; ++j) z += std::exp(x[j] - m);
                const size_t orow = (((size_t)bi * t + i) * h + hi) * d;
                for (int j = 0; j < t; ++j) {
                    const double p = std::exp(x[j] - m) / z;
                    for (int col = 0; col < d; ++col) r_out[orow + col] += p * f(v[head + j * d + col]);
                }
                r_lse[((size_t)bi * h + hi) * t + i] = m + std::log(z);
                double dl = 0;
                for (int col = 0; col < d; ++col) dl += f(dout[orow + col]) * r_out[orow + col];
                for (int j = 0; j < t; ++j) {
                    const double p = std::exp(x[j] - m) / z;
                    if (p == 0) continue;
                    double dp = 0;
                    for (int col = 0; col < d; ++col) dp += f(dout[orow + col]) * f(v[head + j * d + col]);
                    const double ds = p * (dp - dl) * scale;
                    for (int col = 0; col < d; ++col) {
                        r_dv[head + j * d + col] += p * f(dout[orow + col]);
                        r_dq[head + i * d + col] += ds * f(kk[head + j * d + col]);
                        r_dk[head + j * d + col] += ds * f(q[head + i * d + col]);
                    }
                }
            }
        }

    auto as_float = [&](const std::vector<T>& x) {
        std::vector<float> y(x.size());
        for (size_t i = 0; i < x.size(); ++i) y[i] = to_f32(x[i]);
        return y;
    };
    double out_err = 0, out_max = 0, lse_err = 0;
    const std::vector<float> got_out = as_float(out);
    for (size_t i = 0; i < n; ++i) {
        if (std::isnan(got_out[i])) out_err = INFINITY;
        out_err = std::max(out_err, std::abs(got_out[i] - r_out[i]));
        out_max = std::max(out_max, std::abs(r_out[i]));
    }
    bool lse_ok = true;
    for (size_t i = 0; i < lse.size(); ++i) {
        if (std::isnan(lse[i])) {
            lse_ok = false;
        } else if (std::isinf(r_lse[i])) {
            lse_ok &= std::isinf(lse[i]) && lse[i] > 0;
        } else {
            lse_err = std::max(lse_err, std::abs(lse[i] - r_lse[i]));
        }
    }
    const double e_out = out_err / out_max, e_dq = rel_l2<T>(r_dq, dq), e_dk = rel_l2<T>(r_dk, as_float(dk)),
                 e_dv = rel_l2<T>(r_dv, as_float(dv));
    const bool ok = lse_ok && e_out <= out_tol && lse_err <= 1e-3 && e_dq <= grad_tol && e_dk <= grad_tol &&
                    e_dv <= grad_tol;
    std::printf("flash_attention [%d,%d,%d,%d]%s%s %s (tiles skipped/plain/biased %d/%d/%d): out %.2e, lse %.2e%s, "
                "dq %.2e, dk %.2e, dv %.2e  %s\n",
                b, h, t, d, c.left_pad ? " left-padded" : "", c.plain ? " causal" : "", dtype, counts[0], counts[1],
                counts[2], e_out, lse_err, lse_ok ? "" : " (masked rows wrong)", e_dq, e_dk, e_dv, ok ? "ok" : "FAILED");
    return ok;
}

#define KERNELS(NAME, D)                                                                                   \
    Kernels<decltype(type_of_##NAME)> {                                                                    \
        flash_attention_fwd_d##D##_##NAME, flash_attention_bwd_d##D##_##NAME, flash_attention_bwd_delta_##NAME \
    }
static __nv_bfloat16 type_of_bf16;
static __half type_of_f16;

int main() {
    bool ok = true;
    // (b, h, t, d, left padding): the head dim picks the instantiation (d <= 32, 64, 96, 128).
    ok &= run_case<__nv_bfloat16>({1, 1, 130, 96, false}, KERNELS(bf16, 96), 1e-2, 2e-2, "bf16");
    ok &= run_case<__nv_bfloat16>({2, 2, 77, 40, true}, KERNELS(bf16, 64), 1e-2, 2e-2, "bf16");
    ok &= run_case<__nv_bfloat16>({1, 1, 65, 128, false}, KERNELS(bf16, 128), 1e-2, 2e-2, "bf16");
    ok &= run_case<__nv_bfloat16>({1, 2, 33, 20, false}, KERNELS(bf16, 32), 1e-2, 2e-2, "bf16");
    ok &= run_case<__half>({2, 1, 100, 64, true}, KERNELS(f16, 64), 2e-3, 5e-3, "f16");
    ok &= run_case<__half>({1, 1, 1, 96, false}, KERNELS(f16, 96), 2e-3, 5e-3, "f16");
    ok &= run_case<__nv_bfloat16>({2, 2, 150, 96, false, true}, KERNELS(bf16, 96), 1e-2, 2e-2, "bf16");
    ok &= run_case<__nv_bfloat16>({2, 1, 200, 64, true}, KERNELS(bf16, 64), 1e-2, 2e-2, "bf16");
    return ok ? 0 : 1;
}
