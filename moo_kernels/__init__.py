"""moo_kernels: fused kernels for multi-objective GRPO (advantages, policy loss, logits)."""

from moo_kernels._backend import get_backend, set_backend, use_backend
from moo_kernels.ops.advantages import AdvantageResult, multi_objective_advantages
from moo_kernels.ops.brier import brier_reward
from moo_kernels.ops.hidden import policy_loss_from_hidden, token_logprobs_from_hidden
from moo_kernels.ops.logits import policy_loss_from_logits, token_logprobs
from moo_kernels.ops.policy_loss import PolicyLossMetrics, policy_loss
from moo_kernels.ops.rollout import RolloutCorrection, RolloutMetrics, rollout_correction

__version__ = "0.5.0"


def __getattr__(name: str):
    # moo_kernels.distributed (torch.distributed helpers) is imported on first use only.
    if name == "distributed":
        import importlib

        return importlib.import_module("moo_kernels.distributed")
    raise AttributeError(f"module 'moo_kernels' has no attribute {name!r}")


__all__ = [
    "AdvantageResult",
    "brier_reward",
    "PolicyLossMetrics",
    "get_backend",
    "multi_objective_advantages",
    "policy_loss",
    "policy_loss_from_hidden",
    "policy_loss_from_logits",
    "RolloutCorrection",
    "RolloutMetrics",
    "rollout_correction",
    "set_backend",
    "token_logprobs",
    "token_logprobs_from_hidden",
    "use_backend",
]
