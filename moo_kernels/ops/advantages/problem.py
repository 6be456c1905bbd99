"""The canonical, validated form of one advantage call, shared by the three backends."""

from __future__ import annotations

from typing import NamedTuple

import torch


class AdvantageProblem(NamedTuple):
    """Fields in the order of the registered op's arguments, so that AdvantageProblem(*args) builds one."""

    rewards: torch.Tensor  # [N, K], any float dtype, any strides
    weights: torch.Tensor  # [K]
    group_index: torch.Tensor | None  # [N] int64 group of each sample (group_ids path)
    order: torch.Tensor | None  # [N] int64 sample indices sorted by group (group_ids path)
    offsets: torch.Tensor | None  # [G + 1] int64 start of each group in `order` (group_ids path)
    valid: torch.Tensor | None  # [N] bool
    reward_gates: torch.Tensor | None  # [N, K] bool
    gates: torch.Tensor | None  # [N, M] bool
    group_size: int  # > 0: contiguous groups of this size; 0: grouping by group_index
    num_groups: int
    max_count: int  # largest group
    normalize: str
    std: str
    weighting: str
    batch_normalize: bool
    eps: float
    gated_value: float
    infeasible_advantage: float
    min_feasible: int
    drop_zero_variance: bool
    positive_scale: float
    negative_scale: float
    clip: float | None
    nan_policy: str
    weights_checked: bool  # False: a weights tensor whose values the kernel must check

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.float64 if self.rewards.dtype == torch.float64 else torch.float32

    def sample_groups(self) -> torch.Tensor:
        """[N] int64 group of every sample."""
        if self.group_index is not None:
            return self.group_index
        n = self.rewards.shape[0]
        return torch.arange(n, device=self.rewards.device) // self.group_size

    def options(self) -> dict:
        return {name: getattr(self, name) for name in OPTION_NAMES}


OPTION_NAMES = (
    "normalize",
    "std",
    "weighting",
    "batch_normalize",
    "eps",
    "gated_value",
    "infeasible_advantage",
    "min_feasible",
    "drop_zero_variance",
    "positive_scale",
    "negative_scale",
    "clip",
    "nan_policy",
)


def raise_bad_values(rewards: torch.Tensor, weights: torch.Tensor, bad_reward: int, bad_weight: int) -> None:
    """Turn the first offending flat reward index / weight index found by a kernel into an error."""
    k_total = rewards.shape[1]
    if 0 <= bad_weight < weights.numel():
        raise ValueError(f"weights must be finite and >= 0, got weights[{bad_weight}] = {weights[bad_weight].item()}")
    if 0 <= bad_reward < rewards.numel():
        j, k = divmod(bad_reward, k_total)
        raise ValueError(
            f"rewards[{j}, {k}] is {rewards[j, k].item()} (sample {j}, objective {k}); "
            "pass nan_policy='ignore' to leave non-finite rewards out"
        )
