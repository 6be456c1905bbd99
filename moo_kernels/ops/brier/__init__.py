from moo_kernels.ops.brier.api import brier_reward

__all__ = ["brier_reward"]
