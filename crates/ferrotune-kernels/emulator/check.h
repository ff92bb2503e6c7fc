// Helpers of the emulator checks: random inputs stored as T, and the error of a result against a
// float64 reference, relative to the reference's largest magnitude.
#pragma once
#include <cstdio>
#include <random>
#include <vector>

template <typename T> std::vector<T> random_values(size_t n, std::mt19937& rng, float scale = 1.0f) {
    std::normal_distribution<float> normal(0.0f, scale);
    std::vector<T> v(n);
    for (auto& x : v) x = from_f32<T>(normal(rng));
    return v;
}

template <typename T> double value(T x) { return (double)to_f32(x); }

// An output buffer filled with NaN, so that an element the kernel never writes shows.
template <typename T> std::vector<T> unwritten(size_t n) { return std::vector<T>(n, from_f32<T>(NAN)); }

// max |got - want| / max |want|.
template <typename T> double max_relative(const std::vector<T>& got, const std::vector<double>& want) {
    double err = 0, scale = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        if (std::isnan(value(got[i]))) return INFINITY;  // never written (outputs start as NaN)
        err = std::max(err, std::abs(value(got[i]) - want[i]));
        scale = std::max(scale, std::abs(want[i]));
    }
    return err / (scale > 0 ? scale : 1.0);
}

// The tolerance for one rounding to T (relative to the largest value): a unit in the last place.
template <typename T> double one_rounding();
template <> inline double one_rounding<float>() { return 1e-6; }
template <> inline double one_rounding<__nv_bfloat16>() { return 1.0 / 128; }
template <> inline double one_rounding<__half>() { return 1.0 / 1024; }

inline bool report(const char* what, double err, double tol) {
    const bool ok = err <= tol;
    std::printf("%s: %.2e (tolerance %.1e)  %s\n", what, err, tol, ok ? "ok" : "FAILED");
    return ok;
}
