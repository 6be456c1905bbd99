// Multi-objective advantages on the CPU: the C++ backend of moo_kernels.multi_objective_advantages.
//
// Semantics: moo_kernels/ops/advantages/reference.py (the float64 reference); this is the same algorithm.
// Everything is computed in double: rewards of any dtype and strides are converted exactly, the weights
// arrive as float64. Groups are processed in blocks of kLanes = 8 groups side by side, one group per lane
// (two 256-bit vectors of doubles per row; a large group fills a block alone, spread over the lanes),
// blocks in parallel (OpenMP). For a block:
//   1. Gather: every sample of the block's groups is read once, reward gates applied (a nonzero byte is
//      an open gate, a valid sample, a passing gate); a sample is feasible when valid and every gate
//      passes; an entry takes part when its sample is feasible and its reward finite. Objective k
//      becomes column k of (value, take) cells, value 0 where the entry does not take part.
//   2. Scaled statistics of every column and group, three passes over the cells (which stay in cache):
//      count, lo and hi (exact; gathered while masking), then the power-of-two scale
//      c = 2^floor(log2 max|x|), the sum of u = x / c, then the sum of squared deviations of u from its
//      mean. No square over- or underflows for any finite input. lo == hi marks a column that does not
//      vary: its mean is then exactly the common value and its std exactly 0.
//   3. Column K, when needed (scalarize, drop_zero_variance, the batch steps "scale" and "gpg"), holds the
//      combined reward
//      d_j = SORTEDSUM_k(w'_k * (x_jk / C_g)): per sample the K terms are sorted ascending (a sorting
//      network over the lanes for K <= 4, an insertion sort otherwise) and added from +0.0 left to right.
//      These are the reference's IEEE operations in the reference's order, so d has the same bits on
//      every backend and "does not vary" (lo == hi of d) is decided identically everywhere. x / C_g is
//      computed as (x * pre) * inv (x * inv when pre is 1), both factors powers of two, which rounds
//      exactly as the division.
//   4. Weights (w, or w~_gk from the scaled stds), acceptance, normalisation and combination (a sorted
//      sum over the objectives again, so permuting objectives changes no bit), then sign scaling,
//      clipping and the fixed values of infeasible / rejected / invalid samples. What is applied to each
//      column (each objective, or d under "scalarize") is the column code the Python side resolved
//      (Derived.column: normalize, estimator, scale). "zscore", "center", "rloo" and "none" are affine maps
//      of u = x / c, folded into the terms of the sorted sum. The estimators' columns are computed per entry
//      first (estimator_column), after one more pass over the cells for what they need beyond 2.:
//        passk: the one entry equal to hi (when exactly one is, n >= 2) gets (hi / c - second / c) /
//          (sd_u + eps / c), second the largest entry below hi, every other entry 0 (e = 1);
//          passk_unscaled: the same margin, undivided (e = c);
//        opo: u - sum(L u) / sum(L) over the entries that take part (L: the lengths; the mean when they sum
//          to 0), 0 when the column does not vary (e = c);
//        loo_std: D_j = (u - mean_u) n / (n - 1) over sd_j + eps / c, sd_j the std of the others from their
//          M2_j = M2 - (u - mean_u)^2 n / (n - 1) (0 when the others are all equal, decided exactly from lo,
//          hi and how many entries equal them, or when M2_j <= M2 2^-40); D_j times the column's unit (c, or
//          P_g for d) where sd_j is 0; 0 when n < 2 or the column does not vary (e = 1).
//      The unitless columns (zscore, passk, loo_std) of d are the advantage; the others times P_g.
//   5. The batch step (Derived.batch): step 4 stops after the combination and keeps the raw advantage (as
//      double) and a sample code (in the sample-mask bytes), and for "scale" / "gpg" the combined reward.
//      Over the contributing samples: "whiten" (batch_normalize, reinforce_plus_plus_baseline) whitens
//      the advantages with their scaled statistics; "scale" (scale="batch") divides them by c (sd_u +
//      eps / c) of the combined reward s = d C_g cw (saturated); both statistics weighted by the lengths
//      when given (count sum L, mean sum L u / sum L, M2 sum L (u - mean)^2; samples of length 0 are not
//      part of them, yet are whitened or scaled). The statistics are reduced over fixed blocks of samples
//      combined in block order. "gpg" multiplies by n_c / max(m, 1), n_c the contributing samples, m those
//      with d != 0. A last parallel pass applies the step and finishes every sample.
// The reductions run in an order fixed by the code, so results are deterministic: the same bits whatever
// the thread count or instruction set. Outputs are float32 (float64 for float64 rewards). The first
// non-finite reward (nan_policy="raise") and the first bad weight are returned as indices, and the Python
// launcher raises.
// The arguments arrive by name (csrc/args.h): the rewards, the tensors and options of the op's spec
// (moo_kernels/ops/advantages/spec.py) and the outputs, each tensor checked against the sizes read here.
// Shared with the other kernels: the lane macros (OpenMP, AVX2 clones) in simd.h, the element types in
// dtype.h, the option and dtype codes in codes.h.

#include "simd.h"  // first: its no-trapping-math pragma applies to what follows

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "args.h"  // the arguments by name; dtype.h and codes.h

namespace py = pybind11;

namespace {

constexpr int64_t kLanes = 8;  // groups per block: two 256-bit vectors of doubles (two independent sum chains)
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();  // no bad value found
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kMaxFinite = std::numeric_limits<double>::max();
constexpr double kMinNormal = std::numeric_limits<double>::min();  // 2^-1022
constexpr double kTwo52 = 4503599627370496.0;                      // 2^52
constexpr int64_t kParallelMinElements = 1 << 14;  // fewer rewards: one thread (threads cost more)
constexpr int64_t kBlocksPerTask = 4;              // OpenMP dynamic schedule chunk
constexpr int64_t kBatchRows = 1024;               // rows of kLanes samples per part of the batch reduction
constexpr int64_t kSpreadMin = 256;                // a group this large fills a block alone, over all lanes

// The option codes of codes.h (shared with moo_kernels/_codes.py).
using moo::kBatchGpg;
using moo::kBatchNone;
using moo::kBatchScale;
using moo::kBatchWhiten;
using moo::kColLooStd;
using moo::kColNone;
using moo::kColOpo;
using moo::kColPassk;
using moo::kColPasskUnscaled;
using moo::kColRloo;
using moo::kColZScore;
using moo::kScalarize;
using moo::kVariance;
// Sample codes kept in the sample-mask bytes between the group pass and the batch pass.
enum SampleCode : uint8_t { kDropped = 0, kContributes = 1, kInfeasible = 2 };

inline bool is_finite(double x) { return std::abs(x) <= kMaxFinite; }  // false for inf and nan

// ---- problem description -------------------------------------------------------------------------

struct Inputs {
    const void* rewards;  // [N, K] of the dtype code
    int64_t n, k, stride_rn, stride_rk;
    int64_t group_size;           // > 0: contiguous groups of this size; 0: groups given by order / offsets
    int64_t num_groups;
    const int64_t* order;         // [N] sample indices sorted by group
    const int64_t* offsets;       // [G + 1] start of each group in order
    const double* weights;        // [K] w
    const double* wprime;         // [K] w' = w / cw
    double cw;                    // 2^floor(log2 max_k w_k), 1 when every weight is 0
    const uint8_t* valid;         // [N] or null
    int64_t stride_v;
    const uint8_t* reward_gates;  // [N, K] or null
    int64_t stride_rgn, stride_rgk;
    const uint8_t* gates;         // [N, M] or null
    int64_t stride_gn, stride_gm, m;
    const double* std_floor;      // [K] floor of each objective's standard deviation in zscore, or null
    const double* lengths;        // [N] response lengths (as double), or null
};

struct Outputs {
    void* adv;             // [N] Out
    uint8_t* group_mask;   // [G] bool
    uint8_t* sample_mask;  // [N] bool
    void* weights;         // [G, K] Out
    void* mean;            // [G, K] Out
    void* std;             // [G, K] Out
};

struct Options {
    int column;  // what is applied to each column: moo::Column (Derived.column)
    bool unbiased;
    int weighting;
    int batch;   // the batch step after the combination: moo::Batch (Derived.batch)
    double eps, gated_value, infeasible_advantage;
    int64_t min_feasible;
    bool drop_zero_variance;
    double positive_scale, negative_scale;
    bool has_clip;
    double clip;
    bool check_finite;
};

// ---- power-of-two scales -------------------------------------------------------------------------

// 2^floor(log2 m) for finite m >= 0 (exact, subnormals included), 1 for m == 0: the exponent bits of m
// (of m * 2^54 for a subnormal m, then divided by 2^54, exactly).
inline double exponent_only(double m) {
    constexpr uint64_t kExponent = 0x7ff0000000000000ull;
    uint64_t bits;
    std::memcpy(&bits, &m, sizeof bits);
    bits &= kExponent;
    std::memcpy(&m, &bits, sizeof m);
    return m;
}

// Branch-free, so that it vectorises inside the lane loops.
inline double pow2_floor(double m) {
    const bool tiny = m < kMinNormal;                                        // subnormal (or 0)
    const double p = exponent_only(tiny ? m * 18014398509481984.0 : m);      // * 2^54: normal
    const double c = tiny ? p * 5.551115123125783e-17 : p;                   // * 2^-54: exact
    return m > 0 ? c : 1.0;
}

// Division by a power of two c is done as two multiplications, (x * pre) * inv: pre = 2^52 when c is below
// 2^-1022 (1 / c would overflow), else 1, and inv = 1 / (c * pre), both exact. The first product is exact
// and the second rounds once, so the result has the bits of x / c.

// ---- lanes and statistics ------------------------------------------------------------------------
//
// The loops over samples run over rows of kLanes independent lanes. The compiler turns them into SIMD
// code without reassociating anything (no -ffast-math): the summation order stays the code's. Inside
// them every operand is loaded into a local before a condition selects between locals, as a
// conditional load stops the vectorisation.

// A row of kLanes values and their masks (1.0 where the value takes part, and the value is then 0
// otherwise). Keeping both in one cell keeps the loads of one from aliasing the stores of the other.
struct Cell {
    double value[kLanes];
    double take[kLanes];
};

// Per-sample data of a row of a block.
struct Slot {
    int64_t row[kLanes];     // sample index (0 for padding)
    double valid[kLanes];     // 1.0 for a valid sample
    double feasible[kLanes];  // 1.0 for a feasible sample
    double adv[kLanes];       // combined advantage, then the finished one
    double code[kLanes];      // SampleCode, or the sample-mask bit once finished
    double len[kLanes];       // response length (0 without lengths, and for padding)
};

// Scaled statistics of one column of a block, lane by lane (reference.py, step 2).
struct Column {
    double count[kLanes], lo[kLanes], hi[kLanes];
    double big[kLanes];                          // max |x|, 0 without entries
    double c[kLanes], pre[kLanes], inv[kLanes];  // the scale c, and x / c = (x * pre) * inv
    double mean_u[kLanes], sd_u[kLanes];
    double m2[kLanes];                           // sum of squared deviations of u from mean_u
    double varies[kLanes];                       // 1.0 when lo < hi

    double mean(int64_t l) const { return count[l] > 0 ? std::min(std::max(c[l] * mean_u[l], lo[l]), hi[l]) : 0.0; }
    double sd(int64_t l) const { return c[l] * sd_u[l]; }
};

// Pass 1 of a column: per-lane count, min and max of the values that take part.
struct Extremes {
    double count[kLanes], lo[kLanes], hi[kLanes];

    void reset() {
        std::fill(count, count + kLanes, 0.0);
        std::fill(lo, lo + kLanes, kInf);
        std::fill(hi, hi + kLanes, -kInf);
    }

    // One row of a column: value v and mask t (1.0 where it takes part) of each lane.
    MOO_INLINE void add(const double* v, const double* t) {
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) {
            const double a = t[l] > 0 ? v[l] : kInf, b = t[l] > 0 ? v[l] : -kInf;
            count[l] += t[l];
            lo[l] = a < lo[l] ? a : lo[l];
            hi[l] = b > hi[l] ? b : hi[l];
        }
    }
};

MOO_INLINE Extremes lane_extremes(const Cell* cells, int64_t rows) {
    Extremes e;
    e.reset();
    for (int64_t i = 0; i < rows; ++i) e.add(cells[i].value, cells[i].take);
    return e;
}

// x / c in a lane: (x * pre) * inv, or x * inv when the block's pre are all 1 (every c >= 2^-1022, the
// common case: the same bits for one multiplication less).
template <bool kPre>
MOO_INLINE double scaled(double x, double pre, double inv) {
    return kPre ? (x * pre) * inv : x * inv;
}

inline bool unit_pre(const double* pre) {
    bool unit = true;
    for (int64_t l = 0; l < kLanes; ++l) unit &= pre[l] == 1.0;
    return unit;
}

// Pass 2: per-lane sums of u = x / c (0 where the value does not take part). kWeighted: the mask holds a
// weight (> 0 where the value takes part), and the sums are of u * weight.
template <bool kPre, bool kWeighted = false>
MOO_INLINE void lane_scaled_sums(const Cell* cells, int64_t rows, const double* pre, const double* inv,
                                 double* out) {
    double sum[kLanes] = {};
    for (int64_t i = 0; i < rows; ++i) {
        const Cell& c = cells[i];
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) {
            const double u = scaled<kPre>(c.value[l], pre[l], inv[l]);
            sum[l] += kWeighted ? u * c.take[l] : u;
        }
    }
    std::copy(sum, sum + kLanes, out);
}

// Pass 3: per-lane sums of squared deviations of u from mean[lane] over the values that take part (kWeighted:
// each times its weight).
template <bool kPre, bool kWeighted = false>
MOO_INLINE void lane_scaled_squares(const Cell* cells, int64_t rows, const double* pre, const double* inv,
                                    const double* mean, double* out) {
    double m2[kLanes] = {};
    for (int64_t i = 0; i < rows; ++i) {
        const Cell& c = cells[i];
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) {
            if constexpr (kWeighted) {
                const double t = c.take[l], v = scaled<kPre>(c.value[l], pre[l], inv[l]) - mean[l];
                const double d = t > 0 ? v : 0.0;
                m2[l] += (d * d) * t;
            } else {
                const double d = (scaled<kPre>(c.value[l], pre[l], inv[l]) - mean[l]) * c.take[l];  // 0 unless take
                m2[l] += d * d;
            }
        }
    }
    std::copy(m2, m2 + kLanes, out);
}

// Sums of the lanes in lane order, into every lane (a group spread over the lanes).
inline void merge_lanes(double* v) {
    double total = 0;
    for (int64_t l = 0; l < kLanes; ++l) total += v[l];
    std::fill(v, v + kLanes, total);
}

// Scaled statistics of the rows of a column (passes 2 and 3; e: pass 1), per lane, or (spread: every lane
// holds the same group) merged over the lanes in lane order with every lane getting the result.
MOO_INLINE void column_stats(const Cell* cells, int64_t rows, Extremes e, bool spread, bool unbiased, Column& s) {
    if (spread) {
        merge_lanes(e.count);
        const double low = *std::min_element(e.lo, e.lo + kLanes), high = *std::max_element(e.hi, e.hi + kLanes);
        std::fill(e.lo, e.lo + kLanes, low);
        std::fill(e.hi, e.hi + kLanes, high);
    }
    double sums[kLanes];
    double any_varies = 0;
    MOO_OMP(omp simd reduction(max : any_varies))
    for (int64_t l = 0; l < kLanes; ++l) {
        const double n = e.count[l], lo = e.lo[l], hi = e.hi[l];
        const double a = std::abs(lo), b = std::abs(hi);
        s.count[l] = n, s.lo[l] = lo, s.hi[l] = hi;
        s.big[l] = n > 0 ? (a > b ? a : b) : 0.0;
        s.c[l] = pow2_floor(s.big[l]);
        s.pre[l] = s.c[l] < kMinNormal ? kTwo52 : 1.0;
        s.inv[l] = 1.0 / (s.c[l] * s.pre[l]);
        s.varies[l] = hi > lo ? 1.0 : 0.0;
        any_varies = s.varies[l] > any_varies ? s.varies[l] : any_varies;
    }
    const bool unit = unit_pre(s.pre);
    if (unit) {
        lane_scaled_sums<false>(cells, rows, s.pre, s.inv, sums);
    } else {
        lane_scaled_sums<true>(cells, rows, s.pre, s.inv, sums);
    }
    if (spread) merge_lanes(sums);
    MOO_OMP(omp simd)
    for (int64_t l = 0; l < kLanes; ++l) {
        // not varying: exactly the common scaled value (the same operations as each of its entries)
        const double n = s.count[l], exact = n > 0 ? (s.hi[l] * s.pre[l]) * s.inv[l] : 0.0;
        s.mean_u[l] = s.varies[l] > 0 ? sums[l] / n : exact;
        s.sd_u[l] = 0;
        s.m2[l] = 0;
    }
    if (any_varies > 0) {
        if (unit) {
            lane_scaled_squares<false>(cells, rows, s.pre, s.inv, s.mean_u, sums);
        } else {
            lane_scaled_squares<true>(cells, rows, s.pre, s.inv, s.mean_u, sums);
        }
        if (spread) merge_lanes(sums);
        for (int64_t l = 0; l < kLanes; ++l) {
            s.m2[l] = sums[l];
            const double denom = unbiased ? s.count[l] - 1 : s.count[l];
            const double var = s.varies[l] > 0 && denom > 0 ? sums[l] / denom : 0.0;
            s.sd_u[l] = var > 0 ? std::sqrt(var) : 0.0;
        }
    }
}

// ---- sorted sums over the objectives -------------------------------------------------------------

// SORTEDSUM: the terms sorted ascending, then added left to right from +0.0. The sum of a multiset of terms
// does not depend on where equal terms (or zeros of either sign) end up.

// a, b into ascending order (they stay a permutation of the two).
MOO_INLINE void order(double& a, double& b) {
    const double x = a, y = b;
    a = x < y ? x : y;
    b = x < y ? y : x;
}

// SORTEDSUM of the KC <= 4 terms term(0), ..., term(KC - 1) of one lane, by a sorting network on scalars.
// Called inside the lane loops, it becomes minima, maxima and blends over the lanes.
template <int KC, typename Term>
MOO_INLINE double sorted_sum_small(const Term& term) {
    static_assert(KC >= 1 && KC <= 4, "sorting networks for 1 to 4 terms");
    double t0 = term(0), t1 = 0, t2 = 0, t3 = 0;
    if constexpr (KC > 1) t1 = term(1);
    if constexpr (KC > 2) t2 = term(2);
    if constexpr (KC > 3) t3 = term(3);
    if constexpr (KC == 2) {
        order(t0, t1);
    } else if constexpr (KC == 3) {
        order(t0, t2);
        order(t0, t1);
        order(t1, t2);
    } else if constexpr (KC == 4) {
        order(t0, t1);
        order(t2, t3);
        order(t0, t2);
        order(t1, t3);
        order(t1, t2);
    }
    double sum = 0;
    sum += t0;
    if constexpr (KC > 1) sum += t1;
    if constexpr (KC > 2) sum += t2;
    if constexpr (KC > 3) sum += t3;
    return sum;
}

// SORTEDSUM per lane of K rows of kLanes terms t[k * kLanes + l] (any K), by an insertion sort per lane.
inline void sorted_sums(double* t, int64_t K, double* out) {
    for (int64_t l = 0; l < kLanes; ++l) {
        for (int64_t i = 1; i < K; ++i) {
            const double v = t[i * kLanes + l];
            int64_t j = i;
            for (; j > 0 && t[(j - 1) * kLanes + l] > v; --j) t[j * kLanes + l] = t[(j - 1) * kLanes + l];
            t[j * kLanes + l] = v;
        }
        double sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += t[k * kLanes + l];
        out[l] = sum;
    }
}

// ---- per-sample maps -----------------------------------------------------------------------------

// Sign shaping and clipping of a contributing sample's advantage.
inline double shape(double a, const Options& o) {
    a *= a > 0 ? o.positive_scale : o.negative_scale;
    return o.has_clip ? std::min(std::max(a, -o.clip), o.clip) : a;
}

// Final advantage and sample-mask bit of a sample, from its code and (whitened) raw advantage.
template <typename Out>
inline void finish_sample(double a, uint8_t code, const Options& o, Out* adv, uint8_t* keep) {
    const double fixed = code == kInfeasible ? o.infeasible_advantage : 0.0;
    *adv = static_cast<Out>(code == kContributes ? shape(a, o) : fixed);
    *keep = code == kContributes || (code == kInfeasible && o.infeasible_advantage != 0.0);
}

// ---- one block of groups -------------------------------------------------------------------------

// A block: up to kLanes consecutive groups, one per lane, or one large group spread over the lanes.
struct BlockPlan {
    int64_t first;   // first group
    int64_t groups;  // number of groups, 1 when spread
    bool spread;
};

// Per-thread buffers of a block. Row i of lane l is sample i of that lane's group (sample i * kLanes + l
// of the group when spread); rows past the group are padding (invalid, never taking part). cells holds
// K + 1 columns of `cap` rows: the objectives, then the combined reward. The buffers grow to the largest
// block met.
struct Block {
    int64_t k;
    bool spread = false;
    int64_t group[kLanes];                 // group of each lane (num_groups for an empty lane, and lanes 1.. when spread)
    int64_t start[kLanes], count[kLanes];  // start of the lane's group, and the lane's rows
    int64_t rows = 0;                      // largest count of the block
    int64_t cap = 0;
    double feasible_count[kLanes];
    double top[kLanes];                    // C_g: the combined reward's scale of its terms
    std::vector<Slot> slots;               // [cap]
    std::vector<Cell> cells;               // [K + 1, cap]
    std::vector<Extremes> extremes;        // [K + 1] pass 1 of the statistics of each column
    std::vector<Column> stats;             // [K + 1]
    std::vector<double> weff;              // [K, kLanes] combination weights W (w' or w~)
    std::vector<double> shift;             // [K, kLanes] per (objective, lane) maps of the combination
    std::vector<double> mul;               // [K, kLanes]
    std::vector<double> fits;              // [K, kLanes] 1.0 where c_gk <= C_g (the combined reward's terms)
    std::vector<double> terms;             // [K, kLanes] terms of one row, sorted in place

    explicit Block(int64_t objectives)
        : k(objectives),
          extremes(objectives + 1),
          stats(objectives + 1),
          weff(objectives * kLanes),
          shift(objectives * kLanes),
          mul(objectives * kLanes),
          fits(objectives * kLanes),
          terms(objectives * kLanes) {}

    void reserve(int64_t n) {
        if (n <= cap) return;
        cap = n;
        slots.resize(cap);
        cells.resize((k + 1) * cap);
    }

    Cell* column(int64_t c) { return cells.data() + c * cap; }
};

inline int64_t group_start(const Inputs& in, int64_t g) {
    return in.group_size > 0 ? g * in.group_size : in.offsets[g];
}

inline int64_t group_count(const Inputs& in, int64_t g) {
    return in.group_size > 0 ? in.group_size : in.offsets[g + 1] - in.offsets[g];
}

// Blocks in group order: runs of up to kLanes groups smaller than kSpreadMin, and the larger ones alone.
std::vector<BlockPlan> plan_blocks(const Inputs& in) {
    std::vector<BlockPlan> plans;
    for (int64_t g = 0; g < in.num_groups;) {
        if (group_count(in, g) >= kSpreadMin) {
            plans.push_back({g++, 1, true});
            continue;
        }
        BlockPlan p{g, 0, false};
        while (g < in.num_groups && p.groups < kLanes && group_count(in, g) < kSpreadMin) ++g, ++p.groups;
        plans.push_back(p);
    }
    return plans;
}

// Step 1: gather the samples of the block's groups. KC is K when known at compile time (0: in.k).
// Returns the lowest flat index j * K + k of a non-finite reward of a valid sample when checking, else
// kNone.
template <typename In, int KC>
MOO_INLINE int64_t load_block(const Inputs& in, const Options& o, const BlockPlan& plan, Block& b) {
    const int64_t K = KC > 0 ? KC : in.k;
    b.spread = plan.spread;
    b.rows = 0;
    for (int64_t l = 0; l < kLanes; ++l) {
        const int64_t g = plan.spread ? plan.first : l < plan.groups ? plan.first + l : in.num_groups;
        const int64_t size = g < in.num_groups ? group_count(in, g) : 0;
        b.group[l] = plan.spread && l > 0 ? in.num_groups : g;
        b.start[l] = g < in.num_groups ? group_start(in, g) : 0;
        b.count[l] = plan.spread ? (size - l + kLanes - 1) / kLanes : size;
        b.rows = std::max(b.rows, b.count[l]);
    }
    b.reserve(b.rows);

    const int64_t m = in.gates ? in.m : 0;
    const int64_t step = plan.spread ? kLanes : 1;  // sample of row i, lane l: start + i * step (+ l when spread)
    for (int64_t l = 0; l < kLanes; ++l) {
        double feasible_count = 0;
        const int64_t first = b.start[l] + (plan.spread ? l : 0);
        for (int64_t i = 0; i < b.count[l]; ++i) {
            Slot& s = b.slots[i];
            const int64_t index = first + i * step;
            const int64_t row = in.order ? in.order[index] : index;
            const bool valid = !in.valid || in.valid[row * in.stride_v] != 0;  // any nonzero byte is true
            bool pass = valid;
            // The early exit keeps this short loop scalar (its vectorised form costs more for a few gates).
            const uint8_t* gate = m > 0 ? in.gates + row * in.stride_gn : nullptr;
            for (int64_t c = 0; c < m && pass; ++c) pass = gate[c * in.stride_gm] != 0;
            s.row[l] = row, s.valid[l] = valid, s.feasible[l] = pass;
            s.len[l] = in.lengths ? in.lengths[row] : 0.0;
            feasible_count += pass;
        }
        for (int64_t i = b.count[l]; i < b.rows; ++i) {  // padding
            Slot& s = b.slots[i];
            s.row[l] = 0, s.valid[l] = s.feasible[l] = s.len[l] = 0.0;
        }
        b.feasible_count[l] = feasible_count;
    }

    // Read every reward (and reward-gate bit) of the block first, then mask them in place: the vector
    // loads of the masking loop would stall on the scalar stores of the reads if they were interleaved.
    const In* r = static_cast<const In*>(in.rewards);
    for (int64_t k = 0; k < K; ++k) {
        Cell* cells = b.column(k);
        for (int64_t i = 0; i < b.rows; ++i) {
            const int64_t* rows = b.slots[i].row;
            for (int64_t l = 0; l < kLanes; ++l)
                cells[i].value[l] = static_cast<double>(moo::value(r[rows[l] * in.stride_rn + k * in.stride_rk]));
            if (!in.reward_gates) {
                std::fill(cells[i].take, cells[i].take + kLanes, 1.0);
                continue;
            }
            for (int64_t l = 0; l < kLanes; ++l)
                cells[i].take[l] = in.reward_gates[rows[l] * in.stride_rgn + k * in.stride_rgk] != 0;
        }
    }
    double checked[kLanes];  // 0 once a valid sample has a non-finite reward
    std::fill(checked, checked + kLanes, 1.0);
    const double gated_value = o.gated_value;  // a local: a member would be a conditional load
    for (int64_t k = 0; k < K; ++k) {
        Cell* cells = b.column(k);
        double n[kLanes] = {}, low[kLanes], high[kLanes];  // pass 1 of the statistics, on the way
        std::fill(low, low + kLanes, kInf);
        std::fill(high, high + kLanes, -kInf);
        for (int64_t i = 0; i < b.rows; ++i) {
            Cell& c = cells[i];
            const Slot& s = b.slots[i];
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l) {
                const double read = c.value[l], open = c.take[l], feasible = s.feasible[l], valid = s.valid[l];
                const double v = open > 0 ? read : gated_value;
                const double finite = std::abs(v) <= kMaxFinite ? 1.0 : 0.0;  // 0 for inf and nan
                const double take = finite * feasible;
                c.value[l] = take > 0 ? v : 0.0;
                c.take[l] = take;
                const double fine = finite + (1.0 - valid);  // 0 only for a non-finite reward of a valid sample
                checked[l] = fine < checked[l] ? fine : checked[l];
                const double x = c.value[l], lo = take > 0 ? x : kInf, hi = take > 0 ? x : -kInf;
                n[l] += take;
                low[l] = lo < low[l] ? lo : low[l];
                high[l] = hi > high[l] ? hi : high[l];
            }
        }
        Extremes& e = b.extremes[k];
        std::copy(n, n + kLanes, e.count);
        std::copy(low, low + kLanes, e.lo);
        std::copy(high, high + kLanes, e.hi);
    }

    bool all_finite = true;
    for (int64_t l = 0; l < kLanes; ++l) all_finite &= checked[l] > 0;
    if (all_finite || !o.check_finite) return kNone;
    int64_t bad = kNone;  // rare path: name the first one
    for (int64_t l = 0; l < kLanes; ++l) {
        for (int64_t i = 0; i < b.count[l]; ++i) {
            const int64_t row = b.slots[i].row[l];
            for (int64_t k = 0; k < K && b.slots[i].valid[l] > 0; ++k) {
                double v = moo::value(r[row * in.stride_rn + k * in.stride_rk]);
                if (in.reward_gates && !in.reward_gates[row * in.stride_rgn + k * in.stride_rgk]) v = gated_value;
                if (!is_finite(v)) bad = std::min(bad, row * K + k);
            }
        }
    }
    return bad;
}

// The rows of combined_column for K = KC <= 4, with pass 1 of its statistics on the way.
template <int KC, bool kPre>
MOO_INLINE void combined_rows(const double* wk, const double* pre, const double* inv, Block& b, Extremes& e) {
    const double* fits = b.fits.data();
    Cell* combined = b.column(KC);
    double n[kLanes] = {}, low[kLanes], high[kLanes];
    std::fill(low, low + kLanes, kInf);
    std::fill(high, high + kLanes, -kInf);
    for (int64_t i = 0; i < b.rows; ++i) {
        const Cell* x[KC];
        for (int k = 0; k < KC; ++k) x[k] = b.column(k) + i;
        Cell& out = combined[i];
        const double* feasible = b.slots[i].feasible;
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) {
            const double d = sorted_sum_small<KC>([&](int k) {
                const double q = scaled<kPre>(x[k]->value[l], pre[l], inv[l]);
                return wk[k] * (fits[k * kLanes + l] > 0 ? q : 0.0);
            });
            const double t = feasible[l], lo = t > 0 ? d : kInf, hi = t > 0 ? d : -kInf;
            out.value[l] = d;
            out.take[l] = t;
            n[l] += t;
            low[l] = lo < low[l] ? lo : low[l];
            high[l] = hi > high[l] ? hi : high[l];
        }
    }
    std::copy(n, n + kLanes, e.count);
    std::copy(low, low + kLanes, e.lo);
    std::copy(high, high + kLanes, e.hi);
}

// Step 3: column K, the combined reward d_j = SORTEDSUM_k(w'_k * q_jk), q_jk = x_jk / C_g where
// c_gk <= C_g, else 0; C_g = max c_gk over the objectives with w'_k > 0 and a nonzero entry. d is 0
// for an infeasible sample (its values are 0), and takes part where the sample is feasible.
template <int KC>
MOO_INLINE void combined_column(const Inputs& in, Block& b) {
    const int64_t K = KC > 0 ? KC : in.k;
    double top[kLanes] = {}, pre[kLanes], inv[kLanes];
    for (int64_t k = 0; k < K; ++k) {
        const Column& s = b.stats[k];
        const bool weighted = in.wprime[k] > 0;
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) top[l] = weighted && s.big[l] > 0 && s.c[l] > top[l] ? s.c[l] : top[l];
    }
    for (int64_t l = 0; l < kLanes; ++l) {
        top[l] = top[l] > 0 ? top[l] : 1.0;
        pre[l] = top[l] < kMinNormal ? kTwo52 : 1.0;
        inv[l] = 1.0 / (top[l] * pre[l]);
        b.top[l] = top[l];
    }
    for (int64_t k = 0; k < K; ++k) {
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) b.fits[k * kLanes + l] = b.stats[k].c[l] <= top[l] ? 1.0 : 0.0;
    }
    const double* fits = b.fits.data();
    Cell* combined = b.column(K);
    Extremes e;
    e.reset();
    if constexpr (KC > 0) {
        double wk[KC];
        for (int k = 0; k < KC; ++k) wk[k] = in.wprime[k];
        if (unit_pre(pre)) {
            combined_rows<KC, false>(wk, pre, inv, b, e);
        } else {
            combined_rows<KC, true>(wk, pre, inv, b, e);
        }
    } else {
        double* t = b.terms.data();
        for (int64_t i = 0; i < b.rows; ++i) {
            for (int64_t k = 0; k < K; ++k) {
                const Cell& x = b.column(k)[i];
                const double w = in.wprime[k];
                for (int64_t l = 0; l < kLanes; ++l) {
                    const double q = (x.value[l] * pre[l]) * inv[l];
                    t[k * kLanes + l] = w * (fits[k * kLanes + l] > 0 ? q : 0.0);
                }
            }
            sorted_sums(t, K, combined[i].value);
            std::copy(b.slots[i].feasible, b.slots[i].feasible + kLanes, combined[i].take);
            e.add(combined[i].value, combined[i].take);
        }
    }
    b.extremes[K] = e;
}

// ---- the estimators' columns ----------------------------------------------------------------------

// Columns whose value a is a pure number (e = 1); the others are in the column's units (e = c).
inline bool unitless(int column) { return column == kColZScore || column == kColPassk || column == kColLooStd; }

// Columns that are not an affine map of u (step 3: passk, passk_unscaled, opo, loo_std): their values are
// computed per entry by estimator_column, then combined as they are.
inline bool estimator(int column) { return column >= kColPassk; }

constexpr double kLooTiny = 1.0 / 1099511627776.0;  // 2^-40: a leave-one-out M2 at most this fraction of M2 is 0

inline double clamp_finite(double v) { return v < -kMaxFinite ? -kMaxFinite : (v > kMaxFinite ? kMaxFinite : v); }

// Step 3 for the estimators' columns, one column of a block (its cells, statistics s and the rows' slots for the
// lengths): the scaled value a of every row and lane, handed to put(i, l, a) once the column's extra statistics
// are gathered (so put may overwrite the cells); a = 0 where the entry does not take part. eps_u: the z-score's
// eps over the column's scale, per lane; unit: the column's scale (loo_std's unnormalised differences are in its
// units). The extra statistics, per lane (merged over the lanes when spread): how many entries equal lo and hi,
// the largest entry below hi (passk's second best), the sums of the lengths and of lengths * u (opo).
template <bool kPre, typename Put>
MOO_INLINE void estimator_column(int column, const Cell* cells, const Slot* slots, int64_t rows, const Column& s,
                                 bool spread, bool unbiased, const double* eps_u, const double* unit, Put put) {
    const double* pre = s.pre;
    const double* inv = s.inv;
    double n_lo[kLanes] = {}, n_hi[kLanes] = {}, second[kLanes], len[kLanes] = {}, len_u[kLanes] = {};
    std::fill(second, second + kLanes, -kInf);
    for (int64_t i = 0; i < rows; ++i) {
        const Cell& c = cells[i];
        const double* length = slots[i].len;
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) {
            const double x = c.value[l], t = c.take[l] > 0 ? 1.0 : 0.0, L = length[l];
            const double at_lo = x == s.lo[l] ? t : 0.0, at_hi = x == s.hi[l] ? t : 0.0;
            const double below = t > 0 && at_hi == 0 ? x : -kInf, lw = t > 0 ? L : 0.0;
            n_lo[l] += at_lo;
            n_hi[l] += at_hi;
            second[l] = below > second[l] ? below : second[l];
            len[l] += lw;
            len_u[l] += lw * scaled<kPre>(t > 0 ? x : 0.0, pre[l], inv[l]);
        }
    }
    if (spread) {
        merge_lanes(n_lo);
        merge_lanes(n_hi);
        merge_lanes(len);
        merge_lanes(len_u);
        std::fill(second, second + kLanes, *std::max_element(second, second + kLanes));
    }
    if (column == kColPassk || column == kColPasskUnscaled) {
        // the one entry at hi (n >= 2): (hi / c - second / c), over (sd_u + eps / c) for passk; 0 elsewhere
        const bool divide = column == kColPassk;
        double second_u[kLanes];
        for (int64_t l = 0; l < kLanes; ++l)
            second_u[l] = second[l] > -kInf ? scaled<kPre>(second[l], pre[l], inv[l]) : 0.0;
        for (int64_t i = 0; i < rows; ++i) {
            const Cell& c = cells[i];
            for (int64_t l = 0; l < kLanes; ++l) {
                const double x = c.value[l];
                const bool winner = c.take[l] > 0 && x == s.hi[l] && n_hi[l] == 1 && s.count[l] >= 2;
                const double margin = scaled<kPre>(x, pre[l], inv[l]) - second_u[l];
                const double den = s.sd_u[l] + eps_u[l];
                const double a = divide ? (den > 0 ? margin / den : 0.0) : margin;
                put(i, l, winner ? a : 0.0);
            }
        }
    } else if (column == kColOpo) {
        // u - sum(L u) / sum(L) (the mean when the lengths sum to 0); exactly 0 when the column does not vary
        double base[kLanes];
        for (int64_t l = 0; l < kLanes; ++l)
            base[l] = s.varies[l] > 0 && len[l] > 0 ? len_u[l] / len[l] : s.mean_u[l];
        for (int64_t i = 0; i < rows; ++i) {
            const Cell& c = cells[i];
            for (int64_t l = 0; l < kLanes; ++l) {
                const double a = scaled<kPre>(c.value[l], pre[l], inv[l]) - base[l];
                put(i, l, c.take[l] > 0 ? a : 0.0);
            }
        }
    } else {
        // loo_std: D_j = (u - mean_u) f, f = n / (n - 1); M2_j = M2 - (u - mean_u)^2 f, 0 when the others are all
        // equal (exactly: from lo, hi and their counts) or M2_j <= M2 2^-40; sd_j = sqrt(M2_j / D')
        for (int64_t i = 0; i < rows; ++i) {
            const Cell& c = cells[i];
            for (int64_t l = 0; l < kLanes; ++l) {
                const double x = c.value[l], n = s.count[l], m2 = s.m2[l];
                const bool take = c.take[l] > 0, many = n >= 2;
                const double f = many ? n / (n - 1) : 0.0;
                const double dev = scaled<kPre>(x, pre[l], inv[l]) - s.mean_u[l];
                const bool others_equal = take && ((x == s.lo[l] && n_lo[l] == 1 && n_hi[l] == n - 1) ||
                                                   (x == s.hi[l] && n_hi[l] == 1 && n_lo[l] == n - 1));
                double m2_loo = m2 - (f * dev) * dev;
                m2_loo = m2_loo > 0 ? m2_loo : 0.0;
                if (others_equal || m2_loo <= m2 * kLooTiny) m2_loo = 0.0;
                const double d = unbiased ? n - 2 : n - 1;
                const double var = d > 0 ? m2_loo / d : 0.0;
                const double sd = var > 0 ? std::sqrt(var) : 0.0;
                const double diff = dev * f;
                const double a = sd > 0 ? diff / (sd + eps_u[l]) : clamp_finite(diff * unit[l]);
                put(i, l, take && many && s.varies[l] > 0 ? a : 0.0);
            }
        }
    }
}

// The estimators' columns of the objectives (fixed / variance): each objective's cells get their values a in
// place of x, and the column's scale maps become 1 (x / c is then a itself, in combine_block).
template <int KC>
MOO_INLINE void estimator_objectives(const Inputs& in, const Options& o, Block& b) {
    const int64_t K = KC > 0 ? KC : in.k;
    for (int64_t k = 0; k < K; ++k) {
        Column& s = b.stats[k];
        Cell* cells = b.column(k);
        const double eps = in.std_floor ? o.eps + in.std_floor[k] : o.eps;
        double eps_u[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) eps_u[l] = eps > 0 ? eps / s.c[l] : 0.0;
        const auto put = [cells](int64_t i, int64_t l, double a) { cells[i].value[l] = a; };
        if (unit_pre(s.pre)) {
            estimator_column<false>(o.column, cells, b.slots.data(), b.rows, s, b.spread, o.unbiased, eps_u, s.c, put);
        } else {
            estimator_column<true>(o.column, cells, b.slots.data(), b.rows, s, b.spread, o.unbiased, eps_u, s.c, put);
        }
        std::fill(s.pre, s.pre + kLanes, 1.0);
        std::fill(s.inv, s.inv + kLanes, 1.0);
    }
}

// Step 4, all lanes: the combination weights W into b.weff and, per objective, the map of a sample's value
// x to its term of the sorted sum, ((x * pre) * inv - shift) * take * mul; the factor Q = E_g * F that
// multiplies the sum into q. For the estimators' columns the cells hold a (estimator_objectives): shift 0 and
// mul = W (e / E_g).
template <int KC>
MOO_INLINE void objective_maps(const Inputs& in, const Options& o, Block& b, double* q) {
    const int64_t K = KC > 0 ? KC : in.k;
    const bool variance = o.weighting == kVariance;
    double* W = b.weff.data();
    if (variance) {  // w~ = t / SORTEDSUM t, t = (w' sd_u) (c / V_g)
        double vmax[kLanes] = {}, total[kLanes];
        for (int64_t k = 0; k < K; ++k) {
            const Column& s = b.stats[k];
            const bool weighted = in.wprime[k] > 0;
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l)
                vmax[l] = weighted && s.sd_u[l] > 0 && s.c[l] > vmax[l] ? s.c[l] : vmax[l];
        }
        for (int64_t l = 0; l < kLanes; ++l) vmax[l] = vmax[l] > 0 ? vmax[l] : 1.0;
        for (int64_t k = 0; k < K; ++k) {
            const Column& s = b.stats[k];
            const double wp = in.wprime[k];
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l) {
                const bool sel = wp > 0 && s.sd_u[l] > 0;
                W[k * kLanes + l] = sel ? (wp * s.sd_u[l]) * (s.c[l] / vmax[l]) : 0.0;
            }
        }
        if constexpr (KC > 0) {
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l)
                total[l] = sorted_sum_small<KC>([&](int k) { return W[k * kLanes + l]; });
        } else {
            std::copy(W, W + K * kLanes, b.terms.data());
            sorted_sums(b.terms.data(), K, total);
        }
        for (int64_t k = 0; k < K; ++k) {
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l) {
                const double t = W[k * kLanes + l];
                W[k * kLanes + l] = total[l] > 0 ? t / total[l] : 0.0;
            }
        }
    } else {
        for (int64_t k = 0; k < K; ++k) std::fill(W + k * kLanes, W + (k + 1) * kLanes, in.wprime[k]);
    }
    // E_g over the live objectives with W > 0 (e = 1 for the unitless columns, else c; live: varies, or for
    // "none" a nonzero entry)
    const bool zscore = o.column == kColZScore, none = o.column == kColNone, rloo = o.column == kColRloo;
    const bool pure = unitless(o.column), mapped = estimator(o.column);  // mapped: the cells hold a (no shift)
    double emax[kLanes] = {};
    for (int64_t k = 0; k < K; ++k) {
        const Column& s = b.stats[k];
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) {
            const bool live = none ? s.big[l] > 0 : s.varies[l] > 0;
            const double e = pure ? 1.0 : s.c[l];
            emax[l] = W[k * kLanes + l] > 0 && live && e > emax[l] ? e : emax[l];
        }
    }
    for (int64_t l = 0; l < kLanes; ++l) {
        emax[l] = emax[l] > 0 ? emax[l] : 1.0;
        q[l] = emax[l] * (variance ? 1.0 : in.cw);
    }
    for (int64_t k = 0; k < K; ++k) {
        const Column& s = b.stats[k];
        double* shift = b.shift.data() + k * kLanes;
        double* mul = b.mul.data() + k * kLanes;
        const double eps = in.std_floor ? o.eps + in.std_floor[k] : o.eps;  // eps + floor_k, in reward units
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) {
            const double w = W[k * kLanes + l];
            const bool live = none ? s.big[l] > 0 : s.varies[l] > 0;
            const double e = pure ? 1.0 : s.c[l];
            const double coef = w > 0 && live ? w * (e / emax[l]) : 0.0;
            const double den = s.sd_u[l] + eps / s.c[l];  // zscore: (u - mean_u) / (sd_u + (eps + floor) / c)
            const double n = s.count[l];                   // rloo: (u - mean_u) * n / (n - 1), 0 when n < 2
            const double z = s.varies[l] > 0 && den > 0 ? coef / den : 0.0;
            const double r = n > 1 ? coef * (n / (n - 1)) : 0.0;
            shift[l] = none || mapped ? 0.0 : s.mean_u[l];
            mul[l] = zscore ? z : (rloo ? r : coef);
        }
    }
}

// A sum of terms times its scale, 0 staying 0 (also when the scale overflowed), saturated at the largest
// finite double.
MOO_INLINE double saturate(double a, double scale) {
    const double v = a != 0 ? a * scale : a;
    return v < -kMaxFinite ? -kMaxFinite : (v > kMaxFinite ? kMaxFinite : v);
}

// The rows of combine_block for fixed / variance and K = KC <= 4.
template <int KC, bool kPre>
MOO_INLINE void combine_rows(const double* q, Block& b) {
    const double* shift = b.shift.data();
    const double* mul = b.mul.data();
    const Column* st = b.stats.data();
    for (int64_t i = 0; i < b.rows; ++i) {
        const Cell* x[KC];
        for (int k = 0; k < KC; ++k) x[k] = b.column(k) + i;
        double* adv = b.slots[i].adv;
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) {
            const double sum = sorted_sum_small<KC>([&](int k) {
                const int64_t j = k * kLanes + l;
                const double u = scaled<kPre>(x[k]->value[l], st[k].pre[l], st[k].inv[l]);
                return ((u - shift[j]) * x[k]->take[l]) * mul[j];
            });
            adv[l] = saturate(sum, q[l]);
        }
    }
}

// Step 4 for every sample of the block: the combined advantage (before sign scaling) into its slot, 0 for
// an infeasible sample. Fixed / variance: SORTEDSUM_k of the objective terms, times Q_g; scalarize: the
// normalised combined reward (times P_g unless unitless). Saturates at the largest finite double.
template <int KC>
MOO_INLINE void combine_block(const Inputs& in, const Options& o, const double* q, const double* p, Block& b) {
    const int64_t K = KC > 0 ? KC : in.k;
    if (o.weighting == kScalarize) {
        const Column& s = b.stats[K];
        const double* pre = s.pre;
        const double* inv = s.inv;
        if (estimator(o.column)) {  // a of the combined reward (eps over P_g, in units of P_g), times P_g or not
            double eps_u[kLanes], scale[kLanes];
            for (int64_t l = 0; l < kLanes; ++l) {
                eps_u[l] = o.eps > 0 ? o.eps / p[l] : 0.0;
                scale[l] = unitless(o.column) ? 1.0 : p[l];
            }
            Slot* slots = b.slots.data();
            const auto put = [slots, &scale](int64_t i, int64_t l, double a) {
                slots[i].adv[l] = saturate(a, scale[l]);
            };
            if (unit_pre(pre)) {
                estimator_column<false>(o.column, b.column(K), slots, b.rows, s, b.spread, o.unbiased, eps_u, p, put);
            } else {
                estimator_column<true>(o.column, b.column(K), slots, b.rows, s, b.spread, o.unbiased, eps_u, p, put);
            }
            return;
        }
        double shift[kLanes], mul[kLanes], scale[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) {
            shift[l] = s.mean_u[l], mul[l] = 1.0, scale[l] = p[l];
            switch (o.column) {
                case kColZScore: {
                    const double den = s.sd_u[l] + (o.eps > 0 ? o.eps / p[l] : 0.0);
                    mul[l] = s.varies[l] > 0 && den > 0 ? 1.0 / den : 0.0;
                    scale[l] = 1.0;
                    break;
                }
                case kColRloo:
                    mul[l] = s.count[l] > 1 ? s.count[l] / (s.count[l] - 1) : 0.0;
                    break;
                case kColNone:
                    shift[l] = 0;
                    break;
                default:
                    break;
            }
        }
        const Cell* cells = b.column(K);
        for (int64_t i = 0; i < b.rows; ++i) {
            const Cell& x = cells[i];
            double* adv = b.slots[i].adv;
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l)
                adv[l] = saturate((((x.value[l] * pre[l]) * inv[l] - shift[l]) * x.take[l]) * mul[l], scale[l]);
        }
        return;
    }
    if (estimator(o.column)) estimator_objectives<KC>(in, o, b);
    if constexpr (KC > 0) {
        bool unit = true;
        for (int k = 0; k < KC; ++k) unit &= unit_pre(b.stats[k].pre);
        if (unit) {
            combine_rows<KC, false>(q, b);
        } else {
            combine_rows<KC, true>(q, b);
        }
    } else {
        const double* shift = b.shift.data();
        const double* mul = b.mul.data();
        double* t = b.terms.data();
        for (int64_t i = 0; i < b.rows; ++i) {
            for (int64_t k = 0; k < K; ++k) {
                const Cell& x = b.column(k)[i];
                const Column& st = b.stats[k];
                for (int64_t l = 0; l < kLanes; ++l) {
                    const int64_t j = k * kLanes + l;
                    t[j] = ((((x.value[l] * st.pre[l]) * st.inv[l]) - shift[j]) * x.take[l]) * mul[j];
                }
            }
            double* adv = b.slots[i].adv;
            sorted_sums(t, K, adv);
            for (int64_t l = 0; l < kLanes; ++l) adv[l] = saturate(adv[l], q[l]);
        }
    }
}

// Per sample of the block, either (finish) the finished advantage in place of the raw one (sign scaling
// and clipping of a contributing sample, the fixed value of the others) and the sample-mask bit in
// code, or just the SampleCode in code. Branch-free over the lanes: feasibility varies at random.
MOO_INLINE void code_block(const Options& o, const double* accept, bool finish, Block& b) {
    const double positive = o.positive_scale, negative = o.negative_scale;
    const double infeasible_adv = o.infeasible_advantage;
    const double lo = o.has_clip ? -o.clip : -kInf, hi = o.has_clip ? o.clip : kInf;
    const double keep_infeasible = o.infeasible_advantage != 0.0;
    for (int64_t i = 0; i < b.rows; ++i) {
        Slot& s = b.slots[i];
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) {
            const double a = s.adv[l], feasible = s.feasible[l], valid = s.valid[l], ok = accept[l];
            const double contributes = ok * feasible, infeasible = ok * valid * (1.0 - feasible);
            const double scaled = a * (a > 0 ? positive : negative);
            const double clipped = scaled < lo ? lo : (scaled > hi ? hi : scaled);
            const double fixed = infeasible > 0 ? infeasible_adv : 0.0;
            const double code = contributes * double(kContributes) + infeasible * double(kInfeasible);
            const double keep = contributes + infeasible * keep_infeasible;
            s.code[l] = finish ? keep : code;
            s.adv[l] = finish ? (contributes > 0 ? clipped : fixed) : a;
        }
    }
}

// Steps 1-4 for a block: writes the group outputs and, per sample, either the finished advantage or (a batch
// step) the raw advantage and the sample code, and for the batch steps "scale" / "gpg" into aux the combined
// reward s (saturated) / d. Returns the bad reward index of load_block.
template <typename In, typename Out, int KC>
MOO_SIMD_CLONES_TEMPLATE int64_t process_block(const Inputs& in, const Options& o, const Outputs& out, double* raw,
                                               double* aux, const BlockPlan& plan, Block& b) {
    const int64_t K = KC > 0 ? KC : in.k;
    const bool with_combined = o.weighting == kScalarize || o.drop_zero_variance || o.batch == kBatchScale ||
                               o.batch == kBatchGpg;
    const int64_t bad = load_block<In, KC>(in, o, plan, b);
    for (int64_t c = 0; c < K; ++c) column_stats(b.column(c), b.rows, b.extremes[c], b.spread, o.unbiased, b.stats[c]);
    if (with_combined) {
        combined_column<KC>(in, b);
        column_stats(b.column(K), b.rows, b.extremes[K], b.spread, o.unbiased, b.stats[K]);
    }
    if (b.spread) merge_lanes(b.feasible_count);

    // Weights, maps and acceptance, per group.
    double accept[kLanes];        // 1.0 for an accepted group
    double q[kLanes], p[kLanes];  // factors of the sums (fixed / variance) and of the combined reward
    if (o.weighting == kScalarize) {
        for (int64_t l = 0; l < kLanes; ++l) p[l] = (b.top[l] * in.cw) * b.stats[K].c[l], q[l] = 1.0;
    } else {
        objective_maps<KC>(in, o, b, q);
        std::fill(p, p + kLanes, 1.0);
    }
    for (int64_t l = 0; l < kLanes; ++l) {
        const bool varies = with_combined && b.stats[K].varies[l] > 0;
        accept[l] = static_cast<double>(b.feasible_count[l]) >= static_cast<double>(o.min_feasible) &&
                    (varies || !o.drop_zero_variance);
        const int64_t g = b.group[l];
        if (g == in.num_groups) continue;
        out.group_mask[g] = accept[l] > 0;
        for (int64_t k = 0; k < K; ++k) {
            const Column& s = b.stats[k];
            const double w = o.weighting == kVariance ? b.weff[k * kLanes + l] : in.weights[k];
            static_cast<Out*>(out.weights)[g * K + k] = static_cast<Out>(w);
            static_cast<Out*>(out.mean)[g * K + k] = static_cast<Out>(s.mean(l));
            static_cast<Out*>(out.std)[g * K + k] = static_cast<Out>(s.sd(l));
        }
    }

    combine_block<KC>(in, o, q, p, b);
    code_block(o, accept, o.batch == kBatchNone, b);
    Out* adv = static_cast<Out*>(out.adv);
    for (int64_t l = 0; l < kLanes; ++l) {
        if (o.batch != kBatchNone) {
            for (int64_t i = 0; i < b.count[l]; ++i) {
                const Slot& s = b.slots[i];
                out.sample_mask[s.row[l]] = static_cast<uint8_t>(s.code[l]);
                raw[s.row[l]] = s.adv[l];
            }
            if (aux == nullptr) continue;
            const Cell* d = b.column(K);
            const double factor = o.batch == kBatchScale ? b.top[l] * in.cw : 1.0;  // s = d (C_g cw), or d
            for (int64_t i = 0; i < b.count[l]; ++i) aux[b.slots[i].row[l]] = clamp_finite(d[i].value[l] * factor);
        } else {
            for (int64_t i = 0; i < b.count[l]; ++i) {
                const Slot& s = b.slots[i];
                out.sample_mask[s.row[l]] = static_cast<uint8_t>(s.code[l]);
                adv[s.row[l]] = static_cast<Out>(s.adv[l]);
            }
        }
    }
    return bad;
}

// ---- the batch step ------------------------------------------------------------------------------

MOO_SIMD_CLONES void batch_extremes(const Cell* cells, int64_t rows, Extremes* out) {
    *out = lane_extremes(cells, rows);
}

MOO_SIMD_CLONES void batch_sums(const Cell* cells, int64_t rows, const double* pre, const double* inv, double* out) {
    lane_scaled_sums<true>(cells, rows, pre, inv, out);
}

MOO_SIMD_CLONES void batch_squares(const Cell* cells, int64_t rows, const double* pre, const double* inv,
                                   const double* mean, double* out) {
    lane_scaled_squares<true>(cells, rows, pre, inv, mean, out);
}

MOO_SIMD_CLONES void batch_weighted_sums(const Cell* cells, int64_t rows, const double* pre, const double* inv,
                                         double* out) {
    lane_scaled_sums<true, true>(cells, rows, pre, inv, out);
}

MOO_SIMD_CLONES void batch_weighted_squares(const Cell* cells, int64_t rows, const double* pre, const double* inv,
                                            const double* mean, double* out) {
    lane_scaled_squares<true, true>(cells, rows, pre, inv, mean, out);
}

// Scaled statistics of the batch (one group).
struct BatchStats {
    double count = 0, lo = kInf, hi = -kInf, c = 1, pre = 1, inv = 1, mean_u = 0, sd_u = 0;
    bool varies = false;
};

// Scaled statistics of the values of the contributing samples, as cells of kLanes samples whose mask is 1.0, or
// (weighted) the sample's length (a weight: count = sum L, mean = sum L u / sum L, M2 = sum L (u - mean)^2; the
// samples of length 0 are not part of them). The parts of kBatchRows rows are reduced in parallel and combined
// in part order: the same bits whatever the thread count. When the values do not vary only the count, lo and hi
// are gathered, and the scale c too when with_scale.
BatchStats batch_stats(const std::vector<Cell>& cells, bool unbiased, bool weighted, bool with_scale,
                       [[maybe_unused]] bool parallel) {
    const int64_t rows = static_cast<int64_t>(cells.size());
    const int64_t parts = (rows + kBatchRows - 1) / kBatchRows;
    std::vector<Extremes> ext(parts);
    std::vector<double> a(parts * kLanes);
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t p = 0; p < parts; ++p) {
        const int64_t i = p * kBatchRows, n = std::min(kBatchRows, rows - i);
        batch_extremes(&cells[i], n, &ext[p]);
    }
    BatchStats st;
    for (const Extremes& e : ext) {
        for (int64_t l = 0; l < kLanes; ++l) {
            st.count += e.count[l];
            st.lo = std::min(st.lo, e.lo[l]);
            st.hi = std::max(st.hi, e.hi[l]);
        }
    }
    st.varies = st.hi > st.lo;
    if (!st.varies && !with_scale) return st;  // whitening gives 0: nothing else is needed
    if (st.count > 0) {
        st.c = pow2_floor(std::max(std::abs(st.lo), std::abs(st.hi)));
        st.pre = st.c < kMinNormal ? kTwo52 : 1.0;
        st.inv = 1.0 / (st.c * st.pre);
    }
    if (!st.varies) return st;  // std 0
    double pre[kLanes], inv[kLanes], mean[kLanes];
    std::fill(pre, pre + kLanes, st.pre);
    std::fill(inv, inv + kLanes, st.inv);
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t p = 0; p < parts; ++p) {
        const int64_t i = p * kBatchRows, n = std::min(kBatchRows, rows - i);
        if (weighted) {
            batch_weighted_sums(&cells[i], n, pre, inv, &a[p * kLanes]);
        } else {
            batch_sums(&cells[i], n, pre, inv, &a[p * kLanes]);
        }
    }
    double sum = 0;
    for (double v : a) sum += v;
    st.mean_u = sum / st.count;
    std::fill(mean, mean + kLanes, st.mean_u);
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t p = 0; p < parts; ++p) {
        const int64_t i = p * kBatchRows, n = std::min(kBatchRows, rows - i);
        if (weighted) {
            batch_weighted_squares(&cells[i], n, pre, inv, mean, &a[p * kLanes]);
        } else {
            batch_squares(&cells[i], n, pre, inv, mean, &a[p * kLanes]);
        }
    }
    double m2 = 0;
    for (double v : a) m2 += v;
    const double denom = unbiased ? st.count - 1 : st.count;
    const double var = denom > 0 ? m2 / denom : 0.0;
    st.sd_u = var > 0 ? std::sqrt(var) : 0.0;
    return st;
}

// Step 8 over the contributing samples, then every sample finished. raw [n]: the raw advantages; aux [n]: the
// combined reward s ("scale") or d ("gpg"); the sample codes are in the sample-mask bytes.
//   whiten: A <- (A / c - mean_u) / (sd_u + eps / c), the scaled statistics of A (0 when A does not vary);
//   scale:  A <- (A / c) / (sd_u + eps / c), the scaled statistics of s (A unchanged when that is 0);
//   gpg:    A <- A * n_c / max(m, 1), n_c contributing samples, m of them with d != 0 (saturated).
// The statistics are weighted by the lengths when given.
template <typename Out>
void batch_step(const double* raw, const double* aux, const Inputs& in, const Options& o, const Outputs& out,
                [[maybe_unused]] bool parallel) {
    const int64_t n = in.n;
    Out* adv = static_cast<Out*>(out.adv);
    if (o.batch == kBatchGpg) {
        double contributing = 0, nonzero = 0;
        for (int64_t j = 0; j < n; ++j) {
            const bool contributes = out.sample_mask[j] == kContributes;
            contributing += contributes;
            nonzero += contributes && aux[j] != 0;
        }
        const double factor = contributing / std::max(nonzero, 1.0);
        MOO_OMP(omp parallel for schedule(static) if (parallel))
        for (int64_t j = 0; j < n; ++j)
            finish_sample(clamp_finite(raw[j] * factor), out.sample_mask[j], o, adv + j, out.sample_mask + j);
        return;
    }
    const bool scale = o.batch == kBatchScale;
    const double* x = scale ? aux : raw;
    std::vector<Cell> cells((n + kLanes - 1) / kLanes, Cell{});
    for (int64_t j = 0; j < n; ++j) {
        const bool contributes = out.sample_mask[j] == kContributes;
        const double w = contributes ? (in.lengths ? in.lengths[j] : 1.0) : 0.0;
        cells[j / kLanes].value[j % kLanes] = w > 0 ? x[j] : 0.0;
        cells[j / kLanes].take[j % kLanes] = w;
    }
    const BatchStats st = batch_stats(cells, o.unbiased, in.lengths != nullptr, scale, parallel);
    const double den = st.sd_u + o.eps / st.c, pre = st.pre, inv = st.inv;
    if (scale) {
        const bool divide = den > 0;
        MOO_OMP(omp parallel for schedule(static) if (parallel))
        for (int64_t j = 0; j < n; ++j) {
            const double a = divide ? ((raw[j] * pre) * inv) / den : raw[j];
            finish_sample(a, out.sample_mask[j], o, adv + j, out.sample_mask + j);
        }
        return;
    }
    const bool white = st.varies && den > 0;
    const double mul = white ? 1.0 / den : 0.0, shift = st.mean_u;
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t j = 0; j < n; ++j)
        finish_sample(((raw[j] * pre) * inv - shift) * mul, out.sample_mask[j], o, adv + j, out.sample_mask + j);
}

// ---- driver --------------------------------------------------------------------------------------

template <typename In, typename Out, int KC>
int64_t run_blocks(const Inputs& in, const Options& o, const Outputs& out) {
    const std::vector<BlockPlan> plans = plan_blocks(in);
    const int64_t blocks = static_cast<int64_t>(plans.size());
    const bool parallel = in.n * in.k >= kParallelMinElements && blocks > 1;
    std::vector<double> raw(o.batch != kBatchNone ? in.n : 0);
    std::vector<double> aux(o.batch == kBatchScale || o.batch == kBatchGpg ? in.n : 0);
    double* aux_data = aux.empty() ? nullptr : aux.data();
    int64_t bad = kNone;
    MOO_OMP(omp parallel if (parallel) reduction(min : bad))
    {
        Block block(in.k);
        MOO_OMP(omp for schedule(dynamic, kBlocksPerTask))
        for (int64_t p = 0; p < blocks; ++p)
            bad = std::min(bad, process_block<In, Out, KC>(in, o, out, raw.data(), aux_data, plans[p], block));
    }
    if (o.batch != kBatchNone) batch_step<Out>(raw.data(), aux_data, in, o, out, parallel);
    return bad;
}

// The common objective counts get a compile-time K.
template <typename In, typename Out>
int64_t run(const Inputs& in, const Options& o, const Outputs& out) {
    switch (in.k) {
        case 1:
            return run_blocks<In, Out, 1>(in, o, out);
        case 2:
            return run_blocks<In, Out, 2>(in, o, out);
        case 3:
            return run_blocks<In, Out, 3>(in, o, out);
        case 4:
            return run_blocks<In, Out, 4>(in, o, out);
        default:
            return run_blocks<In, Out, 0>(in, o, out);
    }
}

int64_t first_bad_weight(const double* w, int64_t k) {
    for (int64_t i = 0; i < k; ++i)
        if (!(w[i] >= 0 && is_finite(w[i]))) return i;
    return -1;
}

// Returns (bad_reward_flat_index, bad_weight_index), -1 for none. A bad weight is reported before any
// work is done (the caller raises); a bad reward only when o.check_finite.
std::tuple<int64_t, int64_t> advantages(Inputs in, int dtype, const Options& o, const Outputs& out,
                                        bool check_weights) {
    if (check_weights) {
        const int64_t bad_weight = first_bad_weight(in.weights, in.k);
        if (bad_weight >= 0) return {-1, bad_weight};
    }
    // w' = w / cw (exact unless below 2^-1022 of the largest weight)
    double top = 0;
    for (int64_t k = 0; k < in.k; ++k) top = std::max(top, in.weights[k]);
    in.cw = pow2_floor(top);
    std::vector<double> wprime(in.k);
    for (int64_t k = 0; k < in.k; ++k) wprime[k] = in.weights[k] / in.cw;
    in.wprime = wprime.data();
    int64_t bad = kNone;
    switch (dtype) {
        case moo::kFloat16:
            bad = run<moo::Half, float>(in, o, out);
            break;
        case moo::kBFloat16:
            bad = run<moo::BFloat16, float>(in, o, out);
            break;
        case moo::kFloat32:
            bad = run<float, float>(in, o, out);
            break;
        case moo::kFloat64:
            bad = run<double, double>(in, o, out);
            break;
        default:
            break;  // rejected by the binding
    }
    return {bad == kNone ? -1 : bad, -1};
}

// The [n] lengths tensor (int32, int64, float32 or float64, any stride) as doubles; empty when absent.
std::vector<double> read_lengths(const moo::TensorArg& t, int64_t n) {
    std::vector<double> out;
    if (t.ptr == nullptr) return out;
    out.resize(n);
    const auto read = [&](const auto* x) {
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<double>(x[j * t.sb]);
    };
    switch (t.dtype) {
        case moo::kInt32:
            read(static_cast<const int32_t*>(t.ptr));
            break;
        case moo::kInt64:
            read(static_cast<const int64_t*>(t.ptr));
            break;
        case moo::kFloat32:
            read(static_cast<const float*>(t.ptr));
            break;
        default:
            read(static_cast<const double*>(t.ptr));
            break;
    }
    return out;
}

}  // namespace

// The entry point: the rewards, the op's spec (its tensors and options by name, see csrc/args.h), what the call
// derived from it (the Derived of moo_kernels/ops/advantages/spec.py: the grouping by group ids, the number of
// groups, whether the weights' values need checking) and the six outputs. Every tensor is checked against the
// sizes the kernel relies on.
void register_advantages(py::module_& m) {
    m.def(
        "advantages",
        [](const py::handle& rewards, const py::handle& spec, const py::handle& derived, const py::handle& adv_out,
           const py::handle& gmask_out, const py::handle& smask_out, const py::handle& weights_out,
           const py::handle& mean_out, const py::handle& std_out) {
            using moo::option;
            using moo::tensor_arg;
            const moo::TensorArg r = moo::tensor_value(rewards, "rewards", {{-1, -1}}, moo::kFloats, /*optional=*/false);
            const int64_t n = r.sizes[0], k = r.sizes[1];
            const std::optional<int64_t> group_size = moo::optional_option<int64_t>(spec, "group_size");
            const int64_t g = option<int64_t>(derived, "num_groups");
            const bool check_weights = option<bool>(derived, "check_weights");
            if (group_size ? *group_size < 1 || g * *group_size != n : g < 0)
                throw std::invalid_argument("num_groups and group_size do not describe the batch of N samples");
            const bool by_ids = !group_size;  // then order and offsets describe the groups
            const moo::TensorArg order = tensor_arg(derived, "order", {{n}}, {moo::kInt64}, !by_ids);
            const moo::TensorArg offsets = tensor_arg(derived, "offsets", {{g + 1}}, {moo::kInt64}, !by_ids);
            if (by_ids && (order.sb != 1 || offsets.sb != 1))
                throw std::invalid_argument("order and offsets must be contiguous");
            const moo::TensorArg w = tensor_arg(spec, "weights", {{k}}, {moo::kFloat64}, /*optional=*/false);
            const moo::TensorArg valid = tensor_arg(spec, "valid", {{n}}, {moo::kBool});
            const moo::TensorArg rg = tensor_arg(spec, "reward_gates", {{n, k}}, {moo::kBool});
            const moo::TensorArg gates = tensor_arg(spec, "gates", {{n, -1}}, {moo::kBool});

            const int out = r.dtype == moo::kFloat64 ? moo::kFloat64 : moo::kFloat32;
            const Outputs o_out{
                moo::output<void>(adv_out, "advantages", {{n}}, {out}),
                moo::output<uint8_t>(gmask_out, "group_mask", {{g}}, {moo::kBool}),
                moo::output<uint8_t>(smask_out, "sample_mask", {{n}}, {moo::kBool}),
                moo::output<void>(weights_out, "weights", {{g, k}}, {out}),
                moo::output<void>(mean_out, "mean", {{g, k}}, {out}),
                moo::output<void>(std_out, "std", {{g, k}}, {out})};

            std::vector<double> weights(k), floor;  // [K] w and the std floor, read with their strides
            const double* wp = static_cast<const double*>(w.ptr);
            for (int64_t i = 0; i < k; ++i) weights[i] = wp[i * w.sb];
            const moo::TensorArg f = tensor_arg(spec, "std_floor", {{k}}, {moo::kFloat64});
            if (f.ptr != nullptr) {
                floor.resize(k);
                for (int64_t i = 0; i < k; ++i) floor[i] = static_cast<const double*>(f.ptr)[i * f.sb];
            }
            const moo::TensorArg len =
                tensor_arg(spec, "lengths", {{n}}, {moo::kInt32, moo::kInt64, moo::kFloat32, moo::kFloat64});
            const std::vector<double> lengths = read_lengths(len, n);  // [N] as double, empty when absent
            const Inputs in{r.ptr, n, k, r.sb, r.st, group_size.value_or(0), g,
                            static_cast<const int64_t*>(order.ptr), static_cast<const int64_t*>(offsets.ptr),
                            weights.data(), nullptr, 1.0, static_cast<const uint8_t*>(valid.ptr), valid.sb,
                            static_cast<const uint8_t*>(rg.ptr), rg.sb, rg.st,
                            static_cast<const uint8_t*>(gates.ptr), gates.sb, gates.st,
                            gates.ptr ? gates.sizes[1] : 0, floor.empty() ? nullptr : floor.data(),
                            lengths.empty() ? nullptr : lengths.data()};
            const std::optional<double> clip = moo::optional_option<double>(spec, "clip");
            const Options o{option<int>(derived, "column"),
                            option<int>(spec, "std") == moo::kUnbiased,
                            option<int>(spec, "weighting"),
                            option<int>(derived, "batch"),
                            option<double>(spec, "eps"),
                            option<double>(spec, "gated_value"),
                            option<double>(spec, "infeasible_advantage"),
                            option<int64_t>(spec, "min_feasible"),
                            option<bool>(spec, "drop_zero_variance"),
                            option<double>(spec, "positive_scale"),
                            option<double>(spec, "negative_scale"),
                            clip.has_value(),
                            clip.value_or(0.0),
                            option<int>(spec, "nan_policy") == moo::kRaiseNan};
            py::gil_scoped_release release;
            return advantages(in, r.dtype, o, o_out, check_weights);
        },
        py::arg("rewards"), py::arg("spec"), py::arg("derived"), py::arg("advantages"), py::arg("group_mask"),
        py::arg("sample_mask"), py::arg("weights"), py::arg("mean"), py::arg("std"),
        "Multi-objective advantages (see moo_kernels/ops/advantages/cpp_launch.py). Returns "
        "(bad_reward_flat_index, bad_weight_index), -1 for none.");
}
