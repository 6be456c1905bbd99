// Every code the C++ kernels share with the Python side: mirrors moo_kernels/_codes.py (the one place they are
// declared; python_tests/test_codes.py checks that the two agree). The kernels receive options as these integers.

#pragma once

#include <cstdint>

namespace moo {

// ---- options of the advantage op
enum Normalize { kZScore = 0, kCenter = 1, kRloo = 2, kNoNormalize = 3 };
enum Std { kPopulation = 0, kUnbiased = 1 };
enum Weighting { kScalarize = 0, kFixed = 1, kVariance = 2 };
enum NanPolicy { kIgnoreNan = 0, kRaiseNan = 1 };
// what the kernels apply to each column (the normalize codes, then the estimators' own), and the batch-wide step
enum Column {
    kColZScore = 0,
    kColCenter = 1,
    kColRloo = 2,
    kColNone = 3,
    kColPassk = 4,
    kColPasskUnscaled = 5,
    kColOpo = 6,
    kColLooStd = 7
};
enum Batch { kBatchNone = 0, kBatchWhiten = 1, kBatchScale = 2, kBatchGpg = 3 };

// ---- options of rollout_correction (its "mode" strings are disjoint from the loss's: one Python table serves both)
enum IsLevel { kIsToken = 0, kIsSequence = 1 };
enum IsMode { kIsTruncate = 0, kIsMask = 1 };

// ---- options of the policy loss
enum Mode { kClip = 0, kGspo = 1, kCispo = 2, kReinforce = 3, kSapo = 4, kGmpo = 5, kVespo = 6 };
enum Agg { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3, kTokenSum = 4 };
enum Kl { kK1 = 1, kK2 = 2, kK3 = 3, kAbs = 4, kLowVarKl = 5, kK1St = 6, kK3St = 7, kLowVarKlSt = 8, kAbsSt = 9 };

// ---- tensors: dtype codes
enum DType { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3, kBool = 4, kInt32 = 5, kInt64 = 6, kUInt8 = 7 };

// ---- errors reported through a status word
constexpr int64_t kNoError = int64_t(1) << 62;

// ---- constants of the formulas
constexpr double kLogRatioMax = 20.0;

// ---- the loss's metrics, in the order of the metrics tensor
enum Metric {
    kPgLoss = 0,
    kKlMean = 1,
    kClipFrac = 2,
    kClipFracLow = 3,
    kClipFracHigh = 4,
    kDualClipFrac = 5,
    kRatioMean = 6,
    kRatioMin = 7,
    kRatioMax = 8,
    kPpoKl = 9,
    kActiveTokens = 10,
    kMaskedFrac = 11,
    kNumMetrics = 12
};

// ---- rollout_correction's metrics, in the order of its metrics tensor (a namespace of their own: some names are
// the loss's too)
namespace rollout {
enum RolloutMetric {
    kWeightMean = 0,
    kWeightMax = 1,
    kWeightMin = 2,
    kEss = 3,
    kTruncatedFrac = 4,
    kMaskedFrac = 5,
    kBatchNormFactor = 6,
    kRejectedTokenFrac = 7,
    kRejectedSeqFrac = 8,
    kKlK1 = 9,
    kKlK3 = 10,
    kActiveTokens = 11,
    kNumMetrics = 12
};
}  // namespace rollout

}  // namespace moo
