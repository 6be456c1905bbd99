"""The token-level policy loss from log-probs."""

from moo_kernels.ops.loss.spec import PolicyLossMetrics
from moo_kernels.ops.policy_loss.op import policy_loss

__all__ = ["PolicyLossMetrics", "policy_loss"]
