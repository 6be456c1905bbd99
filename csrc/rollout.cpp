// Rollout correction on the CPU (the C++ backend of moo_kernels.rollout_correction): importance weights of the
// training / inference mismatch, verl's rejection criteria and the metrics, in one pass over each row of [B, T].
//
// Semantics: moo_kernels/ops/rollout/reference.py (every rule and metric). Notation: row b, token t, a_bt the
// active tokens (mask != 0), d_bt = old_logp - rollout_logp at active tokens (a NaN there counts 0; 0 elsewhere),
// dc = clamp(d, -20, 20). Everything is computed in double whatever the input dtypes (float16, bfloat16, float32
// or float64, any strides; the mask is read as bytes, any nonzero byte active).
//   1. Rows in parallel (OpenMP). Each row is processed by one thread in two sweeps over its tokens, in blocks of
//      kBlock tokens converted into local double arrays:
//      a. statistics (only what the options need: level "sequence" or a seq_* criterion): the number of active
//         tokens n_b, S_b = sum_t d, and the sums and maxima of k1 = -dc, k2 = dc^2 / 2, k3 = e^dc - 1 - dc over
//         the active tokens (maxima 0 for a row without one). From them the row's raw sequence weight
//         e^clamp(S_b, -20, 20) and the verdict of the seq_* criteria (sum, mean = sum / max(n_b, 1), max; k1 kept
//         where log lower <= statistic <= log upper, the others where statistic <= upper).
//      b. per token: raw = e^dc (level "token") or the row's raw weight; mode "truncate" w = clamp(raw, low,
//         high) ("truncated" where w != raw), mode "mask" w = raw inside [low, high] else 0 ("masked"); w = 0 at
//         inactive tokens; the token_* criteria; the output mask a AND every criterion. The row's partial metrics
//         (sums of w, w_c = clamp(w, 0, high), w_c^2, -d, e^dc - dc - 1; counts of truncated, masked, rejected
//         tokens; max and min of w) accumulate in kLanes independent lanes, summed in lane order at the row's end.
//      The sums of signed terms (S_b, whose error is the relative error of a sequence weight; the sums of k1 and of
//      -d, kl_k1 being a mean near 0) are compensated (Neumaier), here and across rows.
//   2. The per-row partials are reduced in row order (so the results have the same bits for any number of
//      threads), then the metrics: means over the n active tokens (0 when there is none), ESS = 1 / mean(v^2)
//      with v = w_c / (mean(w_c) + 1e-8), taken as sum(w_c^2) / (mean(w_c) + 1e-8)^2 / n; rejected_seq_frac over
//      the rows with an active token.
//   3. batch_normalize: m = the token mean of w (level "token") or the mean of the rows' weights over the rows
//      with an active token (level "sequence"); factor = m where m > 1e-8, else 1. The weights are written as
//      w / factor (in the output dtype, rounded once from double): without normalisation in sweep b, with it in a
//      last parallel pass over the rows that recomputes w (the metrics other than the factor are of w before the
//      division).
// Inactive tokens contribute nothing, not even NaN or inf from their inputs (selects, not products).
// The rejection thresholds arrive as kRejectSlots float64 values (moo_kernels/ops/rollout/spec.py, _SLOTS), NaN
// where a criterion is off.

#include "simd.h"  // first: its no-trapping-math pragma applies to what follows

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
inline void load(const Operand& x, int64_t b, int64_t t0, int64_t n, int64_t padded, double* out) {
    const int64_t off = b * x.sb + t0 * x.st;
    switch (x.dtype) {
        case moo::kFloat16: load_typed<moo::Half>(x.ptr, off, x.st, n, out); break;
        case moo::kBFloat16: load_typed<moo::BFloat16>(x.ptr, off, x.st, n, out); break;
        case moo::kFloat32: load_typed<float>(x.ptr, off, x.st, n, out); break;
        default: load_typed<double>(x.ptr, off, x.st, n, out); break;
    }
    std::fill(out + n, out + padded, 0.0);
}

// out[i] = 1 where the bool byte mask[b, t0 + i] is not 0, else 0, for i < n; then 0 up to padded.
inline void load_active(const Operand& m, int64_t b, int64_t t0, int64_t n, int64_t padded, uint8_t* out) {
    const uint8_t* p = static_cast<const uint8_t*>(m.ptr) + b * m.sb + t0 * m.st;
    for (int64_t i = 0; i < n; ++i) out[i] = p[i * m.st] != 0 ? 1 : 0;
    std::fill(out + n, out + padded, uint8_t(0));
}

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// max / min that propagate NaN, as torch's amax / amin: once the running value is NaN it stays NaN.
inline double max_nan(double acc, double x) { return x > acc || x != x ? x : acc; }
inline double min_nan(double acc, double x) { return x < acc || x != x ? x : acc; }

// A compensated (Neumaier) sum, for the sums of signed terms whose rounding shows: S_b (its error is the relative
// error of a sequence's weight), the sum of -d (kl_k1, a mean near 0) and the sum of k1. Order-fixed like the
// plain sums. The compensation is kept finite (not updated once the sum is inf or NaN), so an infinite or NaN
// term gives the plain sum's inf or NaN, as torch's.
struct Compensated {
    double s = 0, c = 0;
    void add(double x) {
        const double t = s + x;
        const double e = std::fabs(s) >= std::fabs(x) ? (s - t) + x : (x - t) + s;
        c += std::isfinite(t) ? e : 0.0;
        s = t;
    }
    void add(const Compensated& o) {
        add(o.s);
        add(o.c);
    }
    double value() const { return s + c; }
};

// clamp(x, lo, hi) as torch's: min(max(x, lo), hi), NaN stays NaN.
inline double clamp(double x, double lo, double hi) { return std::min(std::max(x, lo), hi); }

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
    bool token_criteria = false;    // any token_* criterion on
    bool seq_criteria = false;      // any seq_* criterion on
};

inline bool on(const Problem& p, int slot) { return !std::isnan(p.reject[slot]); }

// a k1 statistic kept by the criterion with slots (lo, lo + 1), another kept by the one at slot, or no criterion
inline bool keep_k1(const Problem& p, int slot, double stat) {
    return !on(p, slot) || (stat >= p.reject[slot] && stat <= p.reject[slot + 1]);
}
inline bool keep_upper(const Problem& p, int slot, double stat) { return !on(p, slot) || stat <= p.reject[slot]; }

// One block of log-ratios: the inputs converted, d (0 at inactive tokens and where it is NaN) and the active flags.
struct Block {
    double x[kBlock], y[kBlock], d[kBlock];
    uint8_t a[kBlock];
};

inline void log_ratios(const Problem& p, int64_t b, int64_t t0, int64_t n, int64_t padded, Block& k) {
    load(p.old, b, t0, n, padded, k.x);
    load(p.roll, b, t0, n, padded, k.y);
    load_active(p.mask, b, t0, n, padded, k.a);
    for (int64_t i = 0; i < padded; ++i) {
        const double v = k.x[i] - k.y[i];
        k.d[i] = k.a[i] != 0 && !std::isnan(v) ? v : 0.0;
    }
}

// ---- 1a. row statistics --------------------------------------------------------------------------------

struct RowStats {
    int64_t count = 0;      // active tokens
    double sum_d = 0;       // S_b (unclamped d)
    double k_sum[3] = {};   // sums of k1, k2, k3 over the active tokens
    double k_max[3] = {};   // maxima of k2, k3 (slots 1, 2) over the active tokens, 0 without one
};

RowStats row_stats(const Problem& p, int64_t b, bool k_stats) {
    Block k;
    int64_t count[kLanes] = {};
    Compensated sd[kLanes], ks[3][kLanes];
    double km[3][kLanes];
    for (auto& lane : km) std::fill(lane, lane + kLanes, -kInf);
    const double lim = moo::kLogRatioMax;
    for (int64_t t0 = 0; t0 < p.T; t0 += kBlock) {
        const int64_t len = std::min(kBlock, p.T - t0), padded = round_up(len);
        log_ratios(p, b, t0, len, padded, k);
        for (int64_t i0 = 0; i0 < padded; i0 += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) {
                const int64_t i = i0 + l;
                const bool act = k.a[i] != 0;
                count[l] += act ? 1 : 0;
                sd[l].add(k.d[i]);
                if (k_stats) {
                    const double dc = clamp(k.d[i], -lim, lim);
                    const double k1 = -dc, k2 = 0.5 * dc * dc, k3 = std::exp(dc) - 1.0 - dc;
                    ks[0][l].add(act ? k1 : 0.0);
                    ks[1][l].add(act ? k2 : 0.0);
                    ks[2][l].add(act ? k3 : 0.0);
                    km[1][l] = act ? max_nan(km[1][l], k2) : km[1][l];
                    km[2][l] = act ? max_nan(km[2][l], k3) : km[2][l];
                }
            }
        }
    }
    RowStats s;
    Compensated sum_d, k_sum[3];
    double kmax[3] = {-kInf, -kInf, -kInf};
    for (int64_t l = 0; l < kLanes; ++l) {
        s.count += count[l];
        sum_d.add(sd[l]);
        for (int j = 0; j < 3; ++j) {
            k_sum[j].add(ks[j][l]);
            kmax[j] = max_nan(kmax[j], km[j][l]);
        }
    }
    s.sum_d = sum_d.value();
    for (int j = 0; j < 3; ++j) s.k_sum[j] = k_sum[j].value();
    for (int j = 1; j < 3; ++j) s.k_max[j] = s.count > 0 ? kmax[j] : 0.0;
    return s;
}

// The verdict of the seq_* criteria on a row.
bool seq_keep(const Problem& p, const RowStats& s) {
    const double n = std::max(static_cast<double>(s.count), 1.0);
    return keep_k1(p, kSumK1Lo, s.k_sum[0]) && keep_upper(p, kSumK2, s.k_sum[1]) && keep_upper(p, kSumK3, s.k_sum[2]) &&
           keep_k1(p, kMeanK1Lo, s.k_sum[0] / n) && keep_upper(p, kMeanK2, s.k_sum[1] / n) &&
           keep_upper(p, kMeanK3, s.k_sum[2] / n) && keep_upper(p, kMaxK2, s.k_max[1]) &&
           keep_upper(p, kMaxK3, s.k_max[2]);
}

// ---- 1b. per-token weights, mask and the row's partial metrics ------------------------------------------

// What a row contributes to the metrics (over its active tokens).
struct RowOut {
    int64_t count = 0, truncated = 0, masked = 0, rejected = 0;
    double sum_w = 0, sum_wc = 0, sum_wc2 = 0, sum_k3 = 0;
    Compensated sum_neg_d;
    double max_w = -kInf, min_w = kInf;  // NaN propagates
};

// Per-row constants of sweep b.
struct RowParams {
    double raw = 0;        // level "sequence": e^clamp(S_b)
    bool seq_ok = true;    // the seq_* criteria keep the row
    double factor = 1;     // the weights are written divided by it
    bool write_weights = false, write_mask = false;
};

// Stores w / factor at the row's weights in the output dtype.
inline void store_weights(const Problem& p, int64_t b, int64_t t0, int64_t n, const double* w, double factor) {
    const int64_t off = b * p.weights.sb + t0 * p.weights.st, st = p.weights.st;
    if (p.f64) {
        double* out = static_cast<double*>(const_cast<void*>(p.weights.ptr)) + off;
        for (int64_t i = 0; i < n; ++i) out[i * st] = w[i] / factor;
    } else {
        float* out = static_cast<float*>(const_cast<void*>(p.weights.ptr)) + off;
        for (int64_t i = 0; i < n; ++i) out[i * st] = static_cast<float>(w[i] / factor);
    }
}

inline void store_mask(const Problem& p, int64_t b, int64_t t0, int64_t n, const uint8_t* keep) {
    uint8_t* out = static_cast<uint8_t*>(const_cast<void*>(p.out_mask.ptr)) + b * p.out_mask.sb + t0 * p.out_mask.st;
    for (int64_t i = 0; i < n; ++i) out[i * p.out_mask.st] = keep[i];
}

RowOut row_pass(const Problem& p, int64_t b, const RowParams& r) {
    Block k;
    double w[kBlock];
    uint8_t keep[kBlock];
    int64_t count[kLanes] = {}, truncated[kLanes] = {}, masked[kLanes] = {}, rejected[kLanes] = {};
    double sw[kLanes] = {}, swc[kLanes] = {}, swc2[kLanes] = {}, sk3[kLanes] = {};
    Compensated snd[kLanes];
    double wmax[kLanes], wmin[kLanes];
    std::fill(wmax, wmax + kLanes, -kInf);
    std::fill(wmin, wmin + kLanes, kInf);
    const double lim = moo::kLogRatioMax, lo = p.lo, hi = p.hi;
    const bool token_level = p.level == moo::kIsToken, truncate = p.mode == moo::kIsTruncate;
    for (int64_t t0 = 0; t0 < p.T; t0 += kBlock) {
        const int64_t len = std::min(kBlock, p.T - t0), padded = round_up(len);
        log_ratios(p, b, t0, len, padded, k);
        for (int64_t i0 = 0; i0 < padded; i0 += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) {
                const int64_t i = i0 + l;
                const bool act = k.a[i] != 0;
                const double d = k.d[i], dc = clamp(d, -lim, lim), e = std::exp(dc);
                const double raw = token_level ? e : r.raw;
                double wi;
                bool is_truncated = false, is_masked = false;
                if (truncate) {
                    wi = clamp(raw, lo, hi);
                    is_truncated = wi != raw;
                } else {
                    const bool inside = raw >= lo && raw <= hi;
                    wi = inside ? raw : 0.0;
                    is_masked = !inside;
                }
                wi = act ? wi : 0.0;
                bool ok = act && r.seq_ok;
                if (p.token_criteria) {
                    ok = ok && keep_k1(p, kTokenK1Lo, -dc) && keep_upper(p, kTokenK2, 0.5 * dc * dc) &&
                         keep_upper(p, kTokenK3, e - 1.0 - dc);
                }
                w[i] = wi;
                keep[i] = ok ? 1 : 0;
                const double wc = clamp(wi, 0.0, hi);
                count[l] += act ? 1 : 0;
                truncated[l] += act && is_truncated ? 1 : 0;
                masked[l] += act && is_masked ? 1 : 0;
                rejected[l] += act && !ok ? 1 : 0;
                sw[l] += wi;
                swc[l] += act ? wc : 0.0;
                swc2[l] += act ? wc * wc : 0.0;
                snd[l].add(-d);
                sk3[l] += act ? e - dc - 1.0 : 0.0;
                wmax[l] = act ? max_nan(wmax[l], wi) : wmax[l];
                wmin[l] = act ? min_nan(wmin[l], wi) : wmin[l];
            }
        }
        if (r.write_weights) store_weights(p, b, t0, len, w, r.factor);
        if (r.write_mask) store_mask(p, b, t0, len, keep);
    }
    RowOut o;
    for (int64_t l = 0; l < kLanes; ++l) {
        o.count += count[l];
        o.truncated += truncated[l];
        o.masked += masked[l];
        o.rejected += rejected[l];
        o.sum_w += sw[l];
        o.sum_wc += swc[l];
        o.sum_wc2 += swc2[l];
        o.sum_neg_d.add(snd[l]);
        o.sum_k3 += sk3[l];
        o.max_w = max_nan(o.max_w, wmax[l]);
        o.min_w = min_nan(o.min_w, wmin[l]);
    }
    return o;
}

// ---- driver ----------------------------------------------------------------------------------------------

// Writes the weights and the mask, and fills out with the metrics in ROLLOUT_METRICS order.
void run(const Problem& p, double* out) {
    const int64_t B = p.B;
    const bool parallel = p.B * p.T >= kParallelMinTokens;
    (void)parallel;  // unused without OpenMP
    const bool need_stats = p.level == moo::kIsSequence || p.seq_criteria;
    const double lim = moo::kLogRatioMax;

    // ---- 1. rows in parallel: statistics, then the weights, the mask and the row's partials
    std::vector<RowParams> params(B);
    std::vector<RowOut> rows(B);
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t b = 0; b < B; ++b) {
        RowParams& r = params[b];
        if (need_stats) {
            const RowStats s = row_stats(p, b, p.seq_criteria);
            r.raw = std::exp(clamp(s.sum_d, -lim, lim));
            r.seq_ok = !p.seq_criteria || seq_keep(p, s);
        }
        r.write_weights = !p.normalize;
        r.write_mask = true;
        rows[b] = row_pass(p, b, r);
    }

    // ---- 2. the partials in row order, then the metrics
    int64_t count = 0, truncated = 0, masked = 0, rejected = 0, rows_active = 0, rows_rejected = 0;
    double sum_w = 0, sum_wc = 0, sum_wc2 = 0, sum_k3 = 0, sum_row_w = 0;
    Compensated sum_neg_d;
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
        sum_neg_d.add(o.sum_neg_d);
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
    out[rm::kKlK1] = sum_neg_d.value() / n1;
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
            RowParams r = params[b];
            r.factor = factor;
            r.write_weights = true;
            r.write_mask = false;
            row_pass(p, b, r);
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
    p.token_criteria = on(p, kTokenK1Lo) || on(p, kTokenK2) || on(p, kTokenK3);
    for (int s = kSumK1Lo; s < kRejectSlots; ++s) p.seq_criteria |= on(p, s);
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
