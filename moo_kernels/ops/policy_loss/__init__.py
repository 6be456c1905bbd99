from moo_kernels.ops.policy_loss.api import PolicyLossMetrics, policy_loss

__all__ = ["PolicyLossMetrics", "policy_loss"]
