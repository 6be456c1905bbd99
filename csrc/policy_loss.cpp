// Token-level policy loss on the CPU (the C++ backend of moo_kernels.policy_loss).
//
// Semantics: moo_kernels/ops/loss/reference.py (every formula, aggregation and metric). The
// structure mirrors the Triton kernels (triton_kernels.py): the normaliser of every aggregation depends
// on the mask only (and the sequence-level values of GSPO, GMPO and VESPO on sums over the row), so it is
// known before any loss is, and one pass computes each token's loss together with its analytic gradient:
//   1. Row statistics, parallel over rows: active weight n_b = sum_t m, number of active tokens (m != 0) and,
//      for GSPO, sum_t d m (d the clamped log-ratio); for GMPO, in double, sum_t d' m (d' the sign-clipped
//      log-ratio), sum_t A m and, with importance weights, sum_t log(w + 1e-10) m; for VESPO, in double,
//      sum_t d m and log W_b: sum_t clamp(log w, log 1e-8, 20) over the active tokens of [B, T] importance
//      weights, clamp(log w_b, ...) once for [B] ones (a sequence's weight). Totals M = sum_b n_b and
//      S = #{b : n_b > 0}, in row order. A bool mask is read as 0 / 1 (any nonzero byte is 1).
//   2. Per-row values, in double: the token scale of the aggregation, token-mean 1 / (num_tokens or M);
//      token-sum 1; seq-mean-token-mean 1 / (S n_b); seq-mean-token-sum 1 / S; seq-mean-token-sum-norm
//      1 / (B max_len), with num_sequences for S and B when given; 0 where the denominator is not positive.
//      The sequence values: GSPO's ratio s_b; GMPO's -Abar_b R_b G_b (the loss of each of the row's tokens)
//      and R_b; VESPO's weight w_b and its phi(w_b) for either sign of the advantage (phi is a function of
//      the row and of the sign of A alone, computed in double, 0 where log phi > 88).
//   3. Main pass, parallel over work items (row, chunk of kChunk tokens), each processed in blocks of
//      kBlock tokens: the operands are converted into local arrays of the compute type (any dtype and
//      strides in), then short branch-free loops over the block (which the compiler vectorises) compute
//      the log-ratio and ratio, the policy term and its derivative dl/dlogp (clip branch, ratio cap, dual
//      clip, GSPO token form, CISPO, REINFORCE, SAPO, GMPO's per-row term with the gradient where the
//      sign-clip kept the log-ratio, VESPO's -phi A logp; then off-policy rows f = 1 / (1 + gamma e^-logp),
//      the form of p / (p + gamma) that stays finite for any logp, importance weights (not for GMPO and
//      VESPO, whose sequence values hold them), and the drops of offpolicy_mask_threshold and policy_mask),
//      beta times the KL estimate and its derivative (log-ratio clamp at +-20, zero derivative outside it;
//      kl_bias_correction by the token ratio exp(d) in every mode), and the masked contributions to the sums.
//      The gradient dl/dlogp * (m * scale) is written in logp's dtype, m * scale formed in
//      double (a float mask of subnormal weights has a scale beyond float's range); the unscaled sums of the
//      loss and of the metrics, sum l m, accumulate in double, the products with m taken in double too, in
//      kLanes independent lanes.
//   4. The item partials are reduced in item order (rows, then chunks): per-row sums, then the
//      aggregation and the means over M. Neither the work decomposition nor the lane structure depends
//      on the thread count or the instruction set, so the loss, the metrics and the gradient have the
//      same bits whatever the number of threads.
// Maths runs in double for float64 logp, in float32 otherwise (like the Triton kernels), where exp of a
// clamped log-ratio uses a vectorisable polynomial (a few ulp); all sums accumulate in double. GMPO's
// sign-clip decisions take the log-ratio in double in both passes (so the row's d' and the tokens'
// gradient and clip flags agree, and match the reference bit for bit). Masked tokens contribute nothing,
// not even NaN or inf from their inputs (selects, not products with m = 0).
// On-policy (no old_logp) the log-ratio is 0 and the ratio 1 whatever logp holds.
// Shared with the other kernels: the lane macros (OpenMP, AVX2 clones) and the exp polynomial (exp_poly)
// in simd.h, the element types, dtype codes and operands in dtype.h.

#include "simd.h"  // first: its no-trapping-math pragma applies to what follows

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "args.h"
#include "dtype.h"

namespace py = pybind11;

namespace {

constexpr int64_t kBlock = 256;                  // tokens converted and processed together
constexpr int64_t kChunk = 2048;                 // tokens of one work item (a multiple of kBlock)
constexpr int64_t kLanes = 16;                   // independent double accumulators of every sum
constexpr int64_t kParallelMinTokens = 1 << 15;  // below this many tokens, threads cost more than they save
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kLowVarKlMax = 10.0;  // low_var_kl: k3 clamped to at most this (verl)
constexpr double kGmpoIsEps = 1e-10;   // GMPO: the geometric mean of the importance weights takes log(w + 1e-10)
constexpr double kVespoLambdaMin = 1e-4;  // VESPO: lambda is used as max(lambda, 1e-4) (TRL)
constexpr double kVespoLogPhiMax = 88.0;  // VESPO: phi is 0 where log phi exceeds float's range
const double kVespoLogWMin = std::log(1e-8);  // VESPO: the lower clamp of the sequence log-weight (TRL)

// ---- operands -----------------------------------------------------------------------------------------

using moo::exp_poly;
using moo::Operand;
using moo::TensorArg;

// out[i] = x[i * st] as R for i < n (E an element type of dtype.h, or uint8_t for bool).
template <typename R, typename E>
MOO_INLINE void load_typed(const void* base, int64_t off, int64_t st, int64_t n, R* out) {
    const E* p = static_cast<const E*>(base) + off;
    if (st == 1) {
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<R>(moo::value(p[i]));
    } else if (st == 0) {  // a [B] tensor broadcast along the tokens
        std::fill(out, out + n, static_cast<R>(moo::value(p[0])));
    } else {
        for (int64_t i = 0; i < n; ++i) out[i] = static_cast<R>(moo::value(p[i * st]));
    }
}

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// out[i] = 1 where the bool byte p[i * st] is not 0, else 0, for i < n.
template <typename R>
MOO_INLINE void load_bool(const void* base, int64_t off, int64_t st, int64_t n, R* out) {
    const uint8_t* p = static_cast<const uint8_t*>(base) + off;
    if (st == 1) {
        for (int64_t i = 0; i < n; ++i) out[i] = p[i] != 0 ? R(1) : R(0);
    } else {
        for (int64_t i = 0; i < n; ++i) out[i] = p[i * st] != 0 ? R(1) : R(0);
    }
}

// out[i] = x[b, t0 + i] converted to R for i < n, then 0 up to padded.
template <typename R>
MOO_INLINE void load(const Operand& x, int64_t b, int64_t t0, int64_t n, int64_t padded, R* out) {
    const int64_t off = b * x.sb + t0 * x.st;
    switch (x.dtype) {
        case moo::kFloat16: load_typed<R, moo::Half>(x.ptr, off, x.st, n, out); break;
        case moo::kBFloat16: load_typed<R, moo::BFloat16>(x.ptr, off, x.st, n, out); break;
        case moo::kFloat32: load_typed<R, float>(x.ptr, off, x.st, n, out); break;
        case moo::kFloat64: load_typed<R, double>(x.ptr, off, x.st, n, out); break;
        default: load_bool<R>(x.ptr, off, x.st, n, out); break;
    }
    std::fill(out + n, out + padded, R(0));
}

// p[i * st] = g[i] for i < n, in E (float16 / bfloat16 rounded to nearest even).
template <typename E, typename R>
MOO_INLINE void store_typed(void* base, int64_t off, int64_t st, int64_t n, const R* g) {
    E* p = static_cast<E*>(base) + off;
    if (st == 1) {
        for (int64_t i = 0; i < n; ++i) moo::assign(p[i], static_cast<moo::Compute<E>>(g[i]));
    } else {
        for (int64_t i = 0; i < n; ++i) moo::assign(p[i * st], static_cast<moo::Compute<E>>(g[i]));
    }
}

// x[b, t0 + i] = g[i] for i < n, in x's dtype.
template <typename R>
MOO_INLINE void store(const Operand& x, int64_t b, int64_t t0, int64_t n, const R* g) {
    const int64_t off = b * x.sb + t0 * x.st;
    void* base = const_cast<void*>(x.ptr);
    switch (x.dtype) {
        case moo::kFloat16: store_typed<moo::Half>(base, off, x.st, n, g); break;
        case moo::kBFloat16: store_typed<moo::BFloat16>(base, off, x.st, n, g); break;
        case moo::kFloat32: store_typed<float>(base, off, x.st, n, g); break;
        default: store_typed<double>(base, off, x.st, n, g); break;
    }
}

// ---- problem ------------------------------------------------------------------------------------------

struct Problem {
    int64_t B = 0, T = 0;
    Operand logp, old, ref, mask, adv, tadv, isw, grad;  // ptr null: absent (grad: not written)
    bool isw_rows = false;                                // is_weights is [B] (a sequence's weight), not [B, T]
    Operand offpolicy;                                    // [B] bool
    Operand sampling;                                     // [B, T] the sampler's log-probs (off-policy mask)
    Operand pmask;                                        // [B, T] bool policy_mask: False drops the policy term
    std::optional<double> offp_threshold;                 // offpolicy_mask_threshold
    int mode = moo::kClip, agg = moo::kTokenMean, kl = moo::kK3;
    bool kl_bias = false;  // kl_bias_correction
    double beta = 0, clip_low = 0.2, clip_high = 0.2, gamma = 0.1;
    double tau_pos = 1.0, tau_neg = 1.05;  // SAPO
    double vk_pos = 2.0, vlam_pos = 3.0, vk_neg = 3.0, vlam_neg = 2.0;  // VESPO's k and lambda by the sign of A
    std::optional<double> dual_clip, ratio_cap, num_tokens, num_sequences;
    std::optional<int64_t> max_len;
};

// The aggregation's denominator from the totals M (sum of the mask weights) and S (sequences with an active
// token): token-mean M or num_tokens; token-sum 1; seq-mean-token-mean and seq-mean-token-sum S or num_sequences
// (times n_b per row for the first); seq-mean-token-sum-norm B or num_sequences, times max_len.
double denominator(const Problem& p, double total_m, double seqs) {
    switch (p.agg) {
        case moo::kTokenMean: return p.num_tokens.value_or(total_m);
        case moo::kTokenSum: return 1.0;
        case moo::kSeqMeanTokenSumNorm:
            return p.num_sequences.value_or(static_cast<double>(p.B)) * static_cast<double>(p.max_len.value_or(0));
        default: return p.num_sequences.value_or(seqs);
    }
}

// Compute-type constants of one call. Absent options take values that make them no-ops in the
// branch-free loops: ratio_cap +inf (min(rho, inf) = rho), dual_clip +inf (-A inf is never exceeded).
template <typename R>
struct Coeffs {
    R lo, hi, cap, dual, gamma, beta;
    R tau_pos, tau_neg;  // SAPO's gate temperatures
    double gmpo_hi, gmpo_lo;  // GMPO's sign-clip bounds of the log-ratio: clip_high, -clip_low (double)
    bool has_old, has_ref, has_tadv, has_pmask, with_kl, write_grad;
    bool isw_tokens;  // importance weights multiply the token terms (not for GMPO and VESPO)
    bool kl_bias;   // kl_bias_correction: the KL term times the token ratio exp(d)
    bool weighted;  // a float mask: products with m (in double); a bool mask's m is 0 or 1
    int mode, kl;
};

// Per-row values of the main pass.
template <typename R>
struct Row {
    double scale;  // aggregation weight of each token's l m in the loss
    R seq;         // the sequence ratio: GSPO's s_b, GMPO's R_b, VESPO's w_b (what the ratio metrics report)
    R gmpo;        // GMPO: -Abar_b R_b G_b, the policy term of each of the row's tokens
    R phi_pos, phi_neg;  // VESPO: phi(w_b) where A >= 0 / A < 0
    bool off;
    bool drop_negative;  // off-policy mask: the sequence drifted past the threshold, tokens with A < 0 lose pg
};

// The per-token values that are summed (times m, 0 where inactive), then the ratio min / max (+-inf where
// inactive).
// kMasked flags the tokens whose policy term was dropped (masked_frac); kDelta sums d m (ppo_kl is its negated
// mean). The sums below kRatio are those of the v arrays.
enum Sum { kLoss, kPg, kKl, kClipped, kLow, kHigh, kDual, kMasked, kRatio, kDelta, kNumSums };
enum { kRatioMin = kNumSums, kRatioMax = kNumSums + 1, kNumValues = kNumSums + 2 };

// Sums of one work item: kLanes independent accumulators each (loss and pg unscaled: sum of l m).
struct Partials {
    double sum[kNumSums][kLanes] = {};
    double ratio_min[kLanes], ratio_max[kLanes];

    Partials() {
        std::fill(ratio_min, ratio_min + kLanes, kInf);
        std::fill(ratio_max, ratio_max + kLanes, -kInf);
    }
    double total(int q) const {
        double s = 0;
        for (int64_t l = 0; l < kLanes; ++l) s += sum[q][l];
        return s;
    }
};

// Operands and per-token values of one block, padded with zeros to a multiple of kLanes tokens.
template <typename R>
struct Block {
    R lp[kBlock], old[kBlock], ref[kBlock], m[kBlock], adv[kBlock], isw[kBlock], keep[kBlock];
    R d[kBlock], rho[kBlock], rho_ok[kBlock], g[kBlock], grad[kBlock];
    R v[kNumValues][kBlock];
};

struct RowStats {
    double n = 0;       // sum_t m
    double sd = 0;      // sum_t d m over active tokens (GSPO; d in the compute type)
    double skl = 0;     // sum_t (sampling_logp - logp) m over active tokens, NaN as 0 (off-policy mask)
    double sdc = 0;     // GMPO: sum_t d' m (d' the sign-clipped log-ratio, in double)
    double sa = 0;      // GMPO: sum_t A m
    double sdv = 0;     // VESPO: sum_t d m (d in double)
    double slw = 0;     // GMPO: sum_t log(w + 1e-10) m; VESPO: log W_b (w: is_weights, see row_stats)
    int64_t count = 0;  // active tokens (m != 0)
};

// What the row pass sums besides n_b and the active count.
struct RowNeeds {
    bool gspo = false;   // sum_t d m in the compute type
    bool gmpo = false;   // the GMPO sums (sdc, sa, slw)
    bool vespo = false;  // the VESPO sums (sdv, slw)
    const Operand* offp_source = nullptr;  // the off-policy mask's source of sum_t (src - logp) m
};

template <typename R>
inline R clamp_log_ratio(R x) {
    const R lim = static_cast<R>(moo::kLogRatioMax);
    return std::min(std::max(x, -lim), lim);
}

// GMPO's sign-clipped log-ratio d' of a token with advantage A and clamped log-ratio d (double): clip_high where
// A > 0 and d > clip_high (hi), -clip_low where A < 0 and d < -clip_low (lo), 0 where A = 0, else d. The main
// pass takes the same decisions (gmpo_terms), in double too, so a token's gradient is cut exactly where its d'
// left d.
inline double gmpo_clip(double d, double A, double hi, double lo) {
    return A > 0.0 && d > hi ? hi : (A < 0.0 && d < lo ? lo : (A != 0.0 ? d : 0.0));
}

// Step 1: statistics of row b.
template <typename R>
RowStats row_stats(const Problem& p, const RowNeeds& need, int64_t b) {
    R m[kBlock], lp[kBlock], old[kBlock];
    double src[kBlock], lpd[kBlock], oldd[kBlock], adv[kBlock], tadv[kBlock], w[kBlock];
    double n[kLanes] = {}, sd[kLanes] = {}, count[kLanes] = {}, skl[kLanes] = {};
    double sdc[kLanes] = {}, sa[kLanes] = {}, sdv[kLanes] = {}, slw[kLanes] = {};
    const Operand* offp_source = need.offp_source;
    const bool gspo_sums = need.gspo, seq_sums = need.gmpo || need.vespo;
    const bool has_old = p.old.ptr != nullptr, has_isw = p.isw.ptr != nullptr, has_tadv = p.tadv.ptr != nullptr;
    const double hi = p.clip_high, lo = -p.clip_low, vlo = kVespoLogWMin, vhi = moo::kLogRatioMax;
    for (int64_t t0 = 0; t0 < p.T; t0 += kBlock) {
        const int64_t len = std::min(kBlock, p.T - t0), padded = round_up(len);
        load(p.mask, b, t0, len, padded, m);
        if (gspo_sums || offp_source != nullptr) load(p.logp, b, t0, len, padded, lp);
        if (gspo_sums) load(p.old, b, t0, len, padded, old);
        if (offp_source != nullptr) load(*offp_source, b, t0, len, padded, src);
        if (seq_sums) {  // the log-ratio in double (0 on-policy), the advantage and the importance weights
            if (has_old) {
                load(p.logp, b, t0, len, padded, lpd);
                load(p.old, b, t0, len, padded, oldd);
            } else {
                std::fill(lpd, lpd + padded, 0.0);
                std::fill(oldd, oldd + padded, 0.0);
            }
            if (need.gmpo) {
                load(p.adv, b, t0, len, padded, adv);
                if (has_tadv) {
                    load(p.tadv, b, t0, len, padded, tadv);
                    for (int64_t i = 0; i < padded; ++i) adv[i] += tadv[i];
                }
            }
            if (has_isw) load(p.isw, b, t0, len, padded, w);
        }
        for (int64_t i0 = 0; i0 < padded; i0 += kLanes) {
            for (int64_t l = 0; l < kLanes; ++l) {
                const R mi = m[i0 + l];
                n[l] += static_cast<double>(mi);
                count[l] += mi != 0 ? 1.0 : 0.0;
                if (gspo_sums) {
                    const R d = clamp_log_ratio<R>(lp[i0 + l] - old[i0 + l]);
                    sd[l] += mi != 0 ? static_cast<double>(d) * static_cast<double>(mi) : 0.0;
                }
                if (offp_source != nullptr) {
                    const double diff = src[i0 + l] - static_cast<double>(lp[i0 + l]);
                    skl[l] += mi != 0 && diff == diff ? diff * static_cast<double>(mi) : 0.0;
                }
            }
        }
        if (seq_sums) {  // selects: an inactive token's inputs (NaN, inf) never reach a sum
            for (int64_t i0 = 0; i0 < padded; i0 += kLanes) {
                for (int64_t l = 0; l < kLanes; ++l) {
                    const int64_t i = i0 + l;
                    const bool on = m[i] != 0;
                    const double md = static_cast<double>(m[i]), d = clamp_log_ratio<double>(lpd[i] - oldd[i]);
                    if (need.gmpo) {
                        sdc[l] += on ? gmpo_clip(d, adv[i], hi, lo) * md : 0.0;
                        sa[l] += on ? adv[i] * md : 0.0;
                        if (has_isw) slw[l] += on ? std::log(w[i] + kGmpoIsEps) * md : 0.0;
                    } else {  // VESPO: a [B, T] weights' log, clamped, not weighted by m
                        sdv[l] += on ? d * md : 0.0;
                        if (has_isw && !p.isw_rows) slw[l] += on ? std::min(std::max(std::log(w[i]), vlo), vhi) : 0.0;
                    }
                }
            }
        }
    }
    RowStats s;
    for (int64_t l = 0; l < kLanes; ++l) {
        s.n += n[l];
        s.sd += sd[l];
        s.skl += skl[l];
        s.sdc += sdc[l];
        s.sa += sa[l];
        s.sdv += sdv[l];
        s.slw += slw[l];
        s.count += static_cast<int64_t>(count[l]);
    }
    if (need.vespo && has_isw && p.isw_rows && s.count > 0) {  // a [B] weight is the sequence's: it enters once
        double wb;
        load(p.isw, b, 0, 1, 1, &wb);
        s.slw = std::min(std::max(std::log(wb), vlo), vhi);
    }
    return s;
}

// ---- step 3: one block of tokens ------------------------------------------------------------------------

// clip_frac_low / clip_frac_high flags (0 / 1) of the modes with a ratio clip.
template <typename R>
MOO_INLINE void low_high_flags(const Coeffs<R>& c, int64_t np, Block<R>& k) {
    const R zero = 0, one = 1, lo = c.lo, hi = c.hi;
    for (int64_t i = 0; i < np; ++i) {
        const R A = k.adv[i], rho = k.rho[i];
        k.v[kLow][i] = rho < lo && A < zero ? one : zero;
        k.v[kHigh][i] = rho > hi && A > zero ? one : zero;
    }
}

// Policy term pg and its derivative g = d pg / d logp of the clip and gspo modes, plus the clip flags
// (clip_frac in a second loop: GCC 12 does not vectorise the first one when it also sets that flag).
template <typename R, bool GSPO>
MOO_INLINE void clip_terms(const Coeffs<R>& c, int64_t np, Block<R>& k) {
    const R zero = 0, one = 1, lo = c.lo, hi = c.hi, cap = c.cap, dual_clip = c.dual;
    for (int64_t i = 0; i < np; ++i) {
        const R A = k.adv[i], rho = k.rho[i];
        const R d_rho = GSPO ? rho : rho * k.rho_ok[i];  // GSPO token form: d rho / d logp = s
        const R d_rho1 = rho > cap ? zero : d_rho;
        const R l1 = -A * std::min(rho, cap);
        const R rc = std::min(std::max(rho, lo), hi);
        const R l2 = -A * rc;
        const bool clipped = l2 > l1;  // the clipped term is strictly the larger loss: its gradient is cut
        const R pg = clipped ? l2 : l1;
        const R g2 = rc == rho ? -A * d_rho : zero;  // the clamp passes the gradient where lo <= rho <= hi
        const R g = clipped ? g2 : -A * d_rho1;
        const R l3 = -A * dual_clip;
        const bool dual = (A < zero) & (pg > l3);
        k.v[kPg][i] = dual ? l3 : pg;
        k.g[i] = dual ? zero : g;
        k.v[kDual][i] = dual ? one : zero;
    }
    for (int64_t i = 0; i < np; ++i) {
        const R A = k.adv[i], rho = k.rho[i];
        const R l1 = -A * std::min(rho, cap), l2 = -A * std::min(std::max(rho, lo), hi);
        k.v[kClipped][i] = l2 > l1 ? one : zero;
    }
    low_high_flags(c, np, k);
}

template <typename R>
MOO_INLINE void cispo_terms(const Coeffs<R>& c, int64_t np, Block<R>& k) {
    const R zero = 0, one = 1, lo = c.lo, hi = c.hi;
    for (int64_t i = 0; i < np; ++i) {
        const R A = k.adv[i], rho = k.rho[i];
        const R w = std::min(std::max(rho, lo), hi);
        k.v[kPg][i] = -w * A * k.lp[i];
        k.g[i] = -w * A;
        k.v[kClipped][i] = w != rho ? one : zero;
    }
    std::fill(k.v[kDual], k.v[kDual] + np, zero);
    low_high_flags(c, np, k);
}

// SAPO: pg = -A sigmoid(tau (rho - 1)) 4 / tau, tau by the sign of A; g = -A 4 s (1 - s) d rho / d logp (rho_ok:
// 0 where the log-ratio clamps; on-policy 1). No clip flags.
template <typename R>
MOO_INLINE void sapo_terms(const Coeffs<R>& c, int64_t np, Block<R>& k) {
    const R zero = 0, one = 1, four = 4;
    for (int64_t i = 0; i < np; ++i) {
        const R A = k.adv[i], rho = k.rho[i], tau = A > zero ? c.tau_pos : c.tau_neg;
        const R s = one / (one + std::exp(-tau * (rho - one)));
        k.v[kPg][i] = -A * s * (four / tau);
        k.g[i] = -A * (four * s * (one - s)) * (rho * k.rho_ok[i]);
    }
    for (int q : {kClipped, kDual, kLow, kHigh}) std::fill(k.v[q], k.v[q] + np, zero);
}

// GMPO: every active token's policy term is its row's -Abar R G; its gradient is that value where the sign-clip
// kept the token's log-ratio (d' = d: not cut, A != 0) and the log-ratio clamp is inactive, else 0 (the exact
// gradient of the row's loss once aggregated: every aggregation weighs a row's tokens alike). clip_frac counts
// the tokens the sign-clip cut; clip_frac_low / clip_frac_high (verl's pg_clipfrac_lower / pg_clipfrac) those
// whose d lies outside [-clip_low, clip_high], with A < 0 / A > 0. The log-ratio is taken in double, as in the
// row pass (gmpo_clip), so the decisions agree with the row's d' (and A's sign: advantages + token_advantages
// rounded to float has the sign of the exact sum, as the double sum of the row pass does).
template <typename R>
MOO_INLINE void gmpo_terms(const Coeffs<R>& c, const Row<R>& row, int64_t np, Block<R>& k) {
    const R zero = 0, one = 1, pg = row.gmpo;
    const double hi = c.gmpo_hi, lo = c.gmpo_lo, lim = moo::kLogRatioMax;
    for (int64_t i = 0; i < np; ++i) {
        const double raw = c.has_old ? static_cast<double>(k.lp[i]) - static_cast<double>(k.old[i]) : 0.0;
        const double d = clamp_log_ratio<double>(raw), A = static_cast<double>(k.adv[i]);
        const bool cut_hi = A > 0.0 && d > hi, cut_lo = A < 0.0 && d < lo, outside = d < lo || d > hi;
        const bool free = !cut_hi && !cut_lo && A != 0.0 && std::abs(raw) <= lim;
        k.v[kPg][i] = pg;
        k.g[i] = free ? pg : zero;
        k.v[kLow][i] = outside && A < 0.0 ? one : zero;
        k.v[kHigh][i] = outside && A > 0.0 ? one : zero;
        k.v[kClipped][i] = cut_lo || cut_hi ? one : zero;
    }
    std::fill(k.v[kDual], k.v[kDual] + np, zero);
}

// VESPO: pg = -phi A logp with phi = phi(w_b) of the row, by the sign of A (A >= 0: the _pos pair; a NaN A takes
// the _neg one, as the reference's where), no gradient through phi: g = -phi A. No clip flags.
template <typename R>
MOO_INLINE void vespo_terms(const Row<R>& row, int64_t np, Block<R>& k) {
    const R zero = 0, phi_pos = row.phi_pos, phi_neg = row.phi_neg;
    for (int64_t i = 0; i < np; ++i) {
        const R A = k.adv[i], phi = A >= zero ? phi_pos : phi_neg;
        k.v[kPg][i] = -phi * A * k.lp[i];
        k.g[i] = -phi * A;
    }
    for (int q : {kClipped, kDual, kLow, kHigh}) std::fill(k.v[q], k.v[q] + np, zero);
}

template <typename R>
MOO_INLINE void reinforce_terms(int64_t np, Block<R>& k) {
    for (int64_t i = 0; i < np; ++i) {
        k.v[kPg][i] = -k.adv[i] * k.lp[i];
        k.g[i] = -k.adv[i];
    }
    for (int q : {kClipped, kDual, kLow, kHigh}) std::fill(k.v[q], k.v[q] + np, R(0));
}

// KL estimate k of u = logp - ref (the estimator KL: moo::Kl); with beta > 0 (WITH_KL) also the loss
// l = pg + beta k and g += beta dk / dlogp. A straight-through form ("k1+", ...) keeps its estimator's value and
// takes k2's gradient u; kl_bias_correction multiplies k by the token ratio rho = exp(d) (k.rho holds it here in
// every mode but GSPO, which the spec refuses): d (rho k) = rho dk + k d rho.
template <typename R, int KL, bool WITH_KL>
MOO_INLINE void kl_loop(const Coeffs<R>& c, int64_t np, Block<R>& k) {
    const R zero = 0, one = 1, lim = static_cast<R>(moo::kLogRatioMax), beta = c.beta;
    const R low_var_max = static_cast<R>(kLowVarKlMax);
    constexpr bool kStraight = KL == moo::kK1St || KL == moo::kK3St || KL == moo::kLowVarKlSt || KL == moo::kAbsSt;
    for (int64_t i = 0; i < np; ++i) {
        const R u = k.lp[i] - k.ref[i];
        R kl, dk;
        if constexpr (KL == moo::kK1 || KL == moo::kK1St) {
            kl = u;
            dk = one;
        } else if constexpr (KL == moo::kK2) {
            kl = static_cast<R>(0.5) * u * u;
            dk = u;
        } else if constexpr (KL == moo::kAbs || KL == moo::kAbsSt) {
            kl = std::abs(u);
            dk = u > zero ? one : (u < zero ? -one : zero);
        } else {  // k3 of the clamped log-ratio; no gradient where the clamp is active
            const R uc = clamp_log_ratio<R>(u), e = exp_poly(-uc);
            kl = e + uc - one;
            dk = std::abs(u) <= lim ? one - e : zero;
            if constexpr (KL == moo::kLowVarKl || KL == moo::kLowVarKlSt) {  // at most 10, no gradient beyond
                if (!(kl <= low_var_max)) {
                    kl = low_var_max;
                    dk = zero;
                }
            }
        }
        if constexpr (kStraight) dk = u;
        if (c.kl_bias) {  // the token ratio (the spec refuses gspo)
            const R slope = k.rho[i] * k.rho_ok[i];
            dk = dk * k.rho[i] + kl * slope;
            kl = kl * k.rho[i];
        }
        k.v[kKl][i] = kl;
        if (WITH_KL) {
            k.v[kLoss][i] = k.v[kPg][i] + beta * kl;
            k.g[i] += beta * dk;
        }
    }
}

template <typename R, int KL>
MOO_INLINE void kl_terms(const Coeffs<R>& c, int64_t np, Block<R>& k) {
    if (c.with_kl) {
        kl_loop<R, KL, true>(c, np, k);
    } else {
        kl_loop<R, KL, false>(c, np, k);
        std::copy(k.v[kPg], k.v[kPg] + np, k.v[kLoss]);
    }
}

// Tokens [t0, t0 + len) of row b (len <= kBlock): writes the gradient, adds the sums to acc.
template <typename R>
MOO_INLINE void process_block(const Problem& p, const Coeffs<R>& c, const Row<R>& row, int64_t b, int64_t t0,
                             int64_t len, Block<R>& k, Partials& acc) {
    const int64_t np = round_up(len);
    const R zero = 0, one = 1, lim = static_cast<R>(moo::kLogRatioMax);
    load(p.logp, b, t0, len, np, k.lp);
    load(p.mask, b, t0, len, np, k.m);
    load(p.adv, b, t0, len, np, k.adv);
    if (c.has_tadv) {
        load(p.tadv, b, t0, len, np, k.g);
        for (int64_t i = 0; i < np; ++i) k.adv[i] += k.g[i];
    }

    // log-ratio d (clamped), whether its clamp is inactive, and the ratio
    if (c.has_old) {
        load(p.old, b, t0, len, np, k.old);
        for (int64_t i = 0; i < np; ++i) {
            const R raw = k.lp[i] - k.old[i];
            k.d[i] = clamp_log_ratio<R>(raw);
            k.rho_ok[i] = std::abs(raw) <= lim ? one : zero;
        }
    } else {  // on-policy: old = sg(logp), ratio 1 with gradient 1
        std::fill(k.d, k.d + np, zero);
        std::fill(k.rho_ok, k.rho_ok + np, one);
    }
    if (c.mode == moo::kGspo) {
        std::fill(k.rho, k.rho + np, row.seq);
    } else {  // the token ratio (GMPO and VESPO: for kl_bias_correction; their metrics report the row's below)
        for (int64_t i = 0; i < np; ++i) k.rho[i] = exp_poly(k.d[i]);
    }

    // policy term
    switch (c.mode) {
        case moo::kClip: clip_terms<R, false>(c, np, k); break;
        case moo::kGspo: clip_terms<R, true>(c, np, k); break;
        case moo::kCispo: cispo_terms(c, np, k); break;
        case moo::kSapo: sapo_terms(c, np, k); break;
        case moo::kGmpo: gmpo_terms(c, row, np, k); break;
        case moo::kVespo: vespo_terms(row, np, k); break;
        default: reinforce_terms(np, k); break;
    }
    if (row.off) {  // off-policy sequence: -A f, f = p / (p + gamma) = 1 / (1 + gamma / p); no ratio, no clip
        const R gamma = c.gamma;
        for (int64_t i = 0; i < np; ++i) {
            const R A = k.adv[i], f = one / (one + gamma * std::exp(-k.lp[i]));
            k.v[kPg][i] = -A * f;
            k.g[i] = -A * (f * (one - f));
        }
        for (int q : {kClipped, kDual, kLow, kHigh}) std::fill(k.v[q], k.v[q] + np, zero);
    }
    if (c.isw_tokens) {  // not for GMPO and VESPO: their row values hold the importance weights
        load(p.isw, b, t0, len, np, k.isw);
        for (int64_t i = 0; i < np; ++i) {
            k.v[kPg][i] *= k.isw[i];
            k.g[i] *= k.isw[i];
        }
    }
    // dropped policy terms (masked_frac): the off-policy mask drops the tokens with A < 0 (a NaN A included) of a
    // drifted sequence, policy_mask those where it is False; the policy term and its gradient are 0 there, the
    // KL term stays
    if (row.drop_negative || c.has_pmask) {
        if (c.has_pmask) {
            load(p.pmask, b, t0, len, np, k.keep);  // 1 / 0
        } else {
            std::fill(k.keep, k.keep + np, one);
        }
        const bool negative = row.drop_negative;
        for (int64_t i = 0; i < np; ++i) {
            const bool drop = (negative && !(k.adv[i] >= zero)) || k.keep[i] == zero;
            k.v[kMasked][i] = drop ? one : zero;
            if (drop) {
                k.v[kPg][i] = zero;
                k.g[i] = zero;
            }
        }
    } else {
        std::fill(k.v[kMasked], k.v[kMasked] + np, zero);
    }

    // KL estimate to the reference: reported whenever ref is given, in the loss when beta > 0
    if (c.has_ref) {
        load(p.ref, b, t0, len, np, k.ref);
        switch (c.kl) {
            case moo::kK1: kl_terms<R, moo::kK1>(c, np, k); break;
            case moo::kK2: kl_terms<R, moo::kK2>(c, np, k); break;
            case moo::kAbs: kl_terms<R, moo::kAbs>(c, np, k); break;
            case moo::kLowVarKl: kl_terms<R, moo::kLowVarKl>(c, np, k); break;
            case moo::kK1St: kl_terms<R, moo::kK1St>(c, np, k); break;
            case moo::kK3St: kl_terms<R, moo::kK3St>(c, np, k); break;
            case moo::kLowVarKlSt: kl_terms<R, moo::kLowVarKlSt>(c, np, k); break;
            case moo::kAbsSt: kl_terms<R, moo::kAbsSt>(c, np, k); break;
            default: kl_terms<R, moo::kK3>(c, np, k); break;
        }
    } else {
        std::fill(k.v[kKl], k.v[kKl] + np, zero);
        std::copy(k.v[kPg], k.v[kPg] + np, k.v[kLoss]);
    }

    if (c.mode == moo::kGmpo || c.mode == moo::kVespo) std::fill(k.rho, k.rho + np, row.seq);  // reported: R_b, w_b

    // gradient and masked contributions (selects: inactive tokens give exact zeros whatever their inputs).
    // For a float mask, m scale and the products with m are formed in double (a mask of subnormal weights
    // has a scale beyond float's range). The selects write other arrays than they read: selecting in place,
    // x = on ? x : 0, stops the loop vectorising; and a float select feeding a double sum in the same loop
    // is miscompiled by GCC 12 for AVX2 under no-trapping-math (half the lanes dropped).
    const double scale = row.scale;
    const R inf = std::numeric_limits<R>::infinity();
    for (int64_t i = 0; i < np; ++i) {
        const bool on = k.m[i] != zero;
        k.v[kRatioMin][i] = on ? k.rho[i] : inf;
        k.v[kRatioMax][i] = on ? k.rho[i] : -inf;
    }
    if (c.weighted) {
        if (c.write_grad) {
            for (int64_t i = 0; i < np; ++i) {
                const R m = k.m[i], wm = static_cast<R>(static_cast<double>(m) * scale);
                k.grad[i] = m != zero ? k.g[i] * wm : zero;
            }
        }
        alignas(64) double md[kBlock];
        alignas(64) R xs[kBlock];
        for (int64_t i = 0; i < np; ++i) md[i] = static_cast<double>(k.m[i]);
        for (int q = 0; q < kNumSums; ++q) {
            const R* x = q == kRatio ? k.rho : (q == kDelta ? k.d : k.v[q]);
            for (int64_t i = 0; i < np; ++i) xs[i] = k.m[i] != zero ? x[i] : zero;
            double s[kLanes];  // a local copy: for R = double, acc could alias the block as far as the compiler knows
            std::copy(acc.sum[q], acc.sum[q] + kLanes, s);
            for (int64_t i0 = 0; i0 < np; i0 += kLanes) {
                for (int64_t l = 0; l < kLanes; ++l) s[l] += static_cast<double>(xs[i0 + l]) * md[i0 + l];
            }
            std::copy(s, s + kLanes, acc.sum[q]);
        }
    } else {  // a bool mask: m is 1 where active
        const R wm = static_cast<R>(scale);
        for (int64_t i = 0; i < np; ++i) {
            const R m = k.m[i];
            const bool on = m != zero;
            k.grad[i] = on ? k.g[i] * wm : zero;
            for (int q = 0; q < kRatio; ++q) k.v[q][i] = on ? k.v[q][i] * m : zero;
            k.v[kRatio][i] = on ? k.rho[i] * m : zero;
            k.v[kDelta][i] = on ? k.d[i] * m : zero;
        }
        for (int q = 0; q < kNumSums; ++q) {
            double s[kLanes];
            std::copy(acc.sum[q], acc.sum[q] + kLanes, s);
            for (int64_t i0 = 0; i0 < np; i0 += kLanes) {
                for (int64_t l = 0; l < kLanes; ++l) s[l] += static_cast<double>(k.v[q][i0 + l]);
            }
            std::copy(s, s + kLanes, acc.sum[q]);
        }
    }
    if (c.write_grad) store(p.grad, b, t0, len, k.grad);
    R lo[kLanes], hi[kLanes];
    std::fill(lo, lo + kLanes, inf);
    std::fill(hi, hi + kLanes, -inf);
    for (int64_t i0 = 0; i0 < np; i0 += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) lo[l] = std::min(lo[l], k.v[kRatioMin][i0 + l]);
    }
    for (int64_t i0 = 0; i0 < np; i0 += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) hi[l] = std::max(hi[l], k.v[kRatioMax][i0 + l]);
    }
    for (int64_t l = 0; l < kLanes; ++l) {
        acc.ratio_min[l] = std::min(acc.ratio_min[l], static_cast<double>(lo[l]));
        acc.ratio_max[l] = std::max(acc.ratio_max[l], static_cast<double>(hi[l]));
    }
}

template <typename R>
MOO_INLINE void work_item(const Problem& p, const Coeffs<R>& c, const Row<R>& row, int64_t b, int64_t t_begin,
                         Partials& acc) {
    Block<R> k;
    const int64_t t_end = std::min(p.T, t_begin + kChunk);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kBlock) {
        process_block(p, c, row, b, t0, std::min(kBlock, t_end - t0), k, acc);
    }
}

// The compiled work items (an AVX2 clone is picked at load time where the CPU has it).
MOO_SIMD_CLONES void work_item_f32(const Problem& p, const Coeffs<float>& c, const Row<float>& row, int64_t b,
                                  int64_t t_begin, Partials& acc) {
    work_item(p, c, row, b, t_begin, acc);
}

MOO_SIMD_CLONES void work_item_f64(const Problem& p, const Coeffs<double>& c, const Row<double>& row, int64_t b,
                                  int64_t t_begin, Partials& acc) {
    work_item(p, c, row, b, t_begin, acc);
}

// ---- driver ----------------------------------------------------------------------------------------------

// Fills out = [loss, pg_loss, kl_mean, clip_frac, clip_frac_low, clip_frac_high, dual_clip_frac, ratio_mean,
// ratio_min, ratio_max, ppo_kl, active_tokens, masked_frac].
template <typename R>
void run(const Problem& p, double* out) {
    const int64_t B = p.B, T = p.T;
    const bool parallel = B * T >= kParallelMinTokens;
    (void)parallel;  // unused without OpenMP

    // ---- 1. row statistics and totals
    std::vector<RowStats> stats(B);
    RowNeeds need;
    need.gspo = p.mode == moo::kGspo && p.old.ptr != nullptr;
    need.gmpo = p.mode == moo::kGmpo;
    need.vespo = p.mode == moo::kVespo;
    // the off-policy mask's source: sampling_logp, else old_logp (none: on-policy, every mean 0)
    if (p.offp_threshold) need.offp_source = p.sampling.ptr != nullptr ? &p.sampling : (p.old.ptr != nullptr ? &p.old : nullptr);
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t b = 0; b < B; ++b) stats[b] = row_stats<R>(p, need, b);
    double total_m = 0, seqs = 0;
    int64_t total_count = 0;
    for (const RowStats& s : stats) {
        total_m += s.n;
        seqs += s.n > 0 ? 1.0 : 0.0;
        total_count += s.count;
    }

    // ---- 2. per-row scale of the aggregation, sequence values (GSPO, GMPO, VESPO)
    const double den = denominator(p, total_m, seqs);
    const bool has_isw = p.isw.ptr != nullptr;
    std::vector<Row<R>> rows(B);
    for (int64_t b = 0; b < B; ++b) {
        const RowStats& st = stats[b];
        const double n = st.n, row_den = p.agg == moo::kSeqMeanTokenMean ? (n > 0 ? den * n : 0.0) : den;
        const double n1 = std::max(n, 1.0);
        rows[b].scale = row_den > 0 ? 1.0 / row_den : 0.0;
        rows[b].seq = static_cast<R>(std::exp(clamp_log_ratio(st.sd / n1)));  // GSPO's s_b
        rows[b].gmpo = rows[b].phi_pos = rows[b].phi_neg = 0;
        if (p.mode == moo::kGmpo) {
            // R_b = exp(clamp(sum d' m / n_b)), Abar_b = sum A m / n_b, G_b = exp(sum log(w + 1e-10) m / n_b) or 1
            const double ratio = std::exp(clamp_log_ratio(st.sdc / n1)), abar = st.sa / n1;
            const double geo = has_isw ? std::exp(st.slw / n1) : 1.0;
            rows[b].seq = static_cast<R>(ratio);
            rows[b].gmpo = static_cast<R>(-(abar * ratio * geo));
        } else if (p.mode == moo::kVespo) {
            // log w_b = clamp(sum d m + sum clamp(log is_weights), log 1e-8, 20); log phi = lambda + k log w - lambda w
            const double logw = std::min(std::max(st.sdv + st.slw, kVespoLogWMin), moo::kLogRatioMax);
            const double w = std::exp(logw);
            auto phi = [&](double k, double lambda) {
                const double lam = std::max(lambda, kVespoLambdaMin), log_phi = lam + k * logw - lam * w;
                return static_cast<R>(log_phi <= kVespoLogPhiMax ? std::exp(log_phi) : 0.0);
            };
            rows[b].seq = static_cast<R>(w);
            rows[b].phi_pos = phi(p.vk_pos, p.vlam_pos);
            rows[b].phi_neg = phi(p.vk_neg, p.vlam_neg);
        }
        rows[b].off = p.offpolicy.ptr != nullptr && static_cast<const uint8_t*>(p.offpolicy.ptr)[b * p.offpolicy.sb] != 0;
        rows[b].drop_negative = p.offp_threshold && !(stats[b].skl / std::max(n, 1.0) <= *p.offp_threshold);
    }

    // ---- 3. main pass over (row, chunk) work items
    Coeffs<R> c;
    c.lo = static_cast<R>(1.0 - p.clip_low);
    c.hi = static_cast<R>(1.0 + p.clip_high);
    c.cap = static_cast<R>(p.ratio_cap.value_or(kInf));
    c.dual = static_cast<R>(p.dual_clip.value_or(kInf));
    c.gamma = static_cast<R>(p.gamma);
    c.tau_pos = static_cast<R>(p.tau_pos);
    c.tau_neg = static_cast<R>(p.tau_neg);
    c.beta = static_cast<R>(p.beta);
    c.has_old = p.old.ptr != nullptr;
    c.has_ref = p.ref.ptr != nullptr;
    c.has_tadv = p.tadv.ptr != nullptr;
    c.isw_tokens = has_isw && p.mode != moo::kGmpo && p.mode != moo::kVespo;
    c.has_pmask = p.pmask.ptr != nullptr;
    c.gmpo_hi = p.clip_high;
    c.gmpo_lo = -p.clip_low;
    c.with_kl = c.has_ref && p.beta > 0;
    c.write_grad = p.grad.ptr != nullptr;
    c.weighted = p.mask.dtype != moo::kBool;
    c.mode = p.mode;
    c.kl = p.kl;
    c.kl_bias = p.kl_bias;
    const int64_t chunks = (T + kChunk - 1) / kChunk, items = B * chunks;
    std::vector<Partials> parts(items);
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t it = 0; it < items; ++it) {
        const int64_t b = it / chunks;
        if constexpr (std::is_same_v<R, float>) {
            work_item_f32(p, c, rows[b], b, (it % chunks) * kChunk, parts[it]);
        } else {
            work_item_f64(p, c, rows[b], b, (it % chunks) * kChunk, parts[it]);
        }
    }

    // ---- 4. reduction in item order: per-row sums, then the aggregation and the means
    double loss = 0, pg = 0, sums[kNumSums] = {}, ratio_min = kInf, ratio_max = -kInf;
    for (int64_t b = 0; b < B; ++b) {
        double row_loss = 0, row_pg = 0;
        for (int64_t j = 0; j < chunks; ++j) {
            const Partials& q = parts[b * chunks + j];
            row_loss += q.total(kLoss);
            row_pg += q.total(kPg);
            for (int s = kKl; s < kNumSums; ++s) sums[s] += q.total(s);
            for (int64_t l = 0; l < kLanes; ++l) {
                ratio_min = std::min(ratio_min, q.ratio_min[l]);
                ratio_max = std::max(ratio_max, q.ratio_max[l]);
            }
        }
        if (p.agg == moo::kSeqMeanTokenMean) {  // mean over the row's tokens; rows without weight count 0
            const double n = stats[b].n;
            row_loss = n > 0 ? row_loss / n : 0.0;
            row_pg = n > 0 ? row_pg / n : 0.0;
        }
        loss += row_loss;
        pg += row_pg;
    }
    auto mean = [&](int s) { return total_m > 0 ? sums[s] / total_m : 0.0; };
    const bool any_active = total_count > 0;
    out[0] = den > 0 ? loss / den : 0.0;
    out[1] = den > 0 ? pg / den : 0.0;
    out[2] = mean(kKl);
    out[3] = mean(kClipped);
    out[4] = mean(kLow);
    out[5] = mean(kHigh);
    out[6] = mean(kDual);
    out[7] = mean(kRatio);
    out[8] = any_active ? ratio_min : 0.0;
    out[9] = any_active ? ratio_max : 0.0;
    out[10] = -mean(kDelta);
    out[11] = total_m;
    out[12] = mean(kMasked);
}

// Entry point: logp, the loss's spec (its tensors and options by name, csrc/args.h; each tensor checked against
// [B, T] or [B]) and the outputs; writes the loss (0-dim) and metrics [12] in their dtype (float32, or float64 for
// float64 logp) and, when grad is given, d loss / d logp.
void policy_loss(const py::handle& logp_arg, const py::handle& grad_arg, const py::handle& spec,
                 const py::handle& loss_arg, const py::handle& metrics_arg) {
    using moo::kFloats;
    using moo::option;
    using moo::optional_option;
    using moo::tensor_arg;
    Problem p;
    const TensorArg logp = moo::tensor_value(logp_arg, "logp", {{-1, -1}}, kFloats, /*optional=*/false);
    p.B = logp.sizes[0];
    p.T = logp.sizes[1];
    const std::vector<int64_t> bt = {p.B, p.T}, b = {p.B};
    p.logp = logp;
    p.grad = moo::tensor_value(grad_arg, "grad", {bt}, {logp.dtype});
    p.adv = tensor_arg(spec, "advantages", {b, bt}, kFloats, /*optional=*/false);
    std::vector<int> mask_dtypes = kFloats;
    mask_dtypes.push_back(moo::kBool);
    p.mask = tensor_arg(spec, "mask", {bt}, mask_dtypes, /*optional=*/false);
    p.old = tensor_arg(spec, "old_logp", {bt}, kFloats);
    p.ref = tensor_arg(spec, "ref_logp", {bt}, kFloats);
    p.tadv = tensor_arg(spec, "token_advantages", {bt}, kFloats);
    const TensorArg isw = tensor_arg(spec, "is_weights", {b, bt}, kFloats);
    p.isw = isw;
    p.isw_rows = isw.ptr != nullptr && isw.sizes.size() == 1;
    p.offpolicy = tensor_arg(spec, "offpolicy", {b}, {moo::kBool});
    p.sampling = tensor_arg(spec, "sampling_logp", {bt}, kFloats);
    p.pmask = tensor_arg(spec, "policy_mask", {bt}, {moo::kBool});
    p.offp_threshold = optional_option<double>(spec, "offpolicy_mask_threshold");
    p.mode = option<int>(spec, "mode");
    p.agg = option<int>(spec, "agg");
    p.kl = option<int>(spec, "kl");
    p.kl_bias = option<bool>(spec, "kl_bias_correction");
    p.beta = option<double>(spec, "beta");
    p.clip_low = option<double>(spec, "clip_low");
    p.clip_high = option<double>(spec, "clip_high");
    p.dual_clip = optional_option<double>(spec, "dual_clip");
    p.ratio_cap = optional_option<double>(spec, "ratio_cap");
    p.gamma = option<double>(spec, "offpolicy_gamma");
    p.tau_pos = option<double>(spec, "sapo_tau_pos");
    p.tau_neg = option<double>(spec, "sapo_tau_neg");
    p.vk_pos = option<double>(spec, "vespo_k_pos");
    p.vlam_pos = option<double>(spec, "vespo_lambda_pos");
    p.vk_neg = option<double>(spec, "vespo_k_neg");
    p.vlam_neg = option<double>(spec, "vespo_lambda_neg");
    p.num_tokens = optional_option<double>(spec, "num_tokens");
    p.num_sequences = optional_option<double>(spec, "num_sequences");
    p.max_len = optional_option<int64_t>(spec, "max_len");
    const bool f64 = logp.dtype == moo::kFloat64;
    const int out_dtype = f64 ? moo::kFloat64 : moo::kFloat32;
    void* loss_out = moo::output<void>(loss_arg, "loss", {{}}, {out_dtype});
    void* metrics_out = moo::output<void>(metrics_arg, "metrics", {{moo::kNumMetrics}}, {out_dtype});

    double out[moo::kNumMetrics + 1];
    {
        py::gil_scoped_release release;
        if (f64)
            run<double>(p, out);
        else
            run<float>(p, out);
    }
    if (f64) {
        *static_cast<double*>(loss_out) = out[0];
        std::copy(out + 1, out + 1 + moo::kNumMetrics, static_cast<double*>(metrics_out));
    } else {
        *static_cast<float*>(loss_out) = static_cast<float>(out[0]);
        std::transform(out + 1, out + 1 + moo::kNumMetrics, static_cast<float*>(metrics_out),
                       [](double v) { return static_cast<float>(v); });
    }
}

}  // namespace

void register_policy_loss(py::module_& m) {
    m.def("policy_loss", &policy_loss,
          "Token-level policy loss of a [B, T] logp: writes loss, metrics [12] and, when grad is given, d loss / d "
          "logp. The loss's tensors and options are read by name from spec (a LossSpec, see csrc/args.h).",
          py::arg("logp"), py::arg("grad"), py::arg("spec"), py::arg("loss"), py::arg("metrics"));
}
