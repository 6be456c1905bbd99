"""Triton launcher of the policy loss from log-probs (CUDA tensors; CPU tensors under TRITON_INTERPRET=1):
row statistics, the fused forward, the reduction. Returns (loss, metrics [len(METRICS)], grad): grad is d loss / d logp
for an incoming gradient of 1, in logp's dtype (None when no gradient is needed)."""

from __future__ import annotations

import torch
import triton

from moo_kernels._spec import strides2
from moo_kernels.ops.loss.spec import LossSpec
from moo_kernels.ops.loss.triton_launch import partials, reduce, row_statistics
from moo_kernels.ops.policy_loss.triton_kernels import policy_loss_fwd_kernel

BLOCK_T = 512  # tokens per program of the main kernel
FWD_WARPS = 8  # 2 tokens per thread: every option on stays within registers (checked ahead of time)


def policy_loss_triton(logp: torch.Tensor, spec: LossSpec, write_grad: bool):
    B, T = logp.shape
    stats, totals = row_statistics(spec, logp, B, T)
    grid_t = triton.cdiv(T, BLOCK_T)
    parts = partials(B * grid_t, logp.device)
    grad = torch.empty_like(logp) if write_grad else None
    k = policy_loss_fwd_kernel
    k[(B, grid_t)](**spec.kernel_kwargs(
        k, logp=logp, logp_strides=strides2(logp), grad=grad, grad_strides=strides2(grad), stats=stats,
        totals=totals, parts=parts, T=T, BLOCK_T=BLOCK_T, num_warps=FWD_WARPS,
    ))  # fmt: skip
    loss, metrics = reduce(parts, totals, logp)
    return loss, metrics, grad
