"""C++ launcher of the Brier reward."""

import torch

from moo_kernels._backend import cpp


def brier_cpp(correct: torch.Tensor, confidence: torch.Tensor) -> tuple[torch.Tensor, int]:
    """correct [n] uint8/float, confidence [n] float32/float64 contiguous -> (reward, first bad index)."""
    out = torch.empty_like(confidence)
    c_code = {torch.uint8: 0, torch.float32: 1, torch.float64: 2}[correct.dtype]
    bad = cpp().brier_forward(
        correct.data_ptr(),
        c_code,
        confidence.data_ptr(),
        confidence.dtype == torch.float64,
        out.data_ptr(),
        confidence.numel(),
    )
    return out, bad
