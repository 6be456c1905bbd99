"""Every code the Python side shares with the kernels, in one place: option strings and the integers the
kernels receive for them, dtype codes, the error-status sentinel, constants of the formulas, and the layout
of the loss metrics. csrc/codes.h mirrors it for the C++ kernels (python_tests/test_codes.py checks that the
two agree); the Triton kernels import it.
"""

from __future__ import annotations

import torch

# ---- options of the advantage op ------------------------------------------------------------------------
NORMALIZE = {"zscore": 0, "center": 1, "rloo": 2, "none": 3}
STD = {"population": 0, "unbiased": 1}
WEIGHTING = {"scalarize": 0, "fixed": 1, "variance": 2}
NAN_POLICY = {"ignore": 0, "raise": 1}
# The advantage estimators by verl's names, and TRL's scale_rewards (Python-side options: they resolve to the two
# codes below, which the kernels receive; see moo_kernels/ops/advantages/spec.py).
ESTIMATOR = {"grpo": 0, "dr_grpo": 1, "rloo": 2, "grpo_passk": 3, "opo": 4, "gpg": 5,
             "reinforce_plus_plus_baseline": 6, "loo_std": 7}  # fmt: skip
SCALE = {"group": 0, "batch": 1, "none": 2}
# What the kernels apply to each column (an objective, or the combined reward under "scalarize"): the normalize
# options first (same codes), then the estimators' own; and the batch-wide step after the combination.
COLUMN = {**NORMALIZE, "passk": 4, "passk_unscaled": 5, "opo": 6, "loo_std": 7}
BATCH = {"none": 0, "whiten": 1, "scale": 2, "gpg": 3}

# ---- options of rollout_correction ------------------------------------------------------------------------
IS_LEVEL = {"token": 0, "sequence": 1}
IS_MODE = {"truncate": 0, "mask": 1}
ROLLOUT_METRICS = ("weight_mean", "weight_max", "weight_min", "ess", "truncated_frac", "masked_frac",
                   "batch_norm_factor", "rejected_token_frac", "rejected_seq_frac", "kl_k1", "kl_k3",
                   "active_tokens")  # fmt: skip

# ---- options of the policy loss -------------------------------------------------------------------------
MODE = {"clip": 0, "gspo": 1, "cispo": 2, "reinforce": 3, "sapo": 4, "gmpo": 5, "vespo": 6}
AGG = {
    "token-mean": 0,
    "seq-mean-token-mean": 1,
    "seq-mean-token-sum": 2,
    "seq-mean-token-sum-norm": 3,
    "token-sum": 4,
}
# KL estimators of u = logp - ref (verl's kl_penalty names): "abs" |u|, "low_var_kl" k3 clamped to at most 10; a "+"
# form has the value of the estimator it names and the gradient of k2 (straight-through)
KL = {"k1": 1, "k2": 2, "k3": 3, "abs": 4, "low_var_kl": 5, "k1+": 6, "k3+": 7, "low_var_kl+": 8, "abs+": 9}

# the aggregation of the entropy bonus: "mean" over the tokens of the policy term (TRL), "loss" as the loss (verl)
ENTROPY_AGG = {"mean": 0, "loss": 1}

# every string option by its name in the specs (the C++ kernels read a spec's string options through this). Two
# specs name an option "mode" (the loss's and rollout_correction's): their strings differ, so one table serves both.
assert not set(MODE) & set(IS_MODE)
OPTIONS = {"normalize": NORMALIZE, "std": STD, "weighting": WEIGHTING, "nan_policy": NAN_POLICY,
           "mode": {**MODE, **IS_MODE}, "agg": AGG, "kl": KL, "estimator": ESTIMATOR, "scale": SCALE,
           "column": COLUMN, "batch": BATCH, "level": IS_LEVEL, "entropy_agg": ENTROPY_AGG}  # fmt: skip

# ---- tensors as the C++ kernels see them -----------------------------------------------------------------
DTYPE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3, torch.bool: 4, torch.int32: 5,
         torch.int64: 6, torch.uint8: 7}  # fmt: skip

# ---- errors the kernels report through a status word -----------------------------------------------------
NO_ERROR = 2**62  # "nothing found" in the status words that keep the smallest offending index (atomic min)

# ---- constants of the formulas -----------------------------------------------------------------------------
LOG_RATIO_MAX = 20.0  # log-ratios (and the k3 argument) are clamped to [-LOG_RATIO_MAX, LOG_RATIO_MAX]

# ---- the loss's metrics, in the order of the metrics tensor the ops return -----------------------------------
METRICS = (
    "pg_loss",
    "kl_mean",
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "dual_clip_frac",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "ppo_kl",
    "active_tokens",
    "masked_frac",
)


def out_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """The floating dtype of every op's outputs: float64 for float64 inputs, float32 for everything else."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32
