"""torch.library registration of the Brier reward: implementation, fake, autograd."""

import torch
from torch import Tensor

from moo_kernels._backend import implementation
from moo_kernels.ops.brier.reference import brier_reference


@torch.library.custom_op("moo_kernels::brier_reward", mutates_args=())
def brier_op(correct: Tensor, confidence: Tensor, check: bool) -> Tensor:
    """correct [n] uint8/float32/float64, confidence [n] float32/float64, both contiguous; check: raise on a
    confidence outside [0, 1] (on CUDA that reads a flag back: one host synchronisation)."""
    impl = implementation(confidence.device)
    if impl == "reference":
        bad_mask = ~((confidence >= 0) & (confidence <= 1))
        bad = int(bad_mask.nonzero()[0]) if check and bool(bad_mask.any()) else -1
        out = brier_reference(correct, confidence).to(confidence.dtype)
    elif impl == "triton":
        from moo_kernels.ops.brier.cuda import brier_triton

        out, bad = brier_triton(correct, confidence, check)
    else:
        from moo_kernels.ops.brier.cpu import brier_cpp

        out, bad = brier_cpp(correct, confidence)
    if check and bad >= 0:
        raise ValueError(f"confidence must lie in [0, 1], got confidence[{bad}] = {confidence[bad].item()}")
    return out


@brier_op.register_fake
def _(correct, confidence, check):
    return torch.empty_like(confidence)


def _setup_context(ctx, inputs, output):
    correct, confidence, _ = inputs
    ctx.save_for_backward(correct, confidence)


def _backward(ctx, grad):
    correct, confidence = ctx.saved_tensors
    return None, -2.0 * (confidence - correct.to(confidence.dtype)) * grad, None


brier_op.register_autograd(_backward, setup_context=_setup_context)
