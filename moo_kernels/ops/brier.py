"""The Brier calibration reward R = c - (q - c)^2 as a torch expression with its checks.

An elementwise function of two tensors needs no kernel: on the CPU the expression with its checks is faster than
the fused C++ kernel it replaced at small sizes and within noise at large ones (bench/call_overhead.py --against,
bench/results/call_overhead_against_cpu_20261130.json), runs on every device, and autograd differentiates it
(dR/dq = -2 (q - c)).
"""

from __future__ import annotations

import torch

from moo_kernels import _options as O
from moo_kernels._backend import tracing


def brier_reference(correct: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """R = c - (q - c)^2 in float64 (the tests' oracle)."""
    c = correct.to(torch.float64)
    q = confidence.to(torch.float64)
    return c - (q - c) ** 2


def brier_reward(correct: torch.Tensor, confidence: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Brier calibration reward R = c - (q - c)^2, to use as one objective among several.

    Args:
        correct: correctness c of each answer, bool (any nonzero byte is True) or integer / float holding 0 and 1,
            any shape.
        confidence: stated confidence q in [0, 1], float, the same shape and device; may require grad.
        check: raise on bad values (below). In eager mode on CUDA the check reads the answer back (one host
            synchronisation per call); under torch.compile it is an asynchronous assertion in the graph.
            check=False skips every value check, so the call is asynchronous, and a confidence outside [0, 1]
            then simply enters the formula (NaN stays NaN).

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
    if correct.dtype.is_complex:
        raise TypeError(f"correct must be bool, integer or float, got {correct.dtype}")
    q = confidence if confidence.dtype == torch.float64 else confidence.float()
    c = correct.to(q.dtype)  # a bool converts to 0 / 1 whatever byte it holds
    if check:
        q_ok = (q >= 0) & (q <= 1)
        c_ok = None if correct.dtype == torch.bool else (c == 0) | (c == 1)  # a bool is 0 or 1 already
        if tracing(q):
            torch._assert_async(q_ok.all(), "brier_reward: confidence must lie in [0, 1]")
            if c_ok is not None:
                torch._assert_async(c_ok.all(), "brier_reward: correct must hold 0 or 1")
        else:
            if c_ok is not None and not bool(c_ok.all()):
                i = int((~c_ok).flatten().nonzero()[0])
                raise ValueError(f"correct must hold 0 or 1, got {c.flatten()[i].item()} at flat index {i}")
            if not bool(q_ok.all()):
                i = int((~q_ok).flatten().nonzero()[0])
                raise ValueError(f"confidence must lie in [0, 1], got confidence[{i}] = {q.flatten()[i].item()}")
    d = q - c
    return c - d * d
