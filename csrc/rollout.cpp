// Rollout correction on the CPU (the C++ backend of moo_kernels.rollout_correction): importance weights of the
// training / inference mismatch, verl's rejection criteria and the metrics, in one sweep over each row of [B, T].
//
// Semantics: moo_kernels/ops/rollout/reference.py (every rule and metric). Notation: row b, token t, a_bt the
// active tokens (mask != 0), d_bt = old_logp - rollout_logp at active tokens (a NaN there counts 0; 0 elsewhere),
// dc = clamp(d, -20, 20). Everything is computed in double whatever the input dtypes (float16, bfloat16, float32
// or float64, any strides; the mask is read as bytes, any nonzero byte active). e^dc, the one transcendental per
// token, is exp_f64 below: a branch-free polynomial within about an ulp of std::exp (a library call, which would
// keep the token loops scalar).
//   1. Rows in parallel (OpenMP). Each row is processed by one thread in one sweep over its tokens, in blocks of
//      kBlock tokens converted into local double arrays, where d, dc and e^dc are formed by loops over the whole
//      block (e^dc = 1 at an inactive token, as d = 0 there). The row's sums, counts and extrema accumulate in
//      kLanes independent lanes (token i in lane i % kLanes), combined in lane order at the row's end. The token
//      loop holds only what the options need (a template instance per combination, kFlag*), and selects instead
//      of branches, so that it vectorises. Per token:
//      - always: n_b (the active tokens), S_b = sum_t d and the sum of e^dc - dc - 1 (kl_k3);
//      - level "token": raw = e^dc; mode "truncate" w = clamp(raw, low, high) ("truncated" where w != raw), mode
//        "mask" w = raw inside [low, high] else 0 ("masked"); w = 0 at inactive tokens; the sums of w,
//        w_c = clamp(w, 0, high) and w_c^2, the truncated or masked count, the max and min of w (over the active
//        tokens);
//      - the token_* criteria (k1 = -dc, k2 = dc^2 / 2, k3 = e^dc - 1 - dc; a criterion that is off is given
//        infinite bounds) and the output mask a AND them, written as the sweep goes, with the rejected count;
//      - with a seq_* criterion: the sums of k1, k2, k3 and the maxima of k2, k3 over the active tokens.
//      At the row's end (scalar): the verdict of the seq_* criteria (sum, mean = sum / max(n_b, 1), max (0 for a
//      row without an active token); k1 kept where log lower <= statistic <= log upper, the others where
//      statistic <= upper), and a rejected row's mask rewritten all false; level "sequence": the row's raw weight
//      e^clamp(S_b, -20, 20) (std::exp, as NaN can reach it), its w by the rule above, its metrics those of n_b
//      tokens of weight w (n_b w, n_b w_c, ...), and its weights written (w at the active tokens, 0 elsewhere).
//      The sums of signed terms (S_b, whose error is the relative error of a sequence weight and which gives
//      kl_k1 = mean(-d), a mean near 0, as -sum_b S_b; the sum of dc, for k1) are compensated (Knuth's TwoSum,
//      which needs no comparison, so it vectorises), in each lane and across lanes and rows.
//   2. The per-row partials are reduced in row order (so the results have the same bits for any number of
//      threads, and for either SIMD clone: the lanes fix the arithmetic), then the metrics: means over the n
//      active tokens (0 when there is none), ESS = 1 / mean(v^2) with v = w_c / (mean(w_c) + 1e-8), taken as
//      sum(w_c^2) / (mean(w_c) + 1e-8)^2 / n; rejected_seq_frac over the rows with an active token.
//   3. batch_normalize: m = the token mean of w (level "token") or the mean of the rows' weights over the rows
//      with an active token (level "sequence"); factor = m where m > 1e-8, else 1. The weights are written as
//      w / factor (in the output dtype, rounded once from double): without normalisation in the sweep, with it in
//      a last parallel pass over the rows (level "token" recomputes w from the inputs, level "sequence" writes
//      the row's weight); the metrics other than the factor are of w before the division.
// Inactive tokens contribute nothing, not even NaN or inf from their inputs (selects, not products). Within the
// token loops every value is finite (dc is; low < high are not NaN), so the extrema there need no NaN rule.
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

constexpr int64_t kBlock = 512;                  // tokens converted and processed together
constexpr int64_t kLanes = 4;                    // independent double accumulators of every row sum
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

// s + c += x, compensated (Knuth's TwoSum: the rounding error of s + x, exactly, into c; no comparison, so it
// vectorises). The compensation is kept finite (not updated once the sum is inf or NaN), so an infinite or NaN
// term gives the plain sum's inf or NaN, as torch's.
MOO_INLINE void compensated_add(double& s, double& c, double x) {
    const double t = s + x, z = t - s;
    const double e = (s - (t - z)) + (x - z);
    c += std::fabs(t) <= std::numeric_limits<double>::max() ? e : 0.0;
    s = t;
}

// A compensated sum, for the sums of signed terms whose rounding shows (see the header). Order-fixed like the
// plain sums.
struct Compensated {
    double s = 0, c = 0;
    void add(double x) { compensated_add(s, c, x); }
    void add(const Compensated& o) {
        add(o.s);
        add(o.c);
    }
    double value() const { return s + c; }
};

// max / min that propagate NaN, as torch's amax / amin: once the running value is NaN it stays NaN.
inline double max_nan(double acc, double x) { return x > acc || x != x ? x : acc; }
inline double min_nan(double acc, double x) { return x < acc || x != x ? x : acc; }

// clamp(x, lo, hi) as torch's: min(max(x, lo), hi), NaN stays NaN.
inline double clamp(double x, double lo, double hi) { return std::min(std::max(x, lo), hi); }

// The weight of a raw weight by the mode's rule (before the active mask), and whether it was truncated (mode
// "truncate") or masked (mode "mask").
template <bool truncate>
MOO_INLINE double bounded(double raw, double lo, double hi, bool& flagged) {
    if (truncate) {
        const double w = clamp(raw, lo, hi);
        flagged = w != raw;
        return w;
    }
    const bool inside = raw >= lo && raw <= hi;
    flagged = !inside;
    return inside ? raw : 0.0;
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
// inactive tokens and where it is NaN), dc = clamp(d, -20, 20), e = e^dc; and what the sweep writes, w and keep
// (1.0 where the output mask is true).
struct Block {
    double x[kBlock], y[kBlock], act[kBlock], d[kBlock], dc[kBlock], e[kBlock], w[kBlock], keep[kBlock];
};

// Fills k with tokens t0 .. t0 + n - 1 of row b, then inactive tokens up to padded.
MOO_INLINE void load_block(const Problem& p, int64_t b, int64_t t0, int64_t n, int64_t padded, Block& k) {
    load(p.old, b, t0, n, padded, k.x);
    load(p.roll, b, t0, n, padded, k.y);
    load_active(p.mask, b, t0, n, padded, k.act);
    for (int64_t i = 0; i < padded; ++i) {
        const double v = k.x[i] - k.y[i];
        k.d[i] = k.act[i] != 0.0 && v == v ? v : 0.0;
        k.dc[i] = clamp(k.d[i], -kLim, kLim);
        k.e[i] = exp_f64(k.dc[i]);
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
    double sum_w = 0, sum_wc = 0, sum_wc2 = 0, sum_k3 = 0;
    Compensated sum_d;                   // S_b
    double max_w = -kInf, min_w = kInf;  // NaN propagates
    double weight = 0;                   // level "sequence": the row's w
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

// Writes w at the active tokens of row b and 0 elsewhere (level "sequence": w the row's weight / factor).
MOO_INLINE void fill_row_weights(const Problem& p, int64_t b, double w) {
    alignas(64) double buf[kBlock];
    for (int64_t t0 = 0; t0 < p.T; t0 += kBlock) {
        const int64_t len = std::min(kBlock, p.T - t0);
        load_active(p.mask, b, t0, len, len, buf);
        for (int64_t i = 0; i < len; ++i) buf[i] = buf[i] != 0.0 ? w : 0.0;
        store_weights(p, b, t0, len, buf, 1.0);
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
    const bool write_weights = token_level && !p.normalize;
    alignas(64) Block k;
    // the lanes: always
    double count[kLanes] = {}, sd[kLanes] = {}, sd_c[kLanes] = {}, sk3m[kLanes] = {};
    // level "token"
    double flagged[kLanes] = {}, sw[kLanes] = {}, swc[kLanes] = {}, swc2[kLanes] = {};
    double wmax[kLanes], wmin[kLanes];
    std::fill(wmax, wmax + kLanes, -kInf);
    std::fill(wmin, wmin + kLanes, kInf);
    // token_* criteria
    double rejected[kLanes] = {};
    // seq_* criteria: the sum of dc (k1 = -dc), the sums and maxima of k2, k3
    double sdc[kLanes] = {}, sdc_c[kLanes] = {}, sk2[kLanes] = {}, sk3[kLanes] = {}, mk2[kLanes], mk3[kLanes];
    std::fill(mk2, mk2 + kLanes, -kInf);
    std::fill(mk3, mk3 + kLanes, -kInf);
    for (int64_t t0 = 0; t0 < p.T; t0 += kBlock) {
        const int64_t len = std::min(kBlock, p.T - t0), padded = round_up(len);
        load_block(p, b, t0, len, padded, k);
        for (int64_t i0 = 0; i0 < padded; i0 += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) {
                const int64_t i = i0 + l;
                const double act = k.act[i], dc = k.dc[i], e = k.e[i];
                const bool active = act != 0.0;
                count[l] += act;
                compensated_add(sd[l], sd_c[l], k.d[i]);
                sk3m[l] += (e - dc) - 1.0;  // 0 at an inactive token (dc = 0, e = 1)
                if constexpr (token_level) {
                    bool f;
                    const double bw = bounded<truncate>(e, lo, hi, f), w = active ? bw : 0.0;
                    const double wc = clamp(w, 0.0, hi);
                    k.w[i] = w;
                    flagged[l] += active && f ? 1.0 : 0.0;
                    sw[l] += w;
                    swc[l] += wc;
                    swc2[l] += wc * wc;
                    wmax[l] = std::max(wmax[l], active ? w : -kInf);
                    wmin[l] = std::min(wmin[l], active ? w : kInf);
                }
                if constexpr (token_criteria) {
                    const bool ok = -dc >= k1_lo && -dc <= k1_hi && 0.5 * dc * dc <= k2_hi && (e - 1.0) - dc <= k3_hi;
                    k.keep[i] = ok ? act : 0.0;
                    rejected[l] += active && !ok ? 1.0 : 0.0;
                } else {
                    k.keep[i] = act;
                }
                if constexpr (seq_stats) {
                    const double k2 = 0.5 * dc * dc, k3 = (e - 1.0) - dc;  // 0 at an inactive token
                    compensated_add(sdc[l], sdc_c[l], dc);
                    sk2[l] += k2;
                    sk3[l] += k3;
                    mk2[l] = std::max(mk2[l], active ? k2 : -kInf);
                    mk3[l] = std::max(mk3[l], active ? k3 : -kInf);
                }
            }
        }
        if (write_weights) store_weights(p, b, t0, len, k.w, 1.0);
        store_mask(p, b, t0, len, k.keep);
    }

    // the lanes in lane order
    RowOut o;
    double n = 0, n_flagged = 0, n_rejected = 0;
    Compensated sum_dc;
    RowStats s;
    double kmax[3] = {-kInf, -kInf, -kInf};
    for (int64_t l = 0; l < kLanes; ++l) {
        n += count[l];
        o.sum_d.add(Compensated{sd[l], sd_c[l]});
        o.sum_k3 += sk3m[l];
        n_flagged += flagged[l];
        o.sum_w += sw[l];
        o.sum_wc += swc[l];
        o.sum_wc2 += swc2[l];
        o.max_w = std::max(o.max_w, wmax[l]);
        o.min_w = std::min(o.min_w, wmin[l]);
        n_rejected += rejected[l];
        sum_dc.add(Compensated{sdc[l], sdc_c[l]});
        s.k_sum[1] += sk2[l];
        s.k_sum[2] += sk3[l];
        kmax[1] = std::max(kmax[1], mk2[l]);
        kmax[2] = std::max(kmax[2], mk3[l]);
    }
    o.count = static_cast<int64_t>(n);
    o.rejected = static_cast<int64_t>(n_rejected);

    // the seq_* criteria
    if constexpr (seq_stats) {
        s.count = o.count;
        s.k_sum[0] = -sum_dc.value();
        for (int j = 1; j < 3; ++j) s.k_max[j] = s.count > 0 ? kmax[j] : 0.0;
        if (!seq_keep(p, s)) {
            o.rejected = o.count;
            clear_row_mask(p, b);
        }
    }

    // level "sequence": the row's weight, its n_b tokens' metrics, and its weights unless normalised later
    if constexpr (!token_level) {
        const double raw = std::exp(clamp(o.sum_d.value(), -kLim, kLim));
        bool row_flagged;
        const double w = p.mode == moo::kIsTruncate ? bounded<true>(raw, lo, hi, row_flagged)
                                                    : bounded<false>(raw, lo, hi, row_flagged);
        const double wc = clamp(w, 0.0, hi);
        const bool any = o.count > 0;
        o.weight = w;
        o.sum_w = any ? n * w : 0.0;
        o.sum_wc = any ? n * wc : 0.0;
        o.sum_wc2 = any ? n * (wc * wc) : 0.0;
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
            bool f;
            const double w = bounded<truncate>(k.e[i], p.lo, p.hi, f);
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

    // ---- 1. rows in parallel: the weights, the mask and the row's partials
    std::vector<RowOut> rows(B);
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t b = 0; b < B; ++b) rows[b] = sweep(p, b);

    // ---- 2. the partials in row order, then the metrics
    int64_t count = 0, truncated = 0, masked = 0, rejected = 0, rows_active = 0, rows_rejected = 0;
    double sum_w = 0, sum_wc = 0, sum_wc2 = 0, sum_k3 = 0, sum_row_w = 0;
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
        sum_wc += o.sum_wc;
        sum_wc2 += o.sum_wc2;
        sum_d.add(o.sum_d);
        sum_k3 += o.sum_k3;
        max_w = max_nan(max_w, o.max_w);
        min_w = min_nan(min_w, o.min_w);
        // the row's weight (level sequence: every active token has it), 0 for a row without an active token
        sum_row_w += o.count > 0 ? max_nan(0.0, o.max_w) : 0.0;
    }
    const double n = static_cast<double>(count), n1 = std::max(n, 1.0);
    const bool any = count > 0;
    const double m_c = sum_wc / n1, c = m_c + kEssEps;
    out[rm::kWeightMean] = sum_w / n1;
    out[rm::kWeightMax] = any ? (std::isnan(max_w) ? max_w : std::max(max_w, 0.0)) : 0.0;
    out[rm::kWeightMin] = any ? min_w : 0.0;
    out[rm::kEss] = any ? 1.0 / (sum_wc2 / (c * c) / n1) : 0.0;
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
        MOO_OMP(omp parallel for schedule(static) if (parallel))
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
