"""Public function of the advantage step: validates once, canonicalises, calls the registered op."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from moo_kernels import _options as O
from moo_kernels.ops.advantages.op import AdvantagesFunction, advantages_op, problem_from_args, run


class AdvantageResult(NamedTuple):
    """Output of multi_objective_advantages.

    advantages:  [N] float32 (float64 for float64 rewards), the advantage of each sample.
    group_mask:  [G] bool, groups that were accepted (not rejected by min_feasible or drop_zero_variance).
    sample_mask: [N] bool, samples that carry signal: valid, in an accepted group, and feasible
                 (or infeasible with a non-zero infeasible_advantage).
    weights:     [G, K] the per-group weights the combination used (w~ for "variance", w otherwise).
    mean:        [G, K] per-objective group mean over the samples that take part.
    std:         [G, K] per-objective group standard deviation (the std option's estimator).
    """

    advantages: torch.Tensor
    group_mask: torch.Tensor
    sample_mask: torch.Tensor
    weights: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


_DEFAULT_WEIGHTS: dict[tuple, torch.Tensor] = {}


def _weights(weights, k: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """The [K] weight tensor and whether its values are already known to be valid.

    Weights given as numbers are cached on the device in the dtype the kernel reads (no copy per call).
    """
    if weights is None:
        key = ("uniform", k, device, dtype)
        if key not in _DEFAULT_WEIGHTS:
            _DEFAULT_WEIGHTS[key] = torch.full((k,), 1.0 / k, dtype=dtype, device=device)
        return _DEFAULT_WEIGHTS[key], True
    if isinstance(weights, torch.Tensor):
        O.check_float_tensor("weights", weights)
        O.check_same_device("weights", weights, device)
        if tuple(weights.shape) != (k,):
            raise ValueError(f"weights must have shape ({k},) (one per objective), got {tuple(weights.shape)}")
        return weights, False
    if not isinstance(weights, (torch.Tensor, str, Sequence)) and hasattr(weights, "__array__"):
        import numpy as np  # a numpy array or another array-like: numpy is there

        array = np.asarray(weights)
        if array.ndim != 1:
            raise ValueError(f"weights must be 1-D (one per objective), got shape {array.shape}")
        weights = array.tolist()
    if isinstance(weights, Sequence) and not isinstance(weights, str):
        values = tuple(weights)
        if len(values) != k:
            raise ValueError(f"weights must have {k} entries (one per objective), got {len(values)}")
        key = (values, device, dtype)
        cached = _DEFAULT_WEIGHTS.get(key)
        if cached is not None:  # validated when it was cached
            return cached, True
        for i, v in enumerate(values):
            O.check_number(f"weights[{i}]", v, low=0.0)
        if len(_DEFAULT_WEIGHTS) > 64:
            _DEFAULT_WEIGHTS.clear()
        _DEFAULT_WEIGHTS[key] = torch.tensor(values, dtype=dtype, device=device)
        return _DEFAULT_WEIGHTS[key], True
    raise TypeError(
        f"weights must be None, a sequence or 1-D array of numbers, or a tensor, got {type(weights).__name__}"
    )


def multi_objective_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    weights: torch.Tensor | Sequence[float] | None = None,
    normalize: str = "zscore",
    std: str = "unbiased",
    weighting: str = "variance",
    batch_normalize: bool = False,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
    reward_gates: torch.Tensor | None = None,
    gated_value: float = 0.0,
    gates: torch.Tensor | None = None,
    infeasible_advantage: float = 0.0,
    min_feasible: int = 0,
    drop_zero_variance: bool = False,
    positive_scale: float = 1.0,
    negative_scale: float = 1.0,
    clip: float | None = None,
    nan_policy: str = "raise",
) -> AdvantageResult:
    """Group-normalised advantages of several reward objectives, in one fused kernel.

    Args:
        rewards: [N, K] (or [N] for one objective) float16/bfloat16/float32/float64, CPU or CUDA,
            any strides.
        group_size: groups are consecutive runs of this many samples (N must be divisible by it).
        group_ids: [N] integer group id of each sample, any order, any group sizes; groups are
            numbered by sorted unique id. Exactly one of group_size / group_ids. group_ids costs a
            host synchronisation (to count groups); group_size is sync-free.
        weights: [K] non-negative objective weights (default 1/K each); a tensor may require grad.
        normalize: per-objective normalisation inside the group: "zscore" (r - mu) / (sigma + eps),
            "center" r - mu, "rloo" leave-one-out baseline n / (n - 1) (r - mu), "none" r.
        std: "unbiased" (n - 1) or "population" (n) standard deviation.
        weighting: "scalarize" (weighted sum, then normalise the sum: the TRL / verl baseline),
            "fixed" (normalise each objective, then weighted sum: GDPO), "variance" (DVAO:
            per-group weights w_k sigma_gk / sum_l w_l sigma_gl).
        batch_normalize: whiten the combined advantage over the contributing samples of the batch.
        eps: added to the standard deviation in "zscore".
        valid: [N] bool, samples that take part; others get advantage 0. In every bool input any
            nonzero byte counts as true.
        reward_gates: [N, K] bool, a false gate replaces r_jk by gated_value before any statistic
            (conditional rewards).
        gated_value: the reward of a closed reward gate.
        gates: [N] or [N, M] bool feasibility checks (rubrics as gates): a sample is feasible when all
            pass; statistics use feasible samples only and an infeasible sample gets
            infeasible_advantage.
        infeasible_advantage: advantage of a valid, infeasible sample in an accepted group.
        min_feasible: a group with fewer feasible samples is rejected whole (advantage 0).
        drop_zero_variance: reject groups whose combined reward sum_k w_k r_jk does not vary (DAPO
            dynamic sampling). "Does not vary" is an exact comparison of the combined rewards, which
            are computed by the same float64 operations (a sorted sum over the objectives) on every
            backend, so every backend rejects the same groups.
        positive_scale, negative_scale: multiply positive / negative advantages (W-REINFORCE, NSR).
        clip: bound |advantage| by this value (None: no bound).
        nan_policy: "raise" (ValueError naming the sample and objective of a non-finite reward; one
            host synchronisation) or "ignore" (a non-finite reward is left out of its objective's
            statistics and contributes 0).

    Order: gates and non-finite handling, group statistics, normalise and combine, batch_normalize,
    sign scaling, clip, infeasible samples, rejected groups and invalid samples.

    Returns:
        AdvantageResult(advantages, group_mask, sample_mask, weights, mean, std).

    Example:
        >>> r = torch.tensor([[1., 0.2], [0., 0.9], [1., 0.5], [0., 0.1]])
        >>> out = multi_objective_advantages(r, group_size=2, weights=[1.0, 0.5])
        >>> out.advantages.shape
        torch.Size([4])
    """
    O.check_float_tensor("rewards", rewards)
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(1)
        one_objective = True
    elif rewards.dim() == 2:
        one_objective = False
    else:
        raise ValueError(f"rewards must be [N] or [N, K], got shape {tuple(rewards.shape)}")
    n, k = rewards.shape
    if n == 0:
        raise ValueError("rewards is an empty batch (N = 0)")
    if k == 0:
        raise ValueError("rewards has no objective (K = 0)")
    device = rewards.device

    O.choice("normalize", normalize, O.NORMALIZE)
    O.choice("std", std, O.STD)
    O.choice("weighting", weighting, O.WEIGHTING)
    O.choice("nan_policy", nan_policy, O.NAN_POLICY)
    O.check_bool("batch_normalize", batch_normalize)
    O.check_bool("drop_zero_variance", drop_zero_variance)
    eps = O.check_number("eps", eps, low=0.0)
    gated_value = O.check_number("gated_value", gated_value)
    infeasible_advantage = O.check_number("infeasible_advantage", infeasible_advantage)
    positive_scale = O.check_number("positive_scale", positive_scale, low=0.0)
    negative_scale = O.check_number("negative_scale", negative_scale, low=0.0)
    min_feasible = O.check_int("min_feasible", min_feasible, low=0)
    if clip is not None:
        clip = O.check_number("clip", clip, low=0.0, low_inclusive=False)

    # Every backend computes in float64 and reads the weights as float64.
    w, weights_checked = _weights(weights, k, device, torch.float64)

    if valid is not None:
        valid = O.check_bool_tensor("valid", valid, (n,), device).contiguous()
    if reward_gates is not None:
        if one_objective and reward_gates.dim() == 1:
            reward_gates = reward_gates.unsqueeze(1)
        reward_gates = O.check_bool_tensor("reward_gates", reward_gates, (n, k), device)
    if gates is not None:
        O.check_tensor("gates", gates)
        if gates.dim() == 1:
            gates = gates.unsqueeze(1)
        if gates.dim() != 2 or gates.shape[0] != n or gates.shape[1] == 0:
            raise ValueError(f"gates must have shape ({n},) or ({n}, M) with M >= 1, got {tuple(gates.shape)}")
        gates = O.check_bool_tensor("gates", gates, tuple(gates.shape), device)

    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size or group_ids")
    group_index = order = offsets = None
    if group_size is not None:
        group_size = O.check_int("group_size", group_size, low=1)
        if n % group_size:
            raise ValueError(f"group_size={group_size} does not divide the batch of N={n} samples")
        num_groups, max_count = n // group_size, group_size
    else:
        O.check_tensor("group_ids", group_ids)
        if group_ids.is_meta:
            raise ValueError(
                "group_ids on the meta device: the number of groups depends on the ids' values; pass group_size "
                "to get output shapes from meta tensors"
            )
        if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
            raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
        O.check_same_device("group_ids", group_ids, device)
        if tuple(group_ids.shape) != (n,):
            raise ValueError(f"group_ids must have shape ({n},), got {tuple(group_ids.shape)}")
        _, group_index, counts = torch.unique(group_ids, sorted=True, return_inverse=True, return_counts=True)
        num_groups = counts.numel()
        order = torch.argsort(group_index, stable=True)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        max_count = n if torch.compiler.is_compiling() else int(counts.max())
        group_size = 0

    args = (
        rewards,
        w,
        group_index,
        order,
        offsets,
        valid,
        reward_gates,
        gates,
        group_size,
        num_groups,
        max_count,
        normalize,
        std,
        weighting,
        batch_normalize,
        eps,
        gated_value,
        infeasible_advantage,
        min_feasible,
        drop_zero_variance,
        positive_scale,
        negative_scale,
        clip,
        nan_policy,
        weights_checked,
    )
    if torch.compiler.is_compiling() or rewards.is_meta:  # the registered op (meta tensors: its fake)
        return AdvantageResult(*advantages_op(*args))
    if torch.is_grad_enabled() and (rewards.requires_grad or w.requires_grad):
        return AdvantageResult(*AdvantagesFunction.apply(*args))
    return AdvantageResult(*run(problem_from_args(*args)))
