"""moo_kernels: fused kernels for multi-objective GRPO (advantages, policy loss)."""

from moo_kernels._backend import get_backend, set_backend, use_backend
from moo_kernels.ops.advantages import AdvantageResult, multi_objective_advantages

__version__ = "0.1.0"

__all__ = [
    "AdvantageResult",
    "get_backend",
    "multi_objective_advantages",
    "set_backend",
    "use_backend",
]
