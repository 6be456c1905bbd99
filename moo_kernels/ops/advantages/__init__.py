from moo_kernels.ops.advantages.api import AdvantageResult, multi_objective_advantages

__all__ = ["AdvantageResult", "multi_objective_advantages"]
