// Rollout correction on the CPU (the C++ backend of moo_kernels.rollout_correction): importance weights of the
// training / inference mismatch, verl's rejection criteria and the metrics, in one sweep over each row of [B, T].
//
// Semantics: moo_kernels/ops/rollout/reference.py (every rule and metric). Notation: row b, token t, a_bt the
// active tokens (mask != 0), d_bt = old_logp - rollout_logp at active tokens (a NaN there counts 0; 0 elsewhere),
// dc = clamp(d, -20, 20). Everything is computed in double whatever the input dtypes (float16, bfloat16, float32
// or float64, any strides; the mask is read as bytes, any nonzero byte active). e^dc, the one transcendental per
// token, is exp_f64 below: a branch-free polynomial within an ulp of std::exp (a library call, which would keep
// the token loops scalar).
//   1. Rows in parallel (OpenMP). Each row is processed by one thread in one sweep over its tokens, in blocks of
//      kBlock tokens converted into local double arrays. The token loop holds only what the options need (a
//      template instance per combination, kFlag*) and is split for the vectoriser: loops over the block's tokens
//      form the values, selects included (d, dc, e^dc in one; e^dc = 1 at an inactive token, where d = 0), and
//      lane loops, of plain arithmetic and extrema, accumulate the row's sums, counts and extrema in kLanes
//      independent lanes (token i in lane i % kLanes), combined in lane order at the row's end. Per token:
//      - always: n_b (the active tokens), S_b = sum_t d and the sum of e^dc - dc - 1 (kl_k3);
//      - level "token": raw = e^dc; mode "truncate" w = clamp(raw, low, high) ("truncated" where w != raw), mode
//        "mask" w = raw inside [low, high] else 0 ("masked", also where w != raw, as raw > 0); w = 0 at inactive
//        tokens; the sums of w and w^2, the truncated or masked count, the max and min of w (over the active
//        tokens); the weights written (unless normalised later);
//      - the token_* criteria (k1 = -dc, k2 = dc^2 / 2, k3 = e^dc - 1 - dc; a criterion that is off is given
//        infinite bounds) and the output mask a AND them, written as the sweep goes, with the rejected count;
//      - with a seq_* criterion: the sums of k1 (as -sum dc), k2, k3 and the maxima of k2, k3 over the active
//        tokens.
//      At the row's end (scalar): the verdict of the seq_* criteria (sum, mean = sum / max(n_b, 1), max (0 for a
//      row without an active token); k1 kept where log lower <= statistic <= log upper, the others where
//      statistic <= upper), and a rejected row's mask rewritten all false; level "sequence": the row's raw weight
//      e^clamp(S_b, -20, 20) (std::exp, as NaN can reach it), its w by the rule above, its metrics those of n_b
//      tokens of weight w (n_b w, n_b w^2, ...), and its weights written (w at the active tokens, 0 elsewhere;
//      unless normalised later).
//      The sums of signed terms (S_b, whose error is the relative error of a sequence weight and which gives
//      kl_k1 = mean(-d), a mean near 0, as -sum_b S_b; the sum of dc, for k1) are compensated (Knuth's TwoSum,
//      which needs no comparison, so it vectorises), in each lane and across lanes and rows.
//   2. The per-row partials are reduced in row order (so the results have the same bits for any number of
//      threads, and for either SIMD clone: the lanes fix the arithmetic), then the metrics: means over the n
//      active tokens (0 when there is none), ESS = 1 / mean(v^2) with v = w_c / (mean(w_c) + 1e-8), taken as
//      sum(w_c^2) / (mean(w_c) + 1e-8)^2 / n, where w_c = clamp(w, 0, high) is w itself (0 <= w <= high by the
//      rules of both modes); rejected_seq_frac over the rows with an active token.
//   3. batch_normalize: m = the token mean of w (level "token") or the mean of the rows' weights over the rows
//      with an active token (level "sequence"); factor = m where m > 1e-8, else 1. The weights are written as
//      w / factor (in the output dtype, rounded once from double): without normalisation in the sweep, with it in
//      a last parallel pass over the rows (level "token" recomputes w from the inputs, level "sequence" writes
//      the row's weight); the metrics other than the factor are of w before the division.
// Inactive tokens contribute nothing, not even NaN or inf from their inputs (selects, not products). Within the
// token loops every value is finite (dc is; low and high are not NaN), so the extrema there need no NaN rule.
// The rejection thresholds arrive as kRejectSlots float64 values (moo_kernels/ops/rollout/spec.py, _SLOTS), NaN
// where a criterion is off.

#include "simd.h"  // first: its no-trapping-math pragma applies to what follows

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "args.h"
#include "dtype.h"

namespace py = pybind11;

namespace {

constexpr int64_t kBlock = 256;                  // tokens converted and processed together
constexpr int64_t kLanes = 8;                    // independent double accumulators of every row sum
constexpr int64_t kParallelMinTokens = 1 << 15;  // below this many tokens, threads cost more than they save
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kEssEps = 1e-8;   // verl's, in the ESS normalisation (reference.ESS_EPS)
constexpr double kNormMin = 1e-8;  // batch_normalize divides only by a mean above this (reference.NORM_MIN)
constexpr double kLim = moo::kLogRatioMax;

namespace rm = moo::rollout;
using moo::Operand;
using moo::TensorArg;

// The slots of the rejection thresholds (spec.py's _SLOTS, in REJECT_OPTIONS order): a k1 criterion has the logs
// of its lower and upper ratio bounds, the others their upper bound.
enum Slot {
    kTokenK1Lo, kTokenK1Hi, kTokenK2, kTokenK3,
    kSumK1Lo, kSumK1Hi, kSumK2, kSumK3,
    kMeanK1Lo, kMeanK1Hi, kMeanK2, kMeanK3,
    kMaxK2, kMaxK3,
    kRejectSlots  // 14, spec.REJECT_SLOTS
};  // clang-format: keep

// What the token loop computes (the template argument of sweep_row): level "token" weights, mode "truncate"
// (else "mask"; only with kFlagToken), the token_* criteria, the row statistics of the seq_* criteria.
enum Flag { kFlagToken = 1, kFlagTruncate = 2, kFlagTokenCriteria = 4, kFlagSeqStats = 8, kFlagCombinations = 16 };

// ---- arithmetic -----------------------------------------------------------------------------------------

inline uint64_t bits_of(double x) {
    uint64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return bits;
}

inline double double_from_bits(uint64_t bits) {
    double x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
}

// e^x in double for |x| <= 20 (the callers clamp), branch-free so that the block loops vectorise. Range reduction
// x = k ln2 + r with k the nearest integer to x / ln2 (found by adding and subtracting 1.5 * 2^52, which rounds to
// an integer held in the low mantissa bits) and ln2 split into a high part with 21 trailing zero bits (k * high
// is exact) and the remainder, so |r| <= ln2 / 2 accurately; e^r = 1 + (r + r^2 q(r)) with q the Taylor
// polynomial of (e^r - 1 - r) / r^2 to degree 11 (truncation below 5e-18 relative), evaluated by Estrin's scheme
// (pairs of terms, then pairs of pairs, in powers r^2, r^4, r^8: a dependency chain of 4 steps instead of Horner's
// 11, as the loop is bound by it) and added to 1 last, where the rounding of the small terms hardly shows; 2^k
// written into the exponent field. e^0 is exactly 1. Measured against std::exp over |x| <= 20: at most 1 ulp
// apart (equal in 92% of cases).
MOO_INLINE double exp_f64(double x) {
    constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
    constexpr double kLn2High = 6.93147180369123816490e-01, kLn2Low = 1.90821492927058770002e-10;
    constexpr double c2 = 1.0 / 2, c3 = 1.0 / 6, c4 = 1.0 / 24, c5 = 1.0 / 120, c6 = 1.0 / 720, c7 = 1.0 / 5040,
                     c8 = 1.0 / 40320, c9 = 1.0 / 362880, c10 = 1.0 / 3628800, c11 = 1.0 / 39916800,
                     c12 = 1.0 / 479001600, c13 = 1.0 / 6227020800.0;
    const double shifted = x * 1.4426950408889634 + kRound;
    const double k = shifted - kRound;
    const int64_t ki = static_cast<int64_t>(bits_of(shifted) - bits_of(kRound));
    const double r = (x - k * kLn2High) - k * kLn2Low;
    const double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
    const double q23 = c2 + c3 * r, q45 = c4 + c5 * r, q67 = c6 + c7 * r, q89 = c8 + c9 * r;
    const double q1011 = c10 + c11 * r, q1213 = c12 + c13 * r;
    const double q25 = q23 + q45 * r2, q69 = q67 + q89 * r2, q1013 = q1011 + q1213 * r2;
    const double q = (q25 + q69 * r4) + q1013 * r8;  // (e^r - 1 - r) / r^2
    const double poly = 1.0 + (r + r2 * q);
    return poly * double_from_bits(static_cast<uint64_t>(ki + 1023) << 52);
}

// s + c += x, compensated (Knuth's TwoSum: the rounding error of s + x, exactly, into c; no comparison, so the
// lane loops vectorise). Once s is inf or NaN (an infinite or NaN term, or an overflow) it stays so and c turns
// NaN: the sum's value is then s, the plain sum's inf or NaN, as torch's.
MOO_INLINE void compensated_add(double& s, double& c, double x) {
    const double t = s + x, z = t - s;
    c += (s - (t - z)) + (x - z);
    s = t;
}

// A compensated sum, for the sums of signed terms whose rounding shows (see the header). Order-fixed like the
// plain sums.
struct Compensated {
    double s = 0, c = 0;
    void add(double x) { compensated_add(s, c, x); }
    void add(const Compensated& o) {
        add(o.s);
        add(std::isfinite(o.s) ? o.c : 0.0);
    }
    double value() const { return std::isfinite(s) ? s + c : s; }
};

// max / min that propagate NaN, as torch's amax / amin: once the running value is NaN it stays NaN.
inline double max_nan(double acc, double x) { return x > acc || x != x ? x : acc; }
inline double min_nan(double acc, double x) { return x < acc || x != x ? x : acc; }

// std::max and std::min on values, the same results (a NaN x: max_value(acc, x) = acc): std's take and return
// references, from which GCC's if-conversion makes masked loads in the token loops.
MOO_INLINE double max_value(double a, double b) { return a < b ? b : a; }
MOO_INLINE double min_value(double a, double b) { return b < a ? b : a; }

// clamp(x, lo, hi) as torch's: min(max(x, lo), hi), NaN stays NaN.
MOO_INLINE double clamp(double x, double lo, double hi) { return min_value(max_value(x, lo), hi); }

// The weight of a raw weight (> 0, or NaN at level "sequence") by the mode's rule, before the active mask. The
// raw weight is truncated (mode "truncate") or masked (mode "mask") exactly where the weight differs from it.
template <bool truncate>
MOO_INLINE double bounded(double raw, double lo, double hi) {
    return truncate ? clamp(raw, lo, hi) : ((raw >= lo) & (raw <= hi) ? raw : 0.0);  // &: no branch
}

// ---- operands -----------------------------------------------------------------------------------------

// out[i] = x[i * st] as double for i < n (E an element type of dtype.h).
template <typename E>
MOO_INLINE void load_typed(const void* base, int64_t off, int64_t st, int64_t n, double* out) {
    const E* p = static_cast<const E*>(base) + off;
    if (st == 1) {
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(moo::value(p[i]));
    } else {
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(moo::value(p[i * st]));
    }
}

// out[i] = x[b, t0 + i] as double for i < n, then 0 up to padded.
MOO_INLINE void load(const Operand& x, int64_t b, int64_t t0, int64_t n, int64_t padded, double* out) {
    const int64_t off = b * x.sb + t0 * x.st;
    switch (x.dtype) {
        case moo::kFloat16: load_typed<moo::Half>(x.ptr, off, x.st, n, out); break;
        case moo::kBFloat16: load_typed<moo::BFloat16>(x.ptr, off, x.st, n, out); break;
        case moo::kFloat32: load_typed<float>(x.ptr, off, x.st, n, out); break;
        default: load_typed<double>(x.ptr, off, x.st, n, out); break;
    }
    std::fill(out + n, out + padded, 0.0);
}

// out[i] = 1.0 where the bool byte mask[b, t0 + i] is not 0, else 0, for i < n; then 0 up to padded.
MOO_INLINE void load_active(const Operand& m, int64_t b, int64_t t0, int64_t n, int64_t padded, double* out) {
    const uint8_t* p = static_cast<const uint8_t*>(m.ptr) + b * m.sb + t0 * m.st;
    if (m.st == 1) {
        for (int64_t i = 0; i < n; ++i) out[i] = p[i] != 0 ? 1.0 : 0.0;
    } else {
        for (int64_t i = 0; i < n; ++i) out[i] = p[i * m.st] != 0 ? 1.0 : 0.0;
    }
    std::fill(out + n, out + padded, 0.0);
}

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// ---- problem ------------------------------------------------------------------------------------------

struct Problem {
    int64_t B = 0, T = 0;
    Operand old, roll, mask;        // [B, T] inputs
    Operand weights, out_mask;      // [B, T] outputs (out_dtype, bool)
    bool f64 = false;               // the weights are float64 (else float32)
    int level = moo::kIsToken, mode = moo::kIsTruncate;
    double lo = -kInf, hi = kInf;   // the bounds, infinite where absent
    bool normalize = false;
    double reject[kRejectSlots];    // NaN: the criterion is off
    double token_bounds[4];         // the token_* thresholds (slots kTokenK1Lo..kTokenK3), infinite where off
    bool seq_criteria = false;      // any seq_* criterion on
    int flags = 0;                  // the sweep's kFlag*
};

inline bool on(const Problem& p, int slot) { return !std::isnan(p.reject[slot]); }

// a k1 statistic kept by the criterion with slots (lo, lo + 1), another kept by the one at slot, or no criterion
inline bool keep_k1(const Problem& p, int slot, double stat) {
    return !on(p, slot) || (stat >= p.reject[slot] && stat <= p.reject[slot + 1]);
}
inline bool keep_upper(const Problem& p, int slot, double stat) { return !on(p, slot) || stat <= p.reject[slot]; }

// One block of tokens in double: x, y the log-probs, act 1.0 at active tokens (else 0), d the log-ratio (0 at
// inactive tokens and where it is NaN), dc = clamp(d, -20, 20), e = e^dc; what the options need of the token
// weights w, flagged (1.0 where an active token is truncated or masked), w_hi and w_lo (w, and -inf or +inf at
// inactive tokens), keep and rejected (1.0 where the output mask is true, where an active token is rejected),
// k2_hi and k3_hi (k2, k3, -inf at inactive tokens). The selects fill these arrays in loops of their own, and
// the lane loops read them: a select inside a lane loop, acc = max(acc, active ? x : -inf), is made into a
// conditional (masked) store of acc by GCC.
struct Block {
    double x[kBlock], y[kBlock], act[kBlock], d[kBlock], dc[kBlock], e[kBlock];
    double w[kBlock], flagged[kBlock], w_hi[kBlock], w_lo[kBlock], keep[kBlock], rejected[kBlock];
    double k2_hi[kBlock], k3_hi[kBlock];
};

// Fills k with tokens t0 .. t0 + n - 1 of row b, then inactive tokens up to padded.
MOO_INLINE void load_block(const Problem& p, int64_t b, int64_t t0, int64_t n, int64_t padded, Block& k) {
    load(p.old, b, t0, n, padded, k.x);
    load(p.roll, b, t0, n, padded, k.y);
    load_active(p.mask, b, t0, n, padded, k.act);
    for (int64_t i = 0; i < padded; ++i) {
        const double v = k.x[i] - k.y[i];
        const double d = (k.act[i] != 0.0) & (v == v) ? v : 0.0, dc = clamp(d, -kLim, kLim);
        k.d[i] = d;
        k.dc[i] = dc;
        k.e[i] = exp_f64(dc);
    }
}

// Stores w / factor (w alone where factor is 1: the same bits) at the row's weights in the output dtype.
MOO_INLINE void store_weights(const Problem& p, int64_t b, int64_t t0, int64_t n, const double* w, double factor) {
    const int64_t off = b * p.weights.sb + t0 * p.weights.st, st = p.weights.st;
    if (p.f64) {
        double* out = static_cast<double*>(const_cast<void*>(p.weights.ptr)) + off;
        for (int64_t i = 0; i < n; ++i) out[i * st] = w[i] / factor;
    } else {
        float* out = static_cast<float*>(const_cast<void*>(p.weights.ptr)) + off;
        for (int64_t i = 0; i < n; ++i) out[i * st] = static_cast<float>(w[i] / factor);
    }
}

// Stores keep (1.0 or 0.0) at the row's output mask.
MOO_INLINE void store_mask(const Problem& p, int64_t b, int64_t t0, int64_t n, const double* keep) {
    const int64_t st = p.out_mask.st;
    uint8_t* out = static_cast<uint8_t*>(const_cast<void*>(p.out_mask.ptr)) + b * p.out_mask.sb + t0 * st;
    if (st == 1) {
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(static_cast<int32_t>(keep[i]));
    } else {
        for (int64_t i = 0; i < n; ++i) out[i * st] = static_cast<uint8_t>(static_cast<int32_t>(keep[i]));
    }
}

// ---- 1. the sweep over a row ------------------------------------------------------------------------------

// What a row contributes to the metrics (over its active tokens), and its weight at level "sequence".
struct RowOut {
    int64_t count = 0, truncated = 0, masked = 0, rejected = 0;
    double sum_w = 0, sum_w2 = 0, sum_k3 = 0;  // sums of w, w^2, e^dc - dc - 1
    Compensated sum_d;                          // S_b
    double max_w = -kInf, min_w = kInf;         // NaN propagates
    double weight = 0;                          // level "sequence": the row's w
};

// The row statistics of the seq_* criteria.
struct RowStats {
    int64_t count = 0;      // active tokens
    double k_sum[3] = {};   // sums of k1, k2, k3 over the active tokens
    double k_max[3] = {};   // maxima of k2, k3 (slots 1, 2) over the active tokens, 0 without one
};

// The verdict of the seq_* criteria on a row.
bool seq_keep(const Problem& p, const RowStats& s) {
    const double n = std::max(static_cast<double>(s.count), 1.0);
    return keep_k1(p, kSumK1Lo, s.k_sum[0]) && keep_upper(p, kSumK2, s.k_sum[1]) && keep_upper(p, kSumK3, s.k_sum[2]) &&
           keep_k1(p, kMeanK1Lo, s.k_sum[0] / n) && keep_upper(p, kMeanK2, s.k_sum[1] / n) &&
           keep_upper(p, kMeanK3, s.k_sum[2] / n) && keep_upper(p, kMaxK2, s.k_max[1]) &&
           keep_upper(p, kMaxK3, s.k_max[2]);
}

// out[t * ost] = w where mask[t * mst] is not 0, else 0, for t < n.
template <typename O>
MOO_INLINE void fill_typed(const uint8_t* mask, int64_t mst, O* out, int64_t ost, int64_t n, O w) {
    if (mst == 1 && ost == 1) {
        for (int64_t t = 0; t < n; ++t) out[t] = mask[t] != 0 ? w : O(0);
    } else {
        for (int64_t t = 0; t < n; ++t) out[t * ost] = mask[t * mst] != 0 ? w : O(0);
    }
}

// Writes w at the active tokens of row b and 0 elsewhere (level "sequence": w the row's weight / factor), in the
// output dtype.
void fill_row_weights(const Problem& p, int64_t b, double w) {
    const uint8_t* mask = static_cast<const uint8_t*>(p.mask.ptr) + b * p.mask.sb;
    void* out = const_cast<void*>(p.weights.ptr);
    if (p.f64) {
        fill_typed(mask, p.mask.st, static_cast<double*>(out) + b * p.weights.sb, p.weights.st, p.T, w);
    } else {
        fill_typed(mask, p.mask.st, static_cast<float*>(out) + b * p.weights.sb, p.weights.st, p.T,
                   static_cast<float>(w));
    }
}

void clear_row_mask(const Problem& p, int64_t b) {
    uint8_t* out = static_cast<uint8_t*>(const_cast<void*>(p.out_mask.ptr)) + b * p.out_mask.sb;
    for (int64_t t = 0; t < p.T; ++t) out[t * p.out_mask.st] = 0;
}

// The sweep over row b with the flags F (== p.flags): writes the mask (and the weights where they are final) and
// returns the row's partials.
template <int F>
MOO_INLINE RowOut sweep_row(const Problem& p, int64_t b) {
    constexpr bool token_level = F & kFlagToken, truncate = F & kFlagTruncate;
    constexpr bool token_criteria = F & kFlagTokenCriteria, seq_stats = F & kFlagSeqStats;
    const double lo = p.lo, hi = p.hi;
    const double k1_lo = p.token_bounds[0], k1_hi = p.token_bounds[1], k2_hi = p.token_bounds[2],
                 k3_hi = p.token_bounds[3];
    alignas(64) Block k;
    // the lanes: always (the active count, S_b, e^dc - dc - 1); level "token" (w, w^2, the flagged count, the
    // extrema of w); token_* criteria (the rejected count); seq_* criteria (dc, k2, k3, the maxima of k2, k3)
    double count[kLanes] = {}, sd[kLanes] = {}, sd_c[kLanes] = {}, sk3m[kLanes] = {};
    double sw[kLanes] = {}, sw2[kLanes] = {}, flagged[kLanes] = {}, w_max[kLanes], w_min[kLanes];
    double rejected[kLanes] = {};
    double sdc[kLanes] = {}, sdc_c[kLanes] = {}, sk2[kLanes] = {}, sk3[kLanes] = {}, k2_max[kLanes], k3_max[kLanes];
    std::fill(w_max, w_max + kLanes, -kInf);
    std::fill(w_min, w_min + kLanes, kInf);
    std::fill(k2_max, k2_max + kLanes, -kInf);
    std::fill(k3_max, k3_max + kLanes, -kInf);
    for (int64_t t0 = 0; t0 < p.T; t0 += kBlock) {
        const int64_t len = std::min(kBlock, p.T - t0), m = round_up(len);
        load_block(p, b, t0, len, m, k);
        for (int64_t i0 = 0; i0 < m; i0 += kLanes) {
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l) {
                const int64_t i = i0 + l;
                count[l] += k.act[i];
                compensated_add(sd[l], sd_c[l], k.d[i]);
                sk3m[l] += (k.e[i] - k.dc[i]) - 1.0;  // 0 at an inactive token (dc = 0, e = 1)
            }
        }
        if constexpr (token_level) {
            for (int64_t i = 0; i < m; ++i) {
                const bool active = k.act[i] != 0.0;
                const double e = k.e[i], w = bounded<truncate>(e, lo, hi);
                k.w[i] = active ? w : 0.0;
                // not ?: with constant arms, which GCC makes into two masked stores
                k.flagged[i] = static_cast<double>(active & (w != e));
                k.w_hi[i] = active ? w : -kInf;
                k.w_lo[i] = active ? w : kInf;
            }
            for (int64_t i0 = 0; i0 < m; i0 += kLanes) {
                MOO_OMP(omp simd)
                for (int64_t l = 0; l < kLanes; ++l) {
                    const int64_t i = i0 + l;
                    const double w = k.w[i];  // 0 at an inactive token
                    sw[l] += w;
                    sw2[l] += w * w;
                    flagged[l] += k.flagged[i];
                    w_max[l] = max_value(w_max[l], k.w_hi[i]);
                    w_min[l] = min_value(w_min[l], k.w_lo[i]);
                }
            }
            if (!p.normalize) store_weights(p, b, t0, len, k.w, 1.0);
        }
        if constexpr (token_criteria) {
            for (int64_t i = 0; i < m; ++i) {
                const double dc = k.dc[i], e = k.e[i], act = k.act[i];
                const bool ok = (-dc >= k1_lo) & (-dc <= k1_hi) & (0.5 * dc * dc <= k2_hi) & ((e - 1.0) - dc <= k3_hi);
                k.keep[i] = ok ? act : 0.0;
                k.rejected[i] = ok ? 0.0 : act;
            }
            for (int64_t i0 = 0; i0 < m; i0 += kLanes) {
                MOO_OMP(omp simd)
                for (int64_t l = 0; l < kLanes; ++l) rejected[l] += k.rejected[i0 + l];
            }
            store_mask(p, b, t0, len, k.keep);
        } else {
            store_mask(p, b, t0, len, k.act);
        }
        if constexpr (seq_stats) {
            for (int64_t i = 0; i < m; ++i) {
                const bool active = k.act[i] != 0.0;
                const double dc = k.dc[i];
                k.k2_hi[i] = active ? 0.5 * dc * dc : -kInf;
                k.k3_hi[i] = active ? (k.e[i] - 1.0) - dc : -kInf;
            }
            for (int64_t i0 = 0; i0 < m; i0 += kLanes) {
                MOO_OMP(omp simd)
                for (int64_t l = 0; l < kLanes; ++l) {
                    const int64_t i = i0 + l;
                    const double dc = k.dc[i];  // 0 at an inactive token
                    compensated_add(sdc[l], sdc_c[l], dc);
                    sk2[l] += 0.5 * dc * dc;
                    sk3[l] += (k.e[i] - 1.0) - dc;
                    k2_max[l] = max_value(k2_max[l], k.k2_hi[i]);
                    k3_max[l] = max_value(k3_max[l], k.k3_hi[i]);
                }
            }
        }
    }

    // the lanes in lane order
    RowOut o;
    Compensated sum_dc;
    RowStats s;
    double n = 0, n_flagged = 0, n_rejected = 0, max_k2 = -kInf, max_k3 = -kInf;
    for (int64_t l = 0; l < kLanes; ++l) {
        n += count[l];
        o.sum_d.add(Compensated{sd[l], sd_c[l]});
        o.sum_k3 += sk3m[l];
        o.sum_w += sw[l];
        o.sum_w2 += sw2[l];
        n_flagged += flagged[l];
        o.max_w = max_value(o.max_w, w_max[l]);
        o.min_w = min_value(o.min_w, w_min[l]);
        n_rejected += rejected[l];
        sum_dc.add(Compensated{sdc[l], sdc_c[l]});
        s.k_sum[1] += sk2[l];
        s.k_sum[2] += sk3[l];
        max_k2 = max_value(max_k2, k2_max[l]);
        max_k3 = max_value(max_k3, k3_max[l]);
    }
    o.count = static_cast<int64_t>(n);
    o.rejected = static_cast<int64_t>(n_rejected);

    // the seq_* criteria
    if constexpr (seq_stats) {
        s.count = o.count;
        s.k_sum[0] = -sum_dc.value();
        s.k_max[1] = s.count > 0 ? max_k2 : 0.0;
        s.k_max[2] = s.count > 0 ? max_k3 : 0.0;
        if (!seq_keep(p, s)) {
            o.rejected = o.count;
            clear_row_mask(p, b);
        }
    }

    // level "sequence": the row's weight, its n_b tokens' metrics, and its weights unless normalised later
    if constexpr (!token_level) {
        const double raw = std::exp(clamp(o.sum_d.value(), -kLim, kLim));
        const double w = p.mode == moo::kIsTruncate ? bounded<true>(raw, lo, hi) : bounded<false>(raw, lo, hi);
        const bool row_flagged = w != raw;  // NaN: truncated (NaN != NaN), or masked (w = 0)
        const bool any = o.count > 0;
        o.weight = w;
        o.sum_w = any ? n * w : 0.0;
        o.sum_w2 = any ? n * (w * w) : 0.0;
        o.max_w = any ? w : -kInf;
        o.min_w = any ? w : kInf;
        n_flagged = row_flagged ? n : 0.0;
        if (!p.normalize) fill_row_weights(p, b, w);
    }
    (p.mode == moo::kIsTruncate ? o.truncated : o.masked) = static_cast<int64_t>(n_flagged);
    return o;
}

// The sweep over row b with the instance of p.flags (an AVX2 clone is picked at load time where the CPU has it).
template <int F>
MOO_INLINE RowOut sweep_dispatch(const Problem& p, int64_t b) {
    if constexpr (F == kFlagCombinations) {
        return RowOut();  // unreachable: p.flags < kFlagCombinations
    } else if constexpr ((F & kFlagTruncate) && !(F & kFlagToken)) {
        return sweep_dispatch<F + 1>(p, b);  // not a combination: the mode only shapes token weights
    } else {
        return p.flags == F ? sweep_row<F>(p, b) : sweep_dispatch<F + 1>(p, b);
    }
}

MOO_SIMD_CLONES RowOut sweep(const Problem& p, int64_t b) { return sweep_dispatch<0>(p, b); }

// ---- 3. the normalised weights ------------------------------------------------------------------------------

// Level "token": w recomputed from the inputs of row b and written divided by factor.
template <bool truncate>
MOO_INLINE void write_token_weights(const Problem& p, int64_t b, double factor) {
    alignas(64) Block k;
    for (int64_t t0 = 0; t0 < p.T; t0 += kBlock) {
        const int64_t len = std::min(kBlock, p.T - t0), padded = round_up(len);
        load_block(p, b, t0, len, padded, k);
        for (int64_t i = 0; i < padded; ++i) {
            const double w = bounded<truncate>(k.e[i], p.lo, p.hi);
            k.w[i] = k.act[i] != 0.0 ? w : 0.0;
        }
        store_weights(p, b, t0, len, k.w, factor);
    }
}

MOO_SIMD_CLONES void normalized_token_weights(const Problem& p, int64_t b, double factor) {
    if (p.mode == moo::kIsTruncate) {
        write_token_weights<true>(p, b, factor);
    } else {
        write_token_weights<false>(p, b, factor);
    }
}

// ---- driver ----------------------------------------------------------------------------------------------

// Writes the weights and the mask, and fills out with the metrics in ROLLOUT_METRICS order.
void run(const Problem& p, double* out) {
    const int64_t B = p.B;
    const bool parallel = p.B * p.T >= kParallelMinTokens;
    (void)parallel;  // unused without OpenMP

    // ---- 1. rows in parallel: the weights, the mask and the row's partials. Dynamic: the rows cost the same,
    // but a thread that another process holds up does not hold the others back (no result depends on which
    // thread takes a row).
    std::vector<RowOut> rows(B);
    MOO_OMP(omp parallel for schedule(dynamic) if (parallel))
    for (int64_t b = 0; b < B; ++b) rows[b] = sweep(p, b);

    // ---- 2. the partials in row order, then the metrics
    int64_t count = 0, truncated = 0, masked = 0, rejected = 0, rows_active = 0, rows_rejected = 0;
    double sum_w = 0, sum_w2 = 0, sum_k3 = 0, sum_row_w = 0;
    Compensated sum_d;
    double max_w = -kInf, min_w = kInf;
    for (int64_t b = 0; b < B; ++b) {
        const RowOut& o = rows[b];
        count += o.count;
        truncated += o.truncated;
        masked += o.masked;
        rejected += o.rejected;
        rows_active += o.count > 0 ? 1 : 0;
        rows_rejected += o.rejected > 0 ? 1 : 0;
        sum_w += o.sum_w;
        sum_w2 += o.sum_w2;
        sum_d.add(o.sum_d);
        sum_k3 += o.sum_k3;
        max_w = max_nan(max_w, o.max_w);
        min_w = min_nan(min_w, o.min_w);
        // the row's weight (level sequence: every active token has it), 0 for a row without an active token
        sum_row_w += o.count > 0 ? max_nan(0.0, o.max_w) : 0.0;
    }
    const double n = static_cast<double>(count), n1 = std::max(n, 1.0);
    const bool any = count > 0;
    const double c = sum_w / n1 + kEssEps;  // mean(w_c) + 1e-8, w_c = clamp(w, 0, high) being w
    out[rm::kWeightMean] = sum_w / n1;
    out[rm::kWeightMax] = any ? (std::isnan(max_w) ? max_w : std::max(max_w, 0.0)) : 0.0;
    out[rm::kWeightMin] = any ? min_w : 0.0;
    out[rm::kEss] = any ? 1.0 / (sum_w2 / (c * c) / n1) : 0.0;
    out[rm::kTruncatedFrac] = static_cast<double>(truncated) / n1;
    out[rm::kMaskedFrac] = static_cast<double>(masked) / n1;
    out[rm::kRejectedTokenFrac] = static_cast<double>(rejected) / n1;
    out[rm::kRejectedSeqFrac] = static_cast<double>(rows_rejected) / std::max(static_cast<double>(rows_active), 1.0);
    out[rm::kKlK1] = -sum_d.value() / n1;
    out[rm::kKlK3] = sum_k3 / n1;
    out[rm::kActiveTokens] = n;

    // ---- 3. batch normalisation: the weights written divided by the factor
    double factor = 1.0;
    if (p.normalize) {
        const double m = p.level == moo::kIsToken ? out[rm::kWeightMean]
                                                  : sum_row_w / std::max(static_cast<double>(rows_active), 1.0);
        factor = m > kNormMin ? m : 1.0;
        MOO_OMP(omp parallel for schedule(dynamic) if (parallel))
        for (int64_t b = 0; b < B; ++b) {
            if (p.level == moo::kIsToken) {
                normalized_token_weights(p, b, factor);
            } else {
                fill_row_weights(p, b, rows[b].weight / factor);
            }
        }
    }
    out[rm::kBatchNormFactor] = factor;
}

// Entry point: old_logp, the op's spec (its tensors and options by name, csrc/args.h) and the outputs the launcher
// allocated: weights [B, T] and metrics [12] in float32 (float64 for float64 old_logp), mask [B, T] bool.
void rollout_correction(const py::handle& old_arg, const py::handle& spec, const py::handle& weights_arg,
                        const py::handle& mask_arg, const py::handle& metrics_arg) {
    using moo::kFloats;
    using moo::option;
    using moo::optional_option;
    using moo::tensor_arg;
    Problem p;
    const TensorArg old = moo::tensor_value(old_arg, "old_logp", {{-1, -1}}, kFloats, /*optional=*/false);
    p.B = old.sizes[0];
    p.T = old.sizes[1];
    const std::vector<int64_t> bt = {p.B, p.T};
    p.old = old;
    p.roll = tensor_arg(spec, "rollout_logp", {bt}, kFloats, /*optional=*/false);
    p.mask = tensor_arg(spec, "mask", {bt}, {moo::kBool}, /*optional=*/false);
    const TensorArg reject = tensor_arg(spec, "reject", {{kRejectSlots}}, {moo::kFloat64});
    p.level = option<int>(spec, "level");
    p.mode = option<int>(spec, "mode");
    if (p.level != moo::kIsToken && p.level != moo::kIsSequence)
        throw std::invalid_argument("level: not a rollout_correction level code");
    if (p.mode != moo::kIsTruncate && p.mode != moo::kIsMask)
        throw std::invalid_argument("mode: not a rollout_correction mode code");
    p.lo = optional_option<double>(spec, "low").value_or(-kInf);
    p.hi = optional_option<double>(spec, "high").value_or(kInf);
    p.normalize = option<bool>(spec, "batch_normalize");
    for (int s = 0; s < kRejectSlots; ++s) {
        p.reject[s] = reject.ptr == nullptr ? kNaN : static_cast<const double*>(reject.ptr)[s * reject.sb];
    }
    const bool token_criteria = on(p, kTokenK1Lo) || on(p, kTokenK2) || on(p, kTokenK3);
    const double off_bounds[4] = {-kInf, kInf, kInf, kInf};  // keep every finite statistic
    for (int s = kTokenK1Lo; s <= kTokenK3; ++s) p.token_bounds[s] = on(p, s) ? p.reject[s] : off_bounds[s];
    for (int s = kSumK1Lo; s < kRejectSlots; ++s) p.seq_criteria |= on(p, s);
    p.flags = (p.level == moo::kIsToken ? kFlagToken | (p.mode == moo::kIsTruncate ? kFlagTruncate : 0) : 0) |
              (token_criteria ? kFlagTokenCriteria : 0) | (p.seq_criteria ? kFlagSeqStats : 0);
    p.f64 = old.dtype == moo::kFloat64;
    const int out_dtype = p.f64 ? moo::kFloat64 : moo::kFloat32;
    p.weights = moo::tensor_value(weights_arg, "weights", {bt}, {out_dtype}, /*optional=*/false);
    p.out_mask = moo::tensor_value(mask_arg, "out_mask", {bt}, {moo::kBool}, /*optional=*/false);
    void* metrics_out = moo::output<void>(metrics_arg, "metrics", {{rm::kNumMetrics}}, {out_dtype});

    double out[rm::kNumMetrics];
    {
        py::gil_scoped_release release;
        run(p, out);
    }
    if (p.f64) {
        std::copy(out, out + rm::kNumMetrics, static_cast<double*>(metrics_out));
    } else {
        std::transform(out, out + rm::kNumMetrics, static_cast<float*>(metrics_out),
                       [](double v) { return static_cast<float>(v); });
    }
}

}  // namespace

void register_rollout(py::module_& m) {
    m.def("rollout_correction", &rollout_correction,
          "Rollout correction of a [B, T] old_logp: writes the importance weights, the mask without the rejected "
          "tokens and metrics [12]. The op's tensors and options are read by name from spec (a RolloutSpec, see "
          "csrc/args.h).",
          py::arg("old_logp"), py::arg("spec"), py::arg("weights"), py::arg("mask"), py::arg("metrics"));
}
