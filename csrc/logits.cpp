// Token log-probabilities and entropy from logits on the CPU: the C++ backend of token_logprobs.
//
// Semantics: moo_kernels/ops/logits/reference.py. For a row (b, t) of logits z [V] with chosen token y and
// temperature tau, every statistic is taken relative to the row maximum M of the raw logits, on
// x = (z - M) / tau (computed as (z - M) * (1 / tau), so that a huge 1 / tau never overflows z / tau):
// log l = log sum_v exp(x_v), p = exp(x - log l),
//   logp = x_y - log l,   H = log l - sum_v p_v x_v,
//   d (g_logp logp + g_H H) / d z_v = (g_logp (1[v = y] - p_v) - g_H p_v (x_v - log l + H)) / tau.
// Algorithm:
//   Forward, one read of each row: the row is converted in tiles of kTile elements (any input dtype) into a
//   local buffer laid out as kLanes independent lanes (element i belongs to lane i % kLanes), so that the
//   loops vectorise. Every lane keeps a running maximum m of the raw logits and, relative to it,
//   S = sum exp(d) and W = sum exp(d) d with d = (z - m) / tau (online softmax). A tile first raises the lane
//   maxima (rescaling S and W to the new maximum: with delta = (m_new - m) / tau, S' = S e^-delta,
//   W' = e^-delta (W - delta S)), then adds its own sums, accumulated in fresh lane partials (a two-level
//   sum: short tile sums, then one addition per tile, which keeps the float rounding error small at large
//   V). The lanes are combined in lane order in double relative to the row maximum M: log l = log S,
//   logp = (z_y - M) / tau - log S, H = log S - W / S. The forward saves (M, log l) per row for the backward.
//   Backward, element-wise from the saved (M, log l) and entropy, so it can overwrite the logits in place:
//   every tile is read whole into the buffer (as x) before its gradient is written. For tau = 1 both
//   passes are compiled without their multiplications by 1 / tau (the same bits). A row whose incoming gradients
//   are both 0 is written 0 without reading its logits (its p is never formed), whatever they hold.
// Each row is computed by one thread in a fixed order, rows in parallel (OpenMP, static schedule); the lane
// structure does not depend on the instruction set (no FMA contraction in ISO C++ mode), so results have the
// same bits whatever the number of threads or the SIMD clone picked. Compute type: float for float16,
// bfloat16 and float32 logits, with a vectorisable exp (exp_lanes in simd.h), double (std::exp) for float64
// logits.
// Logits of -inf are allowed: a lane with no finite logit yet keeps S = W = 0 (no exp(-inf - -inf)), and
// the products exp(d) d and p (x - mean) are taken as 0 there. A row without a finite logit has M = -inf,
// log-prob -inf, entropy 0 and gradient 0, like the reference; a row holding +inf or NaN gives NaN. Token
// ids are checked first: the entry points return the flat index b * T + t of the first id outside [0, V)
// (nothing computed) or -1.
// Shared with the other kernels: the lane macros (OpenMP, AVX2 clones) and the exp in simd.h, the element
// types, dtype codes and operands in dtype.h.

#include "simd.h"  // first: its no-trapping-math pragma applies to what follows

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "args.h"
#include "dtype.h"

namespace py = pybind11;

namespace {

constexpr int64_t kLanes = 16;                     // independent accumulators of every row sum
constexpr int64_t kTile = 1024;                    // elements of a row converted and processed together
constexpr int64_t kParallelMinElements = 1 << 15;  // fewer logits: one thread (threads cost more)
constexpr double kInfD = std::numeric_limits<double>::infinity();

using moo::BFloat16;
using moo::Compute;
using moo::exp_lanes;
using moo::Half;
using moo::Operand;
using moo::TensorArg;
using moo::value;

// ---- operands ------------------------------------------------------------------------------------------

// Element (b, t) of a [B, T] float operand as double; 0 when the operand is absent.
double scalar_at(const Operand& x, int64_t b, int64_t t) {
    if (x.ptr == nullptr) return 0.0;
    const int64_t off = b * x.sb + t * x.st;
    switch (x.dtype) {
        case moo::kFloat16: return value(static_cast<const Half*>(x.ptr)[off]);
        case moo::kBFloat16: return value(static_cast<const BFloat16*>(x.ptr)[off]);
        case moo::kFloat32: return value(static_cast<const float*>(x.ptr)[off]);
        default: return value(static_cast<const double*>(x.ptr)[off]);
    }
}

int64_t token_at(const Operand& tokens, int64_t b, int64_t t) {
    const int64_t off = b * tokens.sb + t * tokens.st;
    if (tokens.dtype == moo::kInt32) return static_cast<const int32_t*>(tokens.ptr)[off];
    return static_cast<const int64_t*>(tokens.ptr)[off];
}

// Flat index b * T + t of the first token id outside [0, V), or -1.
int64_t first_bad_token(const Operand& tokens, int64_t B, int64_t T, int64_t V) {
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t < T; ++t) {
            const int64_t y = token_at(tokens, b, t);
            if (y < 0 || y >= V) return b * T + t;
        }
    }
    return -1;
}

template <typename E>
const E* row_of(const Operand& x, int64_t b, int64_t t) {
    return static_cast<const E*>(x.ptr) + b * x.sb + t * x.st;
}

// x[i] = src[i] in the compute type for i < n, then -inf up to padded.
template <typename E>
MOO_INLINE void load_tile(const E* src, int64_t n, int64_t padded, Compute<E>* x) {
    for (int64_t i = 0; i < n; ++i) x[i] = value(src[i]);
    std::fill(x + n, x + padded, -std::numeric_limits<Compute<E>>::infinity());
}

// x[i] = (src[i] - shift) / tau (as (src[i] - shift) * inv_tau; UNIT: tau = 1) for i < n.
template <bool UNIT, typename E>
MOO_INLINE void load_shifted(const E* src, int64_t n, Compute<E> shift, Compute<E> inv_tau, Compute<E>* x) {
    for (int64_t i = 0; i < n; ++i) x[i] = UNIT ? value(src[i]) - shift : (value(src[i]) - shift) * inv_tau;
}

inline int64_t round_up(int64_t n) { return (n + kLanes - 1) / kLanes * kLanes; }

// ---- forward -------------------------------------------------------------------------------------------

struct Forward {
    Operand logits, tokens;
    int64_t T = 0, V = 0;
    double inv_tau = 1.0;
    bool entropy = true;  // whether the entropy is wanted (its sum is left out otherwise)
};

struct RowResult {
    double logp, max, log_l, entropy;  // max: of the raw logits; log_l = log sum exp((z - max) / tau)
};

// UNIT: tau = 1, whose multiplications by 1 / tau are left out (the same bits: x * 1 = x). ENTROPY: the sum of
// e^d d is kept (the entropy; 0 is returned for it otherwise, the other results the same bits).
template <typename E, bool UNIT, bool ENTROPY>
MOO_INLINE RowResult forward_row(const Forward& f, int64_t b, int64_t t) {
    using R = Compute<E>;
    constexpr R inf = std::numeric_limits<R>::infinity();
    const E* row = row_of<E>(f.logits, b, t);
    const R inv_tau = UNIT ? R(1) : static_cast<R>(f.inv_tau);
    alignas(64) R x[kTile];
    R m[kLanes], sum[kLanes], wsum[kLanes];  // per lane: max of z, sum e^d, sum e^d d with d = (z - max) / tau
    std::fill(m, m + kLanes, -inf);
    std::fill(sum, sum + kLanes, R(0));
    std::fill(wsum, wsum + kLanes, R(0));

    for (int64_t v0 = 0; v0 < f.V; v0 += kTile) {
        const int64_t n = std::min(kTile, f.V - v0), padded = round_up(n);
        load_tile(row + v0, n, padded, x);

        // raise the lane maxima to the tile's, rescaling the sums kept relative to the old maxima
        R tile_max[kLanes];
        std::fill(tile_max, tile_max + kLanes, -inf);
        for (int64_t i0 = 0; i0 < padded; i0 += kLanes) {
            MOO_OMP(omp simd)  // the lanes are independent: one SIMD element each, no reordering within a lane
            for (int64_t l = 0; l < kLanes; ++l) tile_max[l] = x[i0 + l] > tile_max[l] ? x[i0 + l] : tile_max[l];
        }
        R base[kLanes];
        for (int64_t l = 0; l < kLanes; ++l) {
            const R m_new = std::max(m[l], tile_max[l]);
            if (m_new > m[l] && sum[l] > 0) {  // sum > 0: the old maximum is finite
                const R delta = (m_new - m[l]) * inv_tau, scale = exp_lanes(-delta);
                if (ENTROPY) wsum[l] = scale > 0 ? scale * (wsum[l] - delta * sum[l]) : R(0);  // delta may be inf
                sum[l] *= scale;
            }
            m[l] = m_new;
            base[l] = m_new == -inf ? R(0) : m_new;  // no finite logit in the lane yet: every e^d is 0
        }

        // the tile's sums of e^d and e^d d, then added to the running ones
        R tile_sum[kLanes], tile_wsum[kLanes];
        std::fill(tile_sum, tile_sum + kLanes, R(0));
        std::fill(tile_wsum, tile_wsum + kLanes, R(0));
        for (int64_t i0 = 0; i0 < padded; i0 += kLanes) {
            MOO_OMP(omp simd)
            for (int64_t l = 0; l < kLanes; ++l) {
                const R d = (x[i0 + l] - base[l]) * inv_tau, e = exp_lanes(d);
                tile_sum[l] += e;
                if (ENTROPY) tile_wsum[l] += d == -inf ? R(0) : e * d;
            }
        }
        for (int64_t l = 0; l < kLanes; ++l) {
            sum[l] += tile_sum[l];
            wsum[l] += tile_wsum[l];
        }
    }

    // lanes combined in lane order, in double, relative to the row maximum
    R row_max = -inf;
    for (int64_t l = 0; l < kLanes; ++l) row_max = std::max(row_max, m[l]);
    double total = 0, wtotal = 0;
    for (int64_t l = 0; l < kLanes; ++l) {
        if (sum[l] != 0) {  // a lane with a finite logit, or NaN (a NaN or +inf logit: NaN results)
            const double shift = (static_cast<double>(m[l]) - row_max) * f.inv_tau, scale = std::exp(shift);
            total += scale * sum[l];
            if (ENTROPY) wtotal += scale > 0 ? scale * (wsum[l] + shift * sum[l]) : 0.0;
        }
    }
    if (row_max == -inf && total == 0) return {-kInfD, -kInfD, -kInfD, 0.0};  // no finite logit
    const double log_total = std::log(total);
    const double z_y = value(row[token_at(f.tokens, b, t)]);
    const double logp = (z_y - row_max) * f.inv_tau - log_total;
    return {logp, static_cast<double>(row_max), log_total, ENTROPY ? log_total - wtotal / total : 0.0};
}

template <typename E>
MOO_INLINE RowResult forward_row_of(const Forward& f, int64_t b, int64_t t) {
    if (f.inv_tau == 1.0) return f.entropy ? forward_row<E, true, true>(f, b, t) : forward_row<E, true, false>(f, b, t);
    return f.entropy ? forward_row<E, false, true>(f, b, t) : forward_row<E, false, false>(f, b, t);
}

// The compiled row functions, one per logits dtype (an AVX-512 or AVX2 clone is picked at load time where
// possible).
MOO_SIMD_CLONES RowResult forward_row_f16(const Forward& f, int64_t b, int64_t t) {
    return forward_row_of<Half>(f, b, t);
}
MOO_SIMD_CLONES RowResult forward_row_bf16(const Forward& f, int64_t b, int64_t t) {
    return forward_row_of<BFloat16>(f, b, t);
}
MOO_SIMD_CLONES RowResult forward_row_f32(const Forward& f, int64_t b, int64_t t) {
    return forward_row_of<float>(f, b, t);
}
MOO_SIMD_CLONES RowResult forward_row_f64(const Forward& f, int64_t b, int64_t t) {
    return forward_row_of<double>(f, b, t);
}

// ---- backward ------------------------------------------------------------------------------------------

struct Backward {
    Operand logits, tokens, max, log_l, entropy, g_logp, g_entropy;  // max, log_l: the forward's row statistics
    void* out = nullptr;  // [B, T, V] in the logits' dtype, unit stride on V
    int64_t out_sb = 0, out_st = 0;
    int64_t V = 0;
    double inv_tau = 1.0;
};

template <typename E, bool UNIT>
MOO_INLINE void backward_row(const Backward& g, int64_t b, int64_t t) {
    using R = Compute<E>;
    const E* row = row_of<E>(g.logits, b, t);
    E* out = static_cast<E*>(g.out) + b * g.out_sb + t * g.out_st;
    const double g_logp = scalar_at(g.g_logp, b, t), g_entropy = scalar_at(g.g_entropy, b, t);
    const double row_max = scalar_at(g.max, b, t), row_log_l = scalar_at(g.log_l, b, t);
    const bool empty = row_max == -kInfD && row_log_l == -kInfD;  // no finite logit
    if ((g_logp == 0 && g_entropy == 0) || empty) {  // exactly 0, the logits unread
        for (int64_t v = 0; v < g.V; ++v) moo::assign(out[v], R(0));
        return;
    }
    const R inv_tau = UNIT ? R(1) : static_cast<R>(g.inv_tau), z_max = static_cast<R>(row_max);
    const R log_l = static_cast<R>(row_log_l), entropy = static_cast<R>(scalar_at(g.entropy, b, t));
    // g_logp and g_H; the 1 / tau comes last (g / tau may overflow where the gradient does not)
    const R a = static_cast<R>(g_logp), c = static_cast<R>(g_entropy);
    const int64_t y = token_at(g.tokens, b, t);
    alignas(64) R x[kTile];

    for (int64_t v0 = 0; v0 < g.V; v0 += kTile) {
        const int64_t n = std::min(kTile, g.V - v0);
        load_shifted<UNIT>(row + v0, n, z_max, inv_tau, x);  // x = (z - max) / tau
        const bool has_y = y >= v0 && y < v0 + n;
        R grad_y = 0;  // the chosen token: a (1 - p_y) with 1 - p_y = -expm1(log p_y), exact as p_y -> 1
        if (has_y) {
            const R logp_y = x[y - v0] - log_l, p_y = exp_lanes(logp_y);
            grad_y = (-a * std::expm1(logp_y) - (p_y == R(0) ? R(0) : c * p_y * (logp_y + entropy))) * inv_tau;
        }
        for (int64_t i = 0; i < n; ++i) {
            const R logp = x[i] - log_l, p = exp_lanes(logp);  // x - mean_x = logp + H
            x[i] = p == R(0) ? R(0) : -(p * (a + c * (logp + entropy))) * inv_tau;  // the limit 0 where p = 0
        }
        if (has_y) x[y - v0] = grad_y;
        for (int64_t i = 0; i < n; ++i) moo::assign(out[v0 + i], x[i]);
    }
}

template <typename E>
MOO_INLINE void backward_row_of(const Backward& g, int64_t b, int64_t t) {
    g.inv_tau == 1.0 ? backward_row<E, true>(g, b, t) : backward_row<E, false>(g, b, t);
}

MOO_SIMD_CLONES void backward_row_f16(const Backward& g, int64_t b, int64_t t) { backward_row_of<Half>(g, b, t); }
MOO_SIMD_CLONES void backward_row_bf16(const Backward& g, int64_t b, int64_t t) { backward_row_of<BFloat16>(g, b, t); }
MOO_SIMD_CLONES void backward_row_f32(const Backward& g, int64_t b, int64_t t) { backward_row_of<float>(g, b, t); }
MOO_SIMD_CLONES void backward_row_f64(const Backward& g, int64_t b, int64_t t) { backward_row_of<double>(g, b, t); }

// ---- entry points --------------------------------------------------------------------------------------

template <typename O>
void store_outputs(const RowResult& r, int64_t i, void* logp, void* stats, void* entropy) {
    static_cast<O*>(logp)[i] = static_cast<O>(r.logp);
    static_cast<O*>(stats)[2 * i] = static_cast<O>(r.max);
    static_cast<O*>(stats)[2 * i + 1] = static_cast<O>(r.log_l);
    if (entropy != nullptr) static_cast<O*>(entropy)[i] = static_cast<O>(r.entropy);
}

// The logits [B, T, V] (unit stride on V) and the tokens [B, T] of a call, checked (csrc/args.h).
struct Rows {
    TensorArg logits, tokens;
    int64_t B, T, V;
};

Rows rows_of(const py::handle& logits_arg, const py::handle& tokens_arg) {
    Rows r;
    r.logits = moo::tensor_value(logits_arg, "logits", {{-1, -1, -1}}, moo::kFloats, /*optional=*/false);
    r.B = r.logits.sizes[0];
    r.T = r.logits.sizes[1];
    r.V = r.logits.sizes[2];
    if (r.V > 1 && r.logits.strides[2] != 1) throw std::invalid_argument("logits must have unit stride on V");
    r.tokens = moo::tensor_value(tokens_arg, "tokens", {{r.B, r.T}}, {moo::kInt32, moo::kInt64}, /*optional=*/false);
    return r;
}

// Writes logp, the row statistics (max of the logits, log l; [B, T, 2]) and (when given) the entropy, contiguous,
// float64 for float64 logits and float32 otherwise. Returns the flat index of the first bad token id (nothing
// written) or -1.
int64_t token_logprobs_fwd(const py::handle& logits_arg, const py::handle& tokens_arg, double temperature,
                           const py::handle& logp_arg, const py::handle& stats_arg, const py::handle& entropy_arg) {
    const Rows r = rows_of(logits_arg, tokens_arg);
    const int out_dtype = r.logits.dtype == moo::kFloat64 ? moo::kFloat64 : moo::kFloat32;
    void* logp_out = moo::output<void>(logp_arg, "logp", {{r.B, r.T}}, {out_dtype});
    void* stats_out = moo::output<void>(stats_arg, "stats", {{r.B, r.T, 2}}, {out_dtype});
    void* entropy_out = entropy_arg.is_none() ? nullptr
                                              : moo::output<void>(entropy_arg, "entropy", {{r.B, r.T}}, {out_dtype});
    Forward f;
    f.logits = r.logits;
    f.tokens = r.tokens;
    f.T = r.T;
    f.V = r.V;
    f.inv_tau = 1.0 / temperature;
    f.entropy = entropy_out != nullptr;
    const int64_t B = r.B, T = r.T, V = r.V;
    py::gil_scoped_release release;
    const int64_t bad = first_bad_token(f.tokens, B, T, V);
    if (bad >= 0) return bad;
    RowResult (*row_fn)(const Forward&, int64_t, int64_t) = forward_row_f32;
    switch (f.logits.dtype) {
        case moo::kFloat16: row_fn = forward_row_f16; break;
        case moo::kBFloat16: row_fn = forward_row_bf16; break;
        case moo::kFloat64: row_fn = forward_row_f64; break;
        default: break;
    }
    const bool out_f64 = f.logits.dtype == moo::kFloat64;
    const int64_t rows = B * T;
    const bool parallel = rows * V >= kParallelMinElements;
    (void)parallel;  // unused without OpenMP
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t i = 0; i < rows; ++i) {
        const RowResult res = row_fn(f, i / T, i % T);
        if (out_f64) {
            store_outputs<double>(res, i, logp_out, stats_out, entropy_out);
        } else {
            store_outputs<float>(res, i, logp_out, stats_out, entropy_out);
        }
    }
    return -1;
}

// Writes d (g_logp logp + g_entropy H) / d logits into out (the logits' dtype and shape, unit stride on V; it
// may be the logits themselves), from the forward's row statistics stats [B, T, 2] (max, log l). Absent
// operands (None) count as 0; entropy is needed with g_entropy. Returns the flat index of the first bad token id
// (nothing written) or -1.
int64_t token_logprobs_bwd(const py::handle& logits_arg, const py::handle& tokens_arg, const py::handle& stats_arg,
                           const py::handle& entropy_arg, const py::handle& g_logp_arg,
                           const py::handle& g_entropy_arg, const py::handle& out_arg, double temperature) {
    const Rows r = rows_of(logits_arg, tokens_arg);
    const std::vector<int64_t> bt = {r.B, r.T};
    const std::vector<int> floats = moo::kFloats;
    const TensorArg stats = moo::tensor_value(stats_arg, "stats", {{r.B, r.T, 2}}, floats, /*optional=*/false);
    const TensorArg out = moo::tensor_value(out_arg, "out", {{r.B, r.T, r.V}}, {r.logits.dtype}, /*optional=*/false);
    if (r.V > 1 && out.strides[2] != 1) throw std::invalid_argument("out must have unit stride on V");
    Backward g;
    g.logits = r.logits;
    g.tokens = r.tokens;
    // the statistics as two [B, T] operands: element 0 and element 1 of the last dimension
    g.max = stats;
    g.log_l = stats;
    g.log_l.ptr = static_cast<const char*>(stats.ptr) + (stats.dtype == moo::kFloat64 ? 8 : 4);
    g.entropy = moo::tensor_value(entropy_arg, "entropy", {bt}, floats);
    g.g_logp = moo::tensor_value(g_logp_arg, "g_logp", {bt}, floats);
    g.g_entropy = moo::tensor_value(g_entropy_arg, "g_entropy", {bt}, floats);
    if (g.g_entropy.ptr != nullptr && g.entropy.ptr == nullptr)
        throw std::invalid_argument("g_entropy needs the entropy saved by the forward");
    g.out = const_cast<void*>(out.ptr);
    g.out_sb = out.sb;
    g.out_st = out.st;
    g.V = r.V;
    g.inv_tau = 1.0 / temperature;
    const int64_t B = r.B, T = r.T, V = r.V;
    py::gil_scoped_release release;
    const int64_t bad = first_bad_token(g.tokens, B, T, V);
    if (bad >= 0) return bad;
    void (*row_fn)(const Backward&, int64_t, int64_t) = backward_row_f32;
    switch (g.logits.dtype) {
        case moo::kFloat16: row_fn = backward_row_f16; break;
        case moo::kBFloat16: row_fn = backward_row_bf16; break;
        case moo::kFloat64: row_fn = backward_row_f64; break;
        default: break;
    }
    const int64_t rows = B * T;
    const bool parallel = rows * V >= kParallelMinElements;
    (void)parallel;  // unused without OpenMP
    MOO_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t i = 0; i < rows; ++i) row_fn(g, i / T, i % T);
    return -1;
}

}  // namespace

void register_logits(py::module_& m) {
    m.def("token_logprobs_fwd", &token_logprobs_fwd,
          "Token log-probs [B, T], row statistics [B, T, 2] (max of the logits, log sum exp((z - max) / tau)) and "
          "(when entropy is given) entropy [B, T] of logits [B, T, V] at temperature tau, written contiguous. "
          "Tensors are torch tensors (None: absent), checked (csrc/args.h). Returns the flat index of the first "
          "token id outside [0, V), or -1.",
          py::arg("logits"), py::arg("tokens"), py::arg("temperature"), py::arg("logp"), py::arg("stats"),
          py::arg("entropy"));
    m.def("token_logprobs_bwd", &token_logprobs_bwd,
          "Gradient of sum(g_logp logp + g_entropy entropy) with respect to the logits, written into out (which "
          "may be the logits). Absent tensors are None. Returns the flat index of the first token id outside "
          "[0, V), or -1.",
          py::arg("logits"), py::arg("tokens"), py::arg("stats"), py::arg("entropy"), py::arg("g_logp"),
          py::arg("g_entropy"), py::arg("out"), py::arg("temperature"));
}
