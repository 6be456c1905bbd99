// What the lane-structured CPU kernels (advantages.cpp, logits.cpp, policy_loss.cpp) share to get SIMD code
// with fixed arithmetic: their loops run over rows of independent lanes, which the compiler vectorises
// without reassociating anything (no -ffast-math; no FMA contraction: setup.py passes -ffp-contract=off,
// which GCC's C++ mode does not imply), so the results have the same bits whatever the instruction set or
// the number of threads.
//   - No trapping maths (GCC): no floating-point exception is ever enabled in these kernels, and without
//     it GCC can turn the selects of the lane loops into SIMD blends (Clang already does). No value
//     changes. It applies to the code that follows, so a kernel includes this header first.
//   - MOO_OMP: OpenMP pragmas, which vanish in a build without OpenMP (MOO_KERNELS_NO_OPENMP, macOS).
//   - MOO_SIMD_CLONES: compile a function also for AVX-512 and AVX2, the variant picked at load time where
//     the CPU has it (x86-64 glibc, GCC or Clang >= 14; Clang does not clone function templates, so a
//     template takes MOO_SIMD_CLONES_TEMPLATE, GCC only). The lanes fix the arithmetic: every variant gives
//     the same bits (python_tests/test_snapshot.py holds the C++ outputs to the bit). MOO_INLINE: the helpers are inlined into the cloned function, compiled once per variant.
//   - exp_poly / exp_lanes: a branch-free, vectorisable e^x in float (std::exp for double).

#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <cmath>
#include <cstdint>
#include <limits>

#include "dtype.h"

#ifdef _OPENMP
#define MOO_OMP(directive) _Pragma(#directive)
#else
#define MOO_OMP(directive)
#endif

#if defined(__x86_64__) && defined(__GLIBC__) && \
    ((defined(__GNUC__) && !defined(__clang__)) || (defined(__clang__) && __clang_major__ >= 14))
#define MOO_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOO_SIMD_CLONES
#endif
#if defined(__clang__)
#define MOO_SIMD_CLONES_TEMPLATE
#else
#define MOO_SIMD_CLONES_TEMPLATE MOO_SIMD_CLONES
#endif

#if defined(__GNUC__)
#define MOO_INLINE __attribute__((always_inline)) inline
#else
#define MOO_INLINE inline
#endif

namespace moo {

// e^x in float for -87 <= x <= 88 (the caller clamps or bounds x), within a few ulp and branch-free, so
// that the lane loops vectorise. Range reduction x = k ln2 + r with k the nearest integer to x / ln2 (found
// by adding and subtracting 1.5 * 2^23, which rounds to an integer held in the low mantissa bits) and ln2
// split into a short high part (k * high is exact) and the remainder, so |r| <= ln2 / 2 accurately; e^r by
// its Taylor polynomial of degree 7 (truncation below 6e-9 relative); 2^k written into the exponent field.
// At most a few ulp from the correctly rounded value (measured: 1.7 for |x| <= 20). NaN stays NaN.
inline float exp_poly(float x) {
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
    constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
    const float shifted = x * 1.44269504f + kRound;
    const float k = shifted - kRound;
    const int32_t ki = static_cast<int32_t>(bits_of(shifted)) - static_cast<int32_t>(bits_of(kRound));
    const float r = (x - k * kLn2High) - k * kLn2Low;
    float poly = 1.0f / 5040.0f;
    poly = poly * r + 1.0f / 720.0f;
    poly = poly * r + 1.0f / 120.0f;
    poly = poly * r + 1.0f / 24.0f;
    poly = poly * r + 1.0f / 6.0f;
    poly = poly * r + 0.5f;
    poly = poly * r + 1.0f;
    poly = poly * r + 1.0f;
    return poly * float_from_bits(static_cast<uint32_t>(ki + 127) << 23);
}

inline double exp_poly(double x) { return std::exp(x); }

// exp_poly over the whole line, for the softmax sums: x < -87 (e^x < 2e-38, below the smallest normal
// float) gives 0, x > 88 gives inf, NaN stays NaN.
inline float exp_lanes(float x) {
    constexpr float kMin = -87.0f, kMax = 88.0f;
    const float e = exp_poly(x < kMin ? kMin : (x > kMax ? kMax : x));
    return x < kMin ? 0.0f : (x > kMax ? std::numeric_limits<float>::infinity() : e);
}

inline double exp_lanes(double x) { return std::exp(x); }

}  // namespace moo
