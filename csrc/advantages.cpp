// Multi-objective advantages on the CPU (the C++ backend of moo_kernels.multi_objective_advantages).
//
// Semantics: moo_kernels/ops/advantages/reference.py. Algorithm:
//   1. Groups are processed independently, in parallel (OpenMP). Each group is gathered once into
//      per-thread scratch: rewards converted to double, reward gates applied, non-finite entries set
//      to 0 and left out, sample feasibility (valid and every gate passes), combined reward
//      s_j = sum_k w_k r_jk.
//   2. Two-pass statistics per objective over the entries that take part, and of s over the feasible
//      samples: count, mean, then sum of squared deviations; min and max detect a group that does
//      not vary, whose mean is then exactly the common value and its std exactly 0.
//   3. Weights (w, or w_k sigma_gk / sum_l w_l sigma_gl), acceptance, normalisation and combination
//      per sample; then sign scaling, clipping and the fixed values of infeasible / rejected /
//      invalid samples.
//   4. batch_normalize: step 3 stops after the combination and stores the raw advantage (double) and
//      a sample code in the sample-mask bytes. The batch mean and std over contributing samples are
//      then reduced over fixed blocks of samples combined in block order, so the result has the same
//      bits whatever the thread count; a last parallel pass whitens and finishes every sample.
// Everything accumulates in double; the outputs are float32 (float64 for float64 rewards).
// The first non-finite reward (nan_policy="raise") and the first bad weight are reported to the
// caller as indices, and the Python launcher raises.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kNone = std::numeric_limits<int64_t>::max();  // "no bad value found"
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kParallelMinElements = 1 << 14;  // below this, threads cost more than they save
constexpr int64_t kGroupsPerTask = 16;             // OpenMP dynamic schedule chunk
constexpr int64_t kBatchBlock = 4096;              // fixed blocks of the batch reduction

// Codes shared with moo_kernels/_options.py.
enum DType { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };
enum Normalize { kZScore = 0, kCenter = 1, kRloo = 2, kNoNormalize = 3 };
enum Weighting { kScalarize = 0, kFixed = 1, kVariance = 2 };
// Sample codes kept in the sample-mask bytes between the group pass and the batch pass.
enum SampleCode : uint8_t { kDropped = 0, kContributes = 1, kInfeasible = 2 };

// ---- element types -------------------------------------------------------------------------------

struct Half {
    uint16_t bits;
};
struct BFloat16 {
    uint16_t bits;
};

inline float bits_to_float(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

inline double to_double(Half h) {
    const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
    const uint32_t exponent = (h.bits >> 10) & 0x1fu;
    const uint32_t mantissa = h.bits & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
        const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
    return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));  // rebias 15 -> 127
}

inline double to_double(BFloat16 b) { return bits_to_float(static_cast<uint32_t>(b.bits) << 16); }
inline double to_double(float x) { return x; }
inline double to_double(double x) { return x; }

// ---- problem description -------------------------------------------------------------------------

struct Inputs {
    const void* rewards;  // [N, K] of the dtype code, strides in elements
    int64_t n, k, stride_rn, stride_rk;
    int64_t group_size;                         // > 0: contiguous groups; 0: order / offsets
    int64_t num_groups;
    const int64_t* order;                       // [N] sample indices sorted by group
    const int64_t* offsets;                     // [G + 1]
    const double* weights;                      // [K], contiguous
    const uint8_t* valid;                       // [N] or null
    const uint8_t* reward_gates;                // [N, K] or null
    int64_t stride_rgn, stride_rgk;
    const uint8_t* gates;                       // [N, M] or null
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

// ---- statistics and per-sample maps --------------------------------------------------------------

struct Stats {
    double count = 0, mean = 0, sd = 0;
    bool varies = false;
};

// First pass done: count, sum, min and max give the mean, exactly the common value when nothing varies.
inline Stats stats_mean(double count, double sum, double lo, double hi) {
    Stats st;
    st.count = count;
    st.varies = hi > lo;
    st.mean = st.varies ? sum / count : (count > 0 ? hi : 0.0);
    return st;
}

// Second pass done: the sum of squared deviations gives the std (0 when nothing varies).
inline void stats_std(Stats& st, double m2, bool unbiased) {
    const double denom = unbiased ? st.count - 1 : st.count;
    const double var = st.varies && denom > 0 ? m2 / denom : 0.0;
    st.sd = var > 0 ? std::sqrt(var) : 0.0;
}

// Normalisation of one column as (x - shift) * mul / div. With the values below it reproduces each
// mode of the reference exactly (multiplying or dividing by 1 is exact) and gives 0 where it gives 0.
struct Affine {
    double shift = 0, mul = 1, div = 1;
};

inline Affine normalizer(const Stats& st, int mode, double eps) {
    switch (mode) {
        case kZScore: {  // (x - mu) / (sigma + eps), 0 when the group does not vary
            const double den = st.sd + eps;
            const bool ok = st.varies && den > 0;
            return {st.mean, ok ? 1.0 : 0.0, ok ? den : 1.0};
        }
        case kCenter:
            return {st.mean, 1.0, 1.0};
        case kRloo: {  // (x - mu) * n / (n - 1), 0 when n < 2
            const bool many = st.count > 1;
            return {st.mean, many ? st.count : 0.0, many ? st.count - 1 : 1.0};
        }
        default:
            return {0.0, 1.0, 1.0};
    }
}

inline double apply(const Affine& f, double x) { return (x - f.shift) * f.mul / f.div; }

// Sign shaping and clipping of a contributing sample's advantage.
inline double shape(double a, const Options& o) {
    a *= a > 0 ? o.positive_scale : o.negative_scale;
    return o.has_clip ? std::min(std::max(a, -o.clip), o.clip) : a;
}

// Final advantage and sample-mask bit of a sample given its code and (whitened) raw advantage.
template <typename Out>
inline void finish_sample(double a, uint8_t code, const Options& o, Out* adv, uint8_t* keep) {
    const double fixed = code == kInfeasible ? o.infeasible_advantage : 0.0;
    *adv = static_cast<Out>(code == kContributes ? shape(a, o) : fixed);
    *keep = code == kContributes || (code == kInfeasible && o.infeasible_advantage != 0.0);
}

// ---- one group -----------------------------------------------------------------------------------

// Per-thread buffers for one group, sized for the largest group. Columns 0..K-1 of x and mask are the
// objectives, column K the combined reward; mask is 1.0 for an entry that takes part, else 0.0 (and x
// is then 0.0), so the loops below are branch-free.
struct Scratch {
    int64_t cols;
    std::vector<int64_t> row;    // [C] sample index
    std::vector<uint8_t> valid;  // [C]
    std::vector<double> x;       // [C, K + 1]
    std::vector<double> mask;    // [C, K + 1]
    std::vector<double> n, sum, lo, hi, m2;  // [K + 1] accumulators
    std::vector<Stats> stats;    // [K + 1]
    std::vector<Affine> norm;    // [K + 1]
    std::vector<double> weff;    // [K]

    Scratch(int64_t max_count, int64_t k)
        : cols(k + 1), row(max_count), valid(max_count), x(max_count * cols), mask(max_count * cols), n(cols),
          sum(cols), lo(cols), hi(cols), m2(cols), stats(cols), norm(cols), weff(k) {}
};

inline bool gates_pass(const Inputs& in, int64_t row) {
    if (!in.gates) return true;
    const uint8_t* g = in.gates + row * in.stride_gn;
    bool pass = true;
    for (int64_t c = 0; c < in.m; ++c) pass &= g[c * in.stride_gm] != 0;
    return pass;
}

// Step 1: gather the group's samples into scratch. Returns the lowest flat index j * K + k of a
// non-finite reward of a valid sample when checking, else kNone.
template <typename In>
int64_t load_group(const Inputs& in, const Options& o, int64_t start, int64_t count, Scratch& s) {
    const In* r = static_cast<const In*>(in.rewards);
    const int64_t K = in.k;
    int64_t bad = kNone;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t row = in.order ? in.order[start + i] : start + i;
        const bool valid = !in.valid || in.valid[row];
        const bool feasible = valid && gates_pass(in, row);
        s.row[i] = row;
        s.valid[i] = valid;
        double* x = &s.x[i * s.cols];
        double* mask = &s.mask[i * s.cols];
        double combined = 0;
        for (int64_t k = 0; k < K; ++k) {
            double v = to_double(r[row * in.stride_rn + k * in.stride_rk]);
            if (in.reward_gates) v = in.reward_gates[row * in.stride_rgn + k * in.stride_rgk] ? v : o.gated_value;
            const bool finite = std::isfinite(v);
            if (!finite && valid && o.check_finite) bad = std::min(bad, row * K + k);
            const bool take = feasible && finite;
            x[k] = take ? v : 0.0;
            mask[k] = take;
            combined += in.weights[k] * x[k];
        }
        x[K] = combined;  // 0 unless feasible
        mask[K] = feasible;
    }
    return bad;
}

// Step 2: two-pass statistics of every column over the entries that take part.
void column_stats(int64_t count, bool unbiased, Scratch& s) {
    const int64_t cols = s.cols;
    std::fill(s.n.begin(), s.n.end(), 0.0);
    std::fill(s.sum.begin(), s.sum.end(), 0.0);
    std::fill(s.lo.begin(), s.lo.end(), kInf);
    std::fill(s.hi.begin(), s.hi.end(), -kInf);
    std::fill(s.m2.begin(), s.m2.end(), 0.0);
    for (int64_t i = 0; i < count; ++i) {
        const double* x = &s.x[i * cols];
        const double* mask = &s.mask[i * cols];
        for (int64_t c = 0; c < cols; ++c) {
            s.n[c] += mask[c];
            s.sum[c] += x[c];
            s.lo[c] = std::min(s.lo[c], mask[c] > 0 ? x[c] : kInf);
            s.hi[c] = std::max(s.hi[c], mask[c] > 0 ? x[c] : -kInf);
        }
    }
    for (int64_t c = 0; c < cols; ++c) s.stats[c] = stats_mean(s.n[c], s.sum[c], s.lo[c], s.hi[c]);
    for (int64_t i = 0; i < count; ++i) {
        const double* x = &s.x[i * cols];
        const double* mask = &s.mask[i * cols];
        for (int64_t c = 0; c < cols; ++c) {
            const double d = (x[c] - s.stats[c].mean) * mask[c];
            s.m2[c] += d * d;
        }
    }
    for (int64_t c = 0; c < cols; ++c) stats_std(s.stats[c], s.m2[c], unbiased);
}

// Steps 1-3 for group g. Writes the group outputs and, per sample, either the finished advantage or
// (batch_normalize) the raw advantage and the sample code. Returns the bad reward index of load_group.
template <typename In, typename Out>
int64_t process_group(const Inputs& in, const Options& o, const Outputs& out, double* raw, int64_t g,
                      Scratch& s) {
    const int64_t K = in.k;
    const int64_t start = in.group_size > 0 ? g * in.group_size : in.offsets[g];
    const int64_t count = in.group_size > 0 ? in.group_size : in.offsets[g + 1] - start;
    const int64_t bad = load_group<In>(in, o, start, count, s);
    column_stats(count, o.unbiased, s);
    const Stats& combined = s.stats[K];

    // Weights and acceptance.
    double total = 0;
    for (int64_t k = 0; k < K; ++k) {
        s.weff[k] = o.weighting == kVariance ? in.weights[k] * s.stats[k].sd : in.weights[k];
        total += s.weff[k];
    }
    if (o.weighting == kVariance)
        for (int64_t k = 0; k < K; ++k) s.weff[k] = total > 0 ? s.weff[k] / total : 0.0;
    bool accept = combined.count >= static_cast<double>(o.min_feasible);
    if (o.drop_zero_variance) accept = accept && combined.varies;

    Out* weff_out = static_cast<Out*>(out.weights) + g * K;
    Out* mean_out = static_cast<Out*>(out.mean) + g * K;
    Out* std_out = static_cast<Out*>(out.std) + g * K;
    for (int64_t k = 0; k < K; ++k) {
        weff_out[k] = static_cast<Out>(s.weff[k]);
        mean_out[k] = static_cast<Out>(s.stats[k].mean);
        std_out[k] = static_cast<Out>(s.stats[k].sd);
    }
    out.group_mask[g] = accept;

    // Normalise and combine each sample.
    for (int64_t c = 0; c < s.cols; ++c) s.norm[c] = normalizer(s.stats[c], o.normalize, o.eps);
    Out* adv = static_cast<Out*>(out.adv);
    for (int64_t i = 0; i < count; ++i) {
        const double* x = &s.x[i * s.cols];
        const double* mask = &s.mask[i * s.cols];
        double a = 0;
        if (o.weighting == kScalarize) {
            a = mask[K] * apply(s.norm[K], x[K]);
        } else {
            for (int64_t k = 0; k < K; ++k) a += mask[k] * apply(s.norm[k], x[k]) * s.weff[k];
        }
        const bool feasible = mask[K] > 0;
        const uint8_t code = accept && feasible ? kContributes : accept && s.valid[i] ? kInfeasible : kDropped;
        const int64_t row = s.row[i];
        if (o.batch_normalize) {
            raw[row] = a;
            out.sample_mask[row] = code;
        } else {
            finish_sample(a, code, o, adv + row, out.sample_mask + row);
        }
    }
    return bad;
}

// ---- batch whitening -----------------------------------------------------------------------------

// Mean and std of the raw advantages of contributing samples (code kContributes), reduced over
// fixed blocks of kBatchBlock samples that are combined in block order: deterministic.
Stats batch_stats(const double* raw, const uint8_t* code, int64_t n, bool unbiased, bool parallel) {
    const int64_t blocks = (n + kBatchBlock - 1) / kBatchBlock;
    std::vector<double> count(blocks), sum(blocks), lo(blocks), hi(blocks), m2(blocks);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < blocks; ++b) {
        double c = 0, t = 0, l = kInf, h = -kInf;
        for (int64_t j = b * kBatchBlock; j < std::min(n, (b + 1) * kBatchBlock); ++j) {
            const bool take = code[j] == kContributes;
            c += take;
            t += take ? raw[j] : 0.0;
            l = std::min(l, take ? raw[j] : kInf);
            h = std::max(h, take ? raw[j] : -kInf);
        }
        count[b] = c, sum[b] = t, lo[b] = l, hi[b] = h;
    }
    double c = 0, t = 0, l = kInf, h = -kInf;
    for (int64_t b = 0; b < blocks; ++b) {
        c += count[b];
        t += sum[b];
        l = std::min(l, lo[b]);
        h = std::max(h, hi[b]);
    }
    Stats st = stats_mean(c, t, l, h);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t b = 0; b < blocks; ++b) {
        double acc = 0;
        for (int64_t j = b * kBatchBlock; j < std::min(n, (b + 1) * kBatchBlock); ++j) {
            const double d = code[j] == kContributes ? raw[j] - st.mean : 0.0;
            acc += d * d;
        }
        m2[b] = acc;
    }
    double total = 0;
    for (int64_t b = 0; b < blocks; ++b) total += m2[b];
    stats_std(st, total, unbiased);
    return st;
}

template <typename Out>
void batch_normalize(const double* raw, int64_t n, const Options& o, const Outputs& out, bool parallel) {
    const Affine white = normalizer(batch_stats(raw, out.sample_mask, n, o.unbiased, parallel), kZScore, o.eps);
    Out* adv = static_cast<Out*>(out.adv);
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t j = 0; j < n; ++j) finish_sample(apply(white, raw[j]), out.sample_mask[j], o, adv + j,
                                                  out.sample_mask + j);
}

// ---- driver --------------------------------------------------------------------------------------

int64_t largest_group(const Inputs& in) {
    if (in.group_size > 0) return in.group_size;
    int64_t largest = 0;
    for (int64_t g = 0; g < in.num_groups; ++g) largest = std::max(largest, in.offsets[g + 1] - in.offsets[g]);
    return largest;
}

template <typename In, typename Out>
int64_t run(const Inputs& in, const Options& o, const Outputs& out) {
    const int64_t max_count = largest_group(in);
    const bool parallel = in.n * in.k >= kParallelMinElements && in.num_groups > 1;
    std::vector<double> raw(o.batch_normalize ? in.n : 0);
    int64_t bad = kNone;
#pragma omp parallel if (parallel) reduction(min : bad)
    {
        Scratch scratch(max_count, in.k);
#pragma omp for schedule(dynamic, kGroupsPerTask)
        for (int64_t g = 0; g < in.num_groups; ++g)
            bad = std::min(bad, process_group<In, Out>(in, o, out, raw.data(), g, scratch));
    }
    if (o.batch_normalize) batch_normalize<Out>(raw.data(), in.n, o, out, parallel);
    return bad;
}

int64_t first_bad_weight(const double* w, int64_t k) {
    for (int64_t i = 0; i < k; ++i)
        if (!(w[i] >= 0 && std::isfinite(w[i]))) return i;
    return -1;
}

// Returns (bad_reward_flat_index, bad_weight_index), -1 for none. A bad weight is reported before
// any work is done (the caller raises); a bad reward only when o.check_finite.
std::tuple<int64_t, int64_t> advantages(const Inputs& in, int dtype, const Options& o, const Outputs& out,
                                                                                bool check_weights) {
    if (check_weights) {
        const int64_t bad_weight = first_bad_weight(in.weights, in.k);
        if (bad_weight >= 0) return {-1, bad_weight};
    }
    int64_t bad = kNone;
    switch (dtype) {
        case kFloat16:
            bad = run<Half, float>(in, o, out);
            break;
        case kBFloat16:
            bad = run<BFloat16, float>(in, o, out);
            break;
        case kFloat32:
            bad = run<float, float>(in, o, out);
            break;
        case kFloat64:
            bad = run<double, double>(in, o, out);
            break;
        default:
            throw std::invalid_argument("advantages: unknown rewards dtype code " + std::to_string(dtype));
    }
    return {bad == kNone ? -1 : bad, -1};
}

template <typename T>
T* as_ptr(uintptr_t address) {
    return reinterpret_cast<T*>(address);
}

}  // namespace

// Python entry point: raw addresses (0 for an absent tensor), sizes and strides in elements.
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
                const Inputs in{as_ptr<const void>(rewards), n, k, stride_rn, stride_rk, group_size, num_groups,
                                                as_ptr<const int64_t>(order), as_ptr<const int64_t>(offsets),
                                                as_ptr<const double>(weights), as_ptr<const uint8_t>(valid),
                                                as_ptr<const uint8_t>(reward_gates), stride_rgn, stride_rgk,
                                                as_ptr<const uint8_t>(gates), stride_gn, stride_gm, m};
                const Outputs out{as_ptr<void>(adv), as_ptr<uint8_t>(group_mask), as_ptr<uint8_t>(sample_mask),
                                                    as_ptr<void>(weights_out), as_ptr<void>(mean), as_ptr<void>(std)};
                const Options o{normalize, unbiased, weighting, batch_normalize, eps, gated_value,
                                                infeasible_advantage, min_feasible, drop_zero_variance, positive_scale,
                                                negative_scale, has_clip, clip, check_finite};
                py::gil_scoped_release release;
                return advantages(in, dtype, o, out, check_weights);
            },
            "Multi-objective advantages (see moo_kernels/ops/advantages/cpu.py). Returns "
            "(bad_reward_flat_index, bad_weight_index), -1 for none.");
}
