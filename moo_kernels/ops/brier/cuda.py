"""Triton launcher of the Brier reward."""

import torch
import triton

from moo_kernels.ops.brier import triton_kernels as tk

BLOCK = 1024
NO_ERROR = 2**62


def brier_triton(correct: torch.Tensor, confidence: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, int]:
    """correct [n] uint8/float, confidence [n] float32/float64 contiguous -> (reward, first bad index, or -1;
    always -1 without check, which then reads nothing back: no host synchronisation)."""
    out = torch.empty_like(confidence)
    status = torch.full((1,), NO_ERROR, dtype=torch.int64, device=confidence.device)
    n = confidence.numel()
    tk._brier_fwd_kernel[(triton.cdiv(n, BLOCK),)](correct, confidence, out, status, n, BLOCK=BLOCK, num_warps=4)
    if not check:
        return out, -1
    bad = int(status.item())
    return out, -1 if bad == NO_ERROR else bad
