"""moo_kernels: fused kernels for multi-objective GRPO (advantages, policy loss)."""

from moo_kernels._backend import get_backend, set_backend, use_backend
from moo_kernels.ops.advantages import AdvantageResult, multi_objective_advantages
from moo_kernels.ops.brier import brier_reward
from moo_kernels.ops.policy_loss import PolicyLossMetrics, policy_loss

__version__ = "0.1.0"

__all__ = [
    "AdvantageResult",
    "brier_reward",
    "PolicyLossMetrics",
    "get_backend",
    "multi_objective_advantages",
    "policy_loss",
    "set_backend",
    "use_backend",
]
