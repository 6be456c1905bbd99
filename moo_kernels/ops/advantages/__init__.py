"""The multi-objective advantage step."""

from moo_kernels.ops.advantages.op import AdvantageResult, multi_objective_advantages

__all__ = ["AdvantageResult", "multi_objective_advantages"]
