// Multi-objective advantages on the CPU: the C++ backend of moo_kernels.multi_objective_advantages.
//
// Semantics: moo_kernels/ops/advantages/reference.py (the float64 reference). Algorithm:
//   Groups are processed in blocks of kLanesOf<T> groups side by side, one group per SIMD lane (a large
//   group fills a block alone, spread over the lanes), blocks in parallel (OpenMP). The compute type T
//   of the block code is float for float16/bfloat16/float32 rewards (8 lanes) and double for float64
//   (4 lanes). For a block:
//   1. Gather: every sample of the block's groups is read once (any dtype and strides, converted to
//      T), reward gates applied; a sample is feasible when valid and every gate passes; an entry
//      takes part when its sample is feasible and its reward finite. Objective k becomes column k of
//      (value, take) cells, value 0 where the entry does not take part; column K holds the combined
//      reward s_j = sum_k w_k r_jk when it is needed (scalarize, drop_zero_variance).
//   2. Statistics of every column and group, two-pass: count, sum, min and max, then the sum of squared
//      deviations from the mean. min == max marks a group that does not vary: its mean is then exactly
//      the common value and its std exactly 0.
//   3. Weights (w, or w_k sigma_gk / sum_l w_l sigma_gl), acceptance, normalisation and combination,
//      then sign scaling, clipping and the fixed values of infeasible / rejected / invalid samples.
//   4. batch_normalize: step 3 stops after the combination and keeps the raw advantage (as double) and a
//      sample code (in the sample-mask bytes). The batch statistics over the contributing samples are
//      reduced over fixed blocks of samples combined in block order; a last parallel pass whitens and
//      finishes every sample.
// The block code accumulates in T (two-pass statistics in fp32 at least, as the GPU kernel), the batch
// statistics in double, in an order fixed by the code, so results are deterministic: the same bits
// whatever the thread count or instruction set. Outputs are float32
// (float64 for float64 rewards). The first non-finite reward (nan_policy="raise") and the first bad
// weight are returned as indices, and the Python launcher raises.
// Shared with the other kernels: the lane macros (OpenMP, AVX2 clones) in simd.h, the element types and
// dtype codes in dtype.h.

#include "simd.h"  // first: its no-trapping-math pragma applies to what follows

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "dtype.h"

namespace py = pybind11;

namespace {

constexpr int64_t kLanes = 4;                                    // lanes of the double batch reduction
// Compute type of the block code: float for 16/32-bit rewards (two-pass fp32 statistics, as the GPU
// kernel), double for float64. Groups per block, one per lane: a 256-bit vector of the compute type.
template <typename T>
constexpr int64_t kLanesOf = sizeof(T) == 4 ? 8 : 4;
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();  // no bad value found
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kMaxFinite = std::numeric_limits<double>::max();
constexpr int64_t kParallelMinElements = 1 << 14;  // fewer rewards: one thread (threads cost more)
constexpr int64_t kBlocksPerTask = 4;              // OpenMP dynamic schedule chunk
constexpr int64_t kBatchRows = 1024;               // rows of kLanes samples per part of the batch reduction
constexpr int64_t kSpreadMin = 256;                // a group this large fills a block alone, over all lanes

// Codes shared with moo_kernels/_options.py and moo_kernels/ops/advantages/cpu.py (the dtype codes are
// moo::DType, dtype.h).
enum Normalize { kZScore = 0, kCenter = 1, kRloo = 2, kNoNormalize = 3 };
enum Weighting { kScalarize = 0, kFixed = 1, kVariance = 2 };
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
    const double* weights;        // [K]
    const uint8_t* valid;         // [N] or null
    const uint8_t* reward_gates;  // [N, K] or null
    int64_t stride_rgn, stride_rgk;
    const uint8_t* gates;         // [N, M] or null
    int64_t stride_gn, stride_gm, m;
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
    int normalize;
    bool unbiased;
    int weighting;
    bool batch_normalize;
    double eps, gated_value, infeasible_advantage;
    int64_t min_feasible;
    bool drop_zero_variance;
    double positive_scale, negative_scale;
    bool has_clip;
    double clip;
    bool check_finite;
};

// ---- lanes and statistics ------------------------------------------------------------------------
//
// The loops over samples run over rows of kLanes independent lanes. The compiler turns them into SIMD
// code without reassociating anything (no -ffast-math): the summation order stays the code's. Inside
// them every operand is loaded into a local before a condition selects between locals, as a
// conditional load stops the vectorisation.

// A row of kLanes values and their masks (1.0 where the value takes part, and the value is then 0
// otherwise). Keeping both in one cell keeps the loads of one from aliasing the stores of the other.
template <typename T, int64_t L = kLanesOf<T>>
struct CellT {
    T value[L];
    T take[L];
};
using Cell = CellT<double, kLanes>;

// Per-sample data of a row of a block.
template <typename T, int64_t L = kLanesOf<T>>
struct Slot {
    int64_t row[L];      // sample index (0 for padding)
    T valid[L];     // 1.0 for a valid sample
    T feasible[L];  // 1.0 for a feasible sample
    T adv[L];       // combined advantage, then the finished one
    T code[L];      // SampleCode, or the sample-mask bit once finished
};

template <typename T = double>
struct StatsT {
    T count = 0, mean = 0, sd = 0;
    bool varies = false;
};
using Stats = StatsT<double>;

// First-pass sums: count, sum, min and max of the values that take part.
template <typename T = double>
struct MomentsT {
    T count = 0, sum = 0, lo = std::numeric_limits<T>::infinity(), hi = -std::numeric_limits<T>::infinity();

    void merge(const MomentsT& o) {
        count += o.count;
        sum += o.sum;
        lo = std::min(lo, o.lo);
        hi = std::max(hi, o.hi);
    }
};
using Moments = MomentsT<double>;

// Mean from the first pass: exactly the common value when nothing varies (0 when empty).
template <typename T>
inline StatsT<T> stats_mean(const MomentsT<T>& m) {
    StatsT<T> st;
    st.count = m.count;
    st.varies = m.hi > m.lo;
    st.mean = st.varies ? m.sum / m.count : (m.count > 0 ? m.hi : T(0));
    return st;
}

// Std from the second pass (0 when nothing varies or with too few values).
template <typename T>
inline void stats_std(StatsT<T>& st, T m2, bool unbiased) {
    const T denom = unbiased ? st.count - 1 : st.count;
    const T var = st.varies && denom > 0 ? m2 / denom : T(0);
    st.sd = var > 0 ? std::sqrt(var) : T(0);
}

// Per-lane first pass over rows of cells.
template <typename T, int64_t L>
MOO_INLINE void lane_moments(const CellT<T, L>* cells, int64_t rows, MomentsT<T>* out) {
    constexpr T inf = std::numeric_limits<T>::infinity();
    T count[L] = {}, sum[L] = {}, lo[L], hi[L];
    std::fill(lo, lo + L, inf);
    std::fill(hi, hi + L, -inf);
    for (int64_t i = 0; i < rows; ++i) {
        const CellT<T, L>& c = cells[i];
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < L; ++l) {
            const T v = c.value[l], t = c.take[l];
            const T low = t > 0 ? v : inf, high = t > 0 ? v : -inf;
            count[l] += t;
            sum[l] += v;
            lo[l] = low < lo[l] ? low : lo[l];
            hi[l] = high > hi[l] ? high : hi[l];
        }
    }
    for (int64_t l = 0; l < L; ++l) out[l] = {count[l], sum[l], lo[l], hi[l]};
}

// Per-lane sums of squared deviations from mean[lane].
template <typename T, int64_t L>
MOO_INLINE void lane_squared_deviations(const CellT<T, L>* cells, int64_t rows, const T* mean, T* out) {
    T m2[L] = {};
    for (int64_t i = 0; i < rows; ++i) {
        const CellT<T, L>& c = cells[i];
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < L; ++l) {
            const T d = (c.value[l] - mean[l]) * c.take[l];  // value - mean is finite: 0 where take is
            m2[l] += d * d;
        }
    }
    std::copy(m2, m2 + L, out);
}

// Two-pass statistics of each lane of a column.
template <typename T, int64_t L>
MOO_INLINE void lane_stats(const CellT<T, L>* cells, int64_t rows, bool unbiased, StatsT<T>* st) {
    MomentsT<T> m[L];
    T mean[L], m2[L];
    lane_moments(cells, rows, m);
    for (int64_t l = 0; l < L; ++l) {
        st[l] = stats_mean(m[l]);
        mean[l] = st[l].mean;
    }
    lane_squared_deviations(cells, rows, mean, m2);
    for (int64_t l = 0; l < L; ++l) stats_std(st[l], m2[l], unbiased);
}

// Two-pass statistics of a column whose lanes all hold the same group: the lanes are merged in lane
// order, and every lane gets the result.
template <typename T, int64_t L>
MOO_INLINE void column_stats(const CellT<T, L>* cells, int64_t rows, bool unbiased, StatsT<T>* st) {
    MomentsT<T> m[L], total;
    T mean[L], m2[L], sum = 0;
    lane_moments(cells, rows, m);
    for (int64_t l = 0; l < L; ++l) total.merge(m[l]);
    StatsT<T> merged = stats_mean(total);
    if (merged.varies) {
        std::fill(mean, mean + L, merged.mean);
        lane_squared_deviations(cells, rows, mean, m2);
        for (int64_t l = 0; l < L; ++l) sum += m2[l];
        stats_std(merged, sum, unbiased);
    }
    std::fill(st, st + L, merged);
}

// ---- per-sample maps -----------------------------------------------------------------------------

// Normalisation as (x - shift) * mul / div. With the values below it reproduces each mode of the
// reference exactly (multiplying or dividing by 1 is exact), including the cases where it gives 0.
template <typename T = double>
struct Affine {
    T shift = 0, mul = 1, div = 1;
};

template <typename T>
inline Affine<T> normalizer(const StatsT<T>& st, int mode, double eps) {
    switch (mode) {
        case kZScore: {  // (x - mu) / (sigma + eps), 0 when the values do not vary
            const T den = st.sd + static_cast<T>(eps);
            const bool ok = st.varies && den > 0;
            return {st.mean, ok ? T(1) : T(0), ok ? den : T(1)};
        }
        case kCenter:
            return {st.mean, T(1), T(1)};
        case kRloo: {  // (x - mu) * n / (n - 1), 0 when n < 2
            const bool many = st.count > 1;
            return {st.mean, many ? st.count : T(0), many ? st.count - 1 : T(1)};
        }
        default:
            return {T(0), T(1), T(1)};
    }
}

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
template <typename T>
struct Block {
    static constexpr int64_t kLanes = kLanesOf<T>;
    int64_t k;
    bool spread = false;
    int64_t group[kLanes];  // group of each lane (num_groups for an empty lane, and lanes 1.. when spread)
    int64_t start[kLanes], count[kLanes];  // start of the lane's group, and the lane's rows
    int64_t rows = 0;       // largest count of the block
    int64_t cap = 0;
    T feasible_count[kLanes];
    std::vector<Slot<T>> slots;    // [cap]
    std::vector<CellT<T>> cells;    // [K + 1, cap]
    std::vector<StatsT<T>> stats;   // [K + 1, kLanes]
    std::vector<T> weff;   // [K, kLanes] combination weights

    explicit Block(int64_t objectives) : k(objectives), stats((objectives + 1) * kLanes), weff(objectives * kLanes) {}

    void reserve(int64_t n) {
        if (n <= cap) return;
        cap = n;
        slots.resize(cap);
        cells.resize((k + 1) * cap);
    }

    CellT<T>* column(int64_t c) { return cells.data() + c * cap; }
};

inline int64_t group_start(const Inputs& in, int64_t g) {
    return in.group_size > 0 ? g * in.group_size : in.offsets[g];
}

inline int64_t group_count(const Inputs& in, int64_t g) {
    return in.group_size > 0 ? in.group_size : in.offsets[g + 1] - in.offsets[g];
}

// Blocks in group order: runs of up to kLanes groups smaller than kSpreadMin, and the larger ones alone.
template <typename T>
std::vector<BlockPlan> plan_blocks(const Inputs& in) {
    constexpr int64_t kLanes = kLanesOf<T>;
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
template <typename In, typename T, int KC>
MOO_INLINE int64_t load_block(const Inputs& in, const Options& o, const BlockPlan& plan, bool with_combined,
                                   Block<T>& b) {
    constexpr int64_t kLanes = kLanesOf<T>;
    constexpr T kMax = std::numeric_limits<T>::max();
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
        T feasible_count = 0;
        const int64_t first = b.start[l] + (plan.spread ? l : 0);
        for (int64_t i = 0; i < b.count[l]; ++i) {
            Slot<T>& s = b.slots[i];
            const int64_t index = first + i * step;
            const int64_t row = in.order ? in.order[index] : index;
            const uint8_t valid = !in.valid || in.valid[row];
            uint8_t pass = valid;  // bool bytes are 0 or 1
            // The early exit keeps this short loop scalar (its vectorised form costs more for a few gates).
            const uint8_t* gate = m > 0 ? in.gates + row * in.stride_gn : nullptr;
            for (int64_t c = 0; c < m && pass; ++c) pass &= gate[c * in.stride_gm];
            s.row[l] = row, s.valid[l] = valid, s.feasible[l] = pass;
            feasible_count += pass;
        }
        for (int64_t i = b.count[l]; i < b.rows; ++i) {  // padding
            Slot<T>& s = b.slots[i];
            s.row[l] = 0, s.valid[l] = s.feasible[l] = T(0);
        }
        b.feasible_count[l] = feasible_count;
    }

    // Read every reward (and reward-gate bit) of the block first, then mask them in place: the vector
    // loads of the masking loop would stall on the scalar stores of the reads if they were interleaved.
    const In* r = static_cast<const In*>(in.rewards);
    for (int64_t k = 0; k < K; ++k) {
        CellT<T>* cells = b.column(k);
        for (int64_t i = 0; i < b.rows; ++i) {
            const int64_t* rows = b.slots[i].row;
            for (int64_t l = 0; l < kLanes; ++l)
                cells[i].value[l] = static_cast<T>(moo::value(r[rows[l] * in.stride_rn + k * in.stride_rk]));
            if (!in.reward_gates) {
                std::fill(cells[i].take, cells[i].take + kLanes, T(1));
                continue;
            }
            for (int64_t l = 0; l < kLanes; ++l)
                cells[i].take[l] = in.reward_gates[rows[l] * in.stride_rgn + k * in.stride_rgk];
        }
    }
    T checked[kLanes];  // 0 once a valid sample has a non-finite reward
    std::fill(checked, checked + kLanes, T(1));
    const T gated_value = static_cast<T>(o.gated_value);  // a local: a member would be a conditional load
    for (int64_t k = 0; k < K; ++k) {
        CellT<T>* cells = b.column(k);
        for (int64_t i = 0; i < b.rows; ++i) {
            CellT<T>& c = cells[i];
            const Slot<T>& s = b.slots[i];
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l) {
                const T read = c.value[l], open = c.take[l], feasible = s.feasible[l], valid = s.valid[l];
                const T v = open > 0 ? read : gated_value;
                const T finite = std::abs(v) <= kMax ? T(1) : T(0);  // 0 for inf and nan
                const T take = finite * feasible;
                c.value[l] = take > 0 ? v : T(0);
                c.take[l] = take;
                const T fine = finite + (T(1) - valid);  // 0 only for a non-finite reward of a valid sample
                checked[l] = fine < checked[l] ? fine : checked[l];
            }
        }
    }
    if (with_combined) {  // column K: combined reward (non-finite entries count 0) of the feasible samples
        CellT<T>* combined = b.column(K);
        T wk[KC > 0 ? KC : 1];
        for (int64_t k = 0; k < (KC > 0 ? KC : 0); ++k) wk[k] = static_cast<T>(in.weights[k]);
        for (int64_t i = 0; i < b.rows; ++i) {
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l) {
                T sum = 0;
                for (int64_t k = 0; k < K; ++k)
                    sum += (KC > 0 ? wk[k] : static_cast<T>(in.weights[k])) * b.column(k)[i].value[l];
                combined[i].value[l] = sum;
                combined[i].take[l] = b.slots[i].feasible[l];
            }
        }
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

// Step 3: the normalised, combined advantage of every sample of the block into its slot (0 for an
// infeasible one): the sum over the combined columns of (x - shift) * take * scale, scale = mul / div *
// weight per group: one division per group instead of one per sample (the reference's (x - shift) / div
// * weight may differ in the last bit). x - shift is finite, so an entry that does not take part gives
// exactly 0. A scale that overflows (sigma + eps subnormal) falls back to the reference's order.
template <typename T>
MOO_INLINE void combine_block(const Options& o, const T* weff, Block<T>& b) {
    constexpr int64_t kLanes = kLanesOf<T>;
    const int64_t K = b.k;
    for (int64_t i = 0; i < b.rows; ++i) std::fill(b.slots[i].adv, b.slots[i].adv + kLanes, T(0));
    const bool scalarize = o.weighting == kScalarize;
    for (int64_t c = scalarize ? K : 0; c < (scalarize ? K + 1 : K); ++c) {
        T shift[kLanes], mul[kLanes], div[kLanes], w[kLanes], scale[kLanes];
        bool finite_scale = true;
        for (int64_t l = 0; l < kLanes; ++l) {
            const Affine<T> f = normalizer(b.stats[c * kLanes + l], o.normalize, o.eps);
            shift[l] = f.shift, mul[l] = f.mul, div[l] = f.div;
            w[l] = scalarize ? T(1) : weff[c * kLanes + l];
            scale[l] = f.mul / f.div * w[l];
            finite_scale &= std::abs(scale[l]) <= std::numeric_limits<T>::max();
        }
        const CellT<T>* cells = b.column(c);
        if (!finite_scale) {
            for (int64_t i = 0; i < b.rows; ++i) {
                for (int64_t l = 0; l < kLanes; ++l)
                    b.slots[i].adv[l] += (cells[i].value[l] - shift[l]) * cells[i].take[l] * mul[l] / div[l] * w[l];
            }
            continue;
        }
        for (int64_t i = 0; i < b.rows; ++i) {
            const CellT<T>& x = cells[i];
            T* adv = b.slots[i].adv;
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l) adv[l] += (x.value[l] - shift[l]) * x.take[l] * scale[l];
        }
    }
}

// Per sample of the block, either (finish) the finished advantage in place of the raw one (sign scaling
// and clipping of a contributing sample, the fixed value of the others) and the sample-mask bit in
// code, or just the SampleCode in code. Branch-free over the lanes: feasibility varies at random.
template <typename T>
MOO_INLINE void code_block(const Options& o, const T* accept, bool finish, Block<T>& b) {
    constexpr int64_t kLanes = kLanesOf<T>;
    constexpr T inf = std::numeric_limits<T>::infinity();
    const T positive = static_cast<T>(o.positive_scale), negative = static_cast<T>(o.negative_scale);
    const T infeasible_adv = static_cast<T>(o.infeasible_advantage);
    const T lo = o.has_clip ? static_cast<T>(-o.clip) : -inf, hi = o.has_clip ? static_cast<T>(o.clip) : inf;
    const T keep_infeasible = o.infeasible_advantage != 0.0;
    for (int64_t i = 0; i < b.rows; ++i) {
        Slot<T>& s = b.slots[i];
        MOO_OMP(omp simd)
        for (int64_t l = 0; l < kLanes; ++l) {
            const T a = s.adv[l], feasible = s.feasible[l], valid = s.valid[l], ok = accept[l];
            const T contributes = ok * feasible, infeasible = ok * valid * (T(1) - feasible);
            const T scaled = a * (a > 0 ? positive : negative);
            const T clipped = scaled < lo ? lo : (scaled > hi ? hi : scaled);
            const T fixed = infeasible > 0 ? infeasible_adv : T(0);
            const T code = contributes * T(kContributes) + infeasible * T(kInfeasible);
            const T keep = contributes + infeasible * keep_infeasible;
            s.code[l] = finish ? keep : code;
            s.adv[l] = finish ? (contributes > 0 ? clipped : fixed) : a;
        }
    }
}

// Steps 1-3 for a block: writes the group outputs and, per sample, either the finished advantage or
// (batch_normalize) the raw advantage and the sample code. Returns the bad reward index of load_block.
template <typename In, typename T, typename Out, int KC>
MOO_SIMD_CLONES_TEMPLATE int64_t process_block(const Inputs& in, const Options& o, const Outputs& out, double* raw,
                                               const BlockPlan& plan, Block<T>& b) {
    constexpr int64_t kLanes = kLanesOf<T>;
    const int64_t K = KC > 0 ? KC : in.k;
    const bool with_combined = o.weighting == kScalarize || o.drop_zero_variance;
    const int64_t bad = load_block<In, T, KC>(in, o, plan, with_combined, b);
    for (int64_t c = 0; c < K + with_combined; ++c) {
        StatsT<T>* st = &b.stats[c * kLanes];
        if (b.spread) {
            column_stats(b.column(c), b.rows, o.unbiased, st);
        } else {
            lane_stats(b.column(c), b.rows, o.unbiased, st);
        }
    }
    if (b.spread) {
        T total = 0;
        for (int64_t l = 0; l < kLanes; ++l) total += b.feasible_count[l];
        std::fill(b.feasible_count, b.feasible_count + kLanes, total);
    }

    // Weights and acceptance, per group.
    T* weff = b.weff.data();
    T accept[kLanes];  // 1.0 for an accepted group
    for (int64_t l = 0; l < kLanes; ++l) {
        T total = 0;
        for (int64_t k = 0; k < K; ++k) {
            const T w = static_cast<T>(in.weights[k]);
            weff[k * kLanes + l] = o.weighting == kVariance ? w * b.stats[k * kLanes + l].sd : w;
            total += weff[k * kLanes + l];
        }
        if (o.weighting == kVariance) {
            for (int64_t k = 0; k < K; ++k) weff[k * kLanes + l] = total > 0 ? weff[k * kLanes + l] / total : T(0);
        }
        // Without the combined column only its count, the feasible samples, is used.
        const StatsT<T> combined = with_combined ? b.stats[K * kLanes + l] : StatsT<T>{b.feasible_count[l], 0, 0, false};
        accept[l] = static_cast<double>(combined.count) >= static_cast<double>(o.min_feasible) &&
                    (combined.varies || !o.drop_zero_variance);
        const int64_t g = b.group[l];
        if (g == in.num_groups) continue;
        out.group_mask[g] = accept[l] > 0;
        for (int64_t k = 0; k < K; ++k) {
            static_cast<Out*>(out.weights)[g * K + k] = static_cast<Out>(weff[k * kLanes + l]);
            static_cast<Out*>(out.mean)[g * K + k] = static_cast<Out>(b.stats[k * kLanes + l].mean);
            static_cast<Out*>(out.std)[g * K + k] = static_cast<Out>(b.stats[k * kLanes + l].sd);
        }
    }

    combine_block(o, weff, b);
    code_block(o, accept, !o.batch_normalize, b);
    Out* adv = static_cast<Out*>(out.adv);
    for (int64_t l = 0; l < kLanes; ++l) {
        if (o.batch_normalize) {
            for (int64_t i = 0; i < b.count[l]; ++i) {
                const Slot<T>& s = b.slots[i];
                out.sample_mask[s.row[l]] = static_cast<uint8_t>(s.code[l]);
                raw[s.row[l]] = s.adv[l];
            }
        } else {
            for (int64_t i = 0; i < b.count[l]; ++i) {
                const Slot<T>& s = b.slots[i];
                out.sample_mask[s.row[l]] = static_cast<uint8_t>(s.code[l]);
                adv[s.row[l]] = static_cast<Out>(s.adv[l]);
            }
        }
    }
    return bad;
}

// ---- batch whitening -----------------------------------------------------------------------------

MOO_SIMD_CLONES void batch_moments(const Cell* cells, int64_t rows, Moments* out) { lane_moments(cells, rows, out); }

MOO_SIMD_CLONES void batch_squared_deviations(const Cell* cells, int64_t rows, const double* mean, double* out) {
    lane_squared_deviations(cells, rows, mean, out);
}

// Statistics of the raw advantages of the contributing samples, as cells of kLanes samples. The parts
// of kBatchRows rows are reduced in parallel and combined in part order: the same bits whatever the
// thread count.
Stats batch_stats(const std::vector<Cell>& cells, bool unbiased, [[maybe_unused]] bool parallel) {
    const int64_t rows = static_cast<int64_t>(cells.size());
    const int64_t parts = (rows + kBatchRows - 1) / kBatchRows;
    std::vector<Moments> moments(parts * kLanes);
    std::vector<double> m2(parts * kLanes);
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t p = 0; p < parts; ++p) {
        const int64_t i = p * kBatchRows;
        batch_moments(&cells[i], std::min(kBatchRows, rows - i), &moments[p * kLanes]);
    }
    Moments total;
    for (const Moments& part : moments) total.merge(part);
    Stats st = stats_mean(total);
    if (!st.varies) return st;
    double mean[kLanes];
    std::fill(mean, mean + kLanes, st.mean);
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t p = 0; p < parts; ++p) {
        const int64_t i = p * kBatchRows;
        batch_squared_deviations(&cells[i], std::min(kBatchRows, rows - i), mean, &m2[p * kLanes]);
    }
    double sum = 0;
    for (double v : m2) sum += v;
    stats_std(st, sum, unbiased);
    return st;
}

// raw [n]: the raw advantages; the sample codes are in the sample-mask bytes.
template <typename Out>
void batch_normalize(const double* raw, int64_t n, const Options& o, const Outputs& out,
                     [[maybe_unused]] bool parallel) {
    std::vector<Cell> cells((n + kLanes - 1) / kLanes, Cell{});
    for (int64_t j = 0; j < n; ++j) {
        const bool contributes = out.sample_mask[j] == kContributes;
        cells[j / kLanes].value[j % kLanes] = contributes ? raw[j] : 0.0;
        cells[j / kLanes].take[j % kLanes] = contributes;
    }
    const Affine f = normalizer(batch_stats(cells, o.unbiased, parallel), kZScore, o.eps);
    Out* adv = static_cast<Out*>(out.adv);
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t j = 0; j < n; ++j)
        finish_sample((raw[j] - f.shift) * f.mul / f.div, out.sample_mask[j], o, adv + j, out.sample_mask + j);
}

// ---- driver --------------------------------------------------------------------------------------

template <typename In, typename Out, int KC>
int64_t run_blocks(const Inputs& in, const Options& o, const Outputs& out) {
    using T = Out;  // compute type: float for 16/32-bit rewards, double for float64
    const std::vector<BlockPlan> plans = plan_blocks<T>(in);
    const int64_t blocks = static_cast<int64_t>(plans.size());
    const bool parallel = in.n * in.k >= kParallelMinElements && blocks > 1;
    std::vector<double> raw(o.batch_normalize ? in.n : 0);
    int64_t bad = kNone;
    MOO_OMP(omp parallel if (parallel) reduction(min : bad))
    {
        Block<T> block(in.k);
        MOO_OMP(omp for schedule(dynamic, kBlocksPerTask))
        for (int64_t p = 0; p < blocks; ++p)
            bad = std::min(bad, process_block<In, T, Out, KC>(in, o, out, raw.data(), plans[p], block));
    }
    if (o.batch_normalize) batch_normalize<Out>(raw.data(), in.n, o, out, parallel);
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
std::tuple<int64_t, int64_t> advantages(const Inputs& in, int dtype, const Options& o, const Outputs& out,
                                        bool check_weights) {
    if (check_weights) {
        const int64_t bad_weight = first_bad_weight(in.weights, in.k);
        if (bad_weight >= 0) return {-1, bad_weight};
    }
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

template <typename T>
T* address(uintptr_t a) {
    return reinterpret_cast<T*>(a);
}

}  // namespace

void register_advantages(py::module_& m) {
    m.def(
        "advantages",
        [](uintptr_t rewards, int dtype, int64_t n, int64_t k, int64_t stride_rn, int64_t stride_rk,
           int64_t group_size, int64_t num_groups, uintptr_t order, uintptr_t offsets, uintptr_t weights,
           uintptr_t valid, uintptr_t reward_gates, int64_t stride_rgn, int64_t stride_rgk, uintptr_t gates,
           int64_t stride_gn, int64_t stride_gm, int64_t m, uintptr_t adv, uintptr_t group_mask,
           uintptr_t sample_mask, uintptr_t weights_out, uintptr_t mean, uintptr_t std, int normalize,
           bool unbiased, int weighting, bool batch_normalize, double eps, double gated_value,
           double infeasible_advantage, int64_t min_feasible, bool drop_zero_variance, double positive_scale,
           double negative_scale, bool has_clip, double clip, bool check_finite, bool check_weights) {
            if (dtype < moo::kFloat16 || dtype > moo::kFloat64)
                throw std::invalid_argument("advantages: unknown rewards dtype code " + std::to_string(dtype));
            const Inputs in{address<const void>(rewards), n, k, stride_rn, stride_rk, group_size, num_groups,
                            address<const int64_t>(order), address<const int64_t>(offsets),
                            address<const double>(weights), address<const uint8_t>(valid),
                            address<const uint8_t>(reward_gates), stride_rgn, stride_rgk,
                            address<const uint8_t>(gates), stride_gn, stride_gm, m};
            const Outputs out{address<void>(adv), address<uint8_t>(group_mask), address<uint8_t>(sample_mask),
                              address<void>(weights_out), address<void>(mean), address<void>(std)};
            const Options o{normalize, unbiased, weighting, batch_normalize, eps, gated_value, infeasible_advantage,
                            min_feasible, drop_zero_variance, positive_scale, negative_scale, has_clip, clip,
                            check_finite};
            py::gil_scoped_release release;
            return advantages(in, dtype, o, out, check_weights);
        },
        "Multi-objective advantages from raw addresses (0 for an absent tensor), sizes and strides in "
        "elements; see moo_kernels/ops/advantages/cpu.py. Returns (bad_reward_flat_index, "
        "bad_weight_index), -1 for none.");
}
