"""Public function of the Brier calibration reward."""

import torch

from moo_kernels import _options as O
from moo_kernels.ops.brier.op import brier_op


def brier_reward(correct: torch.Tensor, confidence: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Brier calibration reward R = c - (q - c)^2, to use as one objective among several.

    Args:
        correct: correctness c of each answer, bool (or integer / float holding 0 and 1), any shape.
        confidence: stated confidence q in [0, 1], float, the same shape and device; may require grad.
        check: raise on bad values (below). On CUDA the check reads a flag back from the device (one host
            synchronisation per call); check=False skips it and every other value check, so the call is
            asynchronous, and a confidence outside [0, 1] then simply enters the formula (NaN stays NaN).

    Returns:
        R with confidence's shape, float32 (float64 for float64 confidence). dR/dq = -2 (q - c).

    With check, raises ValueError naming the first confidence outside [0, 1] (or NaN), or a correctness that is
    neither 0 nor 1.

    Example:
        >>> brier_reward(torch.tensor([True, False]), torch.tensor([0.9, 0.2]))
        tensor([ 0.9900, -0.0400])
    """
    O.check_tensor("correct", correct)
    O.check_float_tensor("confidence", confidence)
    check = O.check_bool("check", check)
    if correct.shape != confidence.shape:
        raise ValueError(
            f"correct and confidence must have one shape, got {tuple(correct.shape)} and {tuple(confidence.shape)}"
        )
    if correct.device != confidence.device:
        raise ValueError(f"correct is on {correct.device} but confidence is on {confidence.device}")
    if confidence.numel() == 0:
        raise ValueError("confidence is empty")
    q = confidence if confidence.dtype == torch.float64 else confidence.float()
    if correct.dtype == torch.bool:
        c = correct.reshape(-1).to(torch.uint8)  # a converted bool is 0 / 1 whatever byte it holds
    else:
        if correct.dtype.is_complex:
            raise TypeError(f"correct must be bool, integer or float, got {correct.dtype}")
        c = correct.reshape(-1).to(q.dtype).contiguous()
        if check and not torch.compiler.is_compiling() and not correct.is_meta:
            bad = (c != 0) & (c != 1)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"correct must hold 0 or 1, got {c[i].item()} at flat index {i}")
    return brier_op(c, q.reshape(-1).contiguous(), check).view(confidence.shape)
