from moo_kernels.ops.rollout.op import rollout_correction
from moo_kernels.ops.rollout.spec import RolloutCorrection, RolloutMetrics

__all__ = ["RolloutCorrection", "RolloutMetrics", "rollout_correction"]
