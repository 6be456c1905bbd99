// Tensors as the CPU kernels see them: raw addresses from the Python launchers (no libtorch), a dtype
// code and strides in elements. Shared by advantages.cpp, logits.cpp and policy_loss.cpp.
//   - (The dtype codes are those of codes.h.)
//   - Scalar conversions between float and the 16-bit float formats (IEEE half, bfloat16) held as raw
//     uint16_t bits. They are branch-light and inline, so the compiler can vectorise the loops that convert
//     a block of elements. float16 -> float and bfloat16 -> float are exact; float -> 16 bits rounds to
//     nearest even, overflow gives inf and NaN stays NaN (quiet).
//   - The element types Half and BFloat16 (the raw bits), value() (an element as float, double for double)
//     and assign() (store into an element, rounded as above), and Compute<E>, the type a kernel computes in
//     for elements E: double for float64, float otherwise.
//   - Operand: a [B, T] tensor (or [B] with token stride 0, or [B, T, V] with unit stride on V) of any dtype.

#pragma once

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "codes.h"

namespace moo {

// The dtype codes (kFloat16, ...) are those of codes.h, shared with moo_kernels/_codes.py.

// ---- 16-bit float formats ------------------------------------------------------------------------------

inline float float_from_bits(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline uint32_t bits_of(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
}

inline float bfloat16_to_float(uint16_t h) { return float_from_bits(static_cast<uint32_t>(h) << 16); }

inline float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));  // inf, nan
    return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));          // rebias 15 -> 127
}

inline uint16_t float_to_bfloat16(float f) {
    const uint32_t bits = bits_of(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet nan
    return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline uint16_t float_to_half(float f) {
    const uint32_t bits = bits_of(f);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) {  // inf stays inf, nan stays (quiet) nan
        return static_cast<uint16_t>(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u));
    }
    if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (magnitude < 0x38800000u) {  // below 2^-14, a half subnormal: adding 0.5 rounds to a multiple of 2^-24
        const float rounded = float_from_bits(magnitude) + 0.5f;
        return static_cast<uint16_t>(sign | (bits_of(rounded) - 0x3f000000u));
    }
    // rebias the exponent 127 -> 15 and round the 13 dropped mantissa bits to nearest even
    const uint32_t odd = (magnitude >> 13) & 1u;
    return static_cast<uint16_t>(sign | ((magnitude - 0x38000000u + 0xfffu + odd) >> 13));
}

// ---- element types -------------------------------------------------------------------------------------

struct Half {
    uint16_t bits;
};
struct BFloat16 {
    uint16_t bits;
};

inline float value(Half h) { return half_to_float(h.bits); }
inline float value(BFloat16 h) { return bfloat16_to_float(h.bits); }
inline float value(float x) { return x; }
inline double value(double x) { return x; }
inline float value(uint8_t x) { return x; }  // a bool byte, 0 or 1

inline void assign(Half& dst, float g) { dst.bits = float_to_half(g); }
inline void assign(BFloat16& dst, float g) { dst.bits = float_to_bfloat16(g); }
inline void assign(float& dst, float g) { dst = g; }
inline void assign(double& dst, double g) { dst = g; }

template <typename E>
using Compute = std::conditional_t<std::is_same_v<E, double>, double, float>;

// ---- operands ------------------------------------------------------------------------------------------

// A tensor of the dtype code with strides in elements over its first two dimensions: [B, T], [B] with
// token stride 0, or the [B, T, V] logits / gradient with unit stride on V.
struct Operand {
    const void* ptr = nullptr;
    int dtype = kFloat32;
    int64_t sb = 0, st = 0;
};

}  // namespace moo
