"""moo_kernels: fused kernels for multi-objective GRPO (advantages, policy loss)."""

from moo_kernels._backend import get_backend, set_backend, use_backend
from moo_kernels.ops.advantages import AdvantageResult, multi_objective_advantages
from moo_kernels.ops.brier import brier_reward

__version__ = "0.1.0"

__all__ = [
    "AdvantageResult",
    "brier_reward",
    "get_backend",
    "multi_objective_advantages",
    "set_backend",
    "use_backend",
]
